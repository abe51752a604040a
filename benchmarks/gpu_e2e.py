#!/usr/bin/env python
"""`kontext-train` end to end on one GPU with the trainer's defaults there, for each base and adapter.

Builds the tiny random Kontext model, sample pairs and their manifest offline in --work (as multi_gpu_check.py),
then runs the real CLI once per configuration (bf16, int8-quanto, fp8-quanto, fp8-matmul, LoKr, LoKr on int8, an
explicit activation memory budget, FlashAttention 4 forced), in bf16 on the GPU, with what the trainer does there by
default: compiled blocks, fused q/k/v, the memory plan. Checked per run: exit code 0; finite losses that fall; the
start-up lines (the memory plan, compiled blocks, fused q/k/v where LoRA, the attention kernels); the adapter file
written. And once the same bf16 run with compile_blocks=false and fuse_qkv_projections=false: its first loss (same
weights, batch, noise) must match the default run's, and the curves must stay close (bf16 rounding differs); the
FlashAttention 4 run against the default run the same way.

Example (GPU):  python benchmarks/gpu_e2e.py --out benchmarks/results/gpu_e2e.json
Dry run (CPU):  python benchmarks/gpu_e2e.py --device cpu --steps 4 --only bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from multi_gpu_check import prepare_or_report, run, tool_env  # noqa: E402

RUNS = {  # name -> extra CLI arguments
    "bf16": [],
    "bf16-eager-unfused": ["--set", "compile_blocks=false", "--set", "fuse_qkv_projections=false"],
    "bf16-budget-0.2": ["--set", "activation_memory_budget=0.2"],
    "bf16-fa4": ["--set", "attention_backend=fa4"],  # FlashAttention 4 for every attention (needs flash-attn-4)
    "int8-quanto": ["--precision", "int8-quanto"],
    "fp8-quanto": ["--precision", "fp8-quanto"],
    "fp8-matmul": ["--precision", "fp8-matmul"],
    "lokr": ["--adapter", "lokr", "--set", "lokr_factor=4", "--set", "lokr_factor_ff=4"],
    "lokr-int8": ["--adapter", "lokr", "--set", "lokr_factor=4", "--set", "lokr_factor_ff=4",
                  "--precision", "int8-quanto"],
}


def main() -> int:
    import torch
    from machine import cpu_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kontext-gpu-e2e"))
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (a CPU dry run: --device cpu)", file=sys.stderr)
        return 2
    env = tool_env()
    prepared = prepare_or_report(args, env)
    if prepared is None:
        return 1
    manifest, model = prepared
    results, ok = {}, True
    for name in args.only:
        out = args.work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: an old output dir would be resumed / appended to
        cmd = [sys.executable, "-m", "kontext_trainer", "train", str(manifest), "--model", str(model),
               "--output-dir", str(out), "--device", args.device, "--max-train-steps", str(args.steps),
               "--train-batch-size", "2", "--lora-rank", "8", "--lr", "1e-3", "--seed", "0",
               "--set", "report_to=none", "--set", "skip_final_validation=true", "--json", "--quiet"]
        if "--precision" not in RUNS[name]:
            cmd += ["--precision", "bf16"]
        proc, wall = run(cmd + RUNS[name], env)
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        stages = [e["message"] for e in events if e["event"] == "stage"]
        metrics = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m] \
            if (out / "metrics.jsonl").exists() else []  # step lines (validation-loss lines have val_loss)
        losses = [m["loss"] for m in metrics]
        k = max(1, len(losses) // 5)
        lora = name not in ("lokr", "lokr-int8")
        compiled = name != "bf16-eager-unfused" and args.device == "cuda"
        checks = {
            "ran": proc.returncode == 0,
            # medians, not sums: each step's loss swings with its sigma (the same draws in every run), and one
            # high-sigma step in the last fifth outweighed a slow adapter's progress in a sum (LoKr, 30 steps)
            "finite_falling": bool(losses) and all(math.isfinite(v) for v in losses)
            and statistics.median(losses[-k:]) < statistics.median(losses[:k]),
            "memory_line": any(s.startswith("memory:") for s in stages),
            "compiled_line": any("torch.compile of the transformer blocks" in s for s in stages) == compiled,
            "fused_line": not lora or name == "bf16-eager-unfused" or any(s.startswith("fused q/k/v projections in")
                                                                        and " 0 of" not in s for s in stages),
            "adapter_file": (out / "pytorch_lora_weights.safetensors").is_file(),
        }
        if name == "bf16-budget-0.2":
            checks["budget_line"] = any("activation memory budget 0.2" in s for s in stages)
        if args.device == "cuda":  # which attention kernels: said once at start-up
            checks["attention_line"] = any(s.startswith("attention: FlashAttention 4 (attention_backend fa4)"
                                                        if name == "bf16-fa4" else "attention:") for s in stages)
        results[name] = {"returncode": proc.returncode, "wall_s": round(wall, 1), "stages": stages,
                         "losses": [round(v, 5) for v in losses], "checks": checks,
                         "median_step_s": sorted(m["step_time"] for m in metrics)[len(metrics) // 2]
                         if metrics else None,
                         "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}
        ok &= all(checks.values())
        print(f"{name:<20} rc {proc.returncode}  {wall:6.1f} s  losses {losses[:1]} -> {losses[-1:]}  "
              + " ".join(f"{c}={'ok' if v else 'FAILED'}" for c, v in checks.items()), flush=True)
        for s in stages:
            if s.startswith(("memory:", "fused", "torch.compile", "int8", "fp8", "attention:")):
                print(f"    {s}")
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
    compare = {}
    if "bf16" in results and "bf16-fa4" in results and results["bf16"]["losses"] and results["bf16-fa4"]["losses"]:
        a, b = results["bf16-fa4"]["losses"], results["bf16"]["losses"]
        rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
        compare["fa4_first_loss_rel_diff"] = rel[0]
        compare["fa4_mean_loss_rel_diff"] = sum(rel) / len(rel)
        compare["fa4_ok"] = rel[0] < 1e-2 and compare["fa4_mean_loss_rel_diff"] < 5e-2
        ok &= compare["fa4_ok"]
        print(f"FlashAttention 4 vs auto (bf16, compiled): first loss rel diff {rel[0]:.2e}, mean "
              f"{compare['fa4_mean_loss_rel_diff']:.2e} -> {'ok' if compare['fa4_ok'] else 'FAILED'}")
    if "bf16" in results and "bf16-eager-unfused" in results:
        a, b = results["bf16"]["losses"], results["bf16-eager-unfused"]["losses"]
        if a and b:
            rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
            compare.update(first_loss_rel_diff=rel[0], max_loss_rel_diff=max(rel),
                           mean_loss_rel_diff=sum(rel) / len(rel))
            compare["ok"] = rel[0] < 1e-2 and compare["mean_loss_rel_diff"] < 5e-2
            ok &= compare["ok"]
            print(f"compiled+fused vs eager+separate (bf16): first loss rel diff {rel[0]:.2e}, mean "
                  f"{compare['mean_loss_rel_diff']:.2e}, max {compare['max_loss_rel_diff']:.2e} -> "
                  f"{'ok' if compare['ok'] else 'FAILED'}")
    machine = {"torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count()}
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    print(json.dumps(machine))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "config": vars(args) | {"work": str(args.work),
                                        "out": str(args.out)}, "compare": compare, "runs": results},
                                       indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
