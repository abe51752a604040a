"""Content check of edit pairs: is the reference really the image the edit was made from?

Pairing by file name proves nothing about content. For every (target, reference) pair this module compares small
thumbnails of the two images *as the trainer sees them* (after the recorded resize and crop) and flags:

* ``identical``  -- no edit: the reference equals the target (same bytes, or the same pixels at 128 px);
* ``unrelated``  -- likely mis-paired or shuffled: the pair's similarity is far below what edit pairs score, in
  absolute terms or relative to the rest of the dataset (a fraction of its median);
* ``misaligned`` -- under ``reference_strict`` only: the reference matches the target best when shifted by
  several pixels, or its own aspect ratio differs from the target's (the shared crop cuts different content).

Scores (0..1, higher = more alike), on 64x64 thumbnails:

* ``structure``: normalized cross-correlation of the edge maps (square root of the colour gradient magnitude, so
  weak edges count as well as strong ones), unshifted;
* ``agreement``: the fraction of pixels whose colour differs by less than 20 levels (an edit changes a part of
  the image; an unrelated image differs almost everywhere);
* ``colour``: histogram intersection of 4x4x4-bin RGB histograms;
* ``similarity`` = max(structure, 0.5 structure + 0.3 agreement + 0.2 colour): matching edges alone are enough
  (a global edit -- colour grading, relighting, style -- keeps the edges while every pixel changes), otherwise the
  three together. It is the ``pair_similarity`` column (the lowest over a sample's references). ``layout`` (8x8
  colour thumbnails) is reported, not used.

A pair is ``unrelated`` when its similarity is under ``unrelated_below`` (0.25), or under ``unrelated_ratio`` (0.65)
times the dataset's median similarity (0.85 assumed below 20 pairs). Calibrated on examples/make_sample.py sets with
5 % of the references shuffled (2 x 400 pairs): shuffled pairs scored at most 0.52, edit pairs at least 0.62, with
medians of 0.88-0.89; and on photo-like textures (JPEG) with 30 % global and 70 % local edits: shuffled at most
0.28, edits at least 0.58, median 0.86 (docs/inspect.md has the measurements).

For misalignment the edge maps are also matched at shifts of up to +-6 px (about +-9 %): ``misaligned`` needs the
best shift >= 2 px away, structure there >= 0.5, a gain >= 0.25 over no shift, and better pixel agreement there
than unshifted (an edit that moves one object agrees worse shifted).

In: a manifest path and a ``CheckConfig``. Out: a ``CheckResult`` (per-sample scores and flags, thresholds, counts,
a JSON report). ``write_manifest_with_similarity`` writes the result into a manifest: the ``pair_similarity`` column
and the ``kontext.check`` metadata (``manifest.write_similarity``, which owns the format). The thumbnails are
``manifest.view_image``'s: the pixels the trainer sees.

The work runs in a spawn process pool (``CheckWorker`` is picklable; it never raises: a file it cannot read comes
back as an error string). numpy, PIL and cv2 are imported inside functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kontext_data.manifest import geometry_items, read_manifest, view_image, write_similarity
from kontext_data.workers import chunked, map_chunks, resolve_workers

THUMB = 64  # side of the structure/colour thumbnails
IDENTITY_THUMB = 128  # side of the thumbnails of the "identical" test
MAX_SHIFT = 6  # pixels of THUMB searched in each direction for misalignment
CHUNK = 16
POOL_MIN_SAMPLES = 48
FLAGS = ("identical", "unrelated", "misaligned", "unreadable")


@dataclass(frozen=True)
class CheckConfig:
    """Options of the content check (`kontext-data check`, `pair --check-content`)."""

    workers: int = 0
    """Processes; 0 = all cores. Small manifests (< 48 samples) run in this process."""
    unrelated_below: float = 0.25
    """A pair whose similarity is under this is `unrelated` whatever the rest of the dataset looks like."""
    unrelated_ratio: float = 0.65
    """A pair whose similarity is under this fraction of the dataset's median similarity is `unrelated`."""
    assumed_median: float = 0.85
    """The median used by the ratio rule for datasets of fewer than 20 pairs (typical of local edits)."""
    misaligned_shift: int = 2
    """Flag `misaligned` (reference_strict) when the best match is at least this many thumbnail pixels (of 64) away,"""
    misaligned_structure: float = 0.5
    """...the structure score there is at least this..."""
    misaligned_gain: float = 0.25
    """...it improves on no shift by at least this much, and the pixels agree better there too (by > 2 points)."""
    misaligned_aspect: float = 0.03
    """Flag `misaligned` (reference_strict) when the reference's own aspect ratio differs from the target's by
    more than this fraction."""
    identical_mean: float = 0.6
    """`identical`: mean absolute difference of 128 px thumbnails under this many grey levels (of 255)..."""
    identical_p99: float = 4.0
    """...and 99th percentile under this many levels. Equal target and reference hashes are always identical."""

    def problems(self) -> list[str]:
        out = []
        if self.workers < 0:
            out.append(f"--workers {self.workers}: must be >= 0 (0 = all cores)")
        if not 0 <= self.unrelated_below <= 1:
            out.append(f"--unrelated-below {self.unrelated_below}: must be between 0 and 1")
        if not 0 <= self.unrelated_ratio <= 1:
            out.append(f"--unrelated-ratio {self.unrelated_ratio}: must be between 0 and 1")
        return out


@dataclass
class RefScore:
    """Scores of one (target, reference) pair, computed in a worker."""

    index: int
    similarity: float | None = None
    structure: float | None = None
    structure_shifted: float | None = None
    """The structure score at the best shift (see `shift`)."""
    colour: float | None = None
    layout: float | None = None
    agreement: float | None = None
    shift: tuple[int, int] = (0, 0)
    gain: float = 0.0
    """How much the best shift improves the structure score over no shift."""
    agreement_gain: float = 0.0
    """How much the best shift improves the pixel agreement (of the centre window) over no shift."""
    mean_diff: float | None = None
    p99_diff: float | None = None
    error: str | None = None


@dataclass
class SampleScore:
    """One sample: its references' scores, the flags, and the reasons in words."""

    row: int
    sample_id: str
    conditioning_type: str
    references: list[RefScore] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    z: float | None = None

    @property
    def similarity(self) -> float | None:
        vals = [r.similarity for r in self.references if r.similarity is not None]
        return min(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "similarity": _round(self.similarity),
            "z": _round(self.z),
            "flags": self.flags,
            "reasons": self.reasons,
            "references": [{k: (_round(v) if isinstance(v, float) else v) for k, v in asdict(r).items() if k != "index"}
                           for r in self.references],
        }


@dataclass
class CheckResult:
    """The outcome of `check_manifest`: per-sample scores (manifest order), dataset statistics, counts."""

    manifest: Path
    config: CheckConfig
    samples: list[SampleScore]
    median: float | None
    mad: float | None
    elapsed_s: float
    workers: int

    @property
    def flagged(self) -> list[SampleScore]:
        return [s for s in self.samples if s.flags]

    @property
    def ok(self) -> bool:
        return not self.flagged

    def counts(self) -> dict[str, int]:
        out = {f: 0 for f in FLAGS}
        for s in self.samples:
            for f in s.flags:
                out[f] += 1
        return out

    def similarities(self) -> list[float | None]:
        return [s.similarity for s in self.samples]

    def report(self) -> dict[str, Any]:
        pairs = sum(len(s.references) for s in self.samples)
        return {
            "report_version": 1,
            "manifest": str(self.manifest),
            "samples": len(self.samples),
            "pairs": pairs,
            "flag_counts": self.counts(),
            "ok": self.ok,
            "dataset": {"median_similarity": _round(self.median), "mad_similarity": _round(self.mad)},
            "thresholds": asdict(self.config) | {"thumbnail": THUMB, "max_shift": MAX_SHIFT},
            "elapsed_s": round(self.elapsed_s, 3),
            "ms_per_pair": round(1000 * self.elapsed_s / pairs, 3) if pairs else None,
            "workers": self.workers,
            "flagged": [s.to_json() for s in self.samples if s.flags],
            "results": [s.to_json() for s in self.samples],
        }


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


# --------------------------------------------------------------------------------------------- scores


def _features(img):
    """float32 thumbnails of one image: (128 px RGB for identity, 64 px RGB, 64 px edge map, 8 px layout, hist)."""
    import cv2
    import numpy as np

    big = np.asarray(img, dtype=np.float32)
    small = cv2.resize(big, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    edges = np.sqrt(np.sqrt(gx * gx + gy * gy).sum(axis=2))  # sqrt: weak edges count, strong ones do not dominate
    edges = cv2.GaussianBlur(edges, (0, 0), 1.0)
    layout = cv2.resize(small, (8, 8), interpolation=cv2.INTER_AREA) / 255.0
    q = np.clip(small / 64.0, 0, 3.999).astype(np.int32)
    hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64).astype(np.float32)
    hist /= hist.sum()
    return big, small, edges, layout, hist


def _ncc(a, b) -> float:
    import numpy as np

    a = a - a.mean()
    b = b - b.mean()
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    scale = max(na, nb)
    if scale < 1e-6:
        return 0.0  # both flat: edges say nothing (agreement and colour decide)
    if min(na, nb) < 1e-3 * scale:
        return 0.0  # one flat, one with structure
    return float((a * b).sum() / (na * nb))


def score_pair(target, reference) -> RefScore:
    """Scores of two PIL images of the same size (IDENTITY_THUMB square thumbnails)."""
    import cv2
    import numpy as np

    tb, ts, te, tl, th = _features(target)
    rb, rs, re_, rl, rh = _features(reference)
    diff = np.abs(tb - rb).max(axis=2)
    agreement = float((np.abs(ts - rs).max(axis=2) < 20.0).mean())
    zero = _ncc(te, re_)
    m = MAX_SHIFT
    templ = np.ascontiguousarray(te[m:-m, m:-m])
    if float(templ.std()) > 1e-3 and float(re_.std()) > 1e-3:
        res = cv2.matchTemplate(np.ascontiguousarray(re_), templ, cv2.TM_CCOEFF_NORMED)
        _, best, _, loc = cv2.minMaxLoc(res)
        centre = float(res[m, m])
        shift = (int(loc[0]) - m, int(loc[1]) - m)
        # the best over shifts, judged on the same centre window as the unshifted value
        structure = max(zero, float(best)) if shift != (0, 0) else zero
        gain = float(best) - centre
        # pixel agreement of the centre window, unshifted and at the best shift: a whole-image shift agrees better
        # shifted; an edit that moved one object agrees worse (everything else moves away)
        tc = ts[m:-m, m:-m]
        h, w = tc.shape[:2]
        agree_zero = float((np.abs(tc - rs[m:m + h, m:m + w]).max(axis=2) < 20.0).mean())
        agree_best = float((np.abs(tc - rs[loc[1]:loc[1] + h, loc[0]:loc[0] + w]).max(axis=2) < 20.0).mean())
        agreement_gain = agree_best - agree_zero
    else:
        structure, shift, gain, agreement_gain = zero, (0, 0), 0.0, 0.0
    colour = float(np.minimum(th, rh).sum())
    layout = float(1.0 - np.abs(tl - rl).mean())
    zero_c = max(0.0, min(1.0, zero))
    # matching edges alone are enough (a global edit -- colour grading, relighting, style -- keeps them while every
    # pixel changes); otherwise edges, unchanged pixels and colours together
    similarity = max(zero_c, 0.5 * zero_c + 0.3 * agreement + 0.2 * colour)
    s = RefScore(index=0, similarity=similarity, structure=zero_c, structure_shifted=max(0.0, min(1.0, structure)),
                 colour=colour, layout=layout, agreement=agreement, shift=shift if gain > 0 else (0, 0),
                 gain=max(0.0, gain), agreement_gain=agreement_gain, mean_diff=float(diff.mean()), p99_diff=float(np.percentile(diff, 99)))
    return s


@dataclass(frozen=True)
class CheckTask:
    """One sample for a worker: the target and its references (absolute paths, geometries, degradations)."""

    row: int
    target: str
    geometry: tuple[tuple[str, int], ...]
    references: tuple[tuple[str, tuple[tuple[str, int], ...], str | None], ...]


@dataclass(frozen=True)
class CheckWorker:
    """Picklable pool worker: scores a chunk of CheckTasks. Never raises; a failure comes back in RefScore.error."""

    thumb: int = IDENTITY_THUMB

    def __call__(self, chunk: Sequence[CheckTask]) -> list[tuple[int, list[RefScore]]]:
        try:
            import cv2

            cv2.setNumThreads(1)
        except Exception:  # noqa: BLE001 - scoring reports the import problem per pair below
            pass
        out = []
        for task in chunk:
            scores: list[RefScore] = []
            try:
                target = view_image(task.target, dict(task.geometry), None, (self.thumb, self.thumb))
            except Exception as exc:  # noqa: BLE001 - never raise across the process boundary
                target = None
                msg = f"cannot read target {task.target}: {type(exc).__name__}: {exc}"
            for i, (path, geom, deg) in enumerate(task.references):
                if target is None:
                    scores.append(RefScore(index=i, error=msg))
                    continue
                try:
                    ref = view_image(path, dict(geom), deg, (self.thumb, self.thumb))
                    s = score_pair(target, ref)
                    s.index = i
                    scores.append(s)
                except Exception as exc:  # noqa: BLE001
                    scores.append(RefScore(index=i, error=f"cannot read reference {path}: {type(exc).__name__}: {exc}"))
            out.append((task.row, scores))
        return out


def tasks_from_records(records: list[dict]) -> list[CheckTask]:
    """One CheckTask per record (`read_manifest(...).records()`), in order."""
    return [CheckTask(row=i, target=r["target_path"], geometry=geometry_items(r),
                      references=tuple((p, geometry_items(g), d) for p, g, d in
                                       zip(r["reference_paths"], r["reference_geometry"], r["reference_degradations"])))
            for i, r in enumerate(records)]


# --------------------------------------------------------------------------------------------- decisions


def check_records(records: list[dict], config: CheckConfig, manifest: Path | str = "",
                  on_progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Score every pair of `records` (as `read_manifest(...).records()` gives them) and flag the suspects."""
    start = time.perf_counter()
    tasks = [t for t in tasks_from_records(records) if t.references]
    workers = resolve_workers(config.workers, len(tasks), pool_min_items=POOL_MIN_SAMPLES)
    chunk = max(1, min(CHUNK, math.ceil(len(tasks) / (workers * 4)))) if workers > 1 else CHUNK
    chunks = chunked(tasks, chunk)
    samples = [SampleScore(row=i, sample_id=r["sample_id"], conditioning_type=r["conditioning_type"])
               for i, r in enumerate(records)]
    done = 0
    total = len(tasks)
    if on_progress:
        on_progress(0, total)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total)

    for row, scores in map_chunks(CheckWorker(), chunks, workers, tick, opencv=True):
        samples[row].references = scores
    median, mad = _decide(samples, records, config)
    return CheckResult(manifest=Path(manifest), config=config, samples=samples, median=median, mad=mad,
                       elapsed_s=time.perf_counter() - start, workers=workers)


def _decide(samples: list[SampleScore], records: list[dict], config: CheckConfig) -> tuple[float | None, float | None]:
    import numpy as np

    sims = np.array([r.similarity for s in samples for r in s.references if r.similarity is not None], dtype=np.float64)
    median = float(np.median(sims)) if sims.size else None
    mad = float(np.median(np.abs(sims - median))) if sims.size else None
    enough = sims.size >= 20
    reference_median = median if enough else config.assumed_median
    cut = max(config.unrelated_below, config.unrelated_ratio * reference_median)
    spread = max(1.4826 * (mad or 0.0), 0.02)
    for s in samples:
        rec = records[s.row]
        zs = []
        for r in s.references:
            label = f"reference {r.index + 1}" if len(s.references) > 1 else "reference"
            if r.error:
                _flag(s, "unreadable", r.error)
                continue
            if enough:
                zs.append((r.similarity - median) / spread)
            same_hash = rec["reference_hashes"][r.index] == rec["target_hash"] and not rec["reference_degradations"][r.index]
            if same_hash or (r.mean_diff <= config.identical_mean and r.p99_diff <= config.identical_p99):
                why = "same file bytes" if same_hash else f"mean pixel difference {r.mean_diff:.2f}/255 at {IDENTITY_THUMB} px"
                _flag(s, "identical", f"{label} equals the target ({why}): no edit to learn")
                continue
            g = rec["reference_geometry"][r.index]
            if s.conditioning_type == "reference_strict":
                far = max(abs(r.shift[0]), abs(r.shift[1])) >= config.misaligned_shift
                if (far and r.structure_shifted >= config.misaligned_structure and r.gain >= config.misaligned_gain
                        and r.agreement_gain > 0.02):
                    px = (round(r.shift[0] * g["bucket_width"] / THUMB), round(r.shift[1] * g["bucket_height"] / THUMB))
                    _flag(s, "misaligned", f"{label} matches best shifted by ({px[0]}, {px[1]}) px of the "
                                           f"{g['bucket_width']}x{g['bucket_height']} bucket (structure "
                                           f"{r.structure:.2f} -> {r.structure_shifted:.2f})")
                    continue
            if r.similarity < cut:
                basis = (f"under {config.unrelated_ratio:.0%} of the dataset's median {median:.2f}" if enough and
                         cut > config.unrelated_below else f"under {cut:.2f}")
                _flag(s, "unrelated", f"{label} does not look like the target (similarity {r.similarity:.2f}, "
                                      f"{basis}): mis-paired or shuffled?")
                continue
            if s.conditioning_type == "reference_strict":
                ta = rec["target_width"] / max(rec["target_height"], 1)
                ra = g["width"] / max(g["height"], 1)
                if abs(math.log(ra / ta)) > math.log1p(config.misaligned_aspect):
                    _flag(s, "misaligned", f"{label} is {g['width']}x{g['height']} (aspect {ra:.3f}) but the target is "
                                           f"{rec['target_width']}x{rec['target_height']} (aspect {ta:.3f}): under "
                                           "reference_strict the shared crop cuts different content")
        s.z = min(zs) if zs else None
    return median, mad


def _flag(s: SampleScore, flag: str, reason: str) -> None:
    if flag not in s.flags:
        s.flags.append(flag)
    s.reasons.append(reason)


def check_manifest(manifest_path: Path | str, config: CheckConfig = CheckConfig(),
                   on_progress: Callable[[int, int], None] | None = None) -> CheckResult:
    """Read a manifest (raises ManifestError) and check the content of every pair. `pair --check-content` calls it."""
    m = read_manifest(manifest_path)
    return check_records(m.records(), config, m.path, on_progress)


# --------------------------------------------------------------------------------------------- manifest column


def write_manifest_with_similarity(source: Path | str, result: CheckResult, out: Path | str) -> Path:
    """Copy the manifest `source` to `out` with the `pair_similarity` column (float32, each sample's lowest
    similarity; null for reference-free samples) and `kontext.check` (JSON: thresholds, counts, median, flagged
    samples with their reasons), through `manifest.write_similarity`: the rest of the file is kept, an existing
    column replaced, the write atomic (so `out` may be `source`, in place). Raises ValueError when the manifest's
    rows changed since the check.
    """
    check = {
        "flag_counts": result.counts(), "median_similarity": _round(result.median),
        "thresholds": asdict(result.config) | {"thumbnail": THUMB, "max_shift": MAX_SHIFT},
        "flagged": {s.sample_id: {"flags": s.flags, "reasons": s.reasons} for s in result.samples if s.flags},
    }
    return write_similarity(source, out, {s.sample_id: _round(s.similarity) for s in result.samples}, check)
