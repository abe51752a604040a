"""Split composite images (panels side by side, stacked or in a grid) into one folder per role.

Datasets such as Subjects200K store each edit pair as one composite image with per-panel captions in
nested columns (``description.description_0``). :func:`split_composites` cuts every composite into its
panels and writes them as ``OUTDIR/<role>/<name>.png`` (plus ``<name>.txt`` captions), the folder layout
``kontext-data pair`` reads.

Sources (read row by row in the main process, never loaded whole):

* a folder of composite images (names = relative paths, captions = ``<stem>.txt`` sidecars);
* one or more Parquet files, or a folder of them (a Hugging Face repository clone);
* a ``datasets`` directory written by ``save_to_disk``;
* a Hugging Face hub dataset id through ``datasets.load_dataset`` (cached, or ``streaming``); offline,
  it fails at once with a message naming the dataset and how to download it.

Geometry: the composite is cut into ``cols x rows`` equal panels. Along each split axis the stage looks
for a uniform separator band (a gutter) between panels (``gutter=None``: auto) and for remainder pixels
(length not divisible by the panel count); both are removed and counted in the result. A separator that
does not sit where equal panels would be cut (panels of unequal size) is a problem: the row is not cut.

The library never prints or exits: it returns a :class:`SplitResult` whose ``problems`` name each failed
row. ``datasets``, pyarrow, numpy and OpenCV are imported inside functions so that importing this module
(and ``kontext-data --help``) stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse
from kontext_data.problems import ProblemsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LAYOUTS = ("horizontal", "vertical", "grid")
FORMATS = ("png", "jpeg")
SOURCE_KINDS = ("auto", "folder", "parquet", "disk", "hub")
_NAME_DIGITS = 8  # row-index names: 00000042 (sorts, and is stable across shards)
_ROLE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MAX_AUTO_GUTTER = 64  # widest separator band auto detection considers, in pixels
_MIN_RUN = 4  # shortest uniform band that counts as a separator when checking for unequal panels
_JPEG_TOLERANCE = 32  # JPEG ringing and chroma bleed spread a flat separator by up to ~30 levels
_RUN_GAP = 2  # non-uniform lines (JPEG ringing) allowed inside one separator band


class SplitError(ProblemsError):
    """A problem with the command as a whole (bad options, unreadable source): nothing was split.

    The CLI maps it to exit code 2. ``problems`` holds every problem found, so they are reported together.
    """

    usage = True

    def __init__(self, problems: str | list[str]):
        problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(problems, message="\n".join(problems))


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SplitConfig:
    """Everything :func:`split_composites` needs; build it with the ``parse_*`` helpers from CLI text."""

    sources: tuple[str, ...]
    """Folder of composites, Parquet file(s) or folder of them, a ``save_to_disk`` folder, or a hub id."""
    out: Path
    """Output root: one sub-folder per role."""
    cols: int = 2
    """Panels along the width (``horizontal`` with N panels: cols=N, rows=1)."""
    rows: int = 1
    """Panels along the height (``vertical`` with N panels: cols=1, rows=N)."""
    roles: tuple[tuple[str, int], ...] = (("edit", 0), ("reference", 1))
    """(folder name, panel index) pairs; panels are numbered row-major from the top-left."""
    edit_role: str = "edit"
    """The role whose panel is the edited image (the loss target); its caption is the instruction."""
    mask_role: str | None = None
    """The role whose panel is the loss mask of the edited panel (white = the region the edit changes): written
    like any panel, but `pair --masks` material, not a reference. None: no mask panel."""
    image_column: str = "image"
    """Column holding the composite: raw bytes, a path, or the Hugging Face ``{bytes, path}`` struct."""
    caption_columns: tuple[tuple[str, str], ...] = ()
    """(role, dotted column path) pairs, e.g. ("edit", "description.description_0")."""
    id_column: str | None = None
    """Column (dotted path) whose value names the output files; default: the zero-padded row index."""
    gutter: int | None = None
    """Separator width in pixels between panels; None detects it per image (0 disables detection)."""
    gutter_tolerance: int = 10
    """Largest per-channel spread (0-255) of pixels that still counts as one uniform separator colour
    (JPEG composites use at least 32: their ringing spreads flat bands)."""
    format: str = "png"
    """Output encoding: ``png`` (lossless, default, also for JPEG composites) or ``jpeg`` (lossy)."""
    quality: int = 95
    """JPEG quality when ``format == "jpeg"``."""
    png_compression: int = 1
    """OpenCV PNG compression level 0-9 (1: fast, files a few percent larger than level 6)."""
    source_kind: str = "auto"
    """Force how ``sources`` are read: auto, folder, parquet, disk (save_to_disk) or hub."""
    split: str = "train"
    """Dataset split for ``datasets`` sources."""
    streaming: bool = False
    """Stream a hub dataset instead of using the downloaded/cached copy."""
    workers: int = 0
    """Worker processes; 0 = one per CPU core; 1 = run in this process."""
    shard: tuple[int, int] | None = None
    """(K, N), K from 0 to N-1 (as ``degrade``): process only rows whose index % N == K."""
    limit: int | None = None
    """Only the first ``limit`` rows of the source (before sharding); None = all."""
    overwrite: bool = False
    """Re-split rows whose outputs already exist (default: skip them, i.e. resume)."""
    hub_timeout: float = 3.0
    """Seconds to wait for the Hugging Face Hub before treating the machine as offline."""

    @property
    def panel_count(self) -> int:
        return self.cols * self.rows

    @property
    def extension(self) -> str:
        return ".png" if self.format == "png" else ".jpg"

    def role_dirs(self) -> dict[str, Path]:
        return {role: Path(self.out) / role for role, _ in self.roles}

    def reference_roles(self) -> list[str]:
        return [role for role, _ in self.roles if role not in (self.edit_role, self.mask_role)]


def parse_layout(layout: str, panels: int | None) -> tuple[int, int]:
    """``horizontal``/``vertical`` with ``panels``, or ``grid RxC`` (also ``grid:RxC``, ``RxC``) -> (cols, rows)."""
    text = layout.strip().lower()
    grid = re.fullmatch(r"(?:grid[\s:=]*)?(\d+)\s*x\s*(\d+)", text)
    if grid:
        rows, cols = int(grid.group(1)), int(grid.group(2))
        if rows < 1 or cols < 1:
            raise SplitError(f"--layout {layout!r}: rows and columns must be at least 1")
        if panels is not None and panels != rows * cols:
            raise SplitError(f"--panels {panels} does not match --layout {layout!r} ({rows * cols} panels)")
        return cols, rows
    if text == "grid":
        raise SplitError("--layout grid needs a size: --layout 'grid 2x2' (rows x columns)")
    n = 2 if panels is None else panels
    if n < 1:
        raise SplitError(f"--panels must be at least 1, got {n}")
    if text == "horizontal":
        return n, 1
    if text == "vertical":
        return 1, n
    raise SplitError(f"--layout {layout!r} is not one of: horizontal, vertical, 'grid RxC'")


def parse_roles(text: str) -> tuple[tuple[str, int], ...]:
    """``edit=0,reference=1,reference_2=2`` -> (("edit", 0), ("reference", 1), ("reference_2", 2))."""
    roles: list[tuple[str, int]] = []
    errors: list[str] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, index = part.partition("=")
        name = name.strip()
        if not sep or not index.strip().isdigit():
            errors.append(f"--roles: {part!r} is not NAME=PANEL_INDEX (e.g. edit=0,reference=1)")
        elif not _ROLE_RE.match(name):
            errors.append(f"--roles: {name!r} is not a usable folder name (letters, digits, _ . -)")
        elif any(name == r for r, _ in roles):
            errors.append(f"--roles: role {name!r} is given twice")
        else:
            roles.append((name, int(index)))
    if not roles and not errors:
        errors.append("--roles is empty; e.g. --roles edit=0,reference=1")
    if errors:
        raise SplitError(errors)
    return tuple(roles)


def parse_caption_columns(items: Iterable[str], edit_role: str) -> tuple[tuple[str, str], ...]:
    """``description.description_0`` (edit role) or ``reference=description.description_1`` -> pairs."""
    out: list[tuple[str, str]] = []
    for item in items:
        role, sep, path = item.partition("=")
        if sep and _ROLE_RE.match(role.strip()):
            out.append((role.strip(), path.strip()))
        else:
            out.append((edit_role, item.strip()))
    return tuple(out)


def parse_gutter(text: str | int | None) -> int | None:
    """``auto`` -> None, ``16`` -> 16."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    value = str(text).strip().lower().removesuffix("px")
    if not value.isdigit():
        raise SplitError(f"--gutter {text!r}: give 'auto' or a width in pixels (0 = no gutter)")
    return int(value)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``1/4`` -> (1, 4): the second of four shards (K counts from 0, as in ``degrade``)."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise SplitError(f"--shard {text!r}: give K/N with 0 <= K < N (K counts from 0: --shard 0/4 ... 3/4)")
    return int(m.group(1)), int(m.group(2))


def validate_config(config: SplitConfig) -> None:
    """Raise :class:`SplitError` listing every problem of the options (not of the data)."""
    errors: list[str] = []
    n = config.panel_count
    if not config.sources:
        errors.append("no source given")
    for role, index in config.roles:
        if not _ROLE_RE.match(role):
            errors.append(f"role {role!r} is not a usable folder name (letters, digits, _ . -)")
        if not 0 <= index < n:
            errors.append(f"role {role!r}: panel index {index} is outside 0..{n - 1} ({config.cols}x{config.rows} panels)")
    role_names = [r for r, _ in config.roles]
    if config.edit_role not in role_names:
        errors.append(f"the edit role {config.edit_role!r} is not among --roles ({', '.join(role_names)})")
    if config.mask_role is not None:
        if config.mask_role not in role_names:
            errors.append(f"--mask-role {config.mask_role!r} is not among --roles ({', '.join(role_names)}); e.g. "
                          f"--roles edit=0,reference=1,{config.mask_role}=2")
        elif config.mask_role == config.edit_role:
            errors.append(f"--mask-role {config.mask_role!r} is the edit role: the mask is a panel of its own")
        if any(role == config.mask_role for role, _ in config.caption_columns):
            errors.append(f"--caption-column for the mask role {config.mask_role!r}: a mask takes no caption")
    for role, path in config.caption_columns:
        if role not in role_names:
            errors.append(f"--caption-column {role}={path}: {role!r} is not a role ({', '.join(role_names)})")
        if not path:
            errors.append(f"--caption-column for role {role!r} is empty")
    seen = Counter(r for r, _ in config.caption_columns)
    errors += [f"--caption-column: role {r!r} has {c} caption columns (give one)" for r, c in seen.items() if c > 1]
    if config.format not in FORMATS:
        errors.append(f"--format {config.format!r} is not one of: {', '.join(FORMATS)}")
    if not 1 <= config.quality <= 100:
        errors.append(f"--quality {config.quality} must be 1..100")
    if config.gutter is not None and config.gutter < 0:
        errors.append("--gutter must be 'auto' or >= 0")
    if config.source_kind not in SOURCE_KINDS:
        errors.append(f"source kind {config.source_kind!r} is not one of: {', '.join(SOURCE_KINDS)}")
    if config.workers is not None and config.workers < 0:
        errors.append("--workers must be >= 0")
    if config.limit is not None and config.limit < 0:
        errors.append("--limit must be >= 0")
    if config.shard is not None and not 0 <= config.shard[0] < config.shard[1]:
        errors.append(f"--shard {config.shard[0]}/{config.shard[1]}: need 0 <= K < N (K counts from 0)")
    if errors:
        raise SplitError(errors)


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SplitProblem:
    """One row that was not split (or not read), with what to do about it."""

    row: int | None
    name: str
    message: str


@dataclass
class SplitResult:
    """What :func:`split_composites` did. ``ok`` is False when any row failed."""

    out: Path
    role_dirs: dict[str, Path]
    rows_seen: int = 0
    written: int = 0
    skipped_done: int = 0
    failed: int = 0
    problems: list[SplitProblem] = field(default_factory=list)
    gutters: Counter = field(default_factory=Counter)
    """Detected separator width -> rows (``"x:16"`` for vertical bands, ``"y:8"`` for horizontal ones)."""
    remainders: Counter = field(default_factory=Counter)
    """Remainder pixels dropped, e.g. ``"x:3 at end"`` -> rows."""
    panel_sizes: Counter = field(default_factory=Counter)
    """Panel ``WxH`` -> rows."""
    lossy_sources: int = 0
    """Composites that were JPEG (their panels are written losslessly unless format is jpeg)."""
    missing_captions: Counter = field(default_factory=Counter)
    """Role -> rows whose caption value was empty or null (no caption file written)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "role_dirs": {k: str(v) for k, v in self.role_dirs.items()},
            "rows_seen": self.rows_seen,
            "written": self.written,
            "skipped_done": self.skipped_done,
            "failed": self.failed,
            "ok": self.ok,
            "gutters": dict(sorted(self.gutters.items())),
            "remainders": dict(sorted(self.remainders.items())),
            "panel_sizes": dict(sorted(self.panel_sizes.items())),
            "lossy_sources": self.lossy_sources,
            "missing_captions": dict(self.missing_captions),
            "problems": [{"row": p.row, "name": p.name, "message": p.message} for p in self.problems],
        }


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class AxisPlan:
    """Where panels start along one axis, their common size, the separator and the remainder."""

    starts: tuple[int, ...]
    size: int
    gutter: int
    remainder: int
    remainder_side: str  # "end", "start" or "" when there is none


class GeometryError(ProblemsError, ValueError):
    """The composite cannot be cut into equal panels (reported as a row problem)."""


def _band_uniform(lo, hi, ranges: list[tuple[int, int]], tol: int) -> bool:
    """True when all pixels of the bands ``ranges`` (along the axis) share one colour within ``tol``."""
    low = high = None
    for a, b in ranges:
        band_lo, band_hi = lo[a:b].min(axis=0), hi[a:b].max(axis=0)
        low = band_lo if low is None else low.clip(max=band_lo)
        high = band_hi if high is None else high.clip(min=band_hi)
    return int((high - low).max()) <= tol


def _runs(mask, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D mask, merging runs separated by at most _RUN_GAP False."""
    runs: list[list[int]] = []
    start = None
    for pos, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = pos
        elif not value and start is not None:
            if runs and start - runs[-1][1] <= _RUN_GAP:
                runs[-1][1] = pos
            else:
                runs.append([start, pos])
            start = None
    return [(s + offset, e + offset) for s, e in runs]


def plan_axis(lo, hi, n: int, gutter: int | None, tol: int, axis: str = "x") -> AxisPlan:
    """Cut a length ``len(lo)`` into ``n`` equal panels.

    ``lo``/``hi``: per-position (column for ``x``, row for ``y``) minimum and maximum of every channel
    over the other axis, shape (length, channels). A position is part of a separator when its whole
    line is one colour within ``tol``; all separator bands of one image must share that colour.

    ``gutter=None`` picks the widest uniform band (up to 64 px, at most 1/8 of a panel) that sits where
    ``n`` equal panels would be separated; remainder pixels go to the end unless only the start is
    uniform. A uniform full-length band near a panel boundary that equal panels would cut through raises
    :class:`GeometryError` (the panels are of unequal size). An explicit gutter must be uniform too.
    """
    length = int(lo.shape[0])
    if n == 1:
        return AxisPlan((0,), length, 0, 0, "")

    def layout(g: int, offset: int) -> tuple[int, tuple[int, ...], list[tuple[int, int]]]:
        p = (length - (n - 1) * g) // n
        starts = tuple(offset + k * (p + g) for k in range(n))
        bands = [(s + p, s + p + g) for s in starts[:-1]]
        return p, starts, bands

    def remainder_offsets(r: int) -> list[int]:
        if r == 0:
            return [0]
        end_uniform = _band_uniform(lo, hi, [(length - r, length)], tol)
        start_uniform = _band_uniform(lo, hi, [(0, r)], tol)
        return [r, 0] if start_uniform and not end_uniform else [0, r]

    def finish(g: int, offset: int) -> AxisPlan:
        p, starts, _ = layout(g, offset)
        r = length - n * p - (n - 1) * g
        side = "" if r == 0 else ("start" if offset else "end")
        if p < 1:
            raise GeometryError(f"{axis}: {length} px is too small for {n} panels with a {g} px gutter")
        return AxisPlan(starts, p, g, r, side)

    if gutter is not None:
        p = (length - (n - 1) * gutter) // n
        r = length - n * p - (n - 1) * gutter
        if p < 1:
            raise GeometryError(f"{axis}: {length} px is too small for {n} panels with a {gutter} px gutter")
        if gutter == 0:
            return finish(0, remainder_offsets(r)[0])
        edge = 2 if gutter > 4 else 0  # JPEG ringing may blur the outermost lines of a given band
        for offset in remainder_offsets(r):
            if _band_uniform(lo, hi, [(a + edge, b - edge) for a, b in layout(gutter, offset)[2]], tol):
                return finish(gutter, offset)
        bands = ", ".join(f"{a}-{b - 1}" for a, b in layout(gutter, remainder_offsets(r)[0])[2])
        raise GeometryError(
            f"{axis}: expected a uniform {gutter} px gutter at {axis}={bands} but it holds image content; "
            "check --gutter (auto detects it) and --panels/--layout"
        )

    chosen: tuple[int, int] = (0, remainder_offsets(length % n)[0])
    gmax = max(0, min(_MAX_AUTO_GUTTER, (length // n) // 8))
    for g in range(gmax, 0, -1):
        r = length - n * ((length - (n - 1) * g) // n) - (n - 1) * g
        hit = next((o for o in remainder_offsets(r) if _band_uniform(lo, hi, layout(g, o)[2], tol)), None)
        if hit is not None:
            chosen = (g, hit)
            break
    plan = finish(*chosen)

    # A separator that equal panels would not use: a full-length uniform band near a boundary that
    # neither touches the boundary nor the chosen gutter means the panels have unequal sizes. Runs
    # split by JPEG ringing (gaps up to _RUN_GAP lines) count as one; shorter than _MIN_RUN is noise.
    line_uniform = (hi - lo).max(axis=1) <= tol
    window = max(1, plan.size // 4)
    for k in range(1, n):
        cut_a = plan.starts[k] - plan.gutter  # first position of the gutter (== boundary when g == 0)
        cut_b = plan.starts[k]  # first position of the next panel
        a, b = max(0, cut_a - window), min(length, cut_b + window)
        for run_start, run_end in _runs(line_uniform[a:b], offset=a):
            touches = run_start <= cut_b and run_end >= cut_a
            if run_end - run_start >= _MIN_RUN and not touches and run_start > a and run_end < b:
                raise GeometryError(
                    f"{axis}: a uniform separator at {axis}={run_start}-{run_end - 1} is not where "
                    f"{n} equal panels are cut ({axis}={cut_a}): the panels have unequal sizes; "
                    "not cut (crop these composites yourself, or force an even cut with --gutter 0)"
                )
    return plan


def plan_panels(image, cols: int, rows: int, gutter: int | None, tol: int) -> tuple[AxisPlan, AxisPlan]:
    """(x plan, y plan) for an HxW(xC) uint8/uint16 image."""
    import numpy as np

    a = image if image.ndim == 3 else image[:, :, None]
    if a.dtype != np.uint8:  # 16-bit: compare on the 8-bit scale so the tolerance keeps its meaning
        a = (a >> 8).astype(np.uint8) if a.dtype == np.uint16 else a.astype(np.uint8)
    if a.shape[2] == 4:  # ignore alpha for separators
        a = a[:, :, :3]

    def stats(axis: int):  # reduce on uint8 (fast), widen only the small per-line results
        return a.min(axis=axis).astype(np.int16), a.max(axis=axis).astype(np.int16)

    x = plan_axis(*stats(0), cols, gutter, tol, "x") if cols > 1 else AxisPlan((0,), a.shape[1], 0, 0, "")
    y = plan_axis(*stats(1), rows, gutter, tol, "y") if rows > 1 else AxisPlan((0,), a.shape[0], 0, 0, "")
    return x, y


# --------------------------------------------------------------------------------------------- values


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


def _caption_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        lines = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return "\n".join(lines) or None
    text = str(value).strip()
    return text or None


def _safe_name(value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")
    return text[:200]


def _image_payload(value: Any) -> bytes | str | None:
    """Raw bytes, a path string, or the Hugging Face ``{bytes, path}`` struct -> bytes or path."""
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


# --------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class _Task:
    row: int
    name: str
    payload: bytes | str | None
    captions: tuple[tuple[str, str | None], ...]
    base_dir: str
    error: str | None = None  # a problem found while reading the row (reported, nothing written)
    skip: bool = False  # outputs exist already (resume): nothing to do


@dataclass(frozen=True)
class RowOutcome:
    """What happened to one row (small, crosses the process boundary)."""

    row: int
    name: str
    status: str  # "written", "failed" or "skipped" (already done)
    message: str = ""
    gutter_x: int = 0
    gutter_y: int = 0
    remainder: str = ""
    panel_size: str = ""
    lossy_source: bool = False
    missing_captions: tuple[str, ...] = ()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class SplitWorker:
    """Picklable: decodes one composite, plans the cut, writes every role's panel and caption."""

    def __init__(self, config: SplitConfig):
        self.cols, self.rows = config.cols, config.rows
        self.roles = config.roles
        self.edit_role = config.edit_role
        self.gutter = config.gutter
        self.tol = config.gutter_tolerance
        self.format = config.format
        self.quality = config.quality
        self.png_compression = config.png_compression
        self.ext = config.extension
        self.dirs = {role: str(path) for role, path in config.role_dirs().items()}
        self._ready = False

    def _setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)
        self._ready = True

    def __call__(self, task: _Task) -> RowOutcome:
        try:
            return self._run(task)
        except Exception as exc:  # never raise across the process boundary
            return RowOutcome(task.row, task.name, "failed", f"{type(exc).__name__}: {exc}")

    def _decode(self, task: _Task):
        import cv2
        import numpy as np

        if task.payload is None:
            raise ValueError("the image column is empty (null) in this row")
        if isinstance(task.payload, bytes):
            data = task.payload
        else:
            p = Path(task.payload)
            if not p.is_absolute():
                p = Path(task.base_dir) / p
            if not p.is_file():
                raise FileNotFoundError(f"image path {str(p)!r} does not exist")
            data = p.read_bytes()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"the image data ({len(data)} bytes, starts {data[:8]!r}) is not a decodable image")
        return image, data[:3] == b"\xff\xd8\xff"

    def _encode(self, panel) -> bytes:
        import cv2

        if self.format == "jpeg":
            if panel.ndim == 3 and panel.shape[2] == 4:
                panel = panel[:, :, :3]
            ok, buf = cv2.imencode(".jpg", panel, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        else:
            ok, buf = cv2.imencode(".png", panel, [cv2.IMWRITE_PNG_COMPRESSION, self.png_compression])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {panel.shape} {panel.dtype} panel as {self.format}")
        return buf.tobytes()

    def _run(self, task: _Task) -> RowOutcome:
        if task.skip:
            return RowOutcome(task.row, task.name, "skipped")
        if task.error:
            return RowOutcome(task.row, task.name, "failed", task.error)
        if not self._ready:
            self._setup()
        image, lossy = self._decode(task)
        try:
            tol = max(self.tol, _JPEG_TOLERANCE) if lossy else self.tol
            xplan, yplan = plan_panels(image, self.cols, self.rows, self.gutter, tol)
        except GeometryError as exc:
            h, w = image.shape[:2]
            return RowOutcome(task.row, task.name, "failed", f"{w}x{h} composite: {exc}", lossy_source=lossy)
        encoded: dict[str, bytes] = {}
        for role, index in self.roles:
            r, c = divmod(index, self.cols)
            y0, x0 = yplan.starts[r], xplan.starts[c]
            encoded[role] = self._encode(image[y0:y0 + yplan.size, x0:x0 + xplan.size])
        captions = dict(task.captions)
        missing = tuple(role for role, text in task.captions if text is None)
        # captions first, images after, the edit image last: a row counts as done only once every
        # image exists, so an interrupted row is redone on resume.
        for role, text in captions.items():
            target = Path(self.dirs[role]) / f"{task.name}.txt"
            if text is not None:
                _atomic_write(target, (text + "\n").encode("utf-8"))
            elif target.exists():
                target.unlink()  # a stale caption from an earlier run must not survive
        order = [r for r, _ in self.roles if r != self.edit_role] + [self.edit_role]
        for role in order:
            _atomic_write(Path(self.dirs[role]) / f"{task.name}{self.ext}", encoded[role])
        rem = []
        if xplan.remainder:
            rem.append(f"x:{xplan.remainder} at {xplan.remainder_side}")
        if yplan.remainder:
            rem.append(f"y:{yplan.remainder} at {yplan.remainder_side}")
        return RowOutcome(
            task.row, task.name, "written",
            gutter_x=xplan.gutter, gutter_y=yplan.gutter, remainder=", ".join(rem),
            panel_size=f"{xplan.size}x{yplan.size}", lossy_source=lossy, missing_captions=missing,
        )


# --------------------------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """Rows of one source: ``rows`` yields (row index, raw row dict or None, base dir, error)."""

    description: str
    total: int | None
    rows: Iterator[tuple[int, dict | None, str, str | None]]
    columns: tuple[str, ...] = ()
    folder_names: list[str] | None = None  # folder source: relative names without extension


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


def _top_column(path: str, columns: Iterable[str]) -> str | None:
    """The column a dotted path starts in (the longest prefix that is a column name)."""
    cols = set(columns)
    parts = path.split(".")
    for j in range(len(parts), 0, -1):
        if ".".join(parts[:j]) in cols:
            return ".".join(parts[:j])
    return None


def _needed_columns(config: SplitConfig, columns: list[str], where: str) -> list[str]:
    """Top-level columns to read; raises SplitError naming every missing one and the ones available."""
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
        raise SplitError(errors)
    return needed


def _check_struct_paths(config: SplitConfig, schema, where: str) -> None:
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
        raise SplitError(errors)


def _parquet_files(sources: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.parquet") if q.is_file())
        else:
            files.append(p)
    return files


def _open_parquet(config: SplitConfig) -> _Source:
    import pyarrow.parquet as pq

    files = _parquet_files(config.sources)
    errors = [f"{f}: no such Parquet file" for f in files if not f.is_file()]
    if not files:
        errors.append(f"no .parquet files under {', '.join(config.sources)}")
    if errors:
        raise SplitError(errors)
    handles = []
    for f in files:
        try:
            # no pre-buffering: it holds whole row groups of image bytes (~180 MiB more at 100 rows)
            handles.append(pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            errors.append(f"{f}: not a readable Parquet file ({exc}); re-download it")
    if errors:
        raise SplitError(errors)
    schema = handles[0].schema_arrow
    where = str(files[0])
    needed = _needed_columns(config, schema.names, where)
    _check_struct_paths(config, schema, where)
    for f, h in zip(files[1:], handles[1:]):
        missing = [c for c in needed if c not in h.schema_arrow.names]
        if missing:
            errors.append(f"{f}: lacks column(s) {', '.join(missing)} that {files[0]} has")
    if errors:
        raise SplitError(errors)
    total = sum(h.metadata.num_rows for h in handles)

    def rows() -> Iterator[tuple[int, dict | None, str, str | None]]:
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

    return _Source(f"{len(files)} Parquet file(s)", total, rows(), tuple(needed))


def _iter_datasets(ds, needed: list[str], base: str) -> Iterator[tuple[int, dict | None, str, str | None]]:
    index = 0
    try:
        for batch in ds.iter(batch_size=16):
            n = len(batch[needed[0]])
            for k in range(n):
                yield index, {c: batch[c][k] for c in needed}, base, None
                index += 1
    except Exception as exc:
        yield index, None, base, f"reading the dataset stopped at row {index} ({type(exc).__name__}: {exc})"


def _prepare_dataset(ds, config: SplitConfig, where: str):
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


def _open_disk(config: SplitConfig) -> _Source:
    from datasets import DatasetDict, load_from_disk

    path = config.sources[0]
    try:
        ds = load_from_disk(path)
    except Exception as exc:
        raise SplitError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, DatasetDict):
        if config.split not in ds:
            raise SplitError(f"{path}: no split {config.split!r} (splits: {', '.join(ds)}); pass --dataset-split")
        ds = ds[config.split]
    ds, needed = _prepare_dataset(ds, config, path)
    return _Source(f"datasets folder {path}", len(ds), _iter_datasets(ds, needed, path), tuple(needed))


def _open_hub(config: SplitConfig) -> _Source:
    name = config.sources[0]
    how = (
        f"download it on a connected machine, e.g. `hf download {name} --repo-type dataset --local-dir DIR`, "
        "copy DIR here and pass DIR (a folder of Parquet files) as SRC; or run where the Hub is reachable"
    )
    if config.streaming:
        reason = hub_offline_reason(config.hub_timeout)
        if reason:
            raise SplitError(f"cannot stream hub dataset {name!r}: {reason}. Streaming needs the network; {how}")
    import datasets

    reason = hub_offline_reason(config.hub_timeout) if not config.streaming else None
    guard = _forced_offline() if reason else contextlib.nullcontext()
    try:
        with guard:
            ds = datasets.load_dataset(name, split=config.split, streaming=config.streaming)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if reason:
            raise SplitError(
                f"hub dataset {name!r} (split {config.split!r}) is not in the local Hugging Face cache and the "
                f"Hub cannot be used ({reason}). To fix: {how}. ({detail})"
            ) from None
        raise SplitError(f"cannot load hub dataset {name!r} split {config.split!r}: {detail}") from None
    ds, needed = _prepare_dataset(ds, config, f"hub dataset {name}")
    total = None
    if not config.streaming:
        total = len(ds)
    elif ds.info and ds.info.splits and config.split in ds.info.splits:
        total = ds.info.splits[config.split].num_examples or None
    return _Source(f"hub dataset {name}", total, _iter_datasets(ds, needed, ""), tuple(needed))


def _open_folder(config: SplitConfig) -> _Source:
    root = Path(config.sources[0])
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SplitError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    names = [p.relative_to(root).with_suffix("").as_posix() for p in files]

    def rows() -> Iterator[tuple[int, dict | None, str, str | None]]:
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

    return _Source(f"folder {root}", len(files), rows(), folder_names=names)


def detect_source_kind(config: SplitConfig) -> str:
    """``folder``, ``parquet``, ``disk`` (save_to_disk) or ``hub``."""
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
        raise SplitError(f"{first}: not a folder or a .parquet file")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", config.sources[0]):
        return "hub"
    raise SplitError(f"{first}: no such file or folder (and not a hub dataset id like 'Yuanshi/Subjects200K')")


def open_source(config: SplitConfig) -> _Source:
    kind = detect_source_kind(config)
    if kind == "folder" and config.caption_columns:
        raise SplitError("--caption-column applies to Parquet/datasets sources; a folder source takes "
                         "captions from <composite stem>.txt beside each image (they go with the edit panel)")
    if kind != "parquet" and len(config.sources) > 1:
        raise SplitError(f"several sources are only supported for Parquet files (got a {kind} source)")
    return {"folder": _open_folder, "parquet": _open_parquet, "disk": _open_disk, "hub": _open_hub}[kind](config)


# --------------------------------------------------------------------------------------------- driver


def _in_shard(row: int, shard: tuple[int, int] | None) -> bool:
    return shard is None or row % shard[1] == shard[0]


def _shard_total(total: int | None, config: SplitConfig) -> int | None:
    if total is None:
        return None
    if config.limit is not None:
        total = min(total, config.limit)
    if config.shard is None:
        return total
    k, n = config.shard
    return len(range(k, total, n))


def _row_done(config: SplitConfig, dirs: dict[str, Path], name: str) -> bool:
    return all((d / f"{name}{config.extension}").is_file() for d in dirs.values())


@contextlib.contextmanager
def _worker_environment():
    """Environment the spawned workers start with: keep glibc from returning image buffers every row."""
    extra = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483648",
             "OMP_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1"}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update({k: v for k, v in extra.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _tasks(config: SplitConfig, source: _Source, dirs: dict[str, Path]) -> Iterator[_Task]:
    """Rows of the shard as tasks; done rows are skipped, name clashes and bad values become problems."""
    used: dict[str, int] = {}
    folder = source.folder_names is not None
    if folder:  # x.png and x.jpg would both become x.png: report instead of overwriting
        counts = Counter(source.folder_names)
    for row, values, base, error in source.rows:
        if config.limit is not None and row >= config.limit:
            break
        if not _in_shard(row, config.shard):
            continue
        name = f"{row:0{_NAME_DIGITS}d}"
        if error or values is None:
            yield _Task(row, name, None, (), base, error or "row could not be read")
            continue
        captions: list[tuple[str, str | None]] = []
        try:
            if folder:
                name = source.folder_names[row]
                if counts[name] > 1:
                    raise ValueError(f"{counts[name]} composites share the name {name!r} with different "
                                     "extensions; their panels would overwrite each other: rename them")
                payload = values["image"]
                captions.append((config.edit_role, _caption_text(values["caption"])))
            else:
                if config.id_column:
                    raw = get_path(values, config.id_column)
                    name = _safe_name(raw)
                    if not name:
                        raise ValueError(f"id column {config.id_column!r} value {raw!r} gives no usable file name")
                    if name in used:
                        raise ValueError(f"id {name!r} repeats row {used[name]} (names must be unique)")
                    used[name] = row
                payload = _image_payload(get_path(values, config.image_column))
                for role, path in config.caption_columns:
                    captions.append((role, _caption_text(get_path(values, path))))
        except Exception as exc:  # this runs in the pool's feeder thread: report, never raise
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else f"{exc}"
            if not isinstance(exc, (KeyError, ValueError)):
                msg = f"{type(exc).__name__}: {msg}"
            yield _Task(row, name, None, (), base, str(msg))
            continue
        if not config.overwrite and _row_done(config, dirs, name):
            yield _Task(row, name, None, (), base, skip=True)
            continue
        yield _Task(row, name, payload, tuple(captions), base)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bounded(items: Iterator[_Task], slots: threading.Semaphore) -> Iterator[_Task]:
    """Pool.imap_unordered drains its input eagerly: hold it to a fixed number of rows in flight."""
    for item in items:
        slots.acquire()
        yield item


def split_composites(
    config: SplitConfig,
    progress: Callable[[int, int | None], None] | None = None,
) -> SplitResult:
    """Split every composite of ``config.sources`` (this shard) into per-role panel folders.

    ``progress(done, total)`` is called after each row (written, failed or skipped as already done);
    ``total`` is None for streamed sources of unknown length. Raises :class:`SplitError` for problems
    with the options or the source as a whole; per-row problems are returned in ``result.problems``.
    """
    validate_config(config)
    source = open_source(config)
    dirs = config.role_dirs()
    result = SplitResult(out=Path(config.out), role_dirs=dirs)
    total = _shard_total(source.total, config)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(0, total)

    def record(outcome: RowOutcome) -> None:
        result.rows_seen += 1
        if outcome.status == "skipped":
            result.skipped_done += 1
        elif outcome.status == "written":
            result.written += 1
            if outcome.gutter_x:
                result.gutters[f"x:{outcome.gutter_x}"] += 1
            if outcome.gutter_y:
                result.gutters[f"y:{outcome.gutter_y}"] += 1
            if outcome.remainder:
                result.remainders[outcome.remainder] += 1
            result.panel_sizes[outcome.panel_size] += 1
            for role in outcome.missing_captions:
                result.missing_captions[role] += 1
        else:
            result.failed += 1
            result.problems.append(SplitProblem(outcome.row, outcome.name, outcome.message))
        result.lossy_sources += int(outcome.lossy_source)
        tick()

    worker = SplitWorker(config)
    tasks = _tasks(config, source, dirs)
    workers = config.workers or _usable_cpus()
    if total is not None:
        workers = max(1, min(workers, total))  # no idle processes for a handful of rows
    if workers == 1:
        for task in tasks:
            record(worker(task))
    else:
        import multiprocessing

        slots = threading.Semaphore(workers * 4)
        ctx = multiprocessing.get_context("spawn")
        with _worker_environment(), ctx.Pool(workers) as pool:
            for outcome in pool.imap_unordered(worker, _bounded(tasks, slots), chunksize=1):
                slots.release()
                record(outcome)
    result.problems.sort(key=lambda p: (p.row is None, p.row or 0))
    return result
