"""`kontext-data inspect`, `preview` and `check`: thin Typer commands (parse, build a frozen config, call the library,
print, exit 0 ok / 1 problems found / 2 usage error). The root CLI adds them with :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, fail, fail_with, json_option, out, print_json,
                                 run_with_progress)

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    """Add `inspect`, `preview` and `check` to `app`."""
    app.command("inspect")(inspect)
    app.command("preview")(preview)
    app.command("check")(check)


def _read_or_exit(fn: Callable[[], T], command: str, json_out: bool) -> T:
    """Call fn(); a ManifestError (missing, unreadable or invalid manifest) is a usage error with its problems."""
    from kontext_data.manifest import ManifestError

    try:
        return fn()
    except ManifestError as exc:
        fail_with(exc, json_out=json_out, command=f"kontext-data {command}", code=EXIT_USAGE)


def inspect(
    manifest: Path = typer.Argument(..., help="The manifest to inspect (written by `kontext-data pair`)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for buckets.png and aspect_ratios.png."),
    top: int = typer.Option(10, help="How many frequent captions / duplicate groups / missing files to list."),
    shared_reference_min: int = typer.Option(3, help="List a reference file used by at least this many targets."),
    no_files: bool = typer.Option(False, "--no-files", help="Do not stat the files (skip 'files gone')."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON statistics here."),
    json_out: bool = json_option("Print the JSON statistics on stdout instead of tables."),
) -> None:
    """Counts, buckets, captions, duplicates and missing files of a manifest.

    Example: kontext-data inspect data/manifest.parquet --plots data/plots

    Shows samples, references per sample, splits, datasets, conditioning types, the bucket histogram, caption
    length statistics and the most frequent captions, duplicates (the same edited file twice, one reference used by
    many targets), files gone since the manifest was made, and pair similarity when `kontext-data check
    --write-manifest` added it. No image is decoded. Exit code: 0 nothing to fix, 1 duplicates or files gone,
    2 usage error (e.g. not a manifest).
    """
    from kontext_data.fileio import write_json_atomic
    from kontext_data.inspect import InspectConfig, inspect_manifest, write_plots

    config = InspectConfig(top=top, shared_reference_min=shared_reference_min, check_files=not no_files)
    if config.problems():
        fail(config.problems(), EXIT_USAGE, json_out=json_out, command="kontext-data inspect")
    result = _read_or_exit(lambda: inspect_manifest(manifest, config), "inspect", json_out)
    data = result.report()
    if plots:
        data["plots"] = [str(p) for p in write_plots(result, plots)]
    if report:
        write_json_atomic(report, data)
    if json_out:
        print_json(data)
    else:
        _print_inspect(data)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def _print_inspect(data: dict) -> None:
    from rich.table import Table

    def counts(d: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

    out.print(f"[bold]{data['manifest']}[/bold]: {data['samples']} samples")
    out.print(f"  references per sample: {counts(data['references_per_sample'])}"
              f"  (degraded {data['degraded_references']}, on demand {data['on_demand_references']})")
    if data.get("masked_samples"):
        out.print(f"  loss masks (pair --masks): {data['masked_samples']} of {data['samples']} samples")
    for key in ("splits", "datasets", "conditioning_types", "caption_sources"):
        out.print(f"  {key.replace('_', ' ')}: {counts(data[key])}")
    t = Table(title=f"{data['bucket_count']} bucket(s)", title_justify="left")
    for c in ("bucket", "aspect", "samples", "share"):
        t.add_column(c, justify="right")
    total = max(1, data["samples"])
    for b in data["buckets"][:15]:
        bar = "#" * max(1, round(30 * b["count"] / max(1, data["buckets"][0]["count"])))
        t.add_row(b["bucket"], f"{b['aspect']:.3f}", str(b["count"]), f"{100 * b['count'] / total:5.1f}% {bar}")
    out.print(t)
    if len(data["buckets"]) > 15:
        out.print(f"  ... and {len(data['buckets']) - 15} more buckets (--json for all)")
    cap = data["captions"]
    ch, wd = cap["characters"], cap["words"]
    if ch.get("count"):
        out.print(f"[bold]Captions[/bold]: {cap['distinct']} distinct, {cap['missing']} missing; length in words "
                  f"min {wd['min']} / median {wd['median']} / p95 {wd['p95']} / max {wd['max']}, in characters "
                  f"median {ch['median']}, max {ch['max']}")
        for item in cap["most_frequent"][:5]:
            out.print(f"  {item['count']:>5} x {item['caption']!r}", highlight=False)
    else:
        out.print(f"[bold]Captions[/bold]: none ({cap['missing']} samples without a caption)")
    dup = data["duplicates"]
    out.print(f"[bold]Duplicates[/bold]: {dup['duplicate_target_groups']} edited file(s) used more than once, "
              f"{dup['shared_reference_groups']} reference(s) shared by many targets, "
              f"{dup['target_equals_reference']} reference(s) equal to their target")
    gone = data.get("files_gone")
    if gone:
        out.print(f"[bold]Files gone[/bold]: {gone['targets']} edited, {gone['references']} reference")
    sim = data.get("pair_similarity")
    if sim:
        out.print(f"[bold]Pair similarity[/bold]: min {sim['min']}, median {sim['median']}; flags {sim['flag_counts']}")
    for p in data["problems"]:
        out.print(f"[yellow]problem:[/yellow] {p}", highlight=False)
    for p in data.get("plots", []):
        out.print(f"Plot: {p}")


def preview(
    manifest: Path = typer.Argument(..., help="The manifest to preview."),
    out_path: Path = typer.Option(..., "--out", "-o", help="preview.png (contact sheet) or preview.html (pages)."),
    n: Optional[int] = typer.Option(None, "--n", help="Pairs to show (default: 24 for PNG, all for HTML)."),
    sort: str = typer.Option("manifest", help="manifest | worst (lowest pair similarity first) | random."),
    seed: int = typer.Option(0, help="Seed of --sort random."),
    thumb: int = typer.Option(192, help="Picture size in the PNG sheet (longest side, pixels)."),
    columns: int = typer.Option(2, help="Pairs per row of the PNG sheet."),
    page_size: int = typer.Option(48, help="Pairs per page of the HTML preview."),
    workers: int = typer.Option(0, help="Processes for HTML thumbnails (and --sort worst's check); 0 = all cores."),
    json_out: bool = json_option("Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Contact sheets of reference | edited pairs as the trainer will see them.

    Example: kontext-data preview data/manifest.parquet --out preview.html --sort worst

    Each pair shows the edited original with the recorded crop box, every reference and the edited image after the
    crop, with the bucket, split, similarity/flags and the caption under it. `.png` writes one sheet (24 pairs by
    default); `.html` writes a static page that opens from disk (thumbnails in <name>_files/ beside it, paging, a
    filter box, "flagged only"), fine for 10,000+ samples. --sort worst needs pair similarity: it uses the
    `pair_similarity` column (`kontext-data check --write-manifest`) or runs the content check first.
    Exit code: 0 written, 1 some images unreadable (grey panels), 2 usage error.
    """
    from kontext_data.preview import PreviewConfig, make_preview

    config = PreviewConfig(out=out_path, n=n, sort=sort, seed=seed, thumb=thumb, columns=columns, page_size=page_size,
                           workers=workers)
    if config.problems():
        fail(config.problems(), EXIT_USAGE, json_out=json_out, command="kontext-data preview")
    result = _read_or_exit(lambda: run_with_progress(
        "Rendering", lambda cb: make_preview(manifest, config, cb), quiet=quiet or json_out), "preview", json_out)
    if json_out:
        print_json(result.report())
    else:
        if result.checked:
            out.print("Ran the content check for --sort worst (save it with `kontext-data check --write-manifest`).")
        extra = f" + {len(result.files) - 1} thumbnails in {out_path.stem}_files/" if len(result.files) > 1 else ""
        out.print(f"[green]Wrote[/green] {result.out}{extra}: {result.shown} of {result.total} pairs"
                  f"{', worst first' if sort == 'worst' else ''}.")
        for e in result.errors[:20]:
            out.print(f"[red]unreadable:[/red] {e}", highlight=False)
        if len(result.errors) > 20:
            out.print(f"[red]... and {len(result.errors) - 20} more.[/red]")
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def check(
    manifest: Path = typer.Argument(..., help="The manifest whose pairs to check."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report (every score, flags, reasons) here."),
    write_manifest: Optional[Path] = typer.Option(None, "--write-manifest",
                                                  help="Write a copy of the manifest with a pair_similarity column."),
    in_place: bool = typer.Option(False, "--in-place", help="Add the pair_similarity column to MANIFEST itself."),
    workers: int = typer.Option(0, help="Processes; 0 = all cores."),
    unrelated_below: float = typer.Option(0.25, help="Similarity under which a pair is always 'unrelated'."),
    unrelated_ratio: float = typer.Option(0.65, help="'unrelated' also under this fraction of the dataset's median."),
    json_out: bool = json_option("Print the JSON report on stdout instead of the summary."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Compare every reference with its edited image and flag pairs that are wrong in content.

    Example: kontext-data check data/manifest.parquet --report check.json --in-place

    Flags: identical (no edit), unrelated (likely mis-paired or shuffled: similarity far below the dataset's),
    misaligned (reference_strict: the reference matches best shifted, or its aspect differs), unreadable.
    Scores come from 64x64 thumbnails after the recorded crop (edges, pixel agreement, colour); see docs/inspect.md.
    Exit code: 0 no pair flagged, 1 pairs flagged (listed), 2 usage error.
    """
    from kontext_data.check import CheckConfig, check_manifest, write_manifest_with_similarity
    from kontext_data.fileio import write_json_atomic

    config = CheckConfig(workers=workers, unrelated_below=unrelated_below, unrelated_ratio=unrelated_ratio)
    problems = config.problems()
    if in_place and write_manifest:
        problems.append("--in-place and --write-manifest: give one of them")
    if problems:
        fail(problems, EXIT_USAGE, json_out=json_out, command="kontext-data check")
    result = _read_or_exit(lambda: run_with_progress(
        "Checking pairs", lambda cb: check_manifest(manifest, config, cb), quiet=quiet or json_out), "check", json_out)
    target = manifest if in_place else write_manifest
    data = result.report()
    if target:
        try:
            write_manifest_with_similarity(manifest, result, target)
        except (OSError, ValueError) as exc:
            fail(f"cannot write {target}: {exc}", EXIT_PROBLEMS, json_out=json_out)
        data["manifest_written"] = str(target)
    if report:
        write_json_atomic(report, data)
    if json_out:
        print_json(data)
    else:
        _print_check(result, data, report, target, manifest)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def _print_check(result, data: dict, report: Optional[Path], target: Optional[Path], manifest: Path) -> None:
    from rich.table import Table

    counts = data["flag_counts"]
    med = data["dataset"]["median_similarity"]
    out.print(f"[bold]{data['samples']} samples, {data['pairs']} pairs[/bold] checked in {data['elapsed_s']:.1f} s "
              f"({data['ms_per_pair'] or 0:.1f} ms/pair, {data['workers']} process(es)); median similarity {med}")
    flagged = result.flagged
    if flagged:
        t = Table(title=f"{len(flagged)} pair(s) flagged", title_justify="left")
        t.add_column("sample", no_wrap=True)
        t.add_column("similarity", justify="right")
        t.add_column("flags", style="red")
        t.add_column("why")
        for s in sorted(flagged, key=lambda s: (s.similarity is None, s.similarity or 0))[:50]:
            t.add_row(s.sample_id, "-" if s.similarity is None else f"{s.similarity:.2f}", " ".join(s.flags),
                      "; ".join(s.reasons))
        out.print(t)
        if len(flagged) > 50:
            out.print(f"... and {len(flagged) - 50} more (see --report).")
        out.print("[red]Flagged:[/red] " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                  + f". Look at them: kontext-data preview {manifest} --out preview.html --sort worst",
                  highlight=False)
    else:
        out.print("[green]No pair flagged.[/green]")
    if target:
        out.print(f"Wrote {target} (with a pair_similarity column).")
    if report:
        out.print(f"Report: {report}")
