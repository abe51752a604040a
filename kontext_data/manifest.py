"""The manifest: one Parquet row per training sample, the contract between kontext_data and kontext_trainer.

In: rows (dicts) built by a stage such as `pairing`. Out: a Parquet file with a fixed, versioned schema
(documented column by column in docs/manifest.md), and a reader that validates it and resolves paths.

Only pyarrow is imported at module level; PIL is imported inside `load_image`.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from kontext_data import __version__
from kontext_data.problems import ProblemsError

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = "1.1"
"""major.minor. Readers accept any minor of a major they know and refuse a newer major. 1.1 added the nullable
`mask_path` and `mask_hash` columns (OPTIONAL_COLUMNS): a 1.0 manifest reads as rows without masks."""

HASH_ALGORITHM = "xxh3_128"

META_SCHEMA_VERSION = "kontext.schema_version"
META_TOOL_VERSION = "kontext.tool_version"
META_OPTIONS = "kontext.options"
META_CREATED_BY = "kontext.created_by"
META_HASH = "kontext.hash_algorithm"

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


@functools.lru_cache(maxsize=None)
def arrow_schema():
    """The pyarrow schema of a manifest (version SCHEMA_VERSION)."""
    import pyarrow as pa

    geometry = pa.struct([("width", pa.int32()), ("height", pa.int32())] + [(n, pa.int32()) for n in GEOMETRY_FIELDS])
    types = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "list<string>": pa.list_(pa.string()),
             "list<geometry>": pa.list_(geometry)}
    return pa.schema([pa.field(name, types[t], nullable=nullable) for name, t, nullable in _COLUMN_SPECS])


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


def write_manifest(
    rows: Iterable[Mapping[str, Any]],
    path: Path | str,
    options: Mapping[str, Any] | None = None,
    created_by: str = "kontext-data",
) -> Path:
    """Write `rows` (dicts with every column in COLUMNS; OPTIONAL_COLUMNS may be left out: null) to `path` atomically.

    The file is written to a temporary name in the same folder and renamed over `path`, so an existing manifest
    is either fully replaced or left untouched. `options` (JSON-serializable) are stored in the key-value metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    schema = arrow_schema()
    # Table.from_arrays, not pa.table(dict): the latter imports pandas (~0.2 s) to look for DataFrames
    table = pa.Table.from_arrays([pa.array([row.get(f.name) if f.name in OPTIONAL_COLUMNS else row[f.name]
                                            for row in rows], type=f.type) for f in schema], schema=schema)
    metadata = {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_TOOL_VERSION: __version__,
        META_CREATED_BY: created_by,
        META_HASH: HASH_ALGORITHM,
        META_OPTIONS: json.dumps(dict(options or {}), sort_keys=True, default=str),
    }
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class Manifest:
    """A validated manifest. `table` holds paths as stored; `records()` resolves them."""

    path: Path
    table: "pa.Table"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def options(self) -> dict[str, Any]:
        return self.metadata.get("options", {})

    def __len__(self) -> int:
        return self.table.num_rows

    def resolve(self, stored: str) -> Path:
        """A stored path made usable: relative paths are taken from the manifest's folder."""
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

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


def _parse_version(text: str) -> tuple[int, int] | None:
    try:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    except ValueError:
        return None


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
    meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
    problems: list[str] = []
    version_text = meta.get(META_SCHEMA_VERSION)
    if version_text is None:
        problems.append(f"no '{META_SCHEMA_VERSION}' metadata: not a kontext manifest. Create one with `kontext-data pair`.")
    else:
        version = _parse_version(version_text)
        ours = _parse_version(SCHEMA_VERSION)
        if version is None:
            problems.append(f"unreadable schema version {version_text!r}")
        elif version[0] > ours[0]:
            problems.append(
                f"schema version {version_text} was written by a newer kontext-toolkit "
                f"(this one, {__version__}, reads {ours[0]}.x): upgrade with `pip install -U kontext-toolkit`."
            )
    missing = [name for name in COLUMNS if name not in table.column_names and name not in OPTIONAL_COLUMNS]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if problems:
        raise ManifestError(path, problems)
    table = _add_optional_columns(table)
    problems.extend(_check_values(table))
    if problems:
        raise ManifestError(path, problems)
    metadata: dict[str, Any] = {
        "schema_version": version_text,
        "tool_version": meta.get(META_TOOL_VERSION),
        "created_by": meta.get(META_CREATED_BY),
        "hash_algorithm": meta.get(META_HASH),
        "options": json.loads(meta.get(META_OPTIONS, "{}") or "{}"),
    }
    return Manifest(path=path, table=table, metadata=metadata)


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
