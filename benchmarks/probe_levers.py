#!/usr/bin/env python
"""Probe of training-step levers on the GPU (full-size Kontext, random weights, 1024 px, batch 1, LoRA rank 16 on
the attention preset): where the compiled step's time goes (kernel categories, GPU idle gaps), and quick rows for
combinations of base precision, fused q/k/v and the compiled blocks' activation memory budget. A lighter companion
of bench_train_step.py, to decide which levers are worth building; its figures are in docs/performance.md.

    python benchmarks/probe_levers.py --plan bf16:fuse:ckpt0 bf16:fuse:b0.2 bf16:fuse:gaps int8:fuse:b0.05

Each plan item is PRECISION:FUSE:WHAT[:ATTENTION] with PRECISION bf16|fp8|int8 (+ -lokr for the guide's LoKr), FUSE
fuse|sep, WHAT ckpt<fraction> (block checkpointing), b<budget> (activation memory budget, no block checkpointing) or
gaps (a profiled step: GPU busy time, idle gaps and the CPU ops in them) or vs (loss and gradients of one step
against cudnn's, same weights and batch), ATTENTION a kontext-train attention backend
(default cudnn; fa4 = FlashAttention 4). `--profile` adds the kernel-category profile of the first model. Rows go
to $OUT/probe.json (default /tmp). CUDA only. Results: benchmarks/results/probe_levers-*.json (the first of them was
written by an earlier form of this script, with the same measurements under fixed part names)."""

from __future__ import annotations

import argparse
import gc
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

from gpu_smoke import FULL, TINY, build_transformer, machine_info, make_batch, sync  # noqa: E402
from kontext_trainer import adapters, memory, quantize  # noqa: E402
from kontext_trainer.compile import compile_blocks  # noqa: E402
from kontext_trainer.config import TrainConfig  # noqa: E402
from kontext_trainer.flow import kontext_step  # noqa: E402
from kontext_trainer.optim import build_optimizer  # noqa: E402

memory.use_expandable_segments()  # kontext-train's allocator setting, before the first CUDA allocation
OUT = Path(os.environ.get("OUT", "/tmp"))
RESULT = {"rows": [], "checks": [], "profile": {}}
T0 = time.perf_counter()


def save():
    (OUT / "probe.json").write_text(json.dumps(RESULT, indent=2))


from kontext_trainer.fuse import fuse_qkv  # noqa: E402


PLAIN_ADAMW = False  # --plain-adamw: torch's default (multi-tensor) AdamW instead of kontext-train's fused one


def make_optimizer(params):
    if PLAIN_ADAMW:
        return torch.optim.AdamW(params, lr=1e-5)
    return build_optimizer(TrainConfig(learning_rate=1e-5), params)  # what kontext-train steps


def step_fn(model, batch, backend):
    gen = torch.Generator().manual_seed(0)
    return lambda: kontext_step(model, batch, gen, attention_backend=backend)


def timed(name, model, batch, backend, steps=8, warmup=2, **extra):
    params = adapters.trainable_parameters(model)
    opt = make_optimizer(params)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn = step_fn(model, batch, backend)
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            sync(batch.target.device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            losses.append(fn())
            opt.step()
            sync(batch.target.device)
            times.append(time.perf_counter() - t)
    except Exception as exc:
        row = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}", **extra}
        print(f"{name}: ERROR {row['error']}", flush=True)
        RESULT["rows"].append(row)
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        save()
        return row
    s = statistics.median(times[warmup:])
    row = {"name": name, "s_per_step": round(s, 4), "first_s": round(times[0], 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "losses": [round(v, 5) for v in losses],
           "at_s": round(time.perf_counter() - T0), **extra}
    plan = f"  plan {extra['plan_gib']} GiB" if extra.get("plan_gib") is not None else ""
    print(f"{name:<50} {s:.4f} s/step  peak {row['peak_gib']} GiB (reserved {row['reserved_gib']}){plan}  first "
          f"{row['first_s']} s  [t={row['at_s']}s]", flush=True)
    RESULT["rows"].append(row)
    opt.zero_grad(set_to_none=True)
    save()
    return row


def profile(model, batch, backend, tag):
    from torch.profiler import ProfilerActivity, profile as prof

    fn = step_fn(model, batch, backend)
    fn()
    model.zero_grad(set_to_none=True)
    sync(batch.target.device)
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        sync(batch.target.device)
    model.zero_grad(set_to_none=True)
    cats = {}
    top = []
    for e in p.key_averages():
        t = e.device_time_total / 1e6 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e6
        if t <= 0:
            continue
        n = e.key
        low = n.lower()
        if any(k in low for k in ("cudnn", "flash", "fmha", "attn", "sdpa")):
            c = "attention"
        elif any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "sm90", "gemv", "splitk")):
            c = "gemm"
        elif "triton" in low:
            c = "triton"
        elif "memcpy" in low or "memset" in low:
            c = "memcpy"
        else:
            c = "other"
        cats[c] = cats.get(c, 0.0) + t
        top.append((t, e.count, c, n[:110]))
    top.sort(reverse=True)
    RESULT["profile"][tag] = {"categories_s": {k: round(v, 4) for k, v in cats.items()},
                              "top": [[round(t, 4), cnt, c, n] for t, cnt, c, n in top[:40]]}
    print(f"profile {tag}: " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])))
    for t, cnt, c, n in top[:30]:
        print(f"  {t:7.4f} s  x{cnt:<5} {c:<9} {n}")
    save()


def gaps(model, batch, backend, tag):
    """GPU idle time within one optimizer step and the CPU ops running in the biggest gaps."""
    from torch.profiler import ProfilerActivity, profile as prof

    params = adapters.trainable_parameters(model)
    opt = make_optimizer(params)
    fn = step_fn(model, batch, backend)
    for _ in range(2):
        opt.zero_grad(set_to_none=True); fn(); opt.step()
    sync(batch.target.device)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True); fn(); opt.step()
        sync(batch.target.device)
        wall = time.perf_counter() - t
    evs = p.events()
    kern = sorted((e.time_range.start, e.time_range.end) for e in evs
                  if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
                  and e.time_range.end > e.time_range.start)
    busy, gaps_, cur_s, cur_e = 0.0, [], None, None
    for s0, e0 in kern:
        if cur_e is None:
            cur_s, cur_e = s0, e0
        elif s0 > cur_e:
            busy += cur_e - cur_s
            gaps_.append((s0 - cur_e, cur_e, s0))
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (kern[-1][1] - kern[0][0]) if kern else 0
    cpu = [e for e in evs if not (getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))]
    gaps_.sort(reverse=True)
    big = []
    for g, g0, g1 in gaps_[:25]:
        names = [e.name for e in cpu if e.time_range.start <= g1 and e.time_range.end >= g0 and
                 e.time_range.end - e.time_range.start < 5e5][:4]
        big.append([round(g / 1e3, 3), names])
    total_gap = sum(g for g, _, _ in gaps_) / 1e6
    RESULT["profile"][tag] = {"wall_s": round(wall, 4), "gpu_busy_s": round(busy / 1e6, 4),
                              "kernel_span_s": round(span / 1e6, 4), "gap_s": round(total_gap, 4),
                              "gaps_over_0.1ms_s": round(sum(g for g, _, _ in gaps_ if g > 100) / 1e6, 4),
                              "n_gaps": len(gaps_), "biggest_ms": big}
    print(f"gaps {tag}: wall {wall:.4f} s, GPU busy {busy/1e6:.4f} s, span {span/1e6:.4f}, gaps {total_gap:.4f} s "
          f"({len(gaps_)}), >0.1 ms: {RESULT['profile'][tag]['gaps_over_0.1ms_s']} s", flush=True)
    for g, names in big[:15]:
        print(f"  {g:8.3f} ms  {names}")
    save()


def compare(model, batch, backend, tag):
    """Loss and adapter gradients of one step with `backend` against cudnn: same weights, batch, noise and sigma."""
    out = {}
    for be in ("cudnn", backend):
        model.zero_grad(set_to_none=True)
        set_budget(1.0)
        loss = kontext_step(model, batch, torch.Generator().manual_seed(7), attention_backend=be)
        out[be] = (loss, torch.cat([p.grad.float().flatten() for p in adapters.trainable_parameters(model)
                                    if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    (la, ga), (lb, gb) = out["cudnn"], out[backend]
    row = {"check": f"{tag}: {backend} vs cudnn", "loss_cudnn": la, f"loss_{backend}": lb,
           "loss_rel_diff": abs(la - lb) / max(abs(la), 1e-12),
           "grad_cosine": float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)),
           "grad_rel_diff": float((ga - gb).norm() / ga.norm().clamp_min(1e-12))}
    RESULT["checks"].append(row)
    print(f"check {row['check']}: loss {la:.5f} vs {lb:.5f}, grad cosine {row['grad_cosine']:.6f}, "
          f"rel diff {row['grad_rel_diff']:.4f}", flush=True)
    save()


def fresh(arch, device, precision="bf16", targets="attention"):
    """A new model; PRECISION may end in -lokr: the guide's LoKr (factor 16/8 on attention+ffs, full matrix)."""
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    model = build_transformer(arch, device, torch.bfloat16)
    precision, _, adapter = precision.partition("-")
    if precision == "int8":
        quantize.quantize_transformer(model, "int8-quanto")
    if adapter == "lokr":
        adapters.attach_lokr(model, "attention+ffs", factor=16, factor_ff=8, full_matrix=True)
    else:
        adapters.attach_lora(model, rank=16, alpha=None, dropout=0.0, targets=targets)
    if precision == "int8":
        quantize.to_dequant_linears(model)
    if precision == "fp8":
        from kontext_trainer import fp8
        fp8.convert_base_linears(model, exclude=quantize.QUANTO_EXCLUDE)
    torch.cuda.empty_cache()
    return model


_PLAN_PRECISION = {"bf16": "bf16", "int8": "int8-quanto", "fp8": "fp8-matmul"}


def plan_gib(item_precision: str, what: str, res: int, targets: str, fa4: bool) -> float | None:
    """The memory plan's prediction for a row (full-size model, batch 1, one reference of the target's size), to
    print beside the measured peak: where they part, memory._BUDGET_KEEP needs refitting. None for rows the plan
    does not model (gaps, vs)."""
    precision, _, adapter = item_precision.partition("-")
    wide = adapter == "lokr" or targets != "attention"
    shape = memory.StepShape(memory.sample_tokens((res, res), [(res, res)]), _PLAN_PRECISION[precision],
                             wide_adapter=wide, fa4=fa4)
    if what.startswith("ckpt"):
        return round(shape.peak_gib(float(what[4:]), 1.0, compiled=True), 2)
    if what.startswith("b"):
        return round(shape.peak_gib(0.0, float(what[1:]), compiled=True), 2)
    return None


def set_budget(b):
    import torch._functorch.config as fconf

    fconf.activation_memory_budget = b
    torch._dynamo.reset()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", nargs="+", default=[
        "int8:fuse:ckpt1", "int8:fuse:b0.05", "int8:fuse:b0.1",
        "bf16:fuse:ckpt0", "bf16:fuse:b0.25", "bf16:fuse:b0.3", "bf16:fuse:b0.2", "bf16:fuse:gaps",
        "fp8:fuse:ckpt0", "fp8:fuse:b0.2", "fp8:fuse:b0.05"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--estimator", default="flops", choices=["flops", "profile"],
                    help="the partitioner's runtime estimate for the budget's knapsack (torch's default: flops)")
    ap.add_argument("--targets", default="attention", help="LoRA targets (attention, attention+ffs, all)")
    ap.add_argument("--profile", action="store_true", help="kernel-category profile of each new model's first row")
    ap.add_argument("--profile-every", action="store_true", help="the kernel-category profile of every row")
    ap.add_argument("--recompute-attention", action="store_true",
                    help="leave torch's partitioner free to recompute cuDNN attention (as before keep_attention_outputs)")
    ap.add_argument("--card-gib", type=float, default=None,
                    help="act as a smaller card: cap what PyTorch may reserve at this many GiB (e.g. 31.3 for a 32 GB "
                         "card less its CUDA context); a row that does not fit fails with out-of-memory")
    ap.add_argument("--plain-adamw", action="store_true",
                    help="step torch's default multi-tensor AdamW instead of kontext-train's (fused on CUDA)")
    ap.add_argument("--deadline", type=float, default=540)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--res", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_levers.py needs a CUDA GPU (the CPU path of the step benchmark: bench_train_step.py --tiny)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    global PLAIN_ADAMW
    PLAIN_ADAMW = args.plain_adamw
    RESULT["optimizer"] = "torch AdamW (multi-tensor)" if args.plain_adamw else "kontext-train's AdamW (fused)"
    if args.card_gib:
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib / total), torch.cuda.current_device())
        RESULT["card_gib"] = args.card_gib
    arch = TINY if args.tiny else FULL
    RESULT["machine"] = machine_info(device)
    RESULT["targets"] = args.targets
    RESULT["estimator"] = args.estimator
    import torch._functorch.config as fconf

    fconf.activation_memory_budget_runtime_estimator = args.estimator
    print(json.dumps(RESULT["machine"]), flush=True)
    batch = make_batch(arch, args.res, device, torch.bfloat16)
    model, current = None, None
    for item in args.plan:
        left = args.deadline - (time.perf_counter() - T0)
        if left < 60:
            print(f"skip {item}: {left:.0f} s left", flush=True)
            continue
        precision, fused, what, *rest = item.split(":")
        be = rest[0] if rest else "cudnn"
        tag = "" if be == "cudnn" else f" {be}"
        key = (precision, fused)
        if key != current:
            model = None
            set_budget(1.0)
            model = fresh(arch, device, precision, args.targets)
            if fused == "fuse":
                print(f"fused {fuse_qkv(model)} attentions", flush=True)
            compile_blocks(model, keep_attention=not args.recompute_attention)
            current = key
        if what == "vs":
            compare(model, batch, be, f"{precision} {fused} compiled")
            continue
        if what == "gaps":
            set_budget(1.0)
            memory.set_activation_checkpointing(model, 0.0)
            gaps(model, batch, be, f"{precision} {fused} ckpt0{tag}")
            continue
        if what.startswith("ckpt"):
            set_budget(1.0)
            memory.set_activation_checkpointing(model, float(what[4:]))
        else:
            set_budget(float(what[1:]))
            memory.set_activation_checkpointing(model, 0.0)
        first_row = not any(r["name"].startswith(f"{precision} {fused} ") for r in RESULT["rows"])
        plan = None if args.tiny else plan_gib(precision, what, args.res, args.targets, be == "fa4")
        timed(f"{precision} {fused} compiled {what}{tag}", model, batch, be, steps=args.steps, warmup=1,
              plan_gib=plan)
        if (args.profile and first_row) or args.profile_every:
            profile(model, batch, be, f"{precision} {fused} compiled {what}{tag}")
    print(f"done in {time.perf_counter() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
