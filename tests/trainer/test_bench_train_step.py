"""benchmarks/bench_train_step.py stays importable and working: its tiny CPU mode runs every row kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_step_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--tiny", "--device", "cpu",
                        "--resolutions", "32", "--steps", "1", "--warmup", "1", "--no-compile", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    names = [row["name"] for row in data["rows"]]
    assert any(n.startswith("baseline") for n in names) and any(n.startswith("ours int8") for n in names)
    assert all(row.get("finite", True) for row in data["rows"]) and not any("error" in row for row in data["rows"])
    assert "summary" in r.stdout
