"""Where ``kontext-data split`` reads its composites from: rows of a folder, Parquet files, a ``save_to_disk``
folder or a Hugging Face hub dataset, and the values inside a row.

In: the source options of a split (anything with the :class:`SourceSpec` attributes, e.g. ``SplitConfig``). Out: a
:class:`Source` whose ``rows`` yield ``(row index, row dict or None, base folder, error or None)`` one row at a time
(read in the calling process, never loaded whole; image bytes stay undecoded), or a :class:`SourceError` naming
every problem of the source as a whole (missing columns, unreadable files, an offline hub).

* a folder of composite images (names = relative paths, captions = ``<stem>.txt`` sidecars);
* one or more Parquet files, or a folder of them (a Hugging Face repository clone);
* a ``datasets`` directory written by ``save_to_disk``;
* a Hugging Face hub dataset id through ``datasets.load_dataset`` (cached, or ``streaming``); offline, it fails at
  once with a message naming the dataset and how to download it (:func:`hub_offline_reason` probes the Hub).

``datasets`` and pyarrow are imported inside functions so that importing this module stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol
from urllib.parse import urlparse

from kontext_data.imageio import IMAGE_EXTENSIONS
from kontext_data.problems import ProblemsError

SOURCE_KINDS = ("auto", "folder", "parquet", "disk", "hub")
COMPOSITE_EXTENSIONS = tuple(sorted(IMAGE_EXTENSIONS - {".gif"}))
"""Files a folder source reads. GIF is left out: split decodes with OpenCV, which reads GIF only in recent builds,
so the same folder would split on one machine and fail row by row on another (composite datasets ship PNG/JPEG)."""

Row = tuple[int, dict | None, str, str | None]
"""(row index, the row's values or None, base folder for relative image paths, error or None)."""


class SourceError(ProblemsError):
    """The source as a whole cannot be read (nothing was split): ``problems`` lists every reason."""

    usage = True


class SourceSpec(Protocol):
    """What a source needs to know (``SplitConfig`` documents each attribute)."""

    sources: tuple[str, ...]
    source_kind: str
    image_column: str
    caption_columns: tuple[tuple[str, str], ...]
    id_column: str | None
    split: str
    streaming: bool
    hub_timeout: float


@dataclass
class Source:
    """Rows of one source: ``rows`` yields (row index, raw row dict or None, base dir, error)."""

    description: str
    total: int | None
    """Rows in the source; None for a streamed dataset of unknown length."""
    rows: Iterator[Row]
    columns: tuple[str, ...] = ()
    """Top-level columns read (Parquet/datasets sources)."""
    folder_names: list[str] | None = None
    """Folder source: relative names without extension, one per row."""


# --------------------------------------------------------------------------------------------- row values


def get_path(row: Any, path: str) -> Any:
    """Value at a dotted path in nested dicts/structs (``description.description_0``).

    A key that itself contains dots wins over descending (a top-level column named ``a.b``); a string
    holding a JSON object is parsed and descended into; list elements are addressed by integer parts.
    Raises KeyError naming the missing part and the keys that exist.
    """
    parts = path.split(".")
    obj = row
    i = 0
    while i < len(parts):
        if isinstance(obj, str) and obj.lstrip().startswith("{"):
            try:
                obj = json.loads(obj)
            except ValueError:
                pass
        if isinstance(obj, dict):
            for j in range(len(parts), i, -1):
                key = ".".join(parts[i:j])
                if key in obj:
                    obj, i = obj[key], j
                    break
            else:
                raise KeyError(f"{path!r}: no key {parts[i]!r} (has: {', '.join(map(str, obj.keys())) or 'nothing'})")
        elif isinstance(obj, (list, tuple)) and parts[i].lstrip("-").isdigit() and -len(obj) <= int(parts[i]) < len(obj):
            obj, i = obj[int(parts[i])], i + 1
        else:
            kind = "null" if obj is None else type(obj).__name__
            raise KeyError(f"{path!r}: cannot look up {parts[i]!r} inside a {kind} value")
    return obj


def caption_text(value: Any) -> str | None:
    """A caption cell as text: stripped; a list joins its non-empty entries one per line; None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        lines = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return "\n".join(lines) or None
    text = str(value).strip()
    return text or None


def image_payload(value: Any) -> bytes | str | None:
    """Raw bytes, a path string, or the Hugging Face ``{bytes, path}`` struct -> bytes or path (None: empty)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        return value.get("path") or None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, str):
        return value or None
    return None


# --------------------------------------------------------------------------------------------- the hub


def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def _env_true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline_reason(timeout: float) -> str | None:
    """Why the hub is unusable now (offline env variable or no connection), or None when reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"{var}=1 is set"
    host, port = _hub_endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is not reachable within {timeout:g} s ({exc.__class__.__name__})"


@contextlib.contextmanager
def _forced_offline():
    """Make ``datasets``/``huggingface_hub`` use only the local cache (their flags are read at import)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    hub_constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]


# --------------------------------------------------------------------------------------------- columns


def _top_column(path: str, columns: Iterable[str]) -> str | None:
    """The column a dotted path starts in (the longest prefix that is a column name)."""
    cols = set(columns)
    parts = path.split(".")
    for j in range(len(parts), 0, -1):
        if ".".join(parts[:j]) in cols:
            return ".".join(parts[:j])
    return None


def _needed_columns(config: SourceSpec, columns: list[str], where: str) -> list[str]:
    """Top-level columns to read; raises SourceError naming every missing one and the ones available."""
    paths = [("--image-column", config.image_column)] + [
        (f"--caption-column {role}=", path) for role, path in config.caption_columns
    ]
    if config.id_column:
        paths.append(("--id-column", config.id_column))
    needed: list[str] = []
    errors: list[str] = []
    for option, path in paths:
        top = _top_column(path, columns)
        if top is None:
            errors.append(f"{option}{path}: no column {path.split('.')[0]!r} in {where}")
        elif top not in needed:
            needed.append(top)
    if errors:
        errors.append(f"columns of {where}: {', '.join(columns)}")
        raise SourceError(errors)
    return needed


def _check_struct_paths(config: SourceSpec, schema, where: str) -> None:
    """Check dotted caption paths into Arrow struct columns up front (JSON strings are checked per row)."""
    import pyarrow as pa

    errors = []
    for role, path in list(config.caption_columns) + ([("id", config.id_column)] if config.id_column else []):
        top = _top_column(path, schema.names)
        rest = path[len(top) + 1:].split(".") if top and len(path) > len(top) else []
        typ = schema.field(top).type if top else None
        for i, part in enumerate(rest):
            if not pa.types.is_struct(typ):
                break
            names = [typ.field(k).name for k in range(typ.num_fields)]
            if part not in names:
                # a field name with dots: accept if a longer joined name exists
                joined = next((".".join(rest[i:j]) for j in range(len(rest), i, -1) if ".".join(rest[i:j]) in names), None)
                if joined is None:
                    errors.append(f"caption column {path!r} ({role}): struct {top!r} in {where} has no field "
                                  f"{part!r} (fields: {', '.join(names)})")
                break
            typ = typ.field(part).type
    if errors:
        raise SourceError(errors)


# --------------------------------------------------------------------------------------------- readers


def _parquet_files(sources: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.parquet") if q.is_file())
        else:
            files.append(p)
    return files


def _open_parquet(config: SourceSpec) -> Source:
    import pyarrow.parquet as pq

    files = _parquet_files(config.sources)
    errors = [f"{f}: no such Parquet file" for f in files if not f.is_file()]
    if not files:
        errors.append(f"no .parquet files under {', '.join(config.sources)}")
    if errors:
        raise SourceError(errors)
    handles = []
    for f in files:
        try:
            # no pre-buffering: it holds whole row groups of image bytes (~180 MiB more at 100 rows)
            handles.append(pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            errors.append(f"{f}: not a readable Parquet file ({exc}); re-download it")
    if errors:
        raise SourceError(errors)
    schema = handles[0].schema_arrow
    where = str(files[0])
    needed = _needed_columns(config, schema.names, where)
    _check_struct_paths(config, schema, where)
    for f, h in zip(files[1:], handles[1:]):
        missing = [c for c in needed if c not in h.schema_arrow.names]
        if missing:
            errors.append(f"{f}: lacks column(s) {', '.join(missing)} that {files[0]} has")
    if errors:
        raise SourceError(errors)
    total = sum(h.metadata.num_rows for h in handles)

    def rows() -> Iterator[Row]:
        index = 0
        for f, h in zip(files, handles):
            base = str(f.parent)
            try:
                for batch in h.iter_batches(batch_size=16, columns=needed):
                    for row in batch.to_pylist():
                        yield index, row, base, None
                        index += 1
            except Exception as exc:
                yield index, None, base, f"{f}: reading stopped at row {index} ({exc}); the file is damaged"
                return

    return Source(f"{len(files)} Parquet file(s)", total, rows(), tuple(needed))


def _iter_datasets(ds, needed: list[str], base: str) -> Iterator[Row]:
    index = 0
    try:
        for batch in ds.iter(batch_size=16):
            n = len(batch[needed[0]])
            for k in range(n):
                yield index, {c: batch[c][k] for c in needed}, base, None
                index += 1
    except Exception as exc:
        yield index, None, base, f"reading the dataset stopped at row {index} ({type(exc).__name__}: {exc})"


def _prepare_dataset(ds, config: SourceSpec, where: str):
    from datasets import Image

    names = list(ds.column_names or (ds.features or {}).keys())
    if not names:  # a streamed dataset without declared features: look at the first row
        names = list(next(iter(ds.take(1)), {}).keys())
    needed = _needed_columns(config, names, where)
    ds = ds.select_columns(needed)
    feature = ds.features.get(config.image_column) if ds.features else None
    if isinstance(feature, Image) and feature.decode:
        ds = ds.cast_column(config.image_column, Image(decode=False))  # bytes to the workers, undecoded
    return ds, needed


def _open_disk(config: SourceSpec) -> Source:
    from datasets import DatasetDict, load_from_disk

    path = config.sources[0]
    try:
        ds = load_from_disk(path)
    except Exception as exc:
        raise SourceError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, DatasetDict):
        if config.split not in ds:
            raise SourceError(f"{path}: no split {config.split!r} (splits: {', '.join(ds)}); pass --dataset-split")
        ds = ds[config.split]
    ds, needed = _prepare_dataset(ds, config, path)
    return Source(f"datasets folder {path}", len(ds), _iter_datasets(ds, needed, path), tuple(needed))


def _open_hub(config: SourceSpec) -> Source:
    name = config.sources[0]
    how = (
        f"download it on a connected machine, e.g. `hf download {name} --repo-type dataset --local-dir DIR`, "
        "copy DIR here and pass DIR (a folder of Parquet files) as SRC; or run where the Hub is reachable"
    )
    if config.streaming:
        reason = hub_offline_reason(config.hub_timeout)
        if reason:
            raise SourceError(f"cannot stream hub dataset {name!r}: {reason}. Streaming needs the network; {how}")
    import datasets

    reason = hub_offline_reason(config.hub_timeout) if not config.streaming else None
    guard = _forced_offline() if reason else contextlib.nullcontext()
    try:
        with guard:
            ds = datasets.load_dataset(name, split=config.split, streaming=config.streaming)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if reason:
            raise SourceError(
                f"hub dataset {name!r} (split {config.split!r}) is not in the local Hugging Face cache and the "
                f"Hub cannot be used ({reason}). To fix: {how}. ({detail})"
            ) from None
        raise SourceError(f"cannot load hub dataset {name!r} split {config.split!r}: {detail}") from None
    ds, needed = _prepare_dataset(ds, config, f"hub dataset {name}")
    total = None
    if not config.streaming:
        total = len(ds)
    elif ds.info and ds.info.splits and config.split in ds.info.splits:
        total = ds.info.splits[config.split].num_examples or None
    return Source(f"hub dataset {name}", total, _iter_datasets(ds, needed, ""), tuple(needed))


def _open_folder(config: SourceSpec) -> Source:
    root = Path(config.sources[0])
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in COMPOSITE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SourceError(f"{root}: no images ({', '.join(COMPOSITE_EXTENSIONS)}) found")
    names = [p.relative_to(root).with_suffix("").as_posix() for p in files]

    def rows() -> Iterator[Row]:
        for i, p in enumerate(files):
            txt = p.with_suffix(".txt")
            caption = None
            if txt.is_file():
                try:
                    caption = txt.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    yield i, None, str(root), f"{txt}: caption file unreadable ({exc}); save it as UTF-8"
                    continue
            yield i, {"image": str(p), "caption": caption}, str(root), None

    return Source(f"folder {root}", len(files), rows(), folder_names=names)


def detect_source_kind(config: SourceSpec) -> str:
    """``folder``, ``parquet``, ``disk`` (save_to_disk) or ``hub``: ``config.source_kind`` unless ``auto``."""
    if config.source_kind != "auto":
        return config.source_kind
    first = Path(config.sources[0])
    if len(config.sources) > 1 or first.suffix == ".parquet":
        return "parquet"
    if first.is_dir():
        if any((first / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
            return "disk"
        if next(first.rglob("*.parquet"), None) is not None:
            return "parquet"
        return "folder"
    if first.exists():
        raise SourceError(f"{first}: not a folder or a .parquet file")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", config.sources[0]):
        return "hub"
    raise SourceError(f"{first}: no such file or folder (and not a hub dataset id like 'Yuanshi/Subjects200K')")


def open_source(config: SourceSpec) -> Source:
    """Open ``config.sources`` as the kind :func:`detect_source_kind` gives; raises :class:`SourceError`."""
    kind = detect_source_kind(config)
    if kind == "folder" and config.caption_columns:
        raise SourceError("--caption-column applies to Parquet/datasets sources; a folder source takes "
                          "captions from <composite stem>.txt beside each image (they go with the edit panel)")
    if kind != "parquet" and len(config.sources) > 1:
        raise SourceError(f"several sources are only supported for Parquet files (got a {kind} source)")
    return {"folder": _open_folder, "parquet": _open_parquet, "disk": _open_disk, "hub": _open_hub}[kind](config)
