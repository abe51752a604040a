"""Training samples from manifest records, bucketed batches, and batch loading from the caches.

In: manifest records (dicts), content keys of the caches. Out: `Sample`s; a seeded `BucketBatchSampler` whose
batches hold samples of one bucket (same target size and same reference count and sizes), reshuffled per epoch
and resumable from (epoch, position), with per-sample weights (dataset weights and repeats, see
kontext_trainer.weighting); `load_batch` stacking cached tensors into a `KontextBatch`.

Captions: each sample's alternatives are all cached; which one a step sees, and whether caption dropout blanks
it, is drawn from (run seed, sample seed, epoch), so it does not depend on batch order.

Also here: several manifests read as one (`read_manifests`), on-demand references (`kontext-data degrade
--on-demand`: `ImageEntry.synth` holds the record, the pixels are synthesized when the latent is cached),
reference-free samples (no references: plain text-to-image steps, in buckets of their own), and the choice of
references per step for samples with several (`reference_sampling` combined | random).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from kontext_data.fileio import atomic_path
from kontext_data.manifest import on_demand_record, open_pixels
from kontext_trainer.cache import FeatureCache, ImageEntry
from kontext_trainer.flow import KontextBatch

BLANK_CAPTION = ""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    split: str
    captions: tuple[str, ...]
    target: ImageEntry
    references: tuple[ImageEntry, ...]
    seed: int
    record: Mapping[str, Any] = field(compare=False, hash=False, repr=False, default_factory=dict)
    mask: ImageEntry | None = None
    """The loss mask (`kontext-data pair --masks`): the mask file with the TARGET's geometry; None: no mask."""

    @property
    def bucket(self) -> tuple:
        """Batching key: target size, then each reference's size (so the count is included)."""
        return (self.target.size, tuple(r.size for r in self.references))


def record_problems(records: list[Mapping[str, Any]]) -> list[str]:
    """Problems of the rows' on-demand references (unreadable record, missing seed/chain, unknown degradation),
    all listed; checked before any model loads."""
    from kontext_data import degradations as D

    problems = []
    for r in records:
        for i, text in enumerate(r.get("reference_degradations") or []):
            where = f"{r['sample_id']}: reference {i + 1}"
            try:
                rec = on_demand_record(text, strict=True)
            except ValueError as exc:
                problems.append(f"{where}: reference_degradations is not a JSON record ({exc}); re-run "
                                "`kontext-data pair`")
                continue
            if rec is None:
                continue
            missing = [k for k in ("chain", "seed", "params_hash") if k not in rec]
            if missing:
                problems.append(f"{where}: on-demand record lacks {', '.join(missing)}; re-run `kontext-data "
                                "degrade --on-demand` and `kontext-data pair`")
                continue
            try:
                D.chain_from_json(rec["chain"])
            except Exception as exc:  # noqa: BLE001 - any failure to rebuild the chain is a record problem
                problems.append(f"{where}: on-demand degradation chain cannot be rebuilt ({exc}); re-run "
                                "`kontext-data degrade --on-demand` with this kontext-data version")
    return problems


def read_manifests(paths: Sequence[str | os.PathLike]) -> tuple[list[dict], list[dict], list[str]]:
    """Rows of one or more manifests concatenated (paths resolved against each manifest's folder), their
    `kontext.options`, and every problem (unreadable manifests, sample ids repeated across manifests). Each row
    gets `manifest_path`, the absolute path of its manifest (dataset weights may name a manifest)."""
    from kontext_data.manifest import ManifestError, read_manifest

    records: list[dict] = []
    options: list[dict] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            m = read_manifest(path)
        except ManifestError as exc:
            problems.extend(f"{path}: {p}" for p in exc.problems)
            continue
        options.append(m.options)
        for r in m.records():
            sid = r["sample_id"]
            if sid in seen:
                problems.append(f"sample_id {sid!r} is in both {seen[sid]} and {path}: sample ids must be unique "
                                "across manifests (give one of them another --dataset-id in `kontext-data pair`)")
                continue
            seen[sid] = str(path)
            r["target_path"] = os.path.abspath(r["target_path"])
            r["reference_paths"] = [os.path.abspath(p) for p in r["reference_paths"]]
            r["manifest_path"] = str(m.path)
            records.append(r)
    return records, options, problems


def samples_from_records(records: list[Mapping[str, Any]]) -> list[Sample]:
    out = []
    for r in records:
        captions = [c for c in (r.get("captions") or []) if c is not None]
        if not captions:
            captions = [r["caption"]] if r.get("caption") else [BLANK_CAPTION]
        target = ImageEntry.from_geometry(os.path.abspath(r["target_path"]), r["target_hash"], r)
        degradations = list(r.get("reference_degradations") or [])
        degradations += [None] * (len(r["reference_paths"]) - len(degradations))
        refs = []
        for p, h, g, d in zip(r["reference_paths"], r["reference_hashes"], r["reference_geometry"], degradations):
            rec = on_demand_record(d, strict=True)  # record_problems has vetted every record
            synth = json.dumps(rec, sort_keys=True) if rec is not None else ""
            refs.append(ImageEntry.from_geometry(os.path.abspath(p), h, g, synth=synth))
        refs = tuple(refs)
        mask = (ImageEntry.from_geometry(os.path.abspath(r["mask_path"]), r["mask_hash"], r)
                if r.get("mask_path") else None)
        out.append(Sample(sample_id=r["sample_id"], split=r["split"], captions=tuple(captions), target=target,
                          references=refs, seed=int(r["seed"]), record=dict(r), mask=mask))
    return out


class BucketBatchSampler:
    """Seeded batches of one bucket each. `batches(epoch)` is a pure function of (samples, weights, batch size,
    seed, epoch): the order of the manifest's rows does not matter (samples are sorted by id first).

    `weights` (one per sample, default 1; kontext_trainer.weighting turns dataset weights and repeats into them):
    a sample of weight m is seen floor(m) times per epoch, plus once more in a seeded share m - floor(m) of its
    group (`groups`, e.g. its dataset). That share is a slice of a seeded cycle through the group, so the
    fraction is exact on average and every sample of the group comes up before any comes up again. Each viewing
    is a round: rounds are bucketed and batched separately, so a batch never holds one sample twice, and their
    batches are shuffled together. `occurrences` tells each batch's round (its `copy`), from which caption and
    reference draws are keyed (`draw_epoch`), so the viewings of a sample in one epoch do not share them. With
    every weight 1 there is one round and the batches are those of an unweighted run."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int, weights: Sequence[float] | None = None,
                 groups: Sequence[str] | None = None):
        if not samples:
            raise ValueError("no training samples")
        n = len(samples)
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        groups = [""] * n if groups is None else [str(g) for g in groups]
        if len(weights) != n or len(groups) != n:
            raise ValueError(f"{len(weights)} weights and {len(groups)} groups for {n} samples")
        bad = sorted({w for w in weights if not (math.isfinite(w) and w > 0)})
        if bad:
            raise ValueError(f"sample weights must be finite and above 0, not {bad[0]}")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.weights = weights
        order = sorted(range(n), key=lambda i: samples[i].sample_id)
        self._order = order
        self._buckets: dict[tuple, list[int]] = {}
        for i in order:
            self._buckets.setdefault(samples[i].bucket, []).append(i)
        self._whole = [math.floor(w) for w in weights]
        # samples with the same group and fractional part share one cycle (in sample id order)
        self._fractions: dict[tuple[str, Fraction], list[int]] = {}
        for i in order:
            frac = Fraction(weights[i] - self._whole[i]).limit_denominator(1 << 20)
            if frac:
                self._fractions.setdefault((groups[i], frac), []).append(i)
        self._rounds = max(math.ceil(w) for w in weights)

    @property
    def buckets(self) -> dict[tuple, list[int]]:
        return self._buckets

    def _fraction_picks(self, epoch: int) -> set[int]:
        """The samples seen one extra time in this epoch: per (group, fraction f) of k samples, positions
        [floor(epoch f k), floor((epoch + 1) f k)) of an endless sequence of seeded permutations of the group."""
        picked: set[int] = set()
        for (group, frac), members in self._fractions.items():
            k = len(members)
            start, end = math.floor(epoch * frac * k), math.floor((epoch + 1) * frac * k)
            perms: dict[int, list[int]] = {}
            for p in range(start, end):
                cycle, offset = divmod(p, k)
                if cycle not in perms:
                    perm = list(members)
                    random.Random(f"{self.seed}:{group}:{frac}:{cycle}:fraction").shuffle(perm)
                    perms[cycle] = perm
                picked.add(perms[cycle][offset])
        return picked

    def occurrences(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(copy, batch) pairs of one epoch, in training order: `copy` is the round (0 for a sample's first viewing
        in the epoch, 1 for its second, ...)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        picked = self._fraction_picks(epoch) if self._fractions else set()
        out: list[tuple[int, list[int]]] = []
        for copy in range(self._rounds):
            for key in sorted(self._buckets, key=repr):
                idx = [i for i in self._buckets[key]
                       if self._whole[i] > copy or (self._whole[i] == copy and i in picked)]
                if not idx:
                    continue
                rng.shuffle(idx)
                out.extend((copy, idx[i:i + self.batch_size]) for i in range(0, len(idx), self.batch_size))
        rng.shuffle(out)
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        return [batch for _, batch in self.occurrences(epoch)]

    def iterate(self, epoch: int = 0, position: int = 0, with_copy: bool = False):
        """Endless (epoch, position_after, batch) triples starting at the given state (resume); with `with_copy`,
        (epoch, position_after, batch, copy). An epoch that draws no sample (only small fractional weights) is
        skipped."""
        while True:
            occurrences = self.occurrences(epoch)
            while position < len(occurrences):
                copy, batch = occurrences[position]
                position += 1
                yield (epoch, position, batch, copy) if with_copy else (epoch, position, batch)
            epoch, position = epoch + 1, 0


def draw_epoch(epoch: int, copy: int) -> int | str:
    """The key of a batch's per-sample draws (caption, dropout, reference choice): the epoch for a sample's first
    viewing in it (as in an unweighted run), `epoch.copy` for its repeats, so each viewing draws anew."""
    return epoch if copy == 0 else f"{epoch}.{copy}"


def choose_caption(sample: Sample, run_seed: int, epoch: int | str, dropout: float) -> str:
    """The caption this sample uses in this epoch: one of its alternatives, or blank with probability `dropout`.
    Deterministic in (run seed, sample seed, epoch); `epoch` is `draw_epoch(epoch, copy)` for repeated samples."""
    rng = random.Random(f"{run_seed}:{sample.seed}:{epoch}:caption")
    text = sample.captions[rng.randrange(len(sample.captions))] if len(sample.captions) > 1 else sample.captions[0]
    if dropout > 0 and rng.random() < dropout:
        return BLANK_CAPTION
    return text


REFERENCE_SAMPLING = ("combined", "random")


def choose_references(samples: list[Sample], mode: str, run_seed: int, epoch: int | str) -> list[tuple[int, ...]]:
    """Which references each sample of one batch uses this step (indices into `sample.references`).

    combined: all of them (SimpleTuner's conditioning_multidataset_sampling=combined). random: one per sample,
    drawn from a generator keyed by (run seed, sample id, epoch) — a sample is seen once per epoch (per viewing
    with dataset weights: `epoch` is then `draw_epoch(epoch, copy)`), so this is one draw per step, independent
    of batch order and exact on resume. When a sample's references differ in size (reference_loose), the batch
    must stay stackable: every sample of the batch takes the index drawn for the batch's first sample id. Samples with 0 or 1 reference are unaffected."""
    if mode not in REFERENCE_SAMPLING:
        raise ValueError(f"unknown reference_sampling {mode!r}; valid: {', '.join(REFERENCE_SAMPLING)}")
    if mode == "combined" or not samples or len(samples[0].references) <= 1:
        return [tuple(range(len(s.references))) for s in samples]

    def draw(s: Sample) -> int:
        return random.Random(f"{run_seed}:{s.sample_id}:{epoch}:reference").randrange(len(s.references))

    sizes = samples[0].bucket[1]
    if len(set(sizes)) == 1:
        return [(draw(s),) for s in samples]
    k = draw(min(samples, key=lambda s: s.sample_id))
    return [(k,) for _ in samples]


def materialize_on_demand(samples: list[Sample], folder: Path | str) -> list[Sample]:
    """Samples whose on-demand references are replaced by lossless PNGs of the synthesized (full-size) pixels
    under `folder` (named by content), for consumers that open files, such as validation. Others unchanged."""
    folder = Path(folder)
    out = []
    for s in samples:
        refs = []
        for e in s.references:
            if not e.on_demand:
                refs.append(e)
                continue
            import xxhash

            name = xxhash.xxh3_64_hexdigest(f"{e.file_hash}:{e.synth}".encode()) + ".png"
            path = folder / name
            if not path.is_file():
                with atomic_path(path) as tmp:
                    open_pixels(e.path, e.synth).save(tmp, compress_level=1)
            refs.append(ImageEntry(path=str(path), file_hash=e.file_hash, geometry=e.geometry))
        out.append(replace(s, references=tuple(refs)))
    return out


@dataclass
class KeyBook:
    """Content keys of every cached entry a sample needs."""

    text: Mapping[str, str]  # caption text -> text key
    latent: Mapping[ImageEntry, str]  # entry -> latent key
    mask: Mapping[ImageEntry, str] = field(default_factory=dict)  # loss-mask entry -> mask key


def load_batch(samples: list[Sample], cache: FeatureCache, keys: KeyBook, captions: list[str],
               reference_indices: list[tuple[int, ...]] | None = None) -> KontextBatch:
    """Stack the cached tensors of `samples` (one bucket) with the given per-sample captions; `reference_indices`
    (from `choose_references`) picks each sample's references, default all."""
    buckets = {s.bucket for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(map(repr, buckets))}")
    if reference_indices is None:
        reference_indices = [tuple(range(len(s.references))) for s in samples]
    target = torch.stack([cache.load_latent(keys.latent[s.target]) for s in samples])
    n_refs = len(reference_indices[0])
    refs = [torch.stack([cache.load_latent(keys.latent[s.references[ix[k]]]) for s, ix in zip(samples, reference_indices)])
            for k in range(n_refs)]
    texts = [cache.load_text(keys.text[c]) for c in captions]
    prompt = torch.stack([t[0] for t in texts])
    pooled = torch.stack([t[1] for t in texts])
    mask = None
    if any(s.mask is not None for s in samples):
        # a sample without a mask weighs every token fully: an all-ones mask is exactly the plain loss
        ones = torch.ones(target.shape[-2:], dtype=torch.float32)
        mask = torch.stack([cache.load_mask(keys.mask[s.mask]) if s.mask is not None else ones for s in samples])
    return KontextBatch(target=target, references=refs, prompt_embeds=prompt, pooled=pooled,
                        sample_ids=[s.sample_id for s in samples], mask=mask)
