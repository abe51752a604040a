"""benchmarks/gpu_e2e.py stays working: its CPU dry run passes its own checks (the two-process check is covered by
tests/trainer/test_distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


def test_gpu_e2e_dry_run_on_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    r = _run("gpu_e2e.py", "--device", "cpu", "--steps", "16", "--samples", "4", "--size", "64", "--work",
             str(tmp_path / "work"), "--only", "bf16", "bf16-eager-unfused", "int8-quanto", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"bf16", "bf16-eager-unfused", "int8-quanto"}
    assert all(all(run["checks"].values()) for run in report["runs"].values())
    assert any("fused q/k/v projections in 2 of 2" in s for s in report["runs"]["bf16"]["stages"])
    assert report["compare"]["ok"] and report["compare"]["first_loss_rel_diff"] < 1e-2
