"""The `kontext-train` command line: thin Typer commands that build a TrainConfig and call the recipe.

`kontext-train MANIFEST [options]` trains (the `train` sub-command is implied);
`kontext-train make-tiny-model OUT` writes a tiny random Kontext model for tests and the demo;
`kontext-train make-random-model OUT --full` a full-size one with random weights, for benchmarks.
Exit codes: 0 ok, 1 problems found (manifest, model, training), 2 usage/configuration errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="kontext-train",
    help="Train a FLUX.1 Kontext LoRA from a kontext-data manifest.\n\n"
    "Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
err = Console(stderr=True)
out = Console()
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
SUBCOMMANDS = ("train", "make-tiny-model", "make-random-model", "export")


@app.callback()
def _root() -> None:
    """Train a FLUX.1 Kontext LoRA from a kontext-data manifest.

    Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json
    """


def _quiet_libraries() -> None:
    """Our own progress bars replace the libraries' (weights loading, pipeline steps)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def _fail(title: str, problems: list[str], code: int) -> None:
    err.print(f"[bold red]{title}[/bold red] ({len(problems)} problem(s)):")
    for p in problems:
        err.print(f"  - {p}", markup=False, highlight=False)
    raise typer.Exit(code)


class _Reporter:
    """Turns recipe events into rich progress bars and lines on stderr."""

    def __init__(self, quiet: bool, json_lines: bool):
        self.quiet = quiet
        self.json_lines = json_lines
        self.bar = None
        self.tasks: dict[str, int] = {}
        self.start: dict[str, float] = {}

    def _progress(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        if self.bar is None:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False,
                                disable=self.quiet)
            self.bar.start()
        return self.bar

    def task(self, name: str, total: int) -> int:
        bar = self._progress()
        if name not in self.tasks:
            self.tasks[name] = bar.add_task(name, total=total, info="")
            self.start[name] = time.perf_counter()
        return self.tasks[name]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, kind: str, data: dict) -> None:
        if self.json_lines and kind in ("step", "validation", "checkpoint", "saved", "cache", "stage", "warning",
                                        "note", "timings", "validation_loss"):
            print(json.dumps({"event": kind, **data}), flush=True)
        if kind == "progress":
            name = {"text": "text embeddings", "latents": "VAE latents", "masks": "loss masks"}.get(data["stage"],
                                                                                                   data["stage"])
            t = self.task(name, data["total"])
            rate = data["done"] / max(time.perf_counter() - self.start[name], 1e-9)
            self.bar.update(t, completed=data["done"], total=data["total"], info=f"{rate:,.1f} items/s")
        elif kind == "step":
            t = self.task("training", data["total"])
            self.bar.update(t, completed=data["step"], total=data["total"],
                            info=f"loss {data['loss']:.4f} lr {data['lr']:.2e} {data['step_time']:.2f}s/step")
        elif kind in ("stage", "note"):
            self._line(f"[cyan]{data['message']}[/cyan]")
        elif kind == "warning":
            self._line(f"[yellow]warning:[/yellow] {data['message']}")
        elif kind == "validation":
            self._line(f"validation strips (step {data['step']}): {data['dir']}")
        elif kind == "validation_loss":
            self._line(_validation_loss_line(data))
        elif kind == "checkpoint":
            self._line(f"checkpoint: {data['path']}")
        elif kind == "cache":
            masks = (f", {data.get('mask_encoded', 0)} of {data['mask_total']} loss masks computed"
                     if data.get("mask_total") else "")
            self._line(f"cache {data['cache_dir']}: {data.get('text_encoded', 0)} of {data['text_total']} captions "
                       f"and {data.get('latent_encoded', 0)} of {data['latent_total']} images encoded{masks}, rest "
                       f"reused")

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        (self.bar.console if self.bar else err).print(text)


def _validation_loss_line(d: dict) -> str:
    """`validation loss 0.4123 (train 0.3987) at step 200`, with `; EMA ...` when the EMA is validated too."""
    def pair(prefix: str) -> str:
        text = f"{d[prefix + 'val_loss']:.4f}"
        if prefix + "train_eval_loss" in d:
            text += f" (train {d[prefix + 'train_eval_loss']:.4f})"
        return text

    line = f"validation loss {pair('')} at step {d['step']}"
    return line + (f"; EMA {pair('ema_')}" if "ema_val_loss" in d else "")


def _timings_line(t: dict) -> str:
    """One line of where the run's time went (the --json summary has the whole table)."""
    parts = [f"{name} {t[key]:.1f}s" for name, key in (
        ("model load", "model load_s"), ("first steps of new shapes", "first_steps_of_shapes_s"),
        ("validation", "validation_s"), ("validation loss", "validation loss_s"), ("checkpoints", "checkpoint_s"),
        ("save", "save_s")) if key in t]
    cache = sum(t.get(k, 0.0) for k in ("text encoders load_s", "text cache_s", "vae load_s", "latent cache_s"))
    if cache:
        parts.insert(0, f"caching {cache:.1f}s")
    steady = t.get("steady_s_per_step")
    head = f"time: {t.get('total_s', 0.0):.1f}s in all"
    if steady:
        head += f", steady {steady:.3f} s/step"
    return head + ("; " + ", ".join(parts) if parts else "")


_NUMBER_LIKE = re.compile(r"[-+]?[0-9.]*([eE][-+]?[0-9]*)?|[-+]?(inf(inity)?|nan)", re.IGNORECASE)


def parse_manifest_arguments(args: list[str]) -> tuple[list[str], dict[str, float], list[str]]:
    """MANIFEST arguments, each PATH or PATH:WEIGHT: (paths, {path: weight}, problems).

    An argument naming an existing file is a path whatever it contains, so paths with ':' work as they are. Else a
    last ':' followed by something number-like (or preceded by an existing file) is a weight: a number above 0,
    the times each sample of that manifest is seen per epoch (the config's dataset_weights; SimpleTuner's repeats
    r is a weight of r + 1)."""
    paths: list[str] = []
    weights: dict[str, float] = {}
    problems: list[str] = []
    for arg in args:
        head, sep, tail = arg.rpartition(":")
        if os.path.exists(arg) or not sep or not (os.path.isfile(head) or _NUMBER_LIKE.fullmatch(tail.strip())):
            paths.append(arg)
            continue
        try:
            weight = float(tail)
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight > 0):
            problems.append(f"MANIFEST argument {arg!r}: the weight {tail!r} after the last ':' is not a number above "
                            f"0; write PATH:WEIGHT, e.g. {head}:2 to see its samples twice per epoch ({head}:0.5 for a "
                            "seeded half)")
            continue
        paths.append(head)
        weights[head] = weight
    return paths, weights, problems


@app.command(
    "train",
    epilog="Examples:\n\n"
    "  kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev\n\n"
    "  kontext-train manifest.parquet --model DIR --config config.json --max-train-steps 2000\n\n"
    "  kontext-train manifest.parquet --config config.json --set lora_targets=attention+ffs --set optimizer=lion\n\n"
    "  kontext-train faces.parquet:2 scenes.parquet --validation-prompts prompts.jsonl",
)
def train_cmd(
    manifest: List[Path] = typer.Argument(..., help="Parquet manifest(s) written by `kontext-data pair`; several "
                                          "are trained as one (sample ids must be unique across them). PATH:WEIGHT "
                                          "weighs one: a.parquet:2 sees its samples twice per epoch, :0.5 a seeded "
                                          "half (dataset_weights)."),
    reference_sampling: Optional[str] = typer.Option(None, "--reference-sampling", help="Samples with several "
                                                     "references: combined (all, every step) | random (one per "
                                                     "sample per step, seeded)."),
    num_processes: int = typer.Option(1, "--num-processes", min=1, help="Data-parallel processes on this machine "
                                      "(one per GPU; gloo on the CPU). Same as `accelerate launch --multi_gpu "
                                      "--num_processes N -m kontext_trainer ...`."),
    model: Optional[str] = typer.Option(None, "--model", help="FLUX.1 Kontext [dev] folder (diffusers layout) or hub "
                                        "id; default black-forest-labs/FLUX.1-Kontext-dev from the local HF cache."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file: JSON (comments allowed), TOML "
                                          "or YAML. SimpleTuner config.json keys are accepted."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Output folder (default kontext-lora)."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Cache folder (default OUTPUT_DIR/cache)."),
    max_train_steps: Optional[int] = typer.Option(None, "--max-train-steps", help="Optimizer steps."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate."),
    train_batch_size: Optional[int] = typer.Option(None, "--train-batch-size", help="Micro-batch size."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps"),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank (default 16)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="attention | attention+ffs | all | a,b,c"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | optimi-adamw | lion (optimi-lion) | "
                                            "adamw_bf16 (bf16 weights, Kahan summation)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    validation_steps: Optional[int] = typer.Option(None, "--validation-steps", help="Validate every N steps."),
    validation_samples: Optional[int] = typer.Option(None, "--validation-samples",
                                                     help="Validate on N training samples when there is no eval "
                                                          "split."),
    validation_prompts: Optional[Path] = typer.Option(None, "--validation-prompts", help="JSONL of extra validation "
                                                      "edits: {\"image\": ..., \"prompt\": ...} per line, rendered "
                                                      "at every validation (checked at start-up)."),
    checkpointing_steps: Optional[int] = typer.Option(None, "--checkpointing-steps"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint folder."),
    cache_batch_size: Optional[int] = typer.Option(None, "--cache-batch-size", help="Batch of VAE/text encoding."),
    vae_tiling: Optional[bool] = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="VAE tiling for caching."),
    precision: Optional[str] = typer.Option(None, "--base-precision", "--precision",
                                            help="Base model precision: bf16 | fp32 | int8-quanto | fp8-quanto | "
                                                 "fp8-matmul (fp8 tensor-core matmuls, Ada/Hopper)."),
    # --- model side: quantization and the adapter ---
    quantize_on: Optional[str] = typer.Option(None, "--quantize-on", help="Quantize on the gpu (training device) "
                                              "or in cpu RAM (the guide's quantize_via)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="lora (default) | lokr."),
    lycoris_config: Optional[Path] = typer.Option(None, "--lycoris-config", help="SimpleTuner lycoris_config.json "
                                                  "(algo lokr); implies --adapter lokr."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    mask_loss: Optional[bool] = typer.Option(None, "--mask-loss/--no-mask-loss", help="Weigh the loss by the "
                                             "manifest's loss masks (kontext-data pair --masks; default) or ignore "
                                             "them. The weight outside a mask: --set mask_loss_weight=W."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash images and compare with the manifest first."),
    download: bool = typer.Option(False, "--download", help="Allow downloading --model from the hub."),
    set_: List[str] = typer.Option([], "--set", help="Any config key: --set key=value (repeatable). See "
                                   "docs/train.md for the list."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON line per step/event on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a FLUX.1 Kontext LoRA on MANIFEST and save OUTPUT_DIR/pytorch_lora_weights.safetensors.

    Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json
    """
    from kontext_trainer.config import ConfigError, join_manifest_paths, parse_set_options, read_config_file, \
        resolve_config

    problems: list[str] = []
    file_values: dict = {}
    if config is not None:
        try:
            file_values = read_config_file(config)
        except ConfigError as exc:
            _fail(f"config {config}", exc.problems, EXIT_USAGE)
    sets, set_problems = parse_set_options(set_)
    problems += set_problems
    overrides: dict = dict(sets)
    manifest_paths, manifest_weights, weight_problems = parse_manifest_arguments([str(m) for m in manifest])
    problems += weight_problems
    explicit = {
        "manifest": join_manifest_paths(manifest_paths), "model": model, "output_dir": output_dir,
        "cache_dir": cache_dir,
        "max_train_steps": max_train_steps, "learning_rate": learning_rate, "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps, "lora_rank": lora_rank,
        "lora_targets": lora_targets, "optimizer": optimizer, "seed": seed, "validation_steps": validation_steps,
        "validation_samples": validation_samples, "checkpointing_steps": checkpointing_steps,
        "resume_from_checkpoint": resume, "cache_batch_size": cache_batch_size, "vae_tiling": vae_tiling,
        "base_model_precision": precision, "device": device, "reference_sampling": reference_sampling,
        "quantize_on": quantize_on, "adapter": adapter, "mask_loss": mask_loss,
        "lycoris_config": str(lycoris_config) if lycoris_config else None,
        "validation_prompts": str(validation_prompts) if validation_prompts else None,
    }
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    if verify:
        overrides["verify"] = True
    if download:
        overrides["download"] = True
    try:
        resolved = resolve_config(file_values, overrides, source=str(config) if config else None)
    except ConfigError as exc:
        _fail("invalid configuration", problems + exc.problems, EXIT_USAGE)
    if problems:
        _fail("invalid configuration", problems, EXIT_USAGE)
    for w in resolved.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    for n in resolved.notes:
        err.print(f"[cyan]note:[/cyan] {n}", highlight=False)
    cfg = resolved.config
    if manifest_weights:  # PATH:WEIGHT arguments add to the config's dataset_weights, and win for their manifest
        given = {os.path.abspath(p) for p in manifest_weights}
        merged = {k: v for k, v in cfg.dataset_weights if os.path.abspath(k) not in given}
        merged.update(manifest_weights)
        cfg = dataclasses.replace(cfg, dataset_weights=tuple(sorted(merged.items())))
    if print_config:
        out.print_json(json.dumps(cfg.to_dict()))
        raise typer.Exit(EXIT_OK)

    from kontext_trainer.distributed import launch, world_size_from_env

    if num_processes > 1 and world_size_from_env() <= 1:
        argv, skip = [], False
        for a in sys.argv[1:]:  # the same command without --num-processes, in N processes
            if skip:
                skip = False
            elif a == "--num-processes":
                skip = True
            elif not a.startswith("--num-processes="):
                argv.append(a)
        raise typer.Exit(launch(num_processes, argv))

    from kontext_trainer.speed import use_expandable_segments

    use_expandable_segments()  # before the first CUDA allocation
    from kontext_trainer.recipe import TrainError, train

    _quiet_libraries()
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:  # rank 0 reports for the group
        quiet, json_lines = True, False
    reporter = _Reporter(quiet=quiet, json_lines=json_lines)
    try:
        result = train(cfg, on_event=reporter)
    except TrainError as exc:
        reporter.close()
        _fail(exc.title, exc.problems, EXIT_PROBLEMS)
    except KeyboardInterrupt:
        reporter.close()
        err.print("interrupted; checkpoints already written are intact (resume with --resume latest)")
        raise typer.Exit(130)
    finally:
        reporter.close()
    if rank > 0:
        raise typer.Exit(EXIT_OK)
    first = result.losses[0][1] if result.losses else float("nan")
    last_n = [l for _, l in result.losses[-max(1, len(result.losses) // 10):]]
    summary = {
        "lora": str(result.lora_path),
        "config": str(result.config_path),
        "validation": [str(p) for p in result.validation_dirs],
        "checkpoints": [str(p) for p in result.checkpoints],
        "steps": len(result.losses),
        "first_loss": first,
        "final_loss_mean_last_10pct": sum(last_n) / len(last_n) if last_n else float("nan"),
        "seconds_per_step": result.seconds_per_step,
        "timings": result.timings,
        "validation_loss": result.validation_losses[-1] if result.validation_losses else None,
        "ema_lora": str(result.ema_path) if result.ema_path else None,
    }
    if json_lines:
        print(json.dumps({"event": "done", **summary}), flush=True)
    else:
        out.print(f"LoRA: {result.lora_path}")
        if result.ema_path:
            out.print(f"EMA LoRA: {result.ema_path}")
        if result.validation_dirs:
            out.print(f"Validation strips: {result.validation_dirs[-1]}")
        out.print(f"Resolved config: {result.config_path}")
        out.print(f"{len(result.losses)} steps, {result.seconds_per_step:.2f} s/step; loss {first:.4f} -> "
                  f"{summary['final_loss_mean_last_10pct']:.4f} (mean of the last 10%)")
        out.print(_timings_line(result.timings), highlight=False)


@app.command("make-tiny-model", epilog="Example:\n\n  kontext-train make-tiny-model ./tiny-kontext")
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the model to (diffusers layout)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a tiny random FLUX.1 Kontext model (real classes, diffusers layout) for tests and the demo.

    Example: kontext-train make-tiny-model ./tiny-kontext
    """
    from kontext_trainer.model import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed)
    out.print(f"Tiny Kontext model: {path}")


@app.command("make-random-model", epilog="Examples:\n\n"
             "  kontext-train make-random-model /data/random-kontext --full\n\n"
             "  kontext-train make-random-model ./tiny-kontext --seed 1 --device cpu")
def make_random_model_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the model to (new, empty, or a random model made "
                                   "before, which is replaced)."),
    full: bool = typer.Option(False, "--full", help="FLUX.1 Kontext \\[dev]'s full size (11.9 B + 4.76 B T5-XXL "
                              "parameters, ~34 GB on disk; minutes on a GPU). Default: the tiny test model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights (same seed, same device type: same files)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu (the full size is slow "
                               "and needs ~30 GB RAM) | cuda | cuda:N."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest safetensors file, e.g. 5GB "
                                                 "(default: the hub's, 10GB for the transformer, 5GB for T5)."),
) -> None:
    """Write a FLUX.1 Kontext \\[dev] model with RANDOM weights (real classes, hub layout) for benchmarks and tests.

    Example: kontext-train make-random-model /data/random-kontext --full
    """
    from kontext_trainer.builder import BuildError, make_random_model

    _quiet_libraries()
    variant = "full" if full else "tiny"
    t0 = time.perf_counter()
    try:
        path = make_random_model(out_dir, variant=variant, seed=seed, device=device, max_shard_size=max_shard_size,
                                 on_progress=lambda line: err.print(line, markup=False, highlight=False,
                                                                    soft_wrap=True))
    except BuildError as exc:
        _fail(f"make-random-model {out_dir}", [str(exc)], EXIT_PROBLEMS)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    out.print(f"Random Kontext model ({variant}, seed {seed}; NOT real weights): {path}")
    shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
    out.print(f"{shown} on disk, written in {seconds:.1f} s")


@app.command("export", epilog="Examples:\n\n"
             "  kontext-train export kontext-lora --format comfyui\n\n"
             "  kontext-train export my_lora_comfyui.safetensors --format diffusers --out converted/")
def export_cmd(
    adapter: Path = typer.Argument(..., help="An output folder (its pytorch_lora_weights.safetensors) or an adapter "
                                   ".safetensors file (diffusers, Kohya or LyCORIS keys)."),
    format_: str = typer.Option(..., "--format", "-f", help="comfyui (Kohya keys on BFL names for LoRA, LyCORIS "
                                "keys for LoKr) | diffusers."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: beside the input; "
                                            "diffusers: a diffusers/ folder that load_lora_weights reads)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
) -> None:
    """Convert an adapter between the diffusers and ComfyUI/Kohya formats.

    Example: kontext-train export kontext-lora --format comfyui
    """
    from kontext_trainer.export import FORMATS, ExportError, export_adapter

    if format_ not in FORMATS:
        _fail("export", [f"--format {format_!r} is not one of {', '.join(FORMATS)}"], EXIT_USAGE)
    target = out_path
    if target is not None and (target.is_dir() or str(target).endswith(("/", os.sep))):
        target = target / "pytorch_lora_weights.safetensors"
    try:
        result = export_adapter(adapter, format_, target)
    except ExportError as exc:
        _fail(f"export {adapter}", exc.problems, EXIT_PROBLEMS)
    info = {"path": str(result.path), "from": result.source_format, "to": result.target_format,
            "adapter": result.adapter, "modules": result.modules_in, "keys": result.keys_out, "notes": result.notes}
    if json_out:
        print(json.dumps(info), flush=True)
    else:
        for n in result.notes:
            err.print(f"[cyan]note:[/cyan] {n}", highlight=False)
        out.print(f"{result.adapter} adapter ({result.source_format} -> {result.target_format}, {result.modules_in} "
                  f"modules): {result.path}")


def main() -> None:
    """Console entry point: `kontext-train MANIFEST ...` means `kontext-train train MANIFEST ...`."""
    argv = sys.argv[1:]
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        sys.argv.insert(1, "train")
    app(prog_name="kontext-train")


if __name__ == "__main__":
    main()
