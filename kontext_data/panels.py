"""Panel and gutter geometry of composite images (the cut that ``kontext-data split`` makes).

In: a decoded composite (a numpy HxW or HxWxC uint8/uint16 array) and its panel counts. Out: one :class:`AxisPlan`
per axis (where the equal panels start, their size, the separator band between them, the remainder pixels), or a
:class:`GeometryError` when the composite cannot be cut into equal panels.

Along each split axis the composite is cut into ``n`` equal panels. A uniform separator band (a gutter) between
panels is found (``gutter=None``: auto) or checked (an explicit width), and remainder pixels (a length not divisible
by the panel count) are dropped at the end, or at the start when only the start is uniform. A uniform band that
does not sit where equal panels would be cut means panels of unequal size: an error, never a silent bad cut.

numpy is imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from kontext_data.problems import ProblemsError

MAX_AUTO_GUTTER = 64
"""Widest separator band auto detection considers, in pixels (and at most 1/8 of a panel)."""
JPEG_TOLERANCE = 32
"""Separator tolerance for JPEG composites: ringing and chroma bleed spread a flat band by up to ~30 levels."""
_MIN_RUN = 4  # shortest uniform band that counts as a separator when checking for unequal panels
_RUN_GAP = 2  # non-uniform lines (JPEG ringing) allowed inside one separator band


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


class _Axis:
    """One axis of one composite: per-line colour ranges, the panel count, the tolerance."""

    def __init__(self, lo, hi, n: int, tol: int, name: str):
        self.lo, self.hi, self.n, self.tol, self.name = lo, hi, n, tol, name
        self.length = int(lo.shape[0])

    def uniform(self, ranges: list[tuple[int, int]]) -> bool:
        return _band_uniform(self.lo, self.hi, ranges, self.tol)

    def panel(self, g: int) -> int:
        """Panel size with ``g`` px gutters."""
        return (self.length - (self.n - 1) * g) // self.n

    def remainder(self, g: int) -> int:
        return self.length - self.n * self.panel(g) - (self.n - 1) * g

    def layout(self, g: int, offset: int) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """(panel starts, gutter bands) with ``g`` px gutters and the first panel at ``offset``."""
        p = self.panel(g)
        starts = tuple(offset + k * (p + g) for k in range(self.n))
        return starts, [(s + p, s + p + g) for s in starts[:-1]]

    def remainder_offsets(self, r: int) -> list[int]:
        """Where the first panel may start: remainder at the end first, unless only the start is uniform."""
        if r == 0:
            return [0]
        end_uniform, start_uniform = self.uniform([(self.length - r, self.length)]), self.uniform([(0, r)])
        return [r, 0] if start_uniform and not end_uniform else [0, r]

    def plan(self, g: int, offset: int) -> AxisPlan:
        p, r = self.panel(g), self.remainder(g)
        if p < 1:
            raise GeometryError(f"{self.name}: {self.length} px is too small for {self.n} panels with a {g} px gutter")
        return AxisPlan(self.layout(g, offset)[0], p, g, r, "" if r == 0 else ("start" if offset else "end"))


def _explicit_gutter(ax: _Axis, gutter: int) -> AxisPlan:
    """The plan with the given gutter, which must hold one uniform colour (any offset the remainder allows)."""
    offsets = ax.remainder_offsets(ax.remainder(gutter)) if ax.panel(gutter) >= 1 else [0]
    if gutter == 0 or ax.panel(gutter) < 1:
        return ax.plan(gutter, offsets[0])
    edge = 2 if gutter > 4 else 0  # JPEG ringing may blur the outermost lines of a given band
    for offset in offsets:
        if ax.uniform([(a + edge, b - edge) for a, b in ax.layout(gutter, offset)[1]]):
            return ax.plan(gutter, offset)
    bands = ", ".join(f"{a}-{b - 1}" for a, b in ax.layout(gutter, offsets[0])[1])
    raise GeometryError(
        f"{ax.name}: expected a uniform {gutter} px gutter at {ax.name}={bands} but it holds image content; "
        "check --gutter (auto detects it) and --panels/--layout"
    )


def _auto_gutter(ax: _Axis) -> AxisPlan:
    """The widest uniform gutter (up to MAX_AUTO_GUTTER, at most 1/8 of a panel) where equal panels meet, else 0."""
    for g in range(max(0, min(MAX_AUTO_GUTTER, (ax.length // ax.n) // 8)), 0, -1):
        hit = next((o for o in ax.remainder_offsets(ax.remainder(g)) if ax.uniform(ax.layout(g, o)[1])), None)
        if hit is not None:
            return ax.plan(g, hit)
    return ax.plan(0, ax.remainder_offsets(ax.length % ax.n)[0])


def _check_equal_panels(ax: _Axis, plan: AxisPlan) -> None:
    """Raise when a full-length uniform band near a panel boundary touches neither the boundary nor the chosen
    gutter: a separator equal panels would not use, so the panels have unequal sizes. Runs split by JPEG ringing
    (gaps up to _RUN_GAP lines) count as one; shorter than _MIN_RUN is noise."""
    line_uniform = (ax.hi - ax.lo).max(axis=1) <= ax.tol
    window = max(1, plan.size // 4)
    for k in range(1, ax.n):
        cut_a = plan.starts[k] - plan.gutter  # first position of the gutter (== boundary when g == 0)
        cut_b = plan.starts[k]  # first position of the next panel
        a, b = max(0, cut_a - window), min(ax.length, cut_b + window)
        for run_start, run_end in _runs(line_uniform[a:b], offset=a):
            touches = run_start <= cut_b and run_end >= cut_a
            if run_end - run_start >= _MIN_RUN and not touches and run_start > a and run_end < b:
                raise GeometryError(
                    f"{ax.name}: a uniform separator at {ax.name}={run_start}-{run_end - 1} is not where "
                    f"{ax.n} equal panels are cut ({ax.name}={cut_a}): the panels have unequal sizes; "
                    "not cut (crop these composites yourself, or force an even cut with --gutter 0)"
                )


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
    if n == 1:
        return AxisPlan((0,), int(lo.shape[0]), 0, 0, "")
    ax = _Axis(lo, hi, n, tol, axis)
    if gutter is not None:
        return _explicit_gutter(ax, gutter)
    plan = _auto_gutter(ax)
    _check_equal_panels(ax, plan)
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
