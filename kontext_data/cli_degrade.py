"""``kontext-data degrade``: the Typer command (thin: parse, build DegradeConfig, call run_degrade, report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# numpy/OpenCV are imported inside the command, so that `kontext-data --help` stays fast



class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:6.1f} img/s", style="progress.data.speed")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _int_list(text: Optional[str]) -> Optional[list[int] | str]:
    if text is None:
        return None
    parts = [p for p in text.replace(",", " ").replace("-", " ").split() if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        return text  # resolve_chain reports it with the valid form


def degrade(
    src: Path = typer.Argument(..., help="Folder of clean images (the edit targets), scanned recursively."),
    out: Path = typer.Option(..., "--out", "-o", help="REFDIR: references at the same relative paths."),
    types: Optional[list[str]] = typer.Option(
        None, "--type", "-t", help="Degradation; repeat to chain in order: blur|superresolution, "
        "jpeg|jpeg_artifacts, noise, downscale."),
    params: Optional[Path] = typer.Option(
        None, "--params", help="JSON: a SimpleTuner conditioning entry (or its dataset/dataloader config), or "
        '{"chain": [{"type": ..., "params": {...}}], "captions": [...], "seed": 0}.'),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", help="KEY=VALUE or TYPE.KEY=VALUE (JSON values), any parameter of docs/degrade.md."),
    caption: Optional[list[str]] = typer.Option(
        None, "--caption", "-c", help="Edit instruction; repeat; one per image, written as <stem>.txt."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Root seed (default 0, or the params file's)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="Processes (default: all cores)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: only this 1/N of the files, K from 0."),
    on_demand: bool = typer.Option(False, "--on-demand", help="Write records (+ captions) only, no images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in REFDIR not written by degrade."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    blur_radius: Optional[float] = typer.Option(None, help="blur: Gaussian sigma / box half-width [2.0]."),
    blur_type: Optional[str] = typer.Option(None, help="blur: gaussian|box|motion|both [gaussian]."),
    motion_length: Optional[float] = typer.Option(None, help="blur motion: streak length px [2*radius+1]."),
    motion_angle: Optional[float] = typer.Option(None, help="blur motion: degrees [random per image]."),
    add_noise: Optional[bool] = typer.Option(None, "--add-noise/--no-add-noise", help="blur: add noise [yes]."),
    noise_level: Optional[float] = typer.Option(None, help="blur, noise: std as a fraction of 255 [0.02]."),
    downscale_factor: Optional[float] = typer.Option(None, help="blur: down-then-up factor [none]."),
    jpeg_quality: Optional[int] = typer.Option(None, help="blur: final JPEG pass quality [none]."),
    quality_mode: Optional[str] = typer.Option(None, help="jpeg: fixed|range|random [fixed]."),
    quality: Optional[int] = typer.Option(None, help="jpeg: quality for fixed mode [25]."),
    quality_range: Optional[str] = typer.Option(None, help="jpeg: LOW-HIGH for range mode [10-50]."),
    quality_list: Optional[str] = typer.Option(None, help="jpeg: Q,Q,... for random mode [10,20,30,40]."),
    compression_rounds: Optional[int] = typer.Option(None, help="jpeg: rounds [1]."),
    round_quality_decay: Optional[float] = typer.Option(None, help="jpeg: quality factor per round [0.9]."),
    subsampling: Optional[str] = typer.Option(None, help="jpeg: 4:4:4|4:2:2|4:2:0 [libjpeg default 4:2:0]."),
    noise_type: Optional[str] = typer.Option(None, help="noise: gaussian|poisson [gaussian]."),
    factor: Optional[float] = typer.Option(None, help="downscale: factor [2.0]."),
    upscale: Optional[str] = typer.Option(None, help="downscale: nearest|bilinear|bicubic|lanczos [bilinear]."),
    restore_size: Optional[bool] = typer.Option(None, "--restore-size/--keep-small",
                                                help="downscale: back to the original size [yes]."),
) -> None:
    """Write degraded references (deblur, JPEG artifacts, noise, super-resolution) for every image of SRC, at
    the same relative paths under --out, reproducibly (per-image seeds), resumably and in parallel.

    Example (deblur pairs, the guide's superresolution block):
    kontext-data degrade photos/ -t blur --blur-radius 3 -c "deblur" -c "sharpen image" --out refs/
    then: kontext-data pair photos/ refs/ --match stem

    JPEG artifacts from a SimpleTuner conditioning block: kontext-data degrade photos/ --params cond.json --out refs/

    Chain and shard: kontext-data degrade photos/ -t blur -t downscale -t noise -p blur.blur_radius=1.5
    --out refs/ --shard $SLURM_ARRAY_TASK_ID/8

    On demand (no images; the trainer synthesizes them): kontext-data degrade photos/ -t jpeg --on-demand --out refs/

    Types: blur (= superresolution), jpeg (= jpeg_artifacts), noise, downscale; parameters in docs/degrade.md.
    Outputs: .jpg when the chain ends in a JPEG pass (the exact bytes of the last round), else lossless .png.
    Exit codes: 0 done, 1 some images failed (listed), 2 usage error.
    """
    from . import degradations as D
    from .degrade import DegradeConfig, DegradeError, build_chain, load_params_file, parse_shard, run_degrade
    from .problems import ProblemsError

    err = Console(stderr=True)
    problems: list[str] = []
    file_steps: list = []
    file_caps: list[str] = []
    file_seed = None
    if params is not None:
        try:
            file_steps, file_caps, file_seed = load_params_file(params)
        except DegradeError as exc:
            problems.extend(exc.problems)
    options: dict[str, Any] = {
        "blur_radius": blur_radius, "blur_type": blur_type, "motion_length": motion_length,
        "motion_angle": motion_angle, "add_noise": add_noise, "noise_level": noise_level,
        "downscale_factor": downscale_factor, "jpeg_quality": jpeg_quality, "quality_mode": quality_mode,
        "quality": quality, "quality_range": _int_list(quality_range), "quality_list": _int_list(quality_list),
        "compression_rounds": compression_rounds, "round_quality_decay": round_quality_decay,
        "subsampling": subsampling, "noise_type": noise_type, "factor": factor, "upscale": upscale,
        "restore_size": restore_size,
    }
    for item in param or []:
        if "=" not in item:
            problems.append(f"--param {item!r}: expected KEY=VALUE or TYPE.KEY=VALUE")
            continue
        k, v = item.split("=", 1)
        options[k.strip()] = _parse_value(v.strip())
    chain: list = []
    if not types and not file_steps:
        problems.append(f"no degradation given: pass --type (valid: {D.valid_type_names()}) or --params FILE")
    else:
        try:
            chain = build_chain(list(types or []), options, file_steps)
        except DegradeError as exc:
            problems.extend(exc.problems)
    captions = [c for c in (caption or [])] or file_caps
    if any(not c.strip() for c in captions):
        problems.append("--caption: empty captions are not allowed")
    try:
        shard_t = parse_shard(shard)
    except ProblemsError as exc:  # the ShardError of --shard
        problems.extend(exc.problems)
        shard_t = (0, 1)
    if problems:
        _usage_exit(err, problems, json_out)
    config = DegradeConfig(src=src, out=out, chain=tuple(chain), captions=tuple(captions),
                           seed=seed if seed is not None else (file_seed or 0), workers=workers, shard=shard_t,
                           on_demand=on_demand, overwrite=overwrite)

    show_bar = err.is_terminal or not json_out
    progress = Progress(TextColumn("[bold]degrade"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
                        disable=not show_bar, transient=False)
    task_id = None

    def on_start(total: int) -> None:
        nonlocal task_id
        task_id = progress.add_task("degrade", total=total)

    def on_item(_item) -> None:  # noqa: ANN001
        progress.advance(task_id)

    try:
        with progress:
            result = run_degrade(config, progress=on_item, on_start=on_start)
    except DegradeError as exc:
        _usage_exit(err, exc.problems, json_out)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished files are complete; run the same command again to resume")
        raise typer.Exit(130)

    if json_out:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        _print_summary(err, result)
    raise typer.Exit(0 if result.ok else 1)


def _usage_exit(err: Console, problems: list[str], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps({"usage_errors": problems}, indent=2) + "\n")
    for p in problems:
        err.print(f"[red]error[/]: {p}", highlight=False)
    err.print("see: kontext-data degrade --help", highlight=False)
    raise typer.Exit(2)


def _print_summary(err: Console, result) -> None:  # noqa: ANN001
    r = result.to_json()
    chain = " -> ".join(s["type"] for s in result.chain)
    what = "records (on-demand)" if result.on_demand else f".{'jpg' if result.codec == 'jpeg' else 'png'} files"
    err.print(f"degrade [bold]{chain}[/] (params {result.params_hash}) -> {result.out}: {what}", highlight=False)
    err.print(f"  sources {result.sources}, this shard {result.selected} ({r['shard']}), workers {result.workers}",
              highlight=False)
    err.print(f"  written {result.written}, recorded {result.recorded}, skipped (up to date) {result.skipped}, "
              f"removed (source gone) {result.removed}, failed {result.failed}; {result.elapsed_s:.1f} s"
              + (f", {r['images_per_s']} img/s" if r["images_per_s"] else ""), highlight=False)
    if not result.on_demand:
        ext = ".jpg" if result.codec == "jpeg" else ".png"
        err.print(f"  pair: outputs keep the source name when it already ends in {ext}"
                  f"{' or .jpeg' if ext == '.jpg' else ''}; otherwise use `kontext-data pair SRC REFDIR --match "
                  "stem`", highlight=False)
    for f in result.failures:
        err.print(f"[red]failed[/]: {f.message}", highlight=False)
    if result.failures:
        err.print(f"[red]{result.failed} image(s) failed[/]; the others were produced. Fix or remove them and run "
                  "the same command again (finished images are skipped).", highlight=False)
