"""benchmarks/full_run.py stays working: its CPU dry run (the tiny random model) builds the model, the multi-bucket
dataset and its manifest, runs `kontext-train` as a user does for two card settings, and reports the phase table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_full_run_dry_run_on_cpu(tmp_path):
    out = tmp_path / "full.json"
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_run.py"), "--device", "cpu", "--tiny",
                        "--work", str(tmp_path / "work"), "--pairs", "8", "--size", "64", "--aspects", "3",
                        "--steps", "4", "--validation-steps", "2", "--checkpointing-steps", "2",
                        "--cards", "0:fp32", "8:fp32", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"0GB-fp32", "8GB-fp32"}
    for run in report["runs"].values():
        t = run["timings"]
        assert run["exit_code"] == 0 and t["steps"] == 4 and t["validation_count"] == 2
        assert t["text cache_per_s"] > 0 and t["latent cache_per_s"] > 0 and t["steady_s_per_step"] > 0
        assert run["host_peak_rss_gib"] > 0 and run["projection"]["steps"] == 1000
        assert any("3 bucket(s)" in s for s in run["stages"])
    assert report["runs"]["8GB-fp32"]["memory_limit_gib"] == 8 - 0.8
    assert "steady s/step" in r.stdout and "goals:" in r.stdout
    assert out.with_suffix(".log").is_file()
