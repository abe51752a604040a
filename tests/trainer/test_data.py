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


def test_random_reference_choice_keeps_loose_batches_stackable(sample_manifest):
    """reference_loose references of different sizes: the batch takes one index (drawn for its first sample id),
    so the chosen references of a batch always have one size."""
    import dataclasses

    from kontext_trainer.cache import ImageEntry
    from kontext_trainer.data import choose_references

    base = _samples(sample_manifest)[:3]
    small = dict(intermediary_width=32, intermediary_height=32, crop_left=0, crop_top=0, bucket_width=32,
                 bucket_height=32)
    samples = [dataclasses.replace(s, target=base[0].target,
                                   references=(s.references[0], ImageEntry.from_geometry(s.references[0].path, "h",
                                                                                         small)))
               for s in base]
    assert len({s.bucket for s in samples}) == 1
    for epoch in range(10):
        chosen = choose_references(samples, "random", 0, epoch)
        assert len(set(chosen)) == 1
        assert chosen == choose_references(list(reversed(samples)), "random", 0, epoch)


def test_read_manifests_lists_every_problem(sample_manifest, tmp_path):
    from kontext_trainer.data import read_manifests

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    records, options, problems = read_manifests([sample_manifest, sample_manifest, bad])
    assert len(records) == 8 and len(options) == 2
    assert sum("unique across manifests" in p for p in problems) == 8
    assert any(str(bad) in p for p in problems)
