"""``kontext-data split``: cut composite images into per-role panel folders (thin Typer wrapper).

The root CLI adds the command with :func:`register`. Everything heavy is imported inside the command so
``kontext-data --help`` stays fast.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, ProgressView, err, fail, fail_with, json_option,
                                 out, print_json)


def register(app: typer.Typer) -> None:
    """Add `split` to `app`."""
    app.command("split")(split)


def split(
    src: List[str] = typer.Argument(
        ..., help="Folder of composite images; Parquet file(s) or a folder of them; a save_to_disk folder; "
        "or a hub dataset id (e.g. Yuanshi/Subjects200K, cached or --streaming).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per role.", show_default=False),
    panels: Optional[int] = typer.Option(None, "--panels", "-n", help="Panels per composite (default 2; implied by a grid)."),
    layout: str = typer.Option("horizontal", "--layout", help="horizontal | vertical | 'grid RxC' (rows x columns, panels numbered row by row)."),
    roles: str = typer.Option("edit=0,reference=1", "--roles", help="ROLE=PANEL pairs naming the output folders; any number of references."),
    edit_role: str = typer.Option("edit", "--edit-role", help="The role holding the edited (target) panel."),
    mask_role: Optional[str] = typer.Option(None, "--mask-role", help="The role holding the loss mask of the edited panel (white = the region the edit changes), e.g. --roles edit=0,reference=1,mask=2 --mask-role mask: written like any role; --manifest pairs it as --masks, not as a reference."),
    image_column: str = typer.Option("image", "--image-column", help="Column with the composite: bytes, a path, or the {bytes, path} image struct."),
    caption_column: List[str] = typer.Option([], "--caption-column", "-c", help="Dotted path to a caption (description.description_0) for the edit role, or ROLE=PATH for another role. Repeatable."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Column (dotted path) naming the output files (default: zero-padded row index)."),
    gutter: str = typer.Option("auto", "--gutter", help="Separator width between panels: auto (detect per image) or pixels (0: plain even cut)."),
    gutter_tolerance: int = typer.Option(10, "--gutter-tolerance", help="Largest per-channel spread (0-255) within a separator band."),
    fmt: str = typer.Option("png", "--format", help="png (lossless, also for JPEG composites: no second JPEG pass) or jpeg (lossy re-encode)."),
    quality: int = typer.Option(95, "--quality", help="JPEG quality with --format jpeg."),
    dataset_split: str = typer.Option("train", "--dataset-split", help="Split of a datasets/hub source (train, "
                                      "test, ...; not pair's train/eval)."),
    old_split: Optional[str] = typer.Option(None, "--split", hidden=True, help="Old name of --dataset-split."),
    streaming: bool = typer.Option(False, "--streaming", help="Stream a hub dataset instead of downloading it (needs network)."),
    source_kind: str = typer.Option("auto", "--source-kind", help="auto | folder | parquet | disk | hub."),
    workers: int = typer.Option(0, "--workers", "-j", help="Worker processes (0: one per CPU core, 1: no subprocesses)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: only rows with index % N == K (K counts from 0, as in degrade: 0/4 ... 3/4); the N shards together equal one run."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N rows of the source (a preview)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-split rows already done (default: skip them, i.e. resume)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="After splitting, pair the role folders and write this manifest (Parquet)."),
    json_out: bool = json_option("Print the result as JSON on stdout (no progress bar)."),
) -> None:
    """Split composite images (panels side by side, stacked or in a grid) into one folder per role.

    Each composite becomes OUT/<role>/<name>.png (+ <name>.txt captions), with identical names in every role folder, ready for `kontext-data pair`. Gutters between panels and remainder pixels are detected, removed and reported; rows that cannot be cut into equal panels are reported with their row numbers (exit code 1), never cut silently. Rows already done are skipped (resume).

    Example, Subjects200K Parquet files fetched with `hf download Yuanshi/Subjects200K --repo-type dataset --local-dir s200k`:

    kontext-data split s200k/ --out pairs --roles edit=0,reference=1 -c description.description_0 --gutter 16 --manifest pairs/manifest.parquet

    Over 4 machines: the same command with --shard 0/4 ... --shard 3/4.
    """
    from kontext_data import split as sp
    from kontext_data.problems import ProblemsError

    if old_split is not None and dataset_split not in ("train", old_split):
        fail(f"--split {old_split!r} and --dataset-split {dataset_split!r}: give one (--split is the old name)",
             EXIT_USAGE, json_out=json_out, command="kontext-data split")
    try:
        cols, rows = sp.parse_layout(layout, panels)
        config = sp.SplitConfig(
            sources=tuple(src), out=out, cols=cols, rows=rows, roles=sp.parse_roles(roles),
            edit_role=edit_role, mask_role=mask_role, image_column=image_column,
            caption_columns=sp.parse_caption_columns(caption_column, edit_role), id_column=id_column,
            gutter=sp.parse_gutter(gutter), gutter_tolerance=gutter_tolerance, format=fmt.lower(),
            quality=quality, source_kind=source_kind, split=old_split or dataset_split, streaming=streaming,
            workers=workers, shard=sp.parse_shard(shard), limit=limit, overwrite=overwrite,
        )
        sp.validate_config(config)
        started = time.perf_counter()
        with ProgressView(quiet=json_out, unit="rows") as view:
            result = sp.split_composites(config, progress=lambda done, total: view.update("split", done, total))
    except ProblemsError as exc:  # SplitError, or the ShardError of --shard
        fail_with(exc, json_out=json_out, code=EXIT_USAGE, command="kontext-data split")
    elapsed = time.perf_counter() - started

    manifest_report: dict[str, Any] | None = None
    if manifest is not None:
        manifest_report = write_manifest_from_split(config, manifest)

    payload = result.to_dict() | {"seconds": round(elapsed, 3), "manifest": manifest_report}
    if json_out:
        print_json(payload)
    else:
        _print_summary(result, elapsed, manifest_report)
    failed_manifest = manifest_report is not None and not manifest_report.get("ok", False)
    raise typer.Exit(EXIT_OK if result.ok and not failed_manifest else EXIT_PROBLEMS)


def write_manifest_from_split(config, manifest: Path) -> dict[str, Any]:
    """Pair OUT/<edit role> with OUT/<reference roles> and write ``manifest`` via kontext_data.pairing.

    Manifest writing belongs to the pairing stage; this only calls it. Returns a small report dict.
    """
    dirs = config.role_dirs()
    try:
        from kontext_data.pairing import PairConfig, pair_folders
    except ImportError as exc:
        return {"ok": False, "path": str(manifest),
                "error": f"--manifest needs kontext_data.pairing, which is not available ({exc}); "
                         f"run `kontext-data pair` on {dirs[config.edit_role]} yourself"}
    pair_config = PairConfig(
        edited=dirs[config.edit_role],
        references=tuple(dirs[role] for role in config.reference_roles()),
        masks=dirs[config.mask_role] if config.mask_role else None,
        out=manifest,
    )
    try:
        pair_result = pair_folders(pair_config)
    except Exception as exc:  # the pairing stage's own errors: report them, the split itself is done
        return {"ok": False, "path": str(manifest), "error": f"pairing failed: {type(exc).__name__}: {exc}"}
    problems = [p.as_dict() if hasattr(p, "as_dict") else str(p) for p in pair_result.problems]
    return {"ok": pair_result.ok, "path": str(manifest), "samples": pair_result.samples, "problems": problems}


def _print_summary(result, elapsed: float, manifest_report: dict[str, Any] | None) -> None:
    say = functools.partial(out.print, highlight=False)
    rate = result.rows_seen / elapsed if elapsed > 0 else 0.0
    say(
        f"split {result.rows_seen} rows in {elapsed:.1f} s ({rate:,.1f} rows/s): {result.written} written, "
        f"{result.skipped_done} already done, {result.failed} failed"
    )
    for role, path in result.role_dirs.items():
        say(f"  {role}: {path}")
    if result.panel_sizes:
        say("  panel sizes: " + ", ".join(f"{k} ({v} rows)" for k, v in result.panel_sizes.most_common()))
    if result.gutters:
        say("  gutters removed: " + ", ".join(f"{k} px ({v} rows)" for k, v in sorted(result.gutters.items())))
        if len(result.gutters) > 1:
            say("  [yellow]gutter widths differ between rows[/yellow]: where panel backgrounds share the "
                          "gutter colour auto detection cannot tell them apart; pin it with --gutter PX", markup=True)
    if result.remainders:
        say("  remainder pixels dropped: " + ", ".join(f"{k} ({v} rows)" for k, v in sorted(result.remainders.items())))
    if result.lossy_sources:
        say(f"  {result.lossy_sources} composites were JPEG: panels written as decoded (no extra JPEG pass "
                      "unless --format jpeg)")
    for role, count in result.missing_captions.items():
        say(f"  [yellow]{count} rows have no caption for role {role!r}[/yellow] (empty or null)", markup=True)
    if manifest_report is not None:
        if manifest_report.get("ok"):
            say(f"  manifest: {manifest_report['path']} ({manifest_report.get('samples', '?')} samples)")
        else:
            say("  [red]manifest not written cleanly[/red]: " + escape(manifest_report.get("error") or ""),
                          markup=True)
            for p in manifest_report.get("problems", [])[:20]:
                say(f"    {p}")
    if result.problems:
        err.print(f"[red]{len(result.problems)} rows failed[/red] (nothing written for them):", markup=True)
        for p in result.problems:
            row = "-" if p.row is None else p.row
            err.print(f"  row {row} ({p.name}): {p.message}", markup=False)
