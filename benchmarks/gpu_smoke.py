#!/usr/bin/env python
"""GPU smoke test of the Kontext LoRA training step on the full-size FLUX.1 Kontext architecture.

Builds FluxTransformer2DModel with the real configuration (19 double + 38 single blocks, 24 heads x 128, joint
dim 4096, pooled 768, rope (16, 56, 56), guidance embedding) with RANDOM bf16 weights directly on the GPU (no
download), attaches the trainer's LoRA (adapters.attach_lora, preset `attention`, rank 16), enables gradient
checkpointing and runs a few optimizer steps through `kontext_trainer.flow.kontext_step` -- the function the
trainer calls -- at 1024 px and 512 px (target + one reference: 8,704 / 2,560 tokens with 512 T5 tokens).

It repeats one fixed batch with fixed noise and sigma, so a working step must make the loss fall. Printed per
resolution: s/step (after one warm-up step), peak GPU memory, the losses (finite?), and as the baseline measured
in the same run, one forward-only (inference) pass of the same model at the same resolution.

Example (GPU):   python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json
Dry run (CPU):   python benchmarks/gpu_smoke.py --tiny --device cpu --resolutions 64 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kontext_trainer import adapters  # noqa: E402
from machine import cpu_model  # noqa: E402
from kontext_trainer.flow import KontextBatch, kontext_step  # noqa: E402

FULL = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def no_cuda(device: torch.device, hint: str) -> bool:
    """True, said on stderr with the script's `hint` for a CPU run, when `device` is CUDA and this machine has none
    (the caller then exits with 2)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: {hint}", file=sys.stderr)
        return True
    return False


def machine_info(device: torch.device) -> dict:
    import diffusers
    import peft

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "cpu": cpu_model(), "cores": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"))
    return info


def build_transformer(arch: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = FluxTransformer2DModel(**arch)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def make_batch(arch: dict, res: int, device, dtype, seed: int = 0) -> KontextBatch:
    g = torch.Generator().manual_seed(seed)
    c = arch["in_channels"] // 4
    h = w = res // 8
    text_len = 512 if arch is FULL else 32
    return KontextBatch(
        target=torch.randn(1, c, h, w, generator=g), references=[torch.randn(1, c, h, w, generator=g)],
        prompt_embeds=torch.randn(1, text_len, arch["joint_attention_dim"], generator=g),
        pooled=torch.randn(1, arch["pooled_projection_dim"], generator=g),
    ).to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_resolution(model, params, arch, res, steps, device, dtype, backend, lr) -> dict:
    batch = make_batch(arch, res, device, dtype)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # baseline: one forward-only pass (inference cost) at the same size, after a warm-up
    model.eval()
    fwd_times = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            kontext_step(model, batch, torch.Generator().manual_seed(0), attention_backend=backend, backward=False)
        sync(device)
        fwd_times.append(time.perf_counter() - t0)
    model.train()
    losses, times = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = kontext_step(model, batch, torch.Generator().manual_seed(0), attention_backend=backend)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"  {res}px step {len(losses)}: loss {loss:.5f}  {times[-1]:.3f} s", flush=True)
    # the loss of the weights after the last update
    with torch.no_grad():
        final = kontext_step(model, batch, torch.Generator().manual_seed(0), attention_backend=backend, backward=False)
    timed = times[1:] or times
    tokens = 2 * (res // 16) ** 2 + batch.prompt_embeds.shape[1]
    out = {
        "resolution": res, "tokens": tokens, "steps": steps, "losses": losses, "loss_after_last_update": final,
        "all_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses + [final])),
        "decreased": final < losses[0], "s_per_step": sum(timed) / len(timed), "first_step_s": times[0],
        "baseline_forward_only_s": fwd_times[-1],
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (CPU dry run of this script)")
    ap.add_argument("--attention-backend", default="auto", help="auto | flash | efficient | math | cudnn | default")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if no_cuda(device, "use --tiny --device cpu for a dry run"):
        return 2
    dtype = torch.bfloat16
    arch = TINY if args.tiny else FULL
    info = machine_info(device)
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    model = build_transformer(arch, device, dtype)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    adapters.attach_lora(model, rank=args.rank, alpha=None, dropout=0.0, targets="attention")
    if not args.no_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = adapters.trainable_parameters(model)
    print(f"built {n_params / 1e9:.2f} B parameters in {build_s:.1f} s; LoRA {sum(p.numel() for p in params):,} "
          f"trainable; attention backend {args.attention_backend}", flush=True)
    results = {"machine": info, "arch": "tiny" if args.tiny else "FLUX.1 Kontext full (random weights)",
               "params_b": round(n_params / 1e9, 3), "build_s": build_s, "dtype": "bf16",
               "attention_backend": args.attention_backend, "gradient_checkpointing": not args.no_gradient_checkpointing,
               "lora_rank": args.rank, "runs": []}
    status = 0
    for res in args.resolutions:
        try:
            r = run_resolution(model, params, arch, res, args.steps, device, dtype, args.attention_backend, args.lr)
        except Exception as exc:  # report and go on with the next size
            r = {"resolution": res, "error": f"{type(exc).__name__}: {exc}"}
            status = 1
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if not r.get("all_finite", False):
            status = 1
    print("\nsummary:")
    for r in results["runs"]:
        if "error" in r:
            print(f"  {r['resolution']} px: ERROR {r['error']}")
            continue
        print(f"  {r['resolution']} px ({r['tokens']} tokens): {r['s_per_step']:.3f} s/step train "
              f"(baseline forward-only {r['baseline_forward_only_s']:.3f} s), peak {r.get('peak_memory_gib', '-')} GiB, "
              f"loss {r['losses'][0]:.4f} -> {r['loss_after_last_update']:.4f} finite={r['all_finite']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
