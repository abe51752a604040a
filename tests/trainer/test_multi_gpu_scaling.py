"""benchmarks/multi_gpu_scaling.py stays working: its CPU dry run (tiny random model, 2 gloo processes) measures
samples/s per process count, each rank's all-reduce and idle time and caching, and the speed-up over one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scaling_dry_run_on_cpu(tmp_path):
    out = tmp_path / "scaling.json"
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu_scaling.py"), "--device", "cpu",
                        "--tiny", "--precision", "fp32", "--work", str(tmp_path / "work"), "--pairs", "8", "--size",
                        "64", "--steps", "4", "--processes", "1", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert one["samples_per_step"] == 1 and two["samples_per_step"] == 2  # per-device batches by default
    assert one["samples_per_s"] > 0 and two["samples_per_s"] > 0 and one["per_rank"] == []
    assert len(two["per_rank"]) == 2 and all("allreduce_s" in x and "idle_s" in x for x in two["per_rank"])
    # each run cached for itself, the 2-process one split across its ranks
    assert sum(1 for x in two["per_rank"] if x.get("latent cache", 0) > 0) == 2
    assert any("batch: 1 per process x 2 processes" in s for s in two["stages"])
    assert "x one process" in r.stdout and out.with_suffix(".log").is_file()
