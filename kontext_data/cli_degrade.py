"""``kontext-data degrade``: the Typer command (thin: parse, build DegradeConfig, call run_degrade, report).

The degradation parameters' options (``--blur-radius``, ``--quality``, ...) are generated from
:data:`kontext_data.degrade_params.PARAM_SPECS`: one option per parameter, with its type, documentation and default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import typer

from kontext_data import degrade_params as D
from kontext_data.clikit import (EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, OptionSpec, ProgressView, err, fail, fail_with,
                                 generated_options, interactive, interrupted, json_option, print_json)

PARAMETERS_PANEL = "Degradation parameters (docs/degrade.md; also -p KEY=VALUE)"
FLAGS = {"restore_size": ("--restore-size/--keep-small",)}
"""Parameters whose option is not spelled ``--name`` (``--name/--no-name`` for a bool)."""
TYPES = {"float": Optional[float], "int": Optional[int], "bool": Optional[bool]}  # others: text (lists parsed later)
FORMATS = {"int_pair": "LOW-HIGH", "int_list": "Q,Q,..."}


def _shown_default(spec: D.Param, declaration: str) -> str | None:
    """The default as --help shows it: a bool by its flag (``add-noise`` / ``no-add-noise``), a list by its form."""
    if spec.default is None:
        return None
    if spec.kind == "bool":
        on, _, off = declaration.partition("/")
        return (on if spec.default else off).lstrip("-")
    if isinstance(spec.default, list):
        return ("-" if spec.kind == "int_pair" else ",").join(map(str, spec.default))
    return str(spec.default)


def parameter_options() -> list[OptionSpec]:
    """One option per parameter name of PARAM_SPECS; a name several types share (noise_level) is one option that
    sets it in every chained type that has it. Help: the owning types, the parameter's doc, its choices or form."""
    owners: dict[str, list[tuple[str, D.Param]]] = {}
    for type_name, specs in D.PARAM_SPECS.items():
        for name, spec in specs.items():
            owners.setdefault(name, []).append((type_name, spec))
    options = []
    for name, entries in owners.items():
        spec = entries[0][1]
        docs = {doc: [t for t, s in entries if s.doc == doc] for doc in dict.fromkeys(s.doc for _, s in entries)}
        text = "; ".join(f"{', '.join(types)}: {doc}" for doc, types in docs.items())
        if spec.choices:
            text += f" ({'|'.join(spec.choices)})"
        if spec.kind in FORMATS:
            text += f" ({FORMATS[spec.kind]})"
        option = OptionSpec(name, TYPES.get(spec.kind, Optional[str]), text + ".", flags=FLAGS.get(name, ()),
                            panel=PARAMETERS_PANEL)
        options.append(dataclasses.replace(option, shown_default=_shown_default(spec, option.declarations()[0])))
    return options


def register(app: typer.Typer) -> None:
    """Add `degrade` to `app`."""
    app.command("degrade")(degrade)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@generated_options(parameter_options(), into="param_values")
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
    json_out: bool = json_option("Print the summary as JSON on stdout."),
    *,
    param_values: dict[str, Any],
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
    from .degrade import DegradeError, run_degrade

    config = _config_or_fail(src, out, types, params, param, caption, seed, workers, shard, on_demand, overwrite,
                             param_values, json_out)
    try:
        with ProgressView(quiet=json_out and not interactive(), unit="img") as view:
            result = run_degrade(config, progress=lambda _item: view.advance("degrade"),
                                 on_start=lambda total: view.task("degrade", total))
    except DegradeError as exc:
        fail_with(exc, json_out=json_out, command="kontext-data degrade")
    except KeyboardInterrupt:
        interrupted("finished files are complete; run the same command again to resume")
    if json_out:
        print_json(result.to_json())
    else:
        _print_summary(result)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_PROBLEMS)


def _config_or_fail(src: Path, out: Path, types: Optional[list[str]], params: Optional[Path],
                    param: Optional[list[str]], caption: Optional[list[str]], seed: Optional[int],
                    workers: Optional[int], shard: Optional[str], on_demand: bool, overwrite: bool,
                    param_values: dict[str, Any], json_out: bool):
    """The DegradeConfig of the command line, or exit 2 with every problem of it at once."""
    from .degrade import DegradeConfig, DegradeError, build_chain, load_params_file, parse_shard
    from .problems import ProblemsError

    problems: list[str] = []
    file_steps: list = []
    file_caps: list[str] = []
    file_seed = None
    if params is not None:
        try:
            file_steps, file_caps, file_seed = load_params_file(params)
        except DegradeError as exc:
            problems.extend(exc.problems)
    options: dict[str, Any] = dict(param_values)
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
    captions = list(caption or []) or file_caps
    if any(not c.strip() for c in captions):
        problems.append("--caption: empty captions are not allowed")
    try:
        shard_t = parse_shard(shard)
    except ProblemsError as exc:  # the ShardError of --shard
        problems.extend(exc.problems)
        shard_t = (0, 1)
    if problems:
        fail(problems, EXIT_USAGE, json_out=json_out, command="kontext-data degrade")
    return DegradeConfig(src=src, out=out, chain=tuple(chain), captions=tuple(captions),
                         seed=seed if seed is not None else (file_seed or 0), workers=workers, shard=shard_t,
                         on_demand=on_demand, overwrite=overwrite)


def _print_summary(result: Any) -> None:
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
