"""Training samples from manifest records, bucketed batches, and batch loading from the caches.

In: manifest records (dicts), content keys of the caches. Out: `Sample`s; a seeded `BucketBatchSampler` whose
batches hold samples of one bucket (same target size and same reference count and sizes), reshuffled per epoch
and resumable from (epoch, position); `load_batch` stacking cached tensors into a `KontextBatch`.

Captions: each sample's alternatives are all cached; which one a step sees, and whether caption dropout blanks
it, is drawn from (run seed, sample seed, epoch), so it does not depend on batch order.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

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

    @property
    def bucket(self) -> tuple:
        """Batching key: target size, then each reference's size (so the count is included)."""
        return (self.target.size, tuple(r.size for r in self.references))


def samples_from_records(records: list[Mapping[str, Any]]) -> list[Sample]:
    out = []
    for r in records:
        captions = [c for c in (r.get("captions") or []) if c is not None]
        if not captions:
            captions = [r["caption"]] if r.get("caption") else [BLANK_CAPTION]
        target = ImageEntry.from_geometry(os.path.abspath(r["target_path"]), r["target_hash"], r)
        refs = tuple(ImageEntry.from_geometry(os.path.abspath(p), h, g)
                     for p, h, g in zip(r["reference_paths"], r["reference_hashes"], r["reference_geometry"]))
        out.append(Sample(sample_id=r["sample_id"], split=r["split"], captions=tuple(captions), target=target,
                          references=refs, seed=int(r["seed"]), record=dict(r)))
    return out


class BucketBatchSampler:
    """Seeded batches of one bucket each. `batches(epoch)` is a pure function of (samples, batch size, seed,
    epoch): the order of the manifest's rows does not matter (samples are sorted by id first)."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int):
        if not samples:
            raise ValueError("no training samples")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        order = sorted(range(len(samples)), key=lambda i: samples[i].sample_id)
        self._buckets: dict[tuple, list[int]] = {}
        for i in order:
            self._buckets.setdefault(samples[i].bucket, []).append(i)

    @property
    def buckets(self) -> dict[tuple, list[int]]:
        return self._buckets

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        out: list[list[int]] = []
        for key in sorted(self._buckets, key=repr):
            idx = list(self._buckets[key])
            rng.shuffle(idx)
            out.extend(idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size))
        rng.shuffle(out)
        return out

    def iterate(self, epoch: int = 0, position: int = 0):
        """Endless (epoch, position_after, batch) triples starting at the given state (resume)."""
        while True:
            batches = self.batches(epoch)
            while position < len(batches):
                batch = batches[position]
                position += 1
                yield epoch, position, batch
            epoch, position = epoch + 1, 0


def choose_caption(sample: Sample, run_seed: int, epoch: int, dropout: float) -> str:
    """The caption this sample uses in this epoch: one of its alternatives, or blank with probability `dropout`.
    Deterministic in (run seed, sample seed, epoch)."""
    rng = random.Random(f"{run_seed}:{sample.seed}:{epoch}:caption")
    text = sample.captions[rng.randrange(len(sample.captions))] if len(sample.captions) > 1 else sample.captions[0]
    if dropout > 0 and rng.random() < dropout:
        return BLANK_CAPTION
    return text


@dataclass
class KeyBook:
    """Content keys of every cached entry a sample needs."""

    text: Mapping[str, str]  # caption text -> text key
    latent: Mapping[ImageEntry, str]  # entry -> latent key


def load_batch(samples: list[Sample], cache: FeatureCache, keys: KeyBook, captions: list[str]) -> KontextBatch:
    """Stack the cached tensors of `samples` (one bucket) with the given per-sample captions."""
    buckets = {s.bucket for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(map(repr, buckets))}")
    target = torch.stack([cache.load_latent(keys.latent[s.target]) for s in samples])
    n_refs = len(samples[0].references)
    refs = [torch.stack([cache.load_latent(keys.latent[s.references[k]]) for s in samples]) for k in range(n_refs)]
    texts = [cache.load_text(keys.text[c]) for c in captions]
    prompt = torch.stack([t[0] for t in texts])
    pooled = torch.stack([t[1] for t in texts])
    return KontextBatch(target=target, references=refs, prompt_embeds=prompt, pooled=pooled,
                        sample_ids=[s.sample_id for s in samples])
