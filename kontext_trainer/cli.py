"""The `kontext-train` command line: thin Typer commands that build a TrainConfig and call the recipe.

`kontext-train MANIFEST [options]` trains (the `train` sub-command is implied);
`kontext-train make-tiny-model OUT` writes a tiny random Kontext model for tests and the demo;
`kontext-train make-random-model OUT --full` a full-size one with random weights, for benchmarks.
Exit codes: 0 ok, 1 problems found (manifest, model, training), 2 usage/configuration errors.

`train`'s options that set a TrainConfig field are generated from the fields' metadata (``cli`` in
:mod:`kontext_trainer.config`): name, type, help and default are declared once, on the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer

from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, OptionSpec, ProgressView, err, fail, fail_with,
                                 generated_options, interrupted, json_option, out, print_json, quiet_libraries)
from kontext_trainer.phases import OUTSIDE_PHASES

app = typer.Typer(
    name="kontext-train",
    help="Train a FLUX.1 Kontext LoRA from a kontext-data manifest.\n\n"
    "Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
SUBCOMMANDS = ("train", "make-tiny-model", "make-random-model", "export")
CONFIG_PANEL = "Training options (TrainConfig keys: also in --config FILE or --set KEY=VALUE; docs/train.md)"
STAGE_NAMES = {"text": "text embeddings", "latents": "VAE latents", "masks": "loss masks"}
JSON_EVENTS = ("step", "validation", "checkpoint", "saved", "cache", "stage", "warning", "note", "timings",
               "validation_loss")
"""The recipe events `--json` prints, one JSON line each (and the final `done` summary)."""


@app.callback()
def _root() -> None:
    """Train a FLUX.1 Kontext LoRA from a kontext-data manifest.

    Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json
    """
    quiet_libraries()


def config_options() -> list[OptionSpec]:
    """One option per TrainConfig field whose metadata has ``cli``: its flags (default ``--field-name``), type
    (a Literal takes text: the config's aliases, e.g. optimi-lion, are checked by resolve_config), help and default.
    A bool field is ``--x/--no-x``, or an on-only flag when its ``cli`` names one spelling (``--verify``)."""
    from kontext_trainer.config import cli_fields

    options = []
    for field, tp in cli_fields():
        meta = field.metadata
        if typing.get_origin(tp) is not Literal and typing.get_args(tp):  # X | None: X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        base = Path if meta.get("path") else str if typing.get_origin(tp) is Literal else tp
        on_only = base is bool and len(meta["cli"]) == 1 and "/" not in meta["cli"][0]
        shown = str(field.default).lower() if isinstance(field.default, bool) else field.default
        options.append(OptionSpec(field.name, bool if on_only else Optional[base], meta["help"], tuple(meta["cli"]),
                                  default=False if on_only else None, panel=CONFIG_PANEL,
                                  shown_default=None if on_only or shown in ("", None) else str(shown)))
    return options


class Reporter:
    """Turns recipe events into progress (rich bars on a terminal, whole lines in a log) and lines on stderr;
    with `json_lines`, also one JSON line per event on stdout."""

    def __init__(self, quiet: bool, json_lines: bool):
        self.json_lines = json_lines
        self.view = ProgressView(quiet=quiet)
        self.saved: str | None = None
        """The final adapter's path once the run has written it (before the final validation images)."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bars (the last state of each task stays on screen, or in the log)."""
        self.view.close()

    def kept(self) -> str:
        """What an interrupted run kept: the final adapter once written, else the checkpoints."""
        if self.saved:
            return f"the trained adapter is saved ({self.saved}); only the final validation images are missing"
        return "checkpoints already written are intact (resume with --resume latest)"

    def __call__(self, kind: str, data: dict) -> None:
        if self.json_lines and kind in JSON_EVENTS:
            print_json({"event": kind, **data}, indent=None)
        if kind == "saved" and not data.get("ema"):
            self.saved = data["path"]
        if kind == "progress":
            self.view.update(STAGE_NAMES.get(data["stage"], data["stage"]), data["done"], data["total"])
        elif kind == "step":
            self.view.update("training", data["step"], data["total"],
                             info=f"loss {data['loss']:.4f} lr {data['lr']:.2e} {data['step_time']:.2f}s/step")
        elif kind in ("stage", "note"):
            self.view.line(f"[cyan]{data['message']}[/cyan]")
        elif kind == "warning":
            self.view.line(f"[yellow]warning:[/yellow] {data['message']}")
        elif kind == "validation":
            self.view.line(f"validation strips (step {data['step']}): {data['dir']}")
        elif kind == "validation_loss":
            self.view.line(validation_loss_line(data))
        elif kind == "checkpoint":
            self.view.line(f"checkpoint: {data['path']}")
        elif kind == "cache":
            masks = (f", {data.get('mask_encoded', 0)} of {data['mask_total']} loss masks computed"
                     if data.get("mask_total") else "")
            self.view.line(f"cache {data['cache_dir']}: {data.get('text_encoded', 0)} of {data['text_total']} "
                           f"captions and {data.get('latent_encoded', 0)} of {data['latent_total']} images encoded"
                           f"{masks}, rest reused")


def validation_loss_line(d: dict) -> str:
    """`validation loss 0.4123 (train 0.3987) at step 200`, with `; EMA ...` when the EMA is validated too."""
    def pair(prefix: str) -> str:
        text = f"{d[prefix + 'val_loss']:.4f}"
        if prefix + "train_eval_loss" in d:
            text += f" (train {d[prefix + 'train_eval_loss']:.4f})"
        return text

    line = f"validation loss {pair('')} at step {d['step']}"
    return line + (f"; EMA {pair('ema_')}" if "ema_val_loss" in d else "")


def timings_line(t: dict) -> str:
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
    by_phase = t.get("peak_gpu_gib_by_phase")
    if by_phase:  # where the card came closest to full: the phase to look at when memory is short
        top = max(by_phase, key=by_phase.get)
        parts.append(f"peak GPU memory {by_phase[top]:.1f} GiB in {top}"
                     + (f" ({OUTSIDE_PHASES} {by_phase[OUTSIDE_PHASES]:.1f})"
                        if top != OUTSIDE_PHASES and OUTSIDE_PHASES in by_phase else ""))
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
@generated_options(config_options(), into="field_values")
def train_cmd(
    manifest: List[Path] = typer.Argument(..., help="Parquet manifest(s) written by `kontext-data pair`; several "
                                          "are trained as one (sample ids must be unique across them). PATH:WEIGHT "
                                          "weighs one: a.parquet:2 sees its samples twice per epoch, :0.5 a seeded "
                                          "half (dataset_weights)."),
    num_processes: int = typer.Option(1, "--num-processes", min=1, help="Data-parallel processes on this machine "
                                      "(one per GPU; gloo on the CPU). Same as `accelerate launch --multi_gpu "
                                      "--num_processes N -m kontext_trainer ...`."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file: JSON (comments allowed), TOML "
                                          "or YAML. SimpleTuner config.json keys are accepted."),
    set_: List[str] = typer.Option([], "--set", help="Any config key: --set key=value (repeatable). See "
                                   "docs/train.md for the list."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
    json_out: bool = json_option("Print one JSON line per step/event on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    *,
    field_values: dict[str, Any],
) -> None:
    """Train a FLUX.1 Kontext LoRA on MANIFEST and save OUTPUT_DIR/pytorch_lora_weights.safetensors.

    Example: kontext-train manifest.parquet --model ./FLUX.1-Kontext-dev --config config.json
    """
    cfg = _resolve(manifest, config, set_, field_values, json_out)
    if print_config:
        print_json(cfg.to_dict())
        raise typer.Exit(EXIT_OK)

    from kontext_trainer.distributed import gpu_problems, launch, world_size_from_env

    if num_processes > 1 and world_size_from_env() <= 1:  # the same command without --num-processes, N times
        import torch

        gpus = torch.cuda.device_count() if cfg.device != "cpu" and torch.cuda.is_available() else 0
        problems = gpu_problems(cfg.device, num_processes, gpus)
        if problems:  # said once, before N processes would each say it
            fail(problems, EXIT_USAGE, title="several processes", json_out=json_out, indent=None,
                 extra={"event": "error"})
        raise typer.Exit(launch(num_processes, _without_num_processes(sys.argv[1:])))

    from kontext_trainer.memory import use_expandable_segments

    use_expandable_segments()  # before the first CUDA allocation
    from kontext_trainer.recipe import TrainError, train

    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:  # rank 0 reports for the group
        quiet, json_out = True, False
    with Reporter(quiet=quiet, json_lines=json_out) as reporter:
        try:
            result = train(cfg, on_event=reporter)
        except TrainError as exc:
            reporter.close()
            fail_with(exc, json_out=json_out, code=EXIT_PROBLEMS, indent=None, extra={"event": "error"})
        except KeyboardInterrupt:
            reporter.close()
            interrupted(reporter.kept())
    if rank == 0:
        _print_train_summary(result, json_out)


def _resolve(manifest: list[Path], config: Optional[Path], set_: list[str], field_values: dict[str, Any],
             json_out: bool):
    """The TrainConfig: defaults < config file < --set < explicit options (MANIFEST PATH:WEIGHT arguments add to
    the dataset_weights); every problem reported at once (exit 2). Prints the config's warnings and notes."""
    from kontext_trainer.config import ConfigError, join_manifest_paths, parse_set_options, read_config_file, \
        resolve_config

    file_values: dict = {}
    if config is not None:
        try:
            file_values = read_config_file(config)
        except ConfigError as exc:
            fail(exc.problems, EXIT_USAGE, title=f"config {config}", json_out=json_out, indent=None,
                 extra={"event": "error"})
    overrides, problems = parse_set_options(set_)
    manifest_paths, manifest_weights, weight_problems = parse_manifest_arguments([str(m) for m in manifest])
    problems += weight_problems
    explicit = {"manifest": join_manifest_paths(manifest_paths)}
    explicit.update({k: str(v) if isinstance(v, Path) else v for k, v in field_values.items()})
    overrides.update(explicit)
    try:
        resolved = resolve_config(file_values, overrides, source=str(config) if config else None)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        fail(problems, EXIT_USAGE, title="invalid configuration", json_out=json_out, indent=None,
             extra={"event": "error"})
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
    return cfg


def _without_num_processes(argv: list[str]) -> list[str]:
    """`argv` less its --num-processes N / --num-processes=N (what each launched process runs)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            kept.append(a)
    return kept


def _print_train_summary(result: Any, json_out: bool) -> None:
    """Where the LoRA, EMA, strips and config went, the loss and the time; with --json the `done` event."""
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
    if json_out:
        print_json({"event": "done", **summary}, indent=None)
        return
    out.print(f"LoRA: {result.lora_path}")
    if result.ema_path:
        out.print(f"EMA LoRA: {result.ema_path}")
    if result.validation_dirs:
        out.print(f"Validation strips: {result.validation_dirs[-1]}")
    out.print(f"Resolved config: {result.config_path}")
    out.print(f"{len(result.losses)} steps, {result.seconds_per_step:.2f} s/step; loss {first:.4f} -> "
              f"{summary['final_loss_mean_last_10pct']:.4f} (mean of the last 10%)")
    out.print(timings_line(result.timings), highlight=False)


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

    variant = "full" if full else "tiny"
    t0 = time.perf_counter()
    try:
        path = make_random_model(out_dir, variant=variant, seed=seed, device=device, max_shard_size=max_shard_size,
                                 on_progress=lambda line: err.print(line, markup=False, highlight=False,
                                                                    soft_wrap=True))
    except BuildError as exc:
        fail_with(exc, title=f"make-random-model {out_dir}", code=EXIT_PROBLEMS)
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
    json_out: bool = json_option("Print the result as one JSON line."),
) -> None:
    """Convert an adapter between the diffusers and ComfyUI/Kohya formats.

    Example: kontext-train export kontext-lora --format comfyui
    """
    from kontext_trainer.export import FORMATS, ExportError, export_adapter

    if format_ not in FORMATS:
        fail(f"--format {format_!r} is not one of {', '.join(FORMATS)}", EXIT_USAGE, title="export", json_out=json_out,
             command="kontext-train export", indent=None)
    target = out_path
    if target is not None and (target.is_dir() or str(target).endswith(("/", os.sep))):
        target = target / "pytorch_lora_weights.safetensors"
    try:
        result = export_adapter(adapter, format_, target)
    except ExportError as exc:
        fail_with(exc, title=f"export {adapter}", code=EXIT_PROBLEMS, json_out=json_out, indent=None)
    info = {"path": str(result.path), "from": result.source_format, "to": result.target_format,
            "adapter": result.adapter, "modules": result.modules_in, "keys": result.keys_out, "notes": result.notes}
    if json_out:
        print_json(info, indent=None)
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
