#!/usr/bin/env python
"""Does a second (and a fourth) GPU make training faster? Samples per second of the same `kontext-train` run in
1, 2 and 4 processes, as a user runs it.

Builds, once, in --work (as benchmarks/full_run.py does, and with its code): a full-size random FLUX.1 Kontext [dev]
folder (`kontext-train make-random-model --full`), a multi-bucket 1024 px dataset and its manifest. Then, for every
--processes N, runs the real CLI with `--num-processes N` and the trainer's defaults: per-device batches
(`train_batch_size` 1 per process, so N processes train N samples per micro-step), a cache of its own per N (so
the caching split across the ranks is measured too, unless --shared-cache). From the trainer's `timings`:
samples/s (samples per step / steady s/step), s/step, each rank's all-reduce and idle seconds (idle: waiting at the
all-reduce for the slowest rank) and caching seconds; the speed-up against N=1 measured in the same call, and the
goals (2 GPUs >= 1.9x, 4 GPUs >= 3.7x). Prints them with the machine and writes JSON (+ a log) to
benchmarks/results/.

Example (a 4-GPU machine; ~34 GB of disk for the model):
  python benchmarks/multi_gpu_scaling.py --processes 1 2 4 --steps 30 --tag a
CPU dry run (tiny random model, gloo; what tests/trainer/test_multi_gpu_scaling.py runs):
  python benchmarks/multi_gpu_scaling.py --device cpu --tiny --pairs 8 --size 64 --steps 4 --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from full_run import add_prepare_arguments, cli, json_events, prepare, run_logged, tool_env  # noqa: E402
from machine import machine_info, package_version, results_file  # noqa: E402

GOALS = {2: 1.9, 4: 3.7}
"""Speed-up in samples/s over one GPU that N GPUs should reach (per-device batch 1, 1024 px)."""


def run_n(args, n: int, model: Path, manifest: Path, env: dict, log) -> dict:
    """One `kontext-train` run in `n` processes; its timings, per-rank figures and losses."""
    out = args.work / f"run-{n}p"
    shutil.rmtree(out, ignore_errors=True)
    cmd = cli("kontext_trainer.cli") + [
        "train", str(manifest), "--model", str(model), "--output-dir", str(out), "--device", args.device,
        "--precision", args.precision, "--max-train-steps", str(args.steps), "--validation-steps", "0",
        "--checkpointing-steps", "0", "--seed", "0", "--set", "skip_final_validation=true", "--json", "--quiet"]
    if args.shared_cache:
        cmd += ["--cache-dir", str(args.work / "cache")]
    if n > 1:
        cmd += ["--num-processes", str(n)]
    cmd += args.extra
    log.write(f"\n=== {n} process(es): {' '.join(cmd)}\n")
    code, wall, stdout, _ = run_logged(cmd, env, log)
    events = json_events(stdout)
    t = next((e for e in events if e["event"] == "timings"), {})
    steps = [e for e in events if e["event"] == "step"]
    return {"processes": n, "exit_code": code, "wall_s": round(wall, 1),
            "stages": [e["message"] for e in events if e["event"] in ("stage", "warning")],
            "samples_per_step": t.get("samples_per_step"), "samples_per_s": t.get("samples_per_s"),
            "steady_s_per_step": t.get("steady_s_per_step"), "per_rank": t.get("per_rank", []),
            "timings": t, "losses": [e["loss"] for e in steps], "failure": None if code == 0 else stdout[-4000:]}


def summarize(runs: dict[int, dict]) -> list[str]:
    """One line per run (samples/s, s/step, speed-up, per-rank all-reduce and idle per step) and the goals."""
    base = runs.get(1, {}).get("samples_per_s")
    lines = []
    for n, r in sorted(runs.items()):
        if r["exit_code"]:
            lines.append(f"{n} process(es): FAILED (exit {r['exit_code']})")
            continue
        steps = max(1, r["timings"].get("steps", 1))
        ranks = "; ".join(f"rank {i}: all-reduce {x.get('allreduce_s', 0) / steps * 1e3:.1f} ms/step, idle "
                          f"{x.get('idle_s', 0) / steps * 1e3:.1f} ms/step, caching "
                          f"{x.get('text cache', 0) + x.get('latent cache', 0):.1f} s"
                          for i, x in enumerate(r["per_rank"]))
        speedup = r["samples_per_s"] / base if base and r["samples_per_s"] else None
        goal = GOALS.get(n)
        verdict = f" (goal >= {goal}x: {'met' if speedup >= goal else 'NOT met'})" if goal and speedup else ""
        lines.append(f"{n} process(es): {r['samples_per_s']} samples/s, {r['steady_s_per_step']} s/step, "
                     f"{r['samples_per_step']} samples/step"
                     + (f", {speedup:.2f}x one process{verdict}" if speedup else "") + (f"; {ranks}" if ranks else ""))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(ap, "/tmp/kontext-scaling", pairs=64, aspects=1, eval_samples=1,
                          aspects_help="aspect ratios (buckets); 1: every step the same shape")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shared-cache", action="store_true", help="one cache for all runs (only the first caches)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more kontext-train arguments (last)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/...)")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and torch.cuda.device_count() < max(args.processes):
        print(f"needs {max(args.processes)} CUDA devices; found {torch.cuda.device_count()} (a CPU dry run: "
              "--device cpu --tiny)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**tool_env(), "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast off, as on the lent machines
    info = {**machine_info(), "torch": torch.__version__, "diffusers": package_version("diffusers")}
    if args.device == "cuda":
        info.update(gpu=torch.cuda.get_device_properties(0).name, gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    print(json.dumps(info), flush=True)
    out = args.out or results_file("multi_gpu_scaling", info, f"-{args.tag}" if args.tag else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        try:
            model, manifest, report["prepare"] = prepare(args, env, log)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        runs: dict[int, dict] = {}
        for n in args.processes:
            runs[n] = run_n(args, n, model, manifest, env, log)
            print(f"{n} process(es): exit {runs[n]['exit_code']}, {runs[n]['samples_per_s']} samples/s", flush=True)
            if runs[n]["failure"]:
                print(runs[n]["failure"][-1500:], flush=True)
            report["runs"] = {str(k): v for k, v in runs.items()}
            out.write_text(json.dumps(report, indent=1) + "\n")  # after every run: a cut call keeps what ran
    report["summary"] = summarize(runs)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join([""] + report["summary"] + ["", f"report: {out}"]))
    return 0 if all(r["exit_code"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
