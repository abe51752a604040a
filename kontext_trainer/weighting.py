"""Dataset weights and repeats: how many times each training sample is seen per epoch.

In: the training rows (each with its `dataset_id` and `manifest_path`), the manifests' options (where
`kontext-data import-simpletuner` stores SimpleTuner's `repeats` per dataset id as `dataset_repeats`), and the
config's `dataset_weights` / `dataset_repeats`, whose keys name a dataset id or a manifest path. Out: a weight and
a group per sample id for `BucketBatchSampler`, the samples each dataset gives per epoch (the start-up line), and
every problem (a key that names nothing, an unusable imported value), listed together.

Two ways to say the same thing, both kept because users arrive with one or the other:
- weight w: seen w times per epoch (2 = twice; 0.5 = a seeded half of the dataset each epoch, another half the
  next); what `kontext-train a.parquet:2` sets.
- repeats r (SimpleTuner's `repeats`): seen r + 1 times per epoch, so 0 = once. (kohya, musubi and ai-toolkit count
  differently: their 1 is once; use a weight to carry those over.)
Every entry that names a sample's dataset or its manifest multiplies that sample's weight: w by w, repeats r by
r + 1. The config's `dataset_repeats` entry for a dataset id replaces the repeats imported into the manifest for it
(the same setting, overridden), instead of multiplying with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class DatasetShare:
    """One dataset of one manifest: its training samples, weight factors and what it gives per epoch."""

    label: str
    samples: int
    weight: float  # product of the dataset_weights entries that apply
    repeats: int  # (product of (r + 1)) - 1 of the repeats entries that apply, imported ones included

    @property
    def multiplier(self) -> float:
        """Viewings per epoch of each of its samples: weight x (repeats + 1)."""
        return self.weight * (self.repeats + 1)

    @property
    def per_epoch(self) -> float:
        """Viewings per epoch of the whole dataset."""
        return self.samples * self.multiplier


@dataclass
class Weighting:
    """The weight and group of every training sample, with the problems of the tables and the start-up line."""

    by_sample: dict[str, tuple[float, str]] = field(default_factory=dict)
    """sample id -> (weight, group): the group is its dataset's label (fractional weights pick a share of each)."""
    factors: dict[str, tuple[float, int]] = field(default_factory=dict)
    """dataset label -> (weight, repeats), in the order the datasets first appear."""
    problems: list[str] = field(default_factory=list)

    def for_samples(self, sample_ids: Sequence[str]) -> tuple[list[float], list[str]]:
        """Weights and groups of these samples (BucketBatchSampler's); a sample not seen here weighs 1."""
        pairs = [self.by_sample.get(i, (1.0, "")) for i in sample_ids]
        return [w for w, _ in pairs], [g for _, g in pairs]

    def shares(self, sample_ids: Sequence[str]) -> list[DatasetShare]:
        """Per dataset: its samples among `sample_ids` and what they are seen per epoch."""
        counts: dict[str, int] = {}
        for i in sample_ids:
            label = self.by_sample.get(i, (1.0, ""))[1]
            counts[label] = counts.get(label, 0) + 1
        order = [label for label in self.factors if label in counts] + [l for l in counts if l not in self.factors]
        return [DatasetShare(label or "(other)", counts[label], *self.factors.get(label, (1.0, 0))) for label in order]

    def describe(self, sample_ids: Sequence[str]) -> str:
        """`datasets per epoch: faces 120 (x2), scenes 60; 180 samples per epoch`: what each dataset of these
        training samples gives per epoch, with its factor."""
        shares = self.shares(sample_ids)
        parts = []
        for d in shares:
            text = f"{d.label} {_num(d.per_epoch)}"
            if d.multiplier != 1.0:
                why = []
                if d.weight != 1.0:
                    why.append(f"weight {_num(d.weight)}")
                if d.repeats:
                    why.append(f"repeats {d.repeats}")
                text += f" (x{_num(d.multiplier)}" + (f": {', '.join(why)})" if d.repeats else ")")
            parts.append(text)
        total = sum(d.per_epoch for d in shares)
        weighted = any(d.multiplier != 1.0 for d in shares)
        tail = f"; {_num(total)} samples per epoch" + ("" if float(total).is_integer() else " on average")
        return "datasets per epoch: " + ", ".join(parts) + (tail if len(shares) > 1 or weighted else "")


def _num(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.4g}"


def imported_repeats(manifest: str, options: Mapping[str, Any], problems: list[str]) -> dict[str, int]:
    """`dataset_repeats` of a manifest's options (written by import-simpletuner): {dataset id: repeats >= 0}."""
    raw = options.get("dataset_repeats")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{manifest}: options.dataset_repeats is not an object of dataset id: repeats; re-run "
                        "`kontext-data import-simpletuner`")
        return {}
    out = {}
    for did, r in raw.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            problems.append(f"{manifest}: options.dataset_repeats {did!r}: {r!r} is not a whole number >= 0; re-run "
                            "`kontext-data import-simpletuner`")
            continue
        out[str(did)] = r
    return out


def dataset_weighting(train_records: Sequence[Mapping[str, Any]], all_records: Sequence[Mapping[str, Any]],
                      manifests: Sequence[str], options: Sequence[Mapping[str, Any]],
                      weights: Sequence[tuple[str, float]] = (), repeats: Sequence[tuple[str, int]] = ()) -> Weighting:
    """Each training sample's weight and group (by sample id), each dataset's factors, and every problem.

    `manifests` are the paths as given and `options` their `kontext.options`, in the same order (options are
    skipped when a manifest could not be read: that is a problem of its own). Keys of `weights` / `repeats` match a
    dataset id (of any row, eval rows included) or a manifest (compared as absolute paths)."""
    result = Weighting()
    by_manifest = {os.path.abspath(p): str(p) for p in manifests}
    dataset_ids = {str(r["dataset_id"]) for r in all_records}
    imported: dict[str, dict[str, int]] = {}
    if len(options) == len(manifests):
        for path, opts in zip(manifests, options):
            imported[os.path.abspath(path)] = imported_repeats(str(path), opts or {}, result.problems)

    def matches(key: str) -> tuple[bool, str | None]:
        """(names a dataset id, the manifest it names)."""
        ab = os.path.abspath(os.path.expanduser(key))
        return key in dataset_ids, ab if ab in by_manifest else None

    def check(name: str, table: Sequence[tuple[str, Any]]) -> list[tuple[str, Any, bool, str | None]]:
        out = []
        for key, value in table:
            is_dataset, manifest = matches(key)
            if not is_dataset and manifest is None:
                known = ", ".join(sorted(dataset_ids)) or "none"
                result.problems.append(
                    f"{name}: {key!r} names no dataset id or manifest of this run (dataset ids: {known}; manifests: "
                    f"{', '.join(map(str, manifests))}); use one of them as the key")
                continue
            out.append((key, value, is_dataset, manifest))
        return out

    weight_entries = check("dataset_weights", weights)
    repeat_entries = check("dataset_repeats", repeats)
    overridden = {key for key, _, is_dataset, _ in repeat_entries if is_dataset}

    manifest_ids: dict[str, set[str]] = {}
    for r in train_records:
        manifest_ids.setdefault(str(r["dataset_id"]), set()).add(str(r.get("manifest_path", "")))
    shares: dict[tuple[str, str], list[int]] = {}
    factors: dict[tuple[str, str], tuple[float, int]] = {}
    for i, r in enumerate(train_records):
        did, manifest = str(r["dataset_id"]), str(r.get("manifest_path", ""))
        key = (manifest, did)
        if key not in factors:
            w, rep = 1.0, 1
            for k, value, is_dataset, named in weight_entries:
                if (is_dataset and k == did) or named == manifest:
                    w *= float(value)
            if did not in overridden and imported.get(manifest, {}).get(did):
                rep *= imported[manifest][did] + 1
            for k, value, is_dataset, named in repeat_entries:
                if (is_dataset and k == did) or named == manifest:
                    rep *= int(value) + 1
            factors[key] = (w, rep - 1)
        shares.setdefault(key, []).append(i)

    labels = {}
    for manifest, did in shares:
        if len(manifest_ids[did]) == 1:
            labels[(manifest, did)] = did
        else:  # one dataset id in several manifests: say which
            labels[(manifest, did)] = f"{did} ({Path(manifest).name if manifest else '?'})"
    for key in shares:
        if list(labels.values()).count(labels[key]) > 1:
            labels[key] = f"{key[1]} ({key[0]})"
    for key, members in shares.items():
        w, rep = factors[key]
        label = labels[key]
        result.factors[label] = (w, rep)
        for i in members:
            result.by_sample[str(train_records[i]["sample_id"])] = (w * (rep + 1), label)
        if not math.isfinite(w * (rep + 1)) or w * (rep + 1) <= 0:
            result.problems.append(f"dataset {label}: weight {w * (rep + 1):g} is not a finite number above 0")
    return result
