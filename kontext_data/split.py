"""Split composite images (panels side by side, stacked or in a grid) into one folder per role.

Datasets such as Subjects200K store each edit pair as one composite image with per-panel captions in
nested columns (``description.description_0``). :func:`split_composites` cuts every composite into its
panels and writes them as ``OUTDIR/<role>/<name>.png`` (plus ``<name>.txt`` captions), the folder layout
``kontext-data pair`` reads.

The stage in modules: :mod:`kontext_data.sources` reads the rows (folder, Parquet, ``save_to_disk``, hub),
:mod:`kontext_data.panels` plans the cut (equal panels, gutters, remainders), this module holds the options and
their parsers, the per-row worker (decode, cut, encode, write) and the driver, which feeds the rows of this shard to
the :mod:`kontext_data.workers` pool and sums the outcomes. Rows are read in the calling process (never loaded
whole); their bytes are decoded in the workers.

The library never prints or exits: it returns a :class:`SplitResult` whose ``problems`` name each failed
row. numpy and OpenCV are imported inside functions so that importing this module (and ``kontext-data --help``)
stays fast.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kontext_data.fileio import write_bytes_atomic
from kontext_data.panels import JPEG_TOLERANCE, GeometryError, plan_panels
from kontext_data.problems import ProblemsError
from kontext_data.sources import (SOURCE_KINDS, Source, SourceError, caption_text, get_path, image_payload,
                                  open_source)
from kontext_data.workers import Shard, parse_shard, resolve_workers, run_items

__all__ = [
    "FORMATS", "LAYOUTS", "RowOutcome", "SplitConfig", "SplitError", "SplitProblem", "SplitResult", "SplitWorker",
    "parse_caption_columns", "parse_gutter", "parse_layout", "parse_roles", "parse_shard", "split_composites",
    "validate_config",
]

LAYOUTS = ("horizontal", "vertical", "grid")
FORMATS = ("png", "jpeg")
_NAME_DIGITS = 8  # row-index names: 00000042 (sorts, and is stable across shards)
_ROLE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


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
    """Worker processes; 0 = one per CPU this process may use (its affinity); 1 = run in this process."""
    shard: tuple[int, int] | None = None
    """(K, N), K from 0 to N-1 (as ``degrade``; a :class:`~kontext_data.workers.Shard`): process only rows whose
    index % N == K. None (or (0, 1)): every row."""
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

    def add(self, outcome: RowOutcome) -> None:
        """Count one row's outcome."""
        self.rows_seen += 1
        if outcome.status == "skipped":
            self.skipped_done += 1
        elif outcome.status == "written":
            self.written += 1
            if outcome.gutter_x:
                self.gutters[f"x:{outcome.gutter_x}"] += 1
            if outcome.gutter_y:
                self.gutters[f"y:{outcome.gutter_y}"] += 1
            if outcome.remainder:
                self.remainders[outcome.remainder] += 1
            self.panel_sizes[outcome.panel_size] += 1
            for role in outcome.missing_captions:
                self.missing_captions[role] += 1
        else:
            self.failed += 1
            self.problems.append(SplitProblem(outcome.row, outcome.name, outcome.message))
        self.lossy_sources += int(outcome.lossy_source)

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


class SplitWorker:
    """Picklable: decodes one composite, plans the cut, writes every role's panel and caption.

    A row that cannot be cut comes back as a failed :class:`RowOutcome`; any other exception is turned into one by
    the pool (:func:`kontext_data.workers.run_items`)."""

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

    def __call__(self, task: _Task) -> RowOutcome:
        if task.skip:
            return RowOutcome(task.row, task.name, "skipped")
        if task.error:
            return RowOutcome(task.row, task.name, "failed", task.error)
        image, lossy = self._decode(task)
        try:
            tol = max(self.tol, JPEG_TOLERANCE) if lossy else self.tol
            xplan, yplan = plan_panels(image, self.cols, self.rows, self.gutter, tol)
        except GeometryError as exc:
            h, w = image.shape[:2]
            return RowOutcome(task.row, task.name, "failed", f"{w}x{h} composite: {exc}", lossy_source=lossy)
        encoded: dict[str, bytes] = {}
        for role, index in self.roles:
            r, c = divmod(index, self.cols)
            y0, x0 = yplan.starts[r], xplan.starts[c]
            encoded[role] = self._encode(image[y0:y0 + yplan.size, x0:x0 + xplan.size])
        self._write(task, encoded)
        rem = []
        if xplan.remainder:
            rem.append(f"x:{xplan.remainder} at {xplan.remainder_side}")
        if yplan.remainder:
            rem.append(f"y:{yplan.remainder} at {yplan.remainder_side}")
        return RowOutcome(
            task.row, task.name, "written",
            gutter_x=xplan.gutter, gutter_y=yplan.gutter, remainder=", ".join(rem),
            panel_size=f"{xplan.size}x{yplan.size}", lossy_source=lossy,
            missing_captions=tuple(role for role, text in task.captions if text is None),
        )

    def _write(self, task: _Task, encoded: dict[str, bytes]) -> None:
        """Captions first, images after, the edit image last: a row counts as done only once every image exists,
        so an interrupted row is redone on resume."""
        for role, text in dict(task.captions).items():
            target = Path(self.dirs[role]) / f"{task.name}.txt"
            if text is not None:
                write_bytes_atomic(target, (text + "\n").encode("utf-8"))
            elif target.exists():
                target.unlink()  # a stale caption from an earlier run must not survive
        order = [r for r, _ in self.roles if r != self.edit_role] + [self.edit_role]
        for role in order:
            write_bytes_atomic(Path(self.dirs[role]) / f"{task.name}{self.ext}", encoded[role])


# --------------------------------------------------------------------------------------------- driver


def _safe_name(value: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._")
    return text[:200]


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


def _tasks(config: SplitConfig, source: Source, dirs: dict[str, Path]) -> Iterator[_Task]:
    """Rows of the shard as tasks; done rows are skipped, name clashes and bad values become problems."""
    used: dict[str, int] = {}
    folder = source.folder_names is not None
    if folder:  # x.png and x.jpg would both become x.png: report instead of overwriting
        counts = Counter(source.folder_names)
    shard = Shard(*config.shard) if config.shard is not None else Shard()
    for row, values, base, error in source.rows:
        if config.limit is not None and row >= config.limit:
            break
        if not shard.holds(row):
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
                captions.append((config.edit_role, caption_text(values["caption"])))
            else:
                if config.id_column:
                    raw = get_path(values, config.id_column)
                    name = _safe_name(raw)
                    if not name:
                        raise ValueError(f"id column {config.id_column!r} value {raw!r} gives no usable file name")
                    if name in used:
                        raise ValueError(f"id {name!r} repeats row {used[name]} (names must be unique)")
                    used[name] = row
                payload = image_payload(get_path(values, config.image_column))
                for role, path in config.caption_columns:
                    captions.append((role, caption_text(get_path(values, path))))
        except Exception as exc:  # a bad row is reported; it never stops the others
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else f"{exc}"
            if not isinstance(exc, (KeyError, ValueError)):
                msg = f"{type(exc).__name__}: {msg}"
            yield _Task(row, name, None, (), base, str(msg))
            continue
        if not config.overwrite and _row_done(config, dirs, name):
            yield _Task(row, name, None, (), base, skip=True)
            continue
        yield _Task(row, name, payload, tuple(captions), base)


def split_composites(
    config: SplitConfig,
    progress: Callable[[int, int | None], None] | None = None,
) -> SplitResult:
    """Split every composite of ``config.sources`` (this shard) into per-role panel folders.

    ``progress(done, total)`` is called after each row (written, failed or skipped as already done);
    ``total`` is None for streamed sources of unknown length. Raises :class:`SplitError` for problems
    with the options or the source as a whole; per-row problems are returned in ``result.problems``.
    Rows go to :func:`kontext_data.workers.run_items` (``config.workers``; one row runs in this process).
    """
    validate_config(config)
    try:
        source = open_source(config)
    except SourceError as exc:
        raise SplitError(exc.problems) from None
    dirs = config.role_dirs()
    result = SplitResult(out=Path(config.out), role_dirs=dirs)
    total = _shard_total(source.total, config)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(0, total)
    workers = resolve_workers(config.workers, total)
    for done in run_items(SplitWorker(config), _tasks(config, source, dirs), workers, opencv=True,
                          progress=progress, total=total):
        task = done.item
        result.add(done.value if done.ok else RowOutcome(task.row, task.name, "failed", str(done.error)))
    result.problems.sort(key=lambda p: (p.row is None, p.row or 0))
    return result
