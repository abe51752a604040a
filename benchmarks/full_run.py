#!/usr/bin/env python
"""A whole `kontext-train` run as a user waits for it, per card size: the phase table, GPU and host memory.

Builds, once, in --work: a full-size random FLUX.1 Kontext [dev] folder (`kontext-train make-random-model --full`,
~34 GB; or --model DIR), a realistic dataset (examples/make_sample.py: --pairs pairs of about --size x --size pixels
in --aspects of Kontext's preferred aspect ratios, so as many buckets) and its manifest (`kontext-data pair`, with a
small eval split for validation). Then, for every --cards entry `GB:PRECISION`, runs the real CLI as a user does (a
subprocess, no flags beyond the run's length, its schedule and the card), with PyTorch held to a card of GB
gigabytes less its CUDA context (`--set memory_limit_gib`, i.e. torch.cuda.set_per_process_memory_fraction; 0 or
the whole card: no limit), so 80/48/32/24/16/12 GB cards are measured on one H100 with the trainer's own choices.

Per run it prints and saves (JSON in benchmarks/results/) the trainer's phase table (kontext_trainer/phases.py):
text encoders load and text cache (captions/s), VAE load and latent cache (images/s), model load (and
quantization), the first step of each new step shape (compiles), the steady state (median s/step of the others),
validation, checkpoints, save, total; peak GPU memory (allocated, reserved, and what the process held outside
PyTorch's allocator: the CUDA context, library workspaces); the trainer's peak host RSS (wait4); the start-up lines
(the memory plan, offloading). With --bench-s-per-step, the steady state is compared with a bench_train_step row
measured in the same call. The step-time goals per card size (STEP_GOALS) are checked and printed (docs/performance.md).

Example (one H100; ~34 GB of disk for the model):
  python benchmarks/full_run.py --cards 80:bf16 24:int8-quanto --steps 60 --tag a
CPU dry run (tiny random model, what tests/trainer/test_full_run.py runs):
  python benchmarks/full_run.py --device cpu --tiny --pairs 8 --size 64 --steps 4 --cards 0:fp32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_info, package_version, results_file  # noqa: E402

# What the CUDA context and the libraries' workspaces take outside PyTorch's allocator on an H100 (measured by this
# script as `outside_allocator_gib`); a card of N GB gives PyTorch about N - this.
CONTEXT_GIB = 0.8
# Steady s/step a run should reach on a card of N GB (H100 held to N GB, 1024 px, LoRA rank 16 on attention).
STEP_GOALS = {24: 1.0, 16: 1.3, 12: 1.8}


def tool_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def cli(module: str) -> list[str]:
    return [sys.executable, "-c", f"from {module} import main; main()"]


def run_logged(cmd: list[str], env: dict, log) -> tuple[int, float, str, dict]:
    """Run `cmd`, stream its output to `log`; (exit code, seconds, stdout, the child's rusage as a dict)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t, "".join(lines), {"maxrss_gib": usage.ru_maxrss / 2**20}


def json_events(stdout: str) -> list[dict]:
    """The `--json` event lines of a `kontext-train` run's output (other lines, and cut ones, skipped)."""
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def add_prepare_arguments(ap: argparse.ArgumentParser, work: str, pairs: int, aspects: int, eval_samples: int,
                          aspects_help: str | None = None) -> None:
    """The options `prepare` reads (the model and dataset to build or reuse), with a benchmark's own defaults."""
    ap.add_argument("--work", type=Path, default=Path(work))
    ap.add_argument("--model", type=Path, default=None, help="an existing model folder (default: built in --work)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (CPU dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=pairs)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--aspects", type=int, default=aspects, help=aspects_help)
    ap.add_argument("--eval", type=int, default=eval_samples, help="validation samples (an eval split of this size)")


def prepare(args, env, log) -> tuple[Path, Path, dict]:
    """The model folder, the manifest and how long each took to make (0 when reused)."""
    made: dict[str, float] = {}
    model = args.model or args.work / ("kontext-random-tiny" if args.tiny else "kontext-random-full")
    if not (model / "model_index.json").is_file():
        cmd = cli("kontext_trainer.cli") + ["make-random-model", str(model), "--device", args.device]
        if not args.tiny:
            cmd.append("--full")
        code, made["model_build_s"], out, _ = run_logged(cmd, env, log)
        if code:
            raise RuntimeError(f"make-random-model failed ({code}):\n{out[-3000:]}")
    data = args.work / f"data-{args.pairs}x{args.size}-a{args.aspects}"
    manifest = data / "manifest.parquet"
    if not manifest.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
        make_sample = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(make_sample)
        t = time.perf_counter()
        make_sample.make_sample(data, n=args.pairs, size=args.size, seed=0, aspects=args.aspects)
        made["dataset_s"] = time.perf_counter() - t
        cmd = cli("kontext_data.cli") + ["pair", str(data / "edited"), str(data / "reference"), "--out",
                                         str(manifest), "--resolution", str(args.size),
                                         "--eval-fraction", f"{min(0.5, (args.eval + 0.5) / args.pairs):.4f}"]
        code, made["pair_s"], out, _ = run_logged(cmd, env, log)
        if code:
            raise RuntimeError(f"kontext-data pair failed ({code}):\n{out[-3000:]}")
    return model, manifest, made


def train_once(args, card: str, model: Path, manifest: Path, env: dict, log) -> dict:
    gib, _, precision = card.partition(":")
    gb = float(gib)
    name = f"{gib}GB-{precision}"
    out = args.work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: an old output dir would be resumed
    cmd = cli("kontext_trainer.cli") + [
        "train", str(manifest), "--model", str(model), "--output-dir", str(out), "--device", args.device,
        "--precision", precision, "--max-train-steps", str(args.steps), "--validation-steps",
        str(args.validation_steps), "--validation-samples", str(args.eval), "--checkpointing-steps",
        str(args.checkpointing_steps), "--seed", "0", "--json", "--quiet"]
    if gb > 0:
        cmd += ["--set", f"memory_limit_gib={gb - CONTEXT_GIB:g}"]
    if args.shared_cache:
        cmd += ["--cache-dir", str(args.work / "cache")]
    cmd += args.extra
    log.write(f"\n=== {name}: {' '.join(cmd)}\n")
    code, wall, stdout, usage = run_logged(cmd, env, log)
    events = json_events(stdout)
    done = next((e for e in events if e["event"] == "done"), {})
    steps = [e for e in events if e["event"] == "step"]
    return {
        "card_gb": gb, "precision": precision, "memory_limit_gib": gb - CONTEXT_GIB if gb > 0 else None,
        "exit_code": code, "wall_s": round(wall, 2), "host_peak_rss_gib": round(usage["maxrss_gib"], 2),
        "stages": [e["message"] for e in events if e["event"] in ("stage", "warning")],
        "timings": done.get("timings") or next((e for e in events if e["event"] == "timings"), {}),
        "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
        "failure": None if code == 0 else stdout[-4000:],
    }


def projection(t: dict, steps: int = 1000, validations: int = 4, checkpoints: int = 4) -> dict:
    """Time to a LoRA of `steps` steps from one run's phases: the fixed costs (model load, compiles, validations,
    checkpoints, save) against the steps' time, validations and checkpoints scaled to the counts given."""
    steady = t.get("steady_s_per_step") or 0.0
    # the validation loss runs at every validation and once more before the first step: per validation, its share
    per_validation = (t.get("validation_s", 0.0) / max(1, t.get("validation_count", 1))
                      + t.get("validation loss_s", 0.0) / max(1, t.get("validation loss_count", 1)))
    per_checkpoint = t.get("checkpoint_s", 0.0) / max(1, t.get("checkpoint_count", 1))
    fixed = (t.get("model load_s", 0.0) + t.get("first_steps_of_shapes_s", 0.0) + validations * per_validation
             + checkpoints * per_checkpoint + t.get("save_s", 0.0))
    return {"steps": steps, "steps_s": round(steps * steady, 1), "fixed_s": round(fixed, 1),
            "fixed_share_of_steps": round(fixed / max(1e-9, steps * steady), 3),
            "assumes": f"{validations} validations and {checkpoints} checkpoints, compiles as in this run"}


PLAN_BELOW_TOLERANCE = 0.02  # the memory plan may predict at most this share below a step's measured peak


def plan_vs_peak(run: dict) -> dict | None:
    """The memory plan's predicted peak (its start-up line) against the training steps' measured peak allocated
    memory (the phase table's `training` entry): the check that the plan still matches the code, which moves when
    the compiled graphs keep other activations. None without both figures (a CPU run)."""
    import re

    predicted = None
    for stage in run.get("stages", []):
        m = re.search(r"predicted peak ([0-9.]+) GiB", stage)
        if stage.startswith("memory:") and m:
            predicted = float(m.group(1))
    measured = run.get("timings", {}).get("peak_gpu_gib_by_phase", {}).get("training")
    if predicted is None or not measured:
        return None
    under = (measured - predicted) / measured
    return {"predicted_gib": predicted, "measured_gib": measured, "plan_below_by": round(under, 4),
            "ok": under <= PLAN_BELOW_TOLERANCE}


def table(results: dict) -> str:
    keys = [("text encoders load_s", "text enc load"), ("text cache_s", "text cache"), ("text cache_per_s", "captions/s"),
            ("vae load_s", "vae load"), ("latent cache_s", "latent cache"), ("latent cache_per_s", "latents/s"),
            ("model load_s", "model load"), ("first_steps_of_shapes_s", "first steps (compile)"),
            ("step_shapes", "step shapes"), ("steady_s_per_step", "steady s/step"), ("validation_s", "validation"),
            ("validation loss_s", "validation loss"),
            ("checkpoint_s", "checkpoints"), ("save_s", "save"), ("total_s", "total"),
            ("peak_gpu_reserved_gib", "peak GPU reserved GiB"), ("outside_allocator_gib", "outside allocator GiB")]
    names = list(results)
    lines = [f"{'phase':26s}" + "".join(f"{n:>18s}" for n in names)]
    for key, label in keys:
        row = [results[n]["timings"].get(key) for n in names]
        if all(v is None for v in row):
            continue
        lines.append(f"{label:26s}" + "".join(f"{'-' if v is None else f'{v:.3g}':>18s}" for v in row))
    phases = sorted({k for n in names for k in results[n]["timings"].get("peak_gpu_gib_by_phase", {})})
    for phase in phases:  # where each run's memory peaked (the memory plan predicts the training steps')
        row = [results[n]["timings"].get("peak_gpu_gib_by_phase", {}).get(phase) for n in names]
        lines.append(f"{'peak GiB ' + phase:26s}" + "".join(f"{'-' if v is None else f'{v:.3g}':>18s}" for v in row))
    lines.append(f"{'host peak RSS GiB':26s}" + "".join(f"{results[n]['host_peak_rss_gib']:>18.3g}" for n in names))
    lines.append(f"{'exit code':26s}" + "".join(f"{results[n]['exit_code']:>18d}" for n in names))
    return "\n".join(lines)


def goals(results: dict, bench_s: float | None) -> list[str]:
    out = []
    for name, r in results.items():
        t = r["timings"]
        steady = t.get("steady_s_per_step")
        if r["exit_code"]:
            out.append(f"{name}: FAILED (exit {r['exit_code']})")
            continue
        goal = STEP_GOALS.get(int(r["card_gb"]))
        if goal and steady:
            out.append(f"{name}: {steady:.3f} s/step (goal <= {goal}: {'met' if steady <= goal else 'NOT met'})")
        if (r["card_gb"] == 0 or r["card_gb"] >= 80) and r["precision"] == "bf16" and steady:
            p = r["projection"]
            out.append(f"{name}: 1,000 steps {p['steps_s']:.0f} s, fixed costs {p['fixed_s']:.0f} s = "
                       f"{p['fixed_share_of_steps']:.0%} of the steps (goal <= 25%: "
                       f"{'met' if p['fixed_share_of_steps'] <= 0.25 else 'NOT met'})")
            if bench_s:
                ratio = steady / bench_s
                out.append(f"{name}: steady {steady:.3f} vs bench_train_step {bench_s:.3f} s/step = {ratio:.3f}x "
                           f"(goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
        for key, goal_rate, what in (("latent cache_per_s", 60, "latents/s"), ("text cache_per_s", 150, "captions/s")):
            if key in t:
                out.append(f"{name}: {t[key]:.1f} {what} (goal >= {goal_rate}: "
                           f"{'met' if t[key] >= goal_rate else 'NOT met'})")
        check = plan_vs_peak(r)
        if check:
            out.append(f"{name}: memory plan {check['predicted_gib']:.1f} GiB, training steps took "
                       f"{check['measured_gib']:.2f} GiB (the plan at most {PLAN_BELOW_TOLERANCE:.0%} below: "
                       f"{'met' if check['ok'] else 'NOT met: refit memory._BUDGET_KEEP'})")
        if "int8" in r["precision"]:
            rss = r["host_peak_rss_gib"]
            out.append(f"{name}: host peak RSS {rss:.1f} GiB (goal <= 20: {'met' if rss <= 20 else 'NOT met'})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(ap, "/tmp/kontext-full-run", pairs=300, aspects=6, eval_samples=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--validation-steps", type=int, default=30)
    ap.add_argument("--checkpointing-steps", type=int, default=30)
    ap.add_argument("--cards", nargs="+", default=["80:bf16"],
                    help="GB:PRECISION per run; GB 0 = the whole card, no limit")
    ap.add_argument("--shared-cache", action="store_true", help="one cache for all runs (only the first caches)")
    ap.add_argument("--bench-s-per-step", type=float, default=None,
                    help="bench_train_step's row with the same settings, measured in the same call")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more kontext-train arguments (last)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/...)")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (a CPU dry run: --device cpu --tiny)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    env = tool_env()
    info = {**machine_info(), "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"), "optimum-quanto": package_version("optimum-quanto")}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    print(json.dumps(info), flush=True)
    out = args.out or results_file("full_run", info, f"-{args.tag}" if args.tag else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        try:
            model, manifest, made = prepare(args, env, log)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        report["prepare"] = made
        print(f"prepared {model} and {manifest}: {made}", flush=True)
        for card in args.cards:
            r = train_once(args, card, model, manifest, env, log)
            r["projection"] = projection(r["timings"]) if r["timings"] else {}
            r["plan_vs_peak"] = plan_vs_peak(r)
            name = f"{card.split(':')[0]}GB-{card.split(':')[1]}"
            report["runs"][name] = r
            print(f"{name}: exit {r['exit_code']}, {r['timings'].get('steady_s_per_step')} s/step, "
                  f"{r['wall_s']:.0f} s", flush=True)
            for s in r["stages"]:
                print(f"  | {s}", flush=True)
            if r["failure"]:
                print(r["failure"][-1500:], flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")  # after every run: a cut call keeps what ran
    report["goals"] = goals(report["runs"], args.bench_s_per_step)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table(report["runs"]))
    print("\n".join(["", "goals:"] + [f"  {g}" for g in report["goals"]]))
    print(f"\nreport: {out}")
    return 0 if all(r["exit_code"] == 0 for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
