#!/usr/bin/env python
"""Data-parallel training on a real multi-GPU machine: the tiny model, 1 process vs N processes (NCCL).

Builds everything offline in --work: sample pairs (examples/make_sample.py), the manifest (`kontext-data pair`), the
tiny random Kontext model (`kontext-train make-tiny-model`). Then runs the same `kontext-train` command twice on the
GPUs, once in one process and once with `--num-processes N` (torch.distributed.run, one GPU per rank, NCCL), and
checks what a user relies on:
- every rank on its own GPU (the trainer's "data parallel: ..." line, gathered from all ranks);
- the cache split across the ranks, each entry encoded once;
- checkpoints and the LoRA written once (rank 0);
- the N-process losses equal the 1-process losses: same global batch, sharded, gradients all-reduced (fp32 here,
  so only the order of additions differs).
It prints a summary with the machine and writes a JSON report (--out).

Example (a 2-GPU machine):  python benchmarks/multi_gpu_check.py --processes 2 --out results/multi_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc, time.perf_counter() - t


def tool_env() -> dict:
    """The environment of the CLI subprocesses: offline, this checkout first on the path, NVLink multicast off."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "NCCL_NVLS_ENABLE": "0"}


def prepare(work: Path, samples: int, size: int, env: dict) -> tuple[Path, Path]:
    """Sample pairs, their manifest (`kontext-data pair`) and the tiny random model in `work`, offline.
    Returns (manifest, model dir); RuntimeError with the tool's output when a step fails."""
    import importlib.util

    work.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    make_sample.make_sample(work / "data", n=samples, size=size, seed=0)
    manifest = work / "manifest.parquet"
    proc, _ = run([sys.executable, "-c", "from kontext_data.cli import main; main()", "pair",
                   str(work / "data" / "edited"), str(work / "data" / "reference"), "--out", str(manifest),
                   "--resolution", str(size)], env)
    if proc.returncode:
        raise RuntimeError(proc.stdout + proc.stderr)
    model = work / "tiny-kontext"
    if not model.exists():
        proc, _ = run([sys.executable, "-m", "kontext_trainer", "make-tiny-model", str(model)], env)
        if proc.returncode:
            raise RuntimeError(proc.stdout + proc.stderr)
    return manifest, model


def prepare_or_report(args, env: dict) -> tuple[Path, Path] | None:
    """`prepare` for a script's main: None (the failing tool's output printed to stderr) when a step fails."""
    try:
        return prepare(args.work, args.samples, args.size, env)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return None


def main() -> int:
    import torch

    from machine import cpu_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kontext-multi-gpu"))
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu = a dry run of this script with gloo")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="compile_blocks for both runs: auto = the trainer's default (on for CUDA)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and (not torch.cuda.is_available() or torch.cuda.device_count() < args.processes):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"needs {args.processes} CUDA devices; found {found}", file=sys.stderr)
        return 2
    env = tool_env()
    prepared = prepare_or_report(args, env)
    if prepared is None:
        return 1
    manifest, model = prepared

    results = {}
    for n in (1, args.processes):
        out = args.work / f"run-{n}"
        cmd = [sys.executable, "-m", "kontext_trainer", "train", str(manifest), "--model", str(model),
               "--output-dir", str(out), "--device", args.device, "--precision", "fp32", "--max-train-steps",
               str(args.steps), "--train-batch-size", str(args.batch), "--lora-rank", "8", "--lr", "1e-3",
               "--seed", "0", "--checkpointing-steps", str(args.steps // 2), "--set", "report_to=none",
               "--set", "skip_final_validation=true", "--json", "--quiet",
               # the same global batch in both runs: the N-process curve must equal the 1-process one
               "--set", "batch_semantics=global"]
        if args.compile != "auto":
            cmd += ["--set", f"compile_blocks={'true' if args.compile == 'on' else 'false'}"]
        if n > 1:
            cmd += ["--num-processes", str(n)]
        proc, wall = run(cmd, env)
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        metrics = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m] \
            if (out / "metrics.jsonl").exists() else []  # step lines (validation-loss lines have val_loss)
        cache = next((e for e in events if e["event"] == "cache"), {})
        results[n] = {
            "returncode": proc.returncode, "wall_s": round(wall, 1),
            "stages": [e["message"] for e in events if e["event"] == "stage"],
            "done_events": sum(e["event"] == "done" for e in events),
            "cache": {k: cache.get(k) for k in ("latent_encoded", "latent_total", "text_encoded", "text_total")},
            "latent_files": len(list((out / "cache" / "latents").rglob("*.safetensors"))),
            "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists()
            else [],
            "lora": (out / "pytorch_lora_weights.safetensors").is_file(),
            "losses": [m["loss"] for m in metrics],
            "median_step_s": sorted(m["step_time"] for m in metrics)[len(metrics) // 2] if metrics else None,
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        }
    one, many = results[1], results[args.processes]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], many["losses"])]
    parallel = next((s for s in many["stages"] if s.startswith("data parallel")), "")
    checks = {
        "both_ran": one["returncode"] == 0 and many["returncode"] == 0,
        "one_rank_per_gpu": all(f"cuda:{i}" in parallel for i in range(args.processes)) and "nccl" in parallel
        if cuda else "gloo" in parallel,
        "cache_split": many["cache"]["latent_encoded"] is not None
        and 0 < many["cache"]["latent_encoded"] < many["cache"]["latent_total"] == many["latent_files"],
        "written_once": many["done_events"] == 1 and many["lora"] and many["checkpoints"] == one["checkpoints"],
        "losses_match": len(rel) == args.steps and max(rel, default=1.0) < 1e-3,
    }
    machine = {"torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count()}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=p.name, gpus=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    report = {"machine": machine,
              "config": vars(args) | {"work": str(args.work), "out": str(args.out)},
              "max_loss_rel_diff": max(rel, default=None), "data_parallel": parallel, "checks": checks,
              "runs": {str(k): v for k, v in results.items()}}
    print(json.dumps(report["machine"]))
    print(f"1 process:  {one['wall_s']} s wall, median step {one['median_step_s']} s, rc {one['returncode']}")
    print(f"{args.processes} processes: {many['wall_s']} s wall, median step {many['median_step_s']} s, "
          f"rc {many['returncode']}; {parallel}")
    print(f"cache: {many['cache']}; checkpoints {many['checkpoints']}; max loss rel diff {report['max_loss_rel_diff']}")
    for k, v in checks.items():
        print(f"  {k}: {'ok' if v else 'FAILED'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not all(checks.values()):
        for n, r in results.items():
            if r["stderr_tail"]:
                print(f"--- stderr of the {n}-process run:\n{r['stderr_tail']}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
