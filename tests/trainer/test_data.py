"""Bucketed, seeded batches: one bucket per batch, batch size > 1, independent of the manifest's row order,
resumable; caption choice and dropout depend on the sample, never on the batch position."""

from __future__ import annotations

import random

from kontext_data.manifest import read_manifest
from kontext_trainer.data import BLANK_CAPTION, BucketBatchSampler, choose_caption, samples_from_records


def _samples(manifest):
    return samples_from_records([r for r in read_manifest(manifest).records() if r["split"] == "train"])


def test_batches_hold_one_bucket_and_cover_every_sample(sample_manifest):
    samples = _samples(sample_manifest)
    assert len({s.bucket for s in samples}) >= 2  # the sample set has square and non-square buckets
    sampler = BucketBatchSampler(samples, batch_size=3, seed=0)
    batches = sampler.batches(0)
    assert any(len(b) > 1 for b in batches)
    for b in batches:
        assert len(b) <= 3 and len({samples[i].bucket for i in b}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))


def test_batches_are_seeded_and_ignore_row_order(sample_manifest):
    samples = _samples(sample_manifest)
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)

    def ids(ss, epoch, seed):
        sampler = BucketBatchSampler(ss, 2, seed)
        return [[ss[i].sample_id for i in b] for b in sampler.batches(epoch)]

    assert ids(samples, 0, 5) == ids(shuffled, 0, 5)
    assert ids(samples, 0, 5) != ids(samples, 1, 5)  # reshuffled every epoch
    assert ids(samples, 0, 5) != ids(samples, 0, 6)


def test_resume_continues_the_same_sequence(sample_manifest):
    samples = _samples(sample_manifest)
    sampler = BucketBatchSampler(samples, 2, 1)
    it = sampler.iterate()
    full = [next(it) for _ in range(12)]
    epoch, position, _ = full[4]
    resumed = sampler.iterate(epoch, position)
    assert [next(resumed) for _ in range(7)] == full[5:]


def test_caption_choice_and_dropout_are_per_sample(sample_manifest):
    s = _samples(sample_manifest)[0]
    assert choose_caption(s, 0, 0, 0.0) == s.captions[0]
    assert choose_caption(s, 0, 3, 0.5) == choose_caption(s, 0, 3, 0.5)
    drops = [choose_caption(s, 0, e, 0.3) == BLANK_CAPTION for e in range(2000)]
    assert 0.25 < sum(drops) / len(drops) < 0.35
    assert choose_caption(s, 0, 0, 1.0) == BLANK_CAPTION  # only the caption is blanked; references are untouched
