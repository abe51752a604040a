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


def _counts(sampler, epoch):
    from collections import Counter

    return Counter(i for b in sampler.batches(epoch) for i in b)


def test_weights_set_how_often_each_sample_comes_per_epoch(sample_manifest):
    """Weight 2 = twice per epoch, 1 = once, 0.5 = a seeded half of its group per epoch that cycles through the
    group (every sample before any comes again); batches keep one bucket and never hold one sample twice."""
    samples = _samples(sample_manifest)
    n = len(samples)
    weights = [2.0] * 2 + [1.0] * 2 + [0.5] * (n - 4)
    groups = ["a"] * 2 + ["b"] * 2 + ["c"] * (n - 4)
    sampler = BucketBatchSampler(samples, 2, 0, weights, groups)
    seen_c = []
    for epoch in range(4):
        counts = _counts(sampler, epoch)
        assert [counts[i] for i in range(4)] == [2, 2, 1, 1]
        half = [i for i in range(4, n) if counts[i]]
        assert len(half) == (n - 4) // 2 and all(counts[i] == 1 for i in half)
        seen_c.append(set(half))
        for copy, b in sampler.occurrences(epoch):
            assert len(set(b)) == len(b) and len({samples[i].bucket for i in b}) == 1
            assert copy in (0, 1) and (copy == 0 or all(weights[i] == 2.0 for i in b))
    assert seen_c[0] | seen_c[1] == set(range(4, n)) and not seen_c[0] & seen_c[1]  # a cycle covers the group
    assert seen_c[2] | seen_c[3] == set(range(4, n))


def test_weight_1_is_the_unweighted_sampler_and_weights_are_deterministic(sample_manifest):
    samples = _samples(sample_manifest)
    plain = BucketBatchSampler(samples, 2, 7)
    ones = BucketBatchSampler(samples, 2, 7, [1.0] * len(samples), ["x"] * len(samples))
    assert [plain.batches(e) for e in range(3)] == [ones.batches(e) for e in range(3)]
    weights = [3.0 if i % 2 else 0.25 for i in range(len(samples))]

    def ids(ss, ws, epoch, seed=7):
        sampler = BucketBatchSampler(ss, 2, seed, ws, ["g"] * len(ss))
        return [(c, [ss[i].sample_id for i in b]) for c, b in sampler.occurrences(epoch)]

    order = list(range(len(samples)))
    random.Random(1).shuffle(order)
    shuffled, shuffled_w = [samples[i] for i in order], [weights[i] for i in order]
    for epoch in range(3):
        assert ids(samples, weights, epoch) == ids(samples, weights, epoch)  # a pure function
        assert ids(samples, weights, epoch) == ids(shuffled, shuffled_w, epoch)  # of the rows, not their order
    assert ids(samples, weights, 0) != ids(samples, weights, 0, seed=8)


def test_weighted_resume_continues_the_same_sequence_with_copies(sample_manifest):
    samples = _samples(sample_manifest)
    sampler = BucketBatchSampler(samples, 2, 3, [2.0, 1.5, 1.0, 0.5, 1.0, 2.0, 0.5, 1.0], list("aabbccdd"))
    it = sampler.iterate(with_copy=True)
    full = [next(it) for _ in range(30)]
    assert {e for e, *_ in full} >= {0, 1, 2}  # crosses epochs
    epoch, position, _, _ = full[9]
    resumed = sampler.iterate(epoch, position, with_copy=True)
    assert [next(resumed) for _ in range(20)] == full[10:]
    plain = sampler.iterate()  # without with_copy: the same (epoch, position, batch) triples
    assert [next(plain) for _ in range(30)] == [t[:3] for t in full]


def test_repeated_viewings_draw_their_captions_anew(sample_manifest):
    import dataclasses

    from kontext_trainer.data import choose_references, draw_epoch

    s = dataclasses.replace(_samples(sample_manifest)[0], captions=tuple(f"caption {i}" for i in range(50)))
    assert draw_epoch(4, 0) == 4  # a first viewing keys its draws as an unweighted run does
    assert choose_caption(s, 0, draw_epoch(4, 0), 0.0) == choose_caption(s, 0, 4, 0.0)
    viewings = {choose_caption(s, 0, draw_epoch(4, c), 0.0) for c in range(6)}
    assert len(viewings) > 1
    assert choose_references([s], "random", 0, draw_epoch(2, 1)) == choose_references([s], "random", 0, "2.1")


def test_bad_weights_are_errors(sample_manifest):
    import pytest

    samples = _samples(sample_manifest)
    for bad in ([0.0] * len(samples), [float("nan")] * len(samples), [1.0]):
        with pytest.raises(ValueError):
            BucketBatchSampler(samples, 2, 0, bad)
