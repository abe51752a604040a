"""benchmarks/t5_bias_check.py on the tiny model (CPU): the patched and stock T5 agree to the last bit when the same
kernel runs, and the report says so (the GPU run of the same script is the proof for the fused kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_t5_bias_check_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "t5.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "t5_bias_check.py"), "--model", str(tiny_model),
                        "--device", "cpu", "--batch", "2", "--batches", "1", "--fp32-reference", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["identical_with_the_same_kernel"] and data["same_kernel"]["max_abs"] == 0.0
    assert data["default_kernels"]["max_abs"] == 0.0  # the CPU runs one kernel either way
    assert data["default_kernels"]["cosine"] > 0.999999
    assert data["captions_per_s_stock"] > 0 and data["captions_per_s_patched"] > 0
    assert "identical" in r.stdout
    stock, patched = data["against_fp32"]["stock_bf16"], data["against_fp32"]["patched_bf16"]
    assert stock == patched  # on the CPU both bf16 runs take the same kernel: the same distance from float32
    assert 0 < stock["rms_err"] < 0.1 * stock["rms_ref"] and stock["cosine"] > 0.99
