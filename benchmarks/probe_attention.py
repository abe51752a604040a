#!/usr/bin/env python
"""Attention kernels at Kontext's shapes: one SDPA forward + backward (24 heads of 128, bf16, batch 1) at 8,704 tokens
(1024 px: 4,096 target + 4,096 reference + 512 text) and 2,560 (512 px), for each backend kontext-train can select:
cudnn (with the contiguous gradient kontext-train gives it), flash (PyTorch's FA2 kernels) and fa4 (FlashAttention 4,
kontext_trainer.fa4, when flash-attn-4 is installed). Prints ms and TFLOP/s per pass, and the
outputs' and gradients' agreement with a float32 reference on a few heads. CUDA only.

    python benchmarks/probe_attention.py            # -> $OUT/attention.json (default /tmp)
    python benchmarks/probe_attention.py --tokens 3072 4096 6144 8704 --no-agreement   # where FA4 starts to pay
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_smoke import machine_info  # noqa: E402
from kontext_trainer import fa4  # noqa: E402
from kontext_trainer.attention import attention_context  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
HEADS, DIM = 24, 128
CHECK_HEADS = 2  # heads compared against the float32 reference (its score matrix is N^2 floats per head)


def flops(n: int) -> tuple[float, float]:
    """Forward and backward FLOP of non-causal attention over n tokens (2 matmuls forward, 5 backward)."""
    fwd = 4.0 * n * n * DIM * HEADS
    return fwd, 2.5 * fwd


def inputs(n: int, seed: int = 0):
    """q, k, v and the output's gradient in the layout diffusers hands SDPA: (B, N, H, D) memory seen as (B, H, N, D)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad = (torch.randn(1, n, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                     for _ in range(4))
    return q, k, v, grad


def run_once(backend: str, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with attention_context(backend, "cuda"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def timing(backend: str, n: int, reps: int = 20) -> dict:
    q, k, v, grad = inputs(n)
    for _ in range(3):
        run_once(backend, q, k, v, grad)
    fwd_ms, both_ms = [], []
    for _ in range(reps):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        with attention_context(backend, "cuda"):
            e0.record()
            out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
            e1.record()
            out.backward(grad)
            e2.record()
        torch.cuda.synchronize()
        fwd_ms.append(e0.elapsed_time(e1))
        both_ms.append(e0.elapsed_time(e2))
    f, b = flops(n)
    fwd, total = statistics.median(fwd_ms), statistics.median(both_ms)
    bwd = total - fwd
    return {"backend": backend, "tokens": n, "fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3),
            "fwd_bwd_ms": round(total, 3), "fwd_tflops": round(f / fwd / 1e9, 1), "bwd_tflops": round(b / bwd / 1e9, 1),
            "fwd_bwd_tflops": round((f + b) / total / 1e9, 1)}


def agreement(backend: str, n: int) -> dict:
    """Output and q/k/v gradients on CHECK_HEADS heads against float32 math attention: max abs error and cosine."""
    q, k, v, grad = inputs(n, seed=1)
    q, k, v, grad = (t[:, :CHECK_HEADS] for t in (q, k, v, grad))
    got = run_once(backend, q, k, v, grad)
    ref = run_once("math", q.float(), k.float(), v.float(), grad.float())
    row = {"backend": backend, "tokens": n}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        a, b = a.float().flatten(), b.float().flatten()
        row[f"{name}_max_abs"] = float((a - b).abs().max())
        row[f"{name}_cos"] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8704, 2560])
    ap.add_argument("--no-agreement", action="store_true", help="timings only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    result = {"machine": machine_info(torch.device("cuda")), "rows": [], "agreement": [], "notes": []}
    print(json.dumps(result["machine"]), flush=True)
    backends = ["cudnn", "flash"]
    problem = fa4.usable("cuda")
    if problem:
        result["notes"].append(f"fa4 skipped: {problem}")
        print(f"fa4 skipped: {problem}", flush=True)
    else:
        backends.append("fa4")
    for backend in backends:
        for n in args.tokens:
            t = time.perf_counter()
            try:
                row = timing(backend, n)
                row["first_s"] = round(time.perf_counter() - t, 1)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                if not args.no_agreement:
                    agr = agreement(backend, n)
                    result["agreement"].append(agr)
                    print(json.dumps(agr), flush=True)
            except Exception as exc:  # a missing kernel or a failure is a result too
                row = {"backend": backend, "tokens": n, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        (OUT / "attention.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
