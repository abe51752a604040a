"""benchmarks/bench_cache.py stays working: its tiny CPU mode times both caches (and a VAE speedup set) and fills
every figure the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cache_tiny_cpu(tmp_path):
    out = tmp_path / "cache.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cache.py"), "--tiny", "--device", "cpu",
                        "--captions", "4", "--images", "3", "--size", "64", "--vae-speedups", "none",
                        "channels_last", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    text, latents = data["text"], data["latents"]
    assert text["t5_alone_per_s"] > 0
    assert text["cache_first"]["items"] == text["cache_second"]["items"] == 4
    assert set(latents["cache"]) == {"none", "channels_last"}
    assert all(v["items"] == 3 and v["per_s"] > 0 for v in latents["cache"].values())
    assert "captions/s" in r.stdout and "images/s" in r.stdout
