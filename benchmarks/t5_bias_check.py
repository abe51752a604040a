#!/usr/bin/env python
"""Is T5's contiguous position bias (kontext_trainer.encode.patch_t5_position_bias, on by default in the text cache)
safe and worth it on this GPU? The T5 encoder of a model folder, without and with the patch:

- the same SDPA kernel forced for both (PyTorch's math kernel): the outputs must be identical, to the last bit;
- each as it runs by default (unpatched: the math kernel, since transformers hands SDPA a bias it refuses for the
  fused kernels; patched: a fused kernel): the largest |difference|, relative to the largest output, and the cosine;
- captions/s of each at the cache's batch size (512 tokens per caption, as the cache encodes them);
- with --fp32-reference: both against the same encoder in float32 (math kernel, no TF32): which of the two bf16
  runs is closer to exact (RMS and largest error, cosine). The two bf16 runs differ by bf16 rounding through 24
  layers; this says whether the patched one is any less accurate than stock.

Results (with the machine) are printed and written as JSON to benchmarks/results/t5_bias_check-<gpu>-<date>.json.

GPU (the full-size random model benchmarks/full_run.py builds):
  python benchmarks/t5_bias_check.py --model /tmp/kontext-full-run/kontext-random-full
CPU (the tiny model; what tests/trainer/test_t5_bias_check.py runs):
  python benchmarks/t5_bias_check.py --model DIR --device cpu --batches 1 --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_smoke import machine_info, no_cuda  # noqa: E402
from machine import results_file  # noqa: E402

# Captions of the lengths edit datasets have (a word to two sentences); the cache pads each to 512 tokens.
CAPTIONS = [
    "make it red",
    "Replace the cloudy sky with a clear sunset and add warm light on the building's facade.",
    "remove the person on the left, keep the shadows",
    "change the text on the sign to 'OPEN 24/7' and make the letters neon blue",
    "turn the photo into a watercolor painting",
    "add snow on the roofs and the street; keep the cars",
    "",
    "restore the old photograph: remove scratches and dust, fix the faded colors",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def items_per_s(fn, items: int, device: torch.device, calls: int) -> float:
    """`items` per second of fn(): the median over `calls` timed calls, after one warm-up call."""
    times = []
    for _ in range(calls + 1):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return items / statistics.median(times[1:])


def captions_per_s(t5, ids: torch.Tensor, device: torch.device, batches: int) -> float:
    """The encoder's rate on `ids` (median over `batches` timed calls, after one warm-up call)."""
    with torch.no_grad():
        return items_per_s(lambda: t5(ids, output_hidden_states=False), ids.shape[0], device, batches)


def against_fp32(model: Path, ids: torch.Tensor, device: torch.device) -> dict:
    """The encoder's output in bf16 without and with the patch (default kernels), each against the same encoder
    in float32 with PyTorch's math attention and without TF32 matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kontext_trainer.encode import patch_t5_position_bias, unpatch_t5_position_bias
    from kontext_trainer.model import load_text_encoders

    t5 = load_text_encoders(model, torch.float32, device).text_encoder_2
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref = t5(ids, output_hidden_states=False)[0].float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    t5.to(torch.bfloat16)
    out = {}
    with torch.no_grad():
        for name, patch in (("stock_bf16", False), ("patched_bf16", True)):
            (patch_t5_position_bias if patch else unpatch_t5_position_bias)(t5)
            x = t5(ids, output_hidden_states=False)[0].float()
            d = x - ref
            out[name] = {"max_abs_err": float(d.abs().max()), "rms_err": float(d.pow(2).mean().sqrt()),
                         "rms_ref": float(ref.pow(2).mean().sqrt()),
                         "cosine": float(torch.nn.functional.cosine_similarity(x.flatten(), ref.flatten(), dim=0))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model folder (text_encoder_2/, tokenizer_2/)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="captions per call (default: the text cache's)")
    ap.add_argument("--batches", type=int, default=5, help="timed calls per variant")
    ap.add_argument("--fp32-reference", action="store_true", help="also compare both with a float32 run")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/...)")
    args = ap.parse_args()

    from kontext_trainer.cache import auto_cache_batch_size
    from kontext_trainer.encode import compare_t5_bias_patch, patch_t5_position_bias, unpatch_t5_position_bias
    from kontext_trainer.model import load_text_encoders

    device = torch.device(args.device)
    if no_cuda(device, "use --device cpu"):
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = machine_info(device)
    enc = load_text_encoders(args.model, dtype, device)
    t5, tok = enc.text_encoder_2, enc.tokenizer_2
    batch = args.batch or auto_cache_batch_size(device, "text")
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    result = {"machine": info, "model": str(args.model), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
              "same_kernel": compare_t5_bias_patch(t5, tok, device, captions, force_math=True),
              "default_kernels": compare_t5_bias_patch(t5, tok, device, captions)}
    ids = tok(captions, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids.to(device)
    unpatch_t5_position_bias(t5)
    result["captions_per_s_stock"] = round(captions_per_s(t5, ids, device, args.batches), 2)
    patch_t5_position_bias(t5)
    result["captions_per_s_patched"] = round(captions_per_s(t5, ids, device, args.batches), 2)
    result["speedup"] = round(result["captions_per_s_patched"] / result["captions_per_s_stock"], 3)
    result["identical_with_the_same_kernel"] = result["same_kernel"]["max_abs"] == 0.0
    if args.fp32_reference:
        del enc, t5
        result["against_fp32"] = against_fp32(args.model, ids, device)

    same, default = result["same_kernel"], result["default_kernels"]
    print(f"{info.get('gpu', 'cpu')}, T5 encoder of {args.model}, {result['dtype']}, batch {batch} x 512 tokens")
    print(f"  same kernel (math) both ways: max |diff| {same['max_abs']:.3g} -> "
          f"{'identical' if result['identical_with_the_same_kernel'] else 'DIFFERENT'}")
    print(f"  default kernels: max |diff| {default['max_abs']:.3g} of max |output| {default['max_value']:.3g} "
          f"(relative {default['max_rel']:.2e}), cosine {default['cosine']:.7f}")
    print(f"  captions/s: stock {result['captions_per_s_stock']}, contiguous bias {result['captions_per_s_patched']} "
          f"({result['speedup']}x)")
    for name, err in result.get("against_fp32", {}).items():
        print(f"  {name} against float32: RMS error {err['rms_err']:.6f}, largest {err['max_abs_err']:.3g}, "
              f"cosine {err['cosine']:.7f}")
    out = args.out or results_file("t5_bias_check", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result["identical_with_the_same_kernel"] else 1


if __name__ == "__main__":
    sys.exit(main())
