"""The `kontext-data` command line: thin Typer commands that build a frozen config and call a library function.

Only typer and rich are imported at start-up (and the degradation table, whose options `degrade` generates); each
command imports its stage when it runs. `pair` and `import-simpletuner` live here; the stage commands register
themselves from their modules (`register(app)`), which import :mod:`kontext_data.clikit` and never this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from kontext_data import cli_degrade, cli_inspect, cli_split
from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, err, fail, json_option, out, print_json,
                                 quiet_libraries, run_with_progress)

app = typer.Typer(
    name="kontext-data",
    help="Turn image folders into clean, validated FLUX.1 Kontext edit pairs (a Parquet manifest).\n\n"
    "Example: kontext-data pair ./edited ./reference",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Turn image folders into clean, validated FLUX.1 Kontext edit pairs (a Parquet manifest).

    Example: kontext-data pair ./edited ./reference
    """
    quiet_libraries()


@app.command(
    "pair",
    epilog="Examples:\n\n"
    "  kontext-data pair ./edited ./reference\n\n"
    "  kontext-data pair ./edited ./ref_a ./ref_b --out data/manifest.parquet --report report.json\n\n"
    "  kontext-data pair ./edited ./reference --match stem --resolution 512 --eval-fraction 0.05\n\n"
    "  kontext-data pair ./edited ./reference --masks ./masks",
)
def pair(
    edited: Path = typer.Argument(..., help="Folder of edited images (the training targets), searched recursively."),
    references: Optional[List[Path]] = typer.Argument(None, help="Reference folders; files pair by relative path. None: reference-free (text-to-image) samples."),
    out_path: Path = typer.Option(Path("manifest.parquet"), "--out", "-o", help="Manifest to write (replaced atomically)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of loss masks: one per edited image, same relative name (any image extension), same size; white = the region the edit changes. The trainer weighs the loss by it."),
    match: str = typer.Option("exact", help="exact: same name incl. extension (SimpleTuner's rule) | stem: any extension."),
    captions: str = typer.Option("textfile", help="textfile (<stem>.txt beside the image) | filename | instanceprompt | none."),
    instance_prompt: Optional[str] = typer.Option(None, help="The caption of every sample with --captions instanceprompt."),
    reference_captions: bool = typer.Option(True, "--reference-captions/--no-reference-captions",
                                            help="A caption beside the reference replaces the edit caption."),
    resolution: float = typer.Option(1024, help="Training resolution (pixels; megapixels with --resolution-type area)."),
    resolution_type: str = typer.Option("pixel_area", help="pixel_area | pixel (shorter edge) | area (megapixels)."),
    alignment: int = typer.Option(16, help="Bucket sides are multiples of this (16 Kontext; 64 SimpleTuner parity)."),
    min_size: int = typer.Option(0, help="Images whose shorter edge is under this many pixels are problems."),
    max_size: Optional[int] = typer.Option(None, help="Shorter edge above which images are first downsampled..."),
    target_downsample_size: Optional[int] = typer.Option(None, help="...to this shorter edge, before cropping."),
    max_pixels: int = typer.Option(100_000_000, help="Images with more pixels are problems (decompression bombs)."),
    crop: bool = typer.Option(True, "--crop/--no-crop", help="Crop to the bucket, or resize straight to it."),
    crop_style: str = typer.Option("center", help="center | random (seeded per sample, recorded) | corner."),
    crop_aspect: str = typer.Option("preserve", help="preserve (image aspect) | square | closest (Kontext's aspects)."),
    conditioning: str = typer.Option("reference_strict", help="reference_strict (reference gets the edit's crop) | reference_loose."),
    seed: int = typer.Option(0, help="Seed of random crops and of the eval split; per-sample seeds derive from it."),
    split: str = typer.Option("train", help="Split of every row: train | eval (a dedicated validation set)."),
    eval_fraction: float = typer.Option(0.0, help="Carve this fraction into a deterministic eval split instead."),
    dataset_id: Optional[str] = typer.Option(None, help="Dataset id recorded in each row (default: the edited folder's name)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="With problems, still write the valid samples."),
    verify_decode: bool = typer.Option(False, "--verify-decode", help="Decode every image fully (slower, thorough)."),
    workers: int = typer.Option(0, help="Processes for reading headers and hashing; 0 = all cores."),
    cache_dir: Optional[Path] = typer.Option(None, help="Probe cache folder (default: ~/.cache/kontext-data)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the probe cache."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report (problems, warnings, counts) here."),
    json_out: bool = json_option("Print the JSON report on stdout instead of the summary."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    check_content: bool = typer.Option(False, "--check-content", help="Also compare each pair's pixels (kontext-data check): flags identical, unrelated and misaligned pairs and adds the pair_similarity column."),
) -> None:
    """Check that EDITED and REFERENCE folders pair 1-to-1 and write the training manifest.

    Every problem (missing or misnamed pairs, broken images, missing captions, missing or wrong-size masks, ...) is
    found in one pass and reported together, each with the files and the fix. Exit code: 0 all paired, 1 problems
    found (no manifest unless --allow-partial), 2 usage error.
    """
    from kontext_data.fileio import write_json_atomic
    from kontext_data.geometry import GeometryOptions
    from kontext_data.pairing import PairConfig, pair_folders
    from kontext_data.scan import default_cache_dir

    config = PairConfig(
        edited=edited, references=tuple(references or ()), masks=masks, out=out_path, match=match,
        captions=captions, instance_prompt=instance_prompt, reference_captions=reference_captions,
        geometry=GeometryOptions(
            resolution=resolution, resolution_type=resolution_type, alignment=alignment, max_size=max_size,
            target_downsample_size=target_downsample_size, crop=crop, crop_style=crop_style, crop_aspect=crop_aspect,
        ),
        min_size=min_size, max_pixels=max_pixels, conditioning=conditioning, seed=seed, split=split,
        eval_fraction=eval_fraction, dataset_id=dataset_id, allow_partial=allow_partial, verify_decode=verify_decode,
        workers=workers, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
    )
    if config.problems():
        fail(config.problems(), EXIT_USAGE, json_out=json_out, command="kontext-data pair")
    result = run_with_progress("Reading images", lambda cb: pair_folders(config, cb), quiet=quiet or json_out)
    data = result.report()
    if check_content and result.manifest:
        data["content_check"] = _check_content(result.manifest, workers, quiet=quiet or json_out)
    if report:
        write_json_atomic(report, data)
    if json_out:
        print_json(data)
    else:
        print_pair_summary(result, report)
        if "content_check" in data:
            counts = ", ".join(f"{k}: {v}" for k, v in data["content_check"]["flag_counts"].items())
            out.print(f"Content check ({counts}); see `kontext-data preview {result.manifest} --out preview.html "
                      f"--sort worst` and `kontext-data check` for details.")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def _check_content(manifest: Path, workers: int, *, quiet: bool) -> dict[str, Any]:
    """`pair --check-content`: compare each pair's pixels, add pair_similarity to `manifest`, return the report."""
    from kontext_data.check import CheckConfig, check_manifest, write_manifest_with_similarity

    checked = run_with_progress("Comparing pairs", lambda cb: check_manifest(manifest, CheckConfig(workers=workers),
                                                                             cb), quiet=quiet)
    write_manifest_with_similarity(manifest, checked, manifest)
    return {"flag_counts": checked.counts(),
            "flagged": [{"sample_id": s.sample_id, "flags": list(s.flags)} for s in checked.flagged]}


def print_pair_summary(result, report: Optional[Path]) -> None:
    from rich.table import Table

    stats = result.stats
    masks = f", {stats['mask_images']} mask" if "mask_images" in stats else ""
    out.print(f"[bold]Images:[/bold] {stats['edited_images']} edited, "
              f"{' + '.join(map(str, stats['reference_images']))} reference{masks} "
              f"({stats['probed']} read, {stats['cached']} from cache)")
    if result.reused:
        out.print("Nothing changed since the last run with these options: its result was reused.")
    if result.problems:
        table = Table(title=f"{len(result.problems)} problem(s)", show_lines=False, title_justify="left")
        table.add_column("kind", style="red", no_wrap=True)
        table.add_column("what and how to fix")
        shown = result.problems[:50]
        for p in shown:
            table.add_row(p.kind, p.message)
        out.print(table)
        if len(result.problems) > len(shown):
            out.print(f"... and {len(result.problems) - len(shown)} more (see --report).")
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.report()["problem_counts"].items()))
        out.print(f"[red]Problems by kind:[/red] {counts}")
    for w in result.warnings[:10]:
        out.print(f"[yellow]warning ({w.kind}):[/yellow] {w.message}")
    if len(result.warnings) > 10:
        out.print(f"[yellow]... and {len(result.warnings) - 10} more warnings (see --report).[/yellow]")
    splits = result.report()["splits"]
    if result.manifest:
        split_text = ", ".join(f"{v} {k}" for k, v in sorted(splits.items()))
        out.print(f"[green]Wrote[/green] {result.manifest}: {result.samples} samples ({split_text}).")
        if result.dropped:
            out.print(f"[yellow]Dropped {len(result.dropped)} sample(s) with problems (--allow-partial).[/yellow]")
    elif result.problems:
        out.print("[red]No manifest written.[/red] Fix the problems above, or pass --allow-partial to write "
                  "the valid samples only.")
    else:
        out.print("[yellow]No samples found: no manifest written.[/yellow]")
    if report:
        out.print(f"Report: {report}")


@app.command(
    "import-simpletuner",
    epilog="Examples:\n\n"
    "  kontext-data import-simpletuner multidatabackend.json --out data/\n\n"
    "  kontext-data import-simpletuner multidatabackend.json --config config.json --out data/ "
    "--path-map /datasets=/mnt/nas/datasets --path-map Yuanshi/Subjects200K=/mnt/nas/subjects200k",
)
def import_simpletuner(
    backend: Path = typer.Argument(..., help="SimpleTuner's dataloader config (multidatabackend.json; comments allowed)."),
    config: Optional[Path] = typer.Option(None, help="SimpleTuner's config.json: eval_dataset_id marks eval rows."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the manifests (and split panels / generated references)."),
    path_map: List[str] = typer.Option([], help="OLD=NEW: replace a folder or dataset-name prefix of the config (repeatable)."),
    alignment: int = typer.Option(16, help="Bucket alignment: 16 (Kontext) or 64 (SimpleTuner's exact buckets)."),
    seed: int = typer.Option(0, help="Seed of random crops, generated references and splits."),
    workers: int = typer.Option(0, help="Processes; 0 = all cores."),
    cache_dir: Optional[Path] = typer.Option(None, help="Probe cache folder (default: ~/.cache/kontext-data)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show the plan: what would be split, generated and paired."),
    report: Optional[Path] = typer.Option(None, help="Write a JSON report here."),
    json_out: bool = json_option("Print the JSON report on stdout."),
) -> None:
    """Turn a SimpleTuner dataloader config into manifests: one per edit dataset, and their union in OUT/manifest.parquet.

    Understands local and huggingface (composite) datasets, conditioning_data / conditioning_type, generator blocks
    (`conditioning`: superresolution, jpeg_artifacts), caption strategies, bucket options, and eval_dataset_id.
    Keys it does not support are listed together. Exit code 0 ok, 1 problems in the data, 2 problems in the config.
    """
    from kontext_data.fileio import write_json_atomic
    from kontext_data.scan import default_cache_dir
    from kontext_data.simpletuner import ImportConfig, plan_import, run_import

    pairs = [item.partition("=") for item in path_map]
    bad = [f"--path-map {old + sep + new!r}: expected OLD=NEW" for old, sep, new in pairs if not sep or not old]
    if bad:
        fail(bad, EXIT_USAGE, json_out=json_out, command="kontext-data import-simpletuner")
    cfg = ImportConfig(backend=backend, out=out_dir, config=config, path_map=tuple((o, n) for o, _, n in pairs),
                       alignment=alignment, seed=seed, workers=workers, cache_dir=cache_dir or default_cache_dir())
    plan = plan_import(cfg)
    data = {"report_version": 1, "notes": plan.notes, "unsupported_keys": plan.unsupported,
            "config_problems": plan.problems,
            "jobs": [{"dataset_id": j.dataset_id, "split": j.split is not None, "generated": [str(d.out) for d in j.degrade],
                      "edited": str(j.pair.edited), "references": [str(r) for r in j.pair.references],
                      "manifest": str(j.pair.out), "repeats": j.repeats} for j in plan.jobs]}
    if not json_out:
        _print_plan(plan, data["jobs"], out_dir)
    if plan.problems:
        fail(plan.problems, EXIT_USAGE, json_out=json_out, extra=data)
    if dry_run:
        if json_out:
            print_json(data)
        raise typer.Exit(EXIT_OK)
    result = run_import(cfg, plan, on_stage=None if json_out else (lambda msg: err.print(f"[bold]{msg}[/bold]")))
    data.update({"ok": result.ok, "manifest": str(result.manifest) if result.manifest else None,
                 "samples": result.samples, "stage_problems": result.stage_problems,
                 "datasets": {k: v.report() for k, v in result.pair_results.items()}})
    if report:
        write_json_atomic(report, data)
    if json_out:
        print_json(data)
    else:
        for msg in result.stage_problems:
            out.print(f"[red]problem:[/red] {msg}")
        for did, pres in result.pair_results.items():
            out.print(f"[bold]{did}[/bold]:")
            print_pair_summary(pres, None)
        if result.manifest:
            out.print(f"[green]Wrote[/green] {result.manifest}: {result.samples} samples from "
                      f"{len(result.pair_results)} dataset(s).")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def _print_plan(plan: Any, jobs: list[dict], out_dir: Path) -> None:
    """import-simpletuner's plan: notes, unsupported keys, and per dataset the steps to its manifest."""
    for note in plan.notes:
        out.print(f"[cyan]note:[/cyan] {note}")
    if plan.unsupported:
        out.print("[yellow]Not supported (ignored):[/yellow] " + "; ".join(plan.unsupported))
    for job in jobs:
        steps = (["split composites"] if job["split"] else []) + [f"generate {g}" for g in job["generated"]]
        seen = (f" (repeats {job['repeats']}: seen {job['repeats'] + 1} times per epoch when training on "
                f"{Path(out_dir) / 'manifest.parquet'})"
                if job["repeats"] else "")
        out.print(f"[bold]{job['dataset_id']}[/bold]: {' -> '.join(steps + ['pair'])} -> {job['manifest']}{seen}")


def _register_stage_commands() -> None:
    """Commands whose code lives beside their stage (each module imports its heavy libraries lazily)."""
    for module in (cli_degrade, cli_split, cli_inspect):
        module.register(app)


_register_stage_commands()


def main() -> None:
    """Console entry point of `kontext-data`."""
    app()


if __name__ == "__main__":
    main()
def _register_stage_commands() -> None:
    """Commands whose code lives beside their stage (each module imports its heavy libraries lazily)."""
    from kontext_data.cli_degrade import degrade
    from kontext_data.cli_inspect import check, inspect as inspect_cmd, preview
    from kontext_data.cli_split import split

    app.command("degrade")(degrade)
    app.command("split")(split)
    app.command("inspect")(inspect_cmd)
    app.command("preview")(preview)
    app.command("check")(check)


_register_stage_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
