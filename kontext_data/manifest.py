"""The manifest: one Parquet row per training sample, the contract between kontext_data and kontext_trainer.

In: rows (dicts) built by a stage such as `pairing`. Out: a Parquet file with a fixed, versioned schema
(documented column by column in docs/manifest.md), and a reader that validates it and resolves paths.

This module is the one owner of the format: the schema (with the content check's `pair_similarity` column), every
key-value metadata key (`META_*`, read and written through `decode_metadata` / `encode_metadata`), reading
(`read_manifest`), writing (`write_manifest`; `write_similarity` for the check's column; both atomic through
`kontext_data.fileio`), the on-demand reference records of `reference_degradations` (`on_demand_record`), and how a
row becomes pixels (`load_image`, `load_mask`, `view_image`, `view_original`, `crop_box`). No other module opens a
manifest's Parquet file.

Nothing heavy is imported at module level (pyarrow, PIL and NumPy inside the functions), so the CLIs start fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from kontext_data import __version__
from kontext_data.fileio import atomic_path
from kontext_data.problems import ProblemsError

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

SCHEMA_VERSION = "1.1"
"""major.minor. Readers accept any minor of a major they know and refuse a newer major. 1.1 added the nullable
`mask_path` and `mask_hash` columns (OPTIONAL_COLUMNS): a 1.0 manifest reads as rows without masks. The check's
`pair_similarity` column (CHECK_COLUMNS) needs no version: it is optional in every 1.x manifest."""

HASH_ALGORITHM = "xxh3_128"

# Parquet key-value metadata keys: METADATA_KEYS maps them to the names of `Manifest.metadata`.
META_SCHEMA_VERSION = "kontext.schema_version"
META_TOOL_VERSION = "kontext.tool_version"
META_OPTIONS = "kontext.options"
META_CREATED_BY = "kontext.created_by"
META_HASH = "kontext.hash_algorithm"
META_CHECK = "kontext.check"
METADATA_KEYS = {
    "schema_version": META_SCHEMA_VERSION,
    "tool_version": META_TOOL_VERSION,
    "created_by": META_CREATED_BY,
    "hash_algorithm": META_HASH,
    "options": META_OPTIONS,
    "check": META_CHECK,
}
"""`Manifest.metadata` name -> Parquet key. `options` (every option of the run that wrote the manifest) and `check`
(the content check's thresholds, counts and flagged samples, written with `pair_similarity`) hold JSON objects,
the others text."""
_JSON_METADATA = {"options": {}, "check": None}  # JSON-valued names and their value when the key is absent

GEOMETRY_FIELDS = (
    "intermediary_width",
    "intermediary_height",
    "crop_left",
    "crop_top",
    "bucket_width",
    "bucket_height",
)

# (name, type, nullable); the pyarrow schema is built on first use, so that importing this module (and a
# `kontext-data pair` that reuses its previous result) does not pay for importing pyarrow.
_COLUMN_SPECS = (
    ("sample_id", "string", False),
    ("dataset_id", "string", False),
    ("split", "string", False),
    ("target_path", "string", False),
    ("reference_paths", "list<string>", False),
    ("caption", "string", True),
    ("captions", "list<string>", False),
    ("caption_source", "string", False),
    ("target_width", "int32", False),
    ("target_height", "int32", False),
    ("intermediary_width", "int32", False),
    ("intermediary_height", "int32", False),
    ("crop_left", "int32", False),
    ("crop_top", "int32", False),
    ("bucket_width", "int32", False),
    ("bucket_height", "int32", False),
    ("reference_geometry", "list<geometry>", False),
    ("conditioning_type", "string", False),
    ("target_hash", "string", False),
    ("reference_hashes", "list<string>", False),
    ("seed", "int64", False),
    ("reference_degradations", "list<string>", False),
    # schema 1.1: the loss mask of the edited image (`kontext-data pair --masks`); null for a sample without one
    ("mask_path", "string", True),
    ("mask_hash", "string", True),
)
COLUMNS = tuple(name for name, _, _ in _COLUMN_SPECS)
OPTIONAL_COLUMNS = ("mask_path", "mask_hash")
"""Columns added by a minor version: a manifest without them reads as if they were null in every row, and a row
given to `write_manifest` without them writes null."""

SIMILARITY_COLUMN = "pair_similarity"
_CHECK_COLUMN_SPECS = ((SIMILARITY_COLUMN, "float32", True),)
CHECK_COLUMNS = tuple(name for name, _, _ in _CHECK_COLUMN_SPECS)
"""Columns of the content check (`kontext-data check --write-manifest/--in-place`, `pair --check-content`), written
by `write_similarity` after COLUMNS, with the `kontext.check` metadata. A manifest without them has not been
checked; `write_manifest` never writes them. `pair_similarity`: float32 in [0, 1], the lowest similarity over the
sample's references, null for a reference-free sample or an unreadable pair."""


@functools.lru_cache(maxsize=None)
def _arrow_types() -> dict[str, "pa.DataType"]:
    import pyarrow as pa

    geometry = pa.struct([("width", pa.int32()), ("height", pa.int32())] + [(n, pa.int32()) for n in GEOMETRY_FIELDS])
    return {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(),
            "list<string>": pa.list_(pa.string()), "list<geometry>": pa.list_(geometry)}


@functools.lru_cache(maxsize=None)
def arrow_schema():
    """The pyarrow schema of a manifest (version SCHEMA_VERSION): COLUMNS, without the check's columns."""
    import pyarrow as pa

    types = _arrow_types()
    return pa.schema([pa.field(name, types[t], nullable=nullable) for name, t, nullable in _COLUMN_SPECS])


def _check_field(name: str):
    import pyarrow as pa

    spec = {n: (t, nullable) for n, t, nullable in _CHECK_COLUMN_SPECS}[name]
    return pa.field(name, _arrow_types()[spec[0]], nullable=spec[1])


def geometry_items(geometry: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """The six GEOMETRY_FIELDS of a record (or of one `reference_geometry` element) as ((name, int), ...) pairs:
    hashable and picklable, for pool tasks and content keys; `dict()` of it is a geometry again."""
    return tuple((k, int(geometry[k])) for k in GEOMETRY_FIELDS)


CONDITIONING_TYPES = ("reference_strict", "reference_loose")
SPLITS = ("train", "eval")


class ManifestError(ProblemsError):
    """A manifest cannot be read or used. `problems` lists every problem found, one message each."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        super().__init__(problems, title=f"{self.path}: {len(problems)} problem(s)")


def store_path(path: Path, manifest_dir: Path) -> str:
    """Relative POSIX path when `path` lies under `manifest_dir`, else the absolute path."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path(os.path.abspath(manifest_dir))).as_posix()
    except ValueError:
        return str(path)


def encode_metadata(values: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata of `values` (names of METADATA_KEYS, kept in the order given): JSON for
    `options` and `check` (sorted keys), text for the others. The one writer of every `kontext.*` key."""
    out = {}
    for name, value in values.items():
        text = json.dumps(dict(value or {}), sort_keys=True, default=str) if name in _JSON_METADATA else str(value)
        out[METADATA_KEYS[name].encode()] = text.encode()
    return out


def decode_metadata(raw: Mapping[bytes, bytes] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of a manifest's key-value metadata by METADATA_KEYS name (absent keys: None, `options` {}), and
    the problem of each name whose key does not hold a JSON object (its value then reads as absent). The one reader
    of every `kontext.*` key."""
    text = {k.decode(): v.decode() for k, v in (raw or {}).items()}
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, key in METADATA_KEYS.items():
        values[name] = text.get(key)
        if name not in _JSON_METADATA:
            continue
        fix = "kontext-data check MANIFEST --in-place" if name == "check" else "kontext-data pair"
        try:
            value = json.loads(text[key]) if text.get(key) else _JSON_METADATA[name]
        except ValueError as exc:
            value, problems[name] = None, f"metadata '{key}' is not valid JSON ({exc}): write it again with `{fix}`"
        if value is not None and not isinstance(value, dict):
            problems[name] = f"metadata '{key}' is not a JSON object: write it again with `{fix}`"
        values[name] = value if isinstance(value, dict) else _JSON_METADATA[name]
    return values, problems


def _write_table(table: "pa.Table", path: Path) -> Path:
    """The one place a manifest's Parquet file is written: zstd, atomically (fileio.atomic_path)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")
    return path


def write_manifest(
    rows: Iterable[Mapping[str, Any]],
    path: Path | str,
    options: Mapping[str, Any] | None = None,
    created_by: str = "kontext-data",
) -> Path:
    """Write `rows` (dicts with every column in COLUMNS; OPTIONAL_COLUMNS may be left out: null) to `path` atomically.

    The file is written to a temporary name in the same folder and renamed over `path`, so an existing manifest
    is either fully replaced or left untouched. `options` (JSON-serializable) are stored in the key-value metadata.
    Other keys of a row (such as the check's `pair_similarity`) are not written.
    """
    import pyarrow as pa

    path = Path(path)
    rows = list(rows)
    schema = arrow_schema()
    # Table.from_arrays, not pa.table(dict): the latter imports pandas (~0.2 s) to look for DataFrames
    table = pa.Table.from_arrays([pa.array([row.get(f.name) if f.name in OPTIONAL_COLUMNS else row[f.name]
                                            for row in rows], type=f.type) for f in schema], schema=schema)
    metadata = encode_metadata({"schema_version": SCHEMA_VERSION, "tool_version": __version__,
                                "created_by": created_by, "hash_algorithm": HASH_ALGORITHM, "options": options})
    return _write_table(table.replace_schema_metadata(metadata), path)


def write_similarity(source: Path | str, out: Path | str, similarity: Mapping[str, float | None],
                     check: Mapping[str, Any]) -> Path:
    """Copy the manifest `source` to `out` with the content check's `pair_similarity` column and `kontext.check`
    metadata (`check`, a JSON-ready mapping); the rest of the file (columns, metadata, schema version) is kept.

    `similarity` maps every sample id to its similarity (None: null), in the manifest's row order. An existing
    `pair_similarity` column is replaced. Written atomically, so `out` may be `source` (in place). Raises
    ValueError when the manifest's sample ids are not those of `similarity` (it changed since the check).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, out = Path(source), Path(out)
    table = pq.read_table(source)
    if table.column("sample_id").to_pylist() != list(similarity):
        raise ValueError(f"{source} changed since it was checked (its sample ids differ): run the check again")
    meta = dict(table.schema.metadata or {})
    if SIMILARITY_COLUMN in table.column_names:
        table = table.drop_columns([SIMILARITY_COLUMN])
    f = _check_field(SIMILARITY_COLUMN)
    table = table.append_column(f, pa.array(list(similarity.values()), type=f.type))
    meta.update(encode_metadata({"check": check}))
    return _write_table(table.replace_schema_metadata(meta), out)


@dataclass
class Manifest:
    """A validated manifest. `table` holds paths as stored; `records()` resolves them. `metadata` holds the
    key-value metadata by METADATA_KEYS name."""

    path: Path
    table: "pa.Table"
    metadata: dict[str, Any] = field(default_factory=dict)
    check_problems: list[str] = field(default_factory=list)
    """Problems of the content check's annotations (CHECK_COLUMNS, `kontext.check`): the faulty ones were left out,
    so the manifest reads as unchecked. They never stop a manifest from being used (the trainer ignores them, and
    `kontext-data check --in-place` must be able to rewrite them); `kontext-data inspect` reports them."""

    @property
    def root(self) -> Path:
        """The manifest's folder: relative stored paths start here."""
        return self.path.parent

    @property
    def options(self) -> dict[str, Any]:
        """`kontext.options`: every option of the run that wrote the manifest ({} when none)."""
        return self.metadata.get("options", {})

    @property
    def check(self) -> dict[str, Any] | None:
        """The content check's `kontext.check` record (flag_counts, median_similarity, thresholds, flagged:
        {sample_id: {flags, reasons}}), or None when the check has not written this manifest."""
        return self.metadata.get("check")

    def __len__(self) -> int:
        return self.table.num_rows

    def resolve(self, stored: str) -> Path:
        """A stored path made usable: relative paths are taken from the manifest's folder."""
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row with paths as stored: what `write_manifest` takes to write them again in this folder."""
        return self.table.to_pylist()

    def records(self) -> list[dict[str, Any]]:
        """One dict per row, with `target_path`, `reference_paths` and `mask_path` (when set) resolved to absolute
        path strings."""
        out = self.table.to_pylist()
        for row in out:
            row["target_path"] = str(self.resolve(row["target_path"]))
            row["reference_paths"] = [str(self.resolve(p)) for p in row["reference_paths"]]
            if row.get("mask_path"):
                row["mask_path"] = str(self.resolve(row["mask_path"]))
        return out

    def similarities(self) -> list[float | None] | None:
        """The `pair_similarity` column (one value per row, None where null), or None when the check has not
        written it."""
        if SIMILARITY_COLUMN not in self.table.column_names:
            return None
        return self.table.column(SIMILARITY_COLUMN).to_pylist()


def _parse_version(text: str) -> tuple[int, int] | None:
    try:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    except ValueError:
        return None


def _version_problems(version_text: str | None) -> list[str]:
    if version_text is None:
        return [f"no '{META_SCHEMA_VERSION}' metadata: not a kontext manifest. Create one with `kontext-data pair`."]
    version, ours = _parse_version(version_text), _parse_version(SCHEMA_VERSION)
    if version is None:
        return [f"unreadable schema version {version_text!r}"]
    if version[0] > ours[0]:
        return [f"schema version {version_text} was written by a newer kontext-toolkit "
                f"(this one, {__version__}, reads {ours[0]}.x): upgrade with `pip install -U kontext-toolkit`."]
    return []


def read_manifest(path: Path | str) -> Manifest:
    """Read and validate a manifest; raise ManifestError listing every problem found."""
    import pyarrow.parquet as pq

    path = Path(os.path.abspath(path))  # so that records() resolves to absolute paths
    if not path.is_file():
        raise ManifestError(path, [f"no such file: {path}. Create it with `kontext-data pair EDITED REFERENCE --out {path}`."])
    try:
        pf = pq.ParquetFile(path)
        raw_meta = pf.schema_arrow.metadata or {}
        table = pf.read()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise ManifestError(path, [f"not a readable Parquet file ({exc}). Re-create it with `kontext-data pair`."]) from exc
    metadata, meta_problems = decode_metadata(raw_meta)
    check_problems = [meta_problems.pop("check")] if "check" in meta_problems else []
    problems = _version_problems(metadata["schema_version"]) + list(meta_problems.values())
    missing = [name for name in COLUMNS if name not in table.column_names and name not in OPTIONAL_COLUMNS]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if problems:
        raise ManifestError(path, problems)
    table = _add_optional_columns(table)
    problems.extend(_check_values(table))
    if problems:
        raise ManifestError(path, problems)
    similarity_problems = _similarity_problems(table)
    if similarity_problems:
        table = table.drop_columns([SIMILARITY_COLUMN])
    return Manifest(path=path, table=table, metadata=metadata, check_problems=check_problems + similarity_problems)


def _add_optional_columns(table: "pa.Table") -> "pa.Table":
    """A manifest of an older minor version (1.0: no mask columns) with those columns added as nulls, so every
    reader sees one set of columns."""
    import pyarrow as pa

    schema = arrow_schema()
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            f = schema.field(name)
            table = table.append_column(f, pa.nulls(table.num_rows, type=f.type))
    return table


def _check_values(table: "pa.Table") -> list[str]:
    problems: list[str] = []
    ids = table.column("sample_id").to_pylist()
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dups:
        problems.append(f"duplicate sample_id(s): {', '.join(dups[:10])}{' ...' if len(dups) > 10 else ''}")
    for name, allowed in (("split", SPLITS), ("conditioning_type", CONDITIONING_TYPES)):
        bad = sorted(set(table.column(name).to_pylist()) - set(allowed))
        if bad:
            problems.append(f"column {name}: unknown value(s) {bad}; valid: {list(allowed)}")
    n_refs = [len(r) for r in table.column("reference_paths").to_pylist()]
    for name in ("reference_geometry", "reference_hashes", "reference_degradations"):
        lens = [len(r) for r in table.column(name).to_pylist()]
        bad_rows = [i for i, (a, b) in enumerate(zip(n_refs, lens)) if a != b]
        if bad_rows:
            problems.append(f"column {name}: length differs from reference_paths in row(s) {bad_rows[:10]}")
    paths, hashes = table.column("mask_path").to_pylist(), table.column("mask_hash").to_pylist()
    bad_rows = [i for i, (p, h) in enumerate(zip(paths, hashes)) if bool(p) != bool(h)]
    if bad_rows:
        problems.append(f"columns mask_path and mask_hash: one is set without the other in row(s) {bad_rows[:10]}; "
                        "re-create the manifest with `kontext-data pair --masks`")
    return problems


def _similarity_problems(table: "pa.Table") -> list[str]:
    import pyarrow as pa

    if SIMILARITY_COLUMN not in table.column_names:
        return []
    col = table.column(SIMILARITY_COLUMN)
    fix = "the manifest reads as unchecked; write the column again with `kontext-data check MANIFEST --in-place`"
    if not (pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
        return [f"column {SIMILARITY_COLUMN}: type {col.type}, not a float; {fix}"]
    bad_rows = [i for i, v in enumerate(col.to_pylist()) if v is not None and not 0.0 <= v <= 1.0]
    if bad_rows:
        return [f"column {SIMILARITY_COLUMN}: value(s) outside [0, 1] in row(s) {bad_rows[:10]}; {fix}"]
    return []


# --------------------------------------------------------------------------------------------- on-demand references


def on_demand_record(text: str | None, *, strict: bool = False) -> dict | None:
    """The degradation record of one reference (`reference_degradations[i]`) when it is synthesized on demand
    (`kontext-data degrade --on-demand`: a JSON object with a true `on_demand`), else None: an ordinary file (null)
    or a file written by `degrade` (its provenance record).

    Text that is not a JSON object is an error: with `strict` it raises ValueError (the trainer lists it among the
    manifest's problems before any model loads); without, it reads as an ordinary file (the check, inspect and
    preview look at the file in `reference_paths`, and report it if unreadable).
    """
    if not text:
        return None
    try:
        rec = json.loads(text)
    except (TypeError, ValueError):
        if strict:
            raise
        return None
    if not isinstance(rec, dict):
        if strict:
            raise ValueError("not a JSON object")
        return None
    return rec if rec.get("on_demand") else None


def open_pixels(path: Path | str, degradation: str | None = None) -> "Image.Image":
    """A row's image before its geometry, as a PIL RGB image: the file (`imageio.open_rgb`: EXIF orientation,
    transparency onto white), or, when `degradation` is an on-demand record (`on_demand_record`), the reference
    synthesized from that file with the record's seed (`degrade.synthesize_reference`: the pixels `degrade` would
    have written)."""
    record = on_demand_record(degradation)
    if record is None:
        from kontext_data.imageio import open_rgb

        return open_rgb(path)
    from PIL import Image

    from kontext_data.degrade import synthesize_reference

    return Image.fromarray(synthesize_reference(path, record))


# --------------------------------------------------------------------------------------------- pixels


def load_image(path: Path | str, geometry: Mapping[str, Any]):
    """Open `path`, apply EXIF orientation, convert to RGB, resize to the intermediary size, crop the bucket.

    `geometry` is any mapping with the six GEOMETRY_FIELDS: a manifest record (for the target) or one element of
    its `reference_geometry`. This is the one definition of how a manifest row becomes pixels.
    """
    from kontext_data.geometry import apply_geometry
    from kontext_data.imageio import open_rgb

    return apply_geometry(open_rgb(path), geometry)


def load_mask(path: Path | str, geometry: Mapping[str, Any]):
    """The loss mask of a row at the bucket's pixel size: float32 NumPy array (height, width) in [0, 1], 1 = the
    region the edit changes.

    `geometry` is the TARGET's (a manifest record): a mask has no geometry of its own, it follows the edited
    image's resize and crop exactly (`apply_geometry`, area-averaged when shrinking, bilinear when enlarging, so
    values stay within the mask's range). How a file becomes gray values: `imageio.open_mask`.
    """
    import numpy as np
    from PIL import Image

    from kontext_data.geometry import apply_geometry
    from kontext_data.imageio import open_mask

    img = open_mask(path).convert("F")
    w, h = int(geometry["intermediary_width"]), int(geometry["intermediary_height"])
    shrink = w <= img.width and h <= img.height
    img = apply_geometry(img, geometry, resample=Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32) / 255.0, 0.0, 1.0)


def crop_box(size: tuple[int, int], geometry: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """The recorded crop (left, top, right, bottom) in the coordinates of the oriented original shown at `size`
    (its full size or any scaled copy): the region of the original that becomes the bucket."""
    sx, sy = size[0] / int(geometry["intermediary_width"]), size[1] / int(geometry["intermediary_height"])
    left, top = int(geometry["crop_left"]), int(geometry["crop_top"])
    return (left * sx, top * sy, (left + int(geometry["bucket_width"])) * sx,
            (top + int(geometry["bucket_height"])) * sy)


def _open_reduced(path: Path | str, draft: Callable[[int, int], tuple[int, int] | None]):
    """The oriented RGB original. A JPEG is decoded at the smallest DCT scale that still gives at least
    `draft(width, height)` (None: full size), several times faster for thumbnails; other files as
    `imageio.open_rgb` opens them. The file is opened once."""
    from PIL import Image, ImageOps

    from kontext_data.imageio import open_rgb

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as src:
        if src.format == "JPEG" and src.mode in ("RGB", "L"):
            wanted = draft(*src.size)
            if wanted is not None:
                src.draft("RGB", wanted)
            return ImageOps.exif_transpose(src).convert("RGB")
    return open_rgb(path)


def view_image(path: Path | str, geometry: Mapping[str, Any], degradation: str | None = None,
               size: tuple[int, int] | None = None, exact: bool = False) -> "Image.Image":
    """A PIL RGB image of one image of a row as the trainer sees it (recorded resize + crop), optionally scaled to
    `size`: the target (`geometry` = the record) or reference i (`reference_geometry[i]`, `degradation` =
    `reference_degradations[i]`: an on-demand record is synthesized, `open_pixels`).

    With `exact` (or an on-demand reference, or no `size`) the pixels are `load_image`'s (Lanczos to the
    intermediary size, crop), then resized to `size`. Otherwise the crop box is mapped back onto the original and
    resampled straight to `size` (JPEGs decoded at a reduced DCT scale): the same content, several times faster,
    for thumbnails.
    """
    from PIL import Image

    from kontext_data.geometry import apply_geometry

    if exact or size is None or on_demand_record(degradation) is not None:
        img = apply_geometry(open_pixels(path, degradation), geometry)
        return img if size is None or img.size == tuple(size) else img.resize(size, Image.Resampling.BOX)
    iw, ih = int(geometry["intermediary_width"]), int(geometry["intermediary_height"])
    bw, bh = int(geometry["bucket_width"]), int(geometry["bucket_height"])

    def draft(sw: int, sh: int) -> tuple[int, int] | None:
        # the smallest DCT scale that still gives >= 2x the thumbnail over the crop box
        resize = max(iw, ih) / max(sw, sh)  # the recorded resize (longest sides match under any orientation)
        f = 2 * resize * max(size[0] / max(bw, 1), size[1] / max(bh, 1))
        return (math.ceil(sw * f), math.ceil(sh * f)) if f < 1 else None

    img = _open_reduced(path, draft)
    box = crop_box(img.size, geometry)
    return img.resize(tuple(size), Image.Resampling.BOX if (box[2] - box[0]) >= size[0] else Image.Resampling.BILINEAR,
                      box=box)


def view_original(path: Path | str, max_side: int) -> "Image.Image":
    """The oriented original of a row's image, shrunk to fit `max_side` (a JPEG decoded at a reduced DCT scale):
    the picture `crop_box` maps the recorded crop onto."""
    from PIL import Image

    img = _open_reduced(path, lambda w, h: (max_side * 2, max_side * 2))
    img.thumbnail((max_side, max_side), Image.Resampling.BOX if max(img.size) > 2 * max_side else Image.Resampling.LANCZOS)
    return img
