"""Statistics of a manifest: what `kontext-data inspect` shows.

In: a manifest path and an ``InspectConfig``. Out: an ``InspectResult`` whose ``report()`` is JSON-ready: counts
(samples, references per sample, splits, datasets, conditioning types, caption sources), the bucket histogram,
aspect ratios, caption length statistics and the most frequent captions, duplicates (the same target hash twice,
the same reference used by many targets), files gone since the manifest was made, and `pair_similarity` statistics
when `kontext-data check --write-manifest` added that column. ``write_plots`` draws the bucket histogram and an
aspect ratio scatter as PNG with PIL (no plotting library).

Nothing here decodes an image: it reads the Parquet table and stats files, so it is fast for 100k rows.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kontext_data.manifest import SIMILARITY_COLUMN, on_demand_record, read_manifest


@dataclass(frozen=True)
class InspectConfig:
    """Options of `kontext-data inspect`."""

    top: int = 10
    """How many of the most frequent captions / biggest duplicate groups / missing files to list."""
    shared_reference_min: int = 3
    """A reference file used by at least this many targets is listed as shared (1 reference, many edits is
    legitimate: several edits of one photo; a high count often means a pairing mistake)."""
    check_files: bool = True
    """Stat every target and reference file to find the ones gone since the manifest was made."""

    def problems(self) -> list[str]:
        out = []
        if self.top < 1:
            out.append(f"--top {self.top}: must be >= 1")
        if self.shared_reference_min < 2:
            out.append(f"--shared-reference-min {self.shared_reference_min}: must be >= 2")
        return out


@dataclass
class InspectResult:
    """Statistics of one manifest. `problems` lists what a user should fix (duplicates, files gone)."""

    manifest: Path
    stats: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    buckets: list[tuple[int, int, int]] = field(default_factory=list)
    """(width, height, count), most frequent first."""
    aspects: list[tuple[float, float, str]] = field(default_factory=list)
    """(original aspect, bucket aspect, split) per sample, for the scatter plot."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> dict[str, Any]:
        return {"report_version": 1, "manifest": str(self.manifest), "ok": self.ok, "problems": self.problems,
                **self.stats}


def _length_stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"count": len(v), "min": v[0], "median": pct(50), "mean": round(sum(v) / len(v), 2), "p95": pct(95),
            "max": v[-1]}


def inspect_manifest(path: Path | str, config: InspectConfig = InspectConfig()) -> InspectResult:
    """Read a manifest (raises ManifestError) and compute its statistics."""
    m = read_manifest(path)
    rows = m.records()
    problems: list[str] = []
    stats: dict[str, Any] = {"samples": len(rows), "schema_version": m.metadata.get("schema_version"),
                             "created_by": m.metadata.get("created_by")}
    stats.update(_counts(rows))
    bucket_list, aspects = _geometry_stats(rows, stats)
    stats["captions"] = _caption_stats([r["caption"] for r in rows], rows, config.top)
    stats["duplicates"] = _duplicates(rows, config, problems)
    if config.check_files:
        stats["files_gone"] = _files_gone(rows, config.top, problems)
    sims = m.similarities()
    if sims is not None:
        stats[SIMILARITY_COLUMN] = _similarity_stats(sims, rows, m.check or {}, config.top)
    problems.extend(f"{m.path}: {p}" for p in m.check_problems)
    return InspectResult(manifest=m.path, stats=stats, problems=problems, buckets=bucket_list, aspects=aspects)


def _counts(rows: list[dict]) -> dict[str, Any]:
    """References per sample, splits, datasets, conditioning types, caption sources, degraded/on-demand/masked."""
    out: dict[str, Any] = {
        "references_per_sample": {str(k): v for k, v in sorted(Counter(len(r["reference_paths"]) for r in rows).items())},
        "reference_free_samples": sum(1 for r in rows if not r["reference_paths"]),
    }
    for key, col in (("splits", "split"), ("datasets", "dataset_id"), ("conditioning_types", "conditioning_type"),
                     ("caption_sources", "caption_source")):
        out[key] = dict(Counter(r[col] for r in rows).most_common())
    out["degraded_references"] = sum(1 for r in rows for d in r["reference_degradations"] if d)
    out["on_demand_references"] = sum(1 for r in rows for d in r["reference_degradations"] if on_demand_record(d))
    out["masked_samples"] = sum(1 for r in rows if r.get("mask_path"))
    return out


def _geometry_stats(rows: list[dict], stats: dict[str, Any]) -> tuple[list[tuple[int, int, int]], list]:
    """Bucket histogram, aspect change and target sizes into `stats`; returns the buckets and aspects to plot."""
    buckets = Counter((r["bucket_width"], r["bucket_height"]) for r in rows)
    bucket_list = [(w, h, c) for (w, h), c in sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))]
    stats["buckets"] = [{"bucket": f"{w}x{h}", "width": w, "height": h, "aspect": round(w / h, 3), "count": c}
                        for w, h, c in bucket_list]
    stats["bucket_count"] = len(bucket_list)
    stats["single_sample_buckets"] = sum(1 for b in bucket_list if b[2] == 1)
    aspects = [(r["target_width"] / max(1, r["target_height"]), r["bucket_width"] / max(1, r["bucket_height"]), r["split"])
               for r in rows]
    cropped = [abs(math.log(a / b)) for a, b, _ in aspects]
    stats["aspect_change"] = {"max_percent": round(100 * (math.exp(max(cropped)) - 1), 2) if cropped else 0.0,
                              "over_5_percent": sum(1 for c in cropped if c > math.log(1.05))}
    stats["target_pixels"] = _length_stats([r["target_width"] * r["target_height"] for r in rows])
    return bucket_list, aspects


def _caption_stats(captions: list[str | None], rows: list[dict], top: int) -> dict[str, Any]:
    return {
        "missing": sum(1 for c in captions if not c),
        "alternatives_per_sample": _length_stats([len(r["captions"]) for r in rows]),
        "characters": _length_stats([len(c) for c in captions if c]),
        "words": _length_stats([len(c.split()) for c in captions if c]),
        "distinct": len({c for c in captions if c}),
        "most_frequent": [{"caption": c, "count": k} for c, k in Counter(c for c in captions if c).most_common(top)],
    }


def _duplicates(rows: list[dict], config: InspectConfig, problems: list[str]) -> dict[str, Any]:
    """Targets with the same hash, references shared by many targets, references equal to their target."""
    by_target: dict[str, list[str]] = defaultdict(list)
    by_ref: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_target[r["target_hash"]].append(r["sample_id"])
        for h, d in zip(r["reference_hashes"], r["reference_degradations"]):
            ids = by_ref[h + ("|" + d if d else "")]
            if not ids or ids[-1] != r["sample_id"]:  # one sample with the same file in two folders counts once
                ids.append(r["sample_id"])
    dup_targets = sorted((ids for ids in by_target.values() if len(ids) > 1), key=lambda ids: (-len(ids), ids[0]))
    shared = sorted((ids for ids in by_ref.values() if len(ids) >= config.shared_reference_min),
                    key=lambda ids: (-len(ids), ids[0]))
    if dup_targets:
        ex = ", ".join(dup_targets[0][:3])
        problems.append(f"{len(dup_targets)} edited image(s) appear more than once (same file hash), e.g. {ex}: "
                        "remove the copies, they weigh those samples twice")
    if shared:
        problems.append(f"{len(shared)} reference file(s) are used by {config.shared_reference_min}+ targets "
                        f"(up to {len(shared[0])}), e.g. {', '.join(shared[0][:3])}: check the pairing "
                        "(`kontext-data check` compares their content)")
    # a target identical to its own reference is the content check's business, but the hashes tell for free
    same = [r["sample_id"] for r in rows
            if any(h == r["target_hash"] and not d for h, d in zip(r["reference_hashes"], r["reference_degradations"]))]
    if same:
        problems.append(f"{len(same)} sample(s) have a reference that is the same file as the target (no edit), "
                        f"e.g. {', '.join(same[:3])}")
    return {
        "duplicate_target_groups": len(dup_targets),
        "duplicate_target_samples": sum(len(g) for g in dup_targets),
        "duplicate_targets": [{"count": len(g), "sample_ids": g[:20]} for g in dup_targets[:config.top]],
        "shared_reference_groups": len(shared),
        "shared_references": [{"count": len(g), "sample_ids": g[:20]} for g in shared[:config.top]],
        "target_equals_reference": len(same),
    }


def _files_gone(rows: list[dict], top: int, problems: list[str]) -> dict[str, Any]:
    gone_t = [r["target_path"] for r in rows if not os.path.isfile(r["target_path"])]
    gone_r = sorted({p for r in rows for p in r["reference_paths"] if not os.path.isfile(p)})
    if gone_t or gone_r:
        problems.append(f"{len(gone_t)} edited and {len(gone_r)} reference file(s) are gone since the manifest was "
                        f"made, e.g. {(gone_t + gone_r)[0]}: restore them or run `kontext-data pair` again")
    return {"targets": len(gone_t), "references": len(gone_r), "examples": (gone_t + gone_r)[:top]}


def _similarity_stats(sims: list[float | None], rows: list[dict], check: dict[str, Any], top: int) -> dict[str, Any]:
    """Statistics of the `pair_similarity` column and the flag counts of the check that wrote it."""
    vals = sorted(v for v in sims if v is not None)
    return {
        "count": len(vals),
        "min": round(vals[0], 4) if vals else None,
        "median": round(vals[len(vals) // 2], 4) if vals else None,
        "flag_counts": check.get("flag_counts"),
        "worst": [{"sample_id": r["sample_id"], "similarity": round(s, 4)} for s, r in
                  sorted(((s, r) for s, r in zip(sims, rows) if s is not None), key=lambda t: t[0])[:top]],
    }


# --------------------------------------------------------------------------------------------- plots (PIL only)

_SPLIT_COLOURS = {"train": (40, 110, 200), "eval": (230, 120, 20)}


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def plot_buckets(result: InspectResult, path: Path, max_bars: int = 30) -> Path:
    """A horizontal bar chart of the bucket histogram (most frequent first), written as PNG."""
    from PIL import Image, ImageDraw

    bars = result.buckets[:max_bars]
    rest = sum(c for _, _, c in result.buckets[max_bars:])
    labels = [f"{w}x{h}" for w, h, _ in bars] + ([f"{len(result.buckets) - max_bars} more"] if rest else [])
    counts = [c for _, _, c in bars] + ([rest] if rest else [])
    row, left, right, top = 22, 110, 90, 44
    width = 760
    height = top + row * max(1, len(counts)) + 20
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f, fb = _font(13), _font(16)
    d.text((10, 10), f"Buckets of {result.manifest.name}: {result.stats['samples']} samples, "
                     f"{len(result.buckets)} bucket(s)", fill="black", font=fb)
    peak = max(counts) if counts else 1
    span = width - left - right
    for i, (label, c) in enumerate(zip(labels, counts)):
        y = top + i * row
        d.text((10, y + 3), label, fill="black", font=f)
        w = max(1, round(span * c / peak))
        d.rectangle((left, y + 2, left + w, y + row - 4), fill=(40, 110, 200))
        d.text((left + w + 6, y + 3), f"{c} ({100 * c / max(1, result.stats['samples']):.1f}%)", fill="black", font=f)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def plot_aspects(result: InspectResult, path: Path) -> Path:
    """Scatter of original aspect ratio (x) against bucket aspect ratio (y), log scales, one dot per sample.

    Dots on the diagonal keep their aspect; the distance from it is how much the crop cuts away.
    """
    from PIL import Image, ImageDraw

    size, margin = 520, 60
    img = Image.new("RGB", (size + margin + 20, size + margin + 60), "white")
    d = ImageDraw.Draw(img)
    f, fb = _font(12), _font(15)
    vals = [a for a, b, _ in result.aspects] + [b for a, b, _ in result.aspects] or [1.0]
    lo = min(min(vals), 0.5)
    hi = max(max(vals), 2.0)
    llo, lhi = math.log(lo) - 0.05, math.log(hi) + 0.05

    def px(v: float) -> float:
        return (math.log(v) - llo) / (lhi - llo) * size

    ox, oy = margin, 50 + size  # origin, bottom-left
    d.text((10, 6), f"Aspect ratio (w/h): original vs bucket, {len(result.aspects)} samples", fill="black", font=fb)
    d.rectangle((ox, oy - size, ox + size, oy), outline=(120, 120, 120))
    for t in (0.5, 0.75, 1.0, 1.333, 2.0, 3.0):
        if lo <= t <= hi:
            x, y = ox + px(t), oy - px(t)
            d.line((x, oy, x, oy - size), fill=(230, 230, 230))
            d.line((ox, y, ox + size, y), fill=(230, 230, 230))
            d.text((x - 12, oy + 4), f"{t:g}", fill="black", font=f)
            d.text((ox - 40, y - 7), f"{t:g}", fill="black", font=f)
    d.line((ox, oy, ox + size, oy - size), fill=(170, 170, 170), width=1)
    for a, b, split in result.aspects:
        x, y = ox + px(a), oy - px(b)
        c = _SPLIT_COLOURS.get(split, (0, 0, 0))
        d.ellipse((x - 3, y - 3, x + 3, y + 3), outline=c, fill=c)
    d.text((ox + size // 2 - 60, oy + 20), "original aspect (log)", fill="black", font=f)
    d.text((6, oy - size - 17), "bucket aspect (log); a dot may stand for many samples", fill="black", font=f)
    for i, (name, c) in enumerate(_SPLIT_COLOURS.items()):
        d.ellipse((ox + 10, oy - size + 10 + 16 * i, ox + 18, oy - size + 18 + 16 * i), fill=c)
        d.text((ox + 24, oy - size + 7 + 16 * i), name, fill="black", font=f)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def write_plots(result: InspectResult, folder: Path | str) -> list[Path]:
    """buckets.png and aspect_ratios.png in `folder` (created)."""
    folder = Path(folder)
    return [plot_buckets(result, folder / "buckets.png"), plot_aspects(result, folder / "aspect_ratios.png")]
