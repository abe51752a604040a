"""Reference-free samples (empty reference_paths) train as plain text-to-image samples in the same run as pairs,
in buckets of their own; several manifests train as one."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from kontext_data.manifest import read_manifest, write_manifest
from kontext_trainer.data import BucketBatchSampler, load_batch, samples_from_records
from kontext_trainer.flow import image_ids, kontext_forward, kontext_ids
from kontext_trainer.recipe import KontextLoRARecipe, TrainError
from conftest import tiny_cpu_config


def _cfg(manifest, model, out, **kw):
    return tiny_cpu_config(manifest, model, out, **kw)


def _drop_references(rows, every=2):
    for i, r in enumerate(rows):
        if i % every == 0:
            r.update(reference_paths=[], reference_hashes=[], reference_geometry=[], reference_degradations=[])
    return rows


@pytest.fixture()
def mixed_manifest(sample_manifest, tmp_path):
    """The sample pairs with every other row turned reference-free (as `kontext-data pair EDITED` will write)."""
    m = read_manifest(sample_manifest)
    rows = _drop_references(m.table.to_pylist())
    # stored paths are relative to the sample folder: write the new manifest beside it
    path = sample_manifest.parent / f"mixed-{os.getpid()}-{tmp_path.name}.parquet"
    write_manifest(rows, path, options=m.options)
    yield path
    path.unlink(missing_ok=True)


def test_plain_flux_step_has_only_target_tokens(tiny_pipeline):
    ids = kontext_ids((8, 6), [])
    assert torch.equal(ids, image_ids(8, 6))  # the plain Flux grid, index 0
    g = torch.Generator().manual_seed(0)
    from kontext_trainer.flow import KontextBatch

    batch = KontextBatch(target=torch.randn(2, 4, 8, 6, generator=g), references=[],
                         prompt_embeds=torch.randn(2, 16, 32, generator=g), pooled=torch.randn(2, 32, generator=g))
    out = kontext_forward(tiny_pipeline.transformer, batch, torch.tensor([0.3, 0.7]), torch.randn(2, 4, 8, 6))
    assert out.prediction.shape[1] == out.num_target_tokens == 4 * 3
    assert torch.isfinite(out.loss)


def test_batches_never_mix_reference_counts(mixed_manifest):
    samples = samples_from_records(read_manifest(mixed_manifest).records())
    assert {len(s.references) for s in samples} == {0, 1}
    sampler = BucketBatchSampler(samples, batch_size=4, seed=0)
    for epoch in range(3):
        for b in sampler.batches(epoch):
            assert len({len(samples[i].references) for i in b}) == 1
            assert len({samples[i].bucket for i in b}) == 1


def test_pairs_and_reference_free_train_in_one_run(tiny_model, mixed_manifest, tmp_path):
    events = []
    recipe = KontextLoRARecipe(_cfg(mixed_manifest, tiny_model, tmp_path / "out", skip_final_validation=False,
                                    validation_samples=8), on_event=lambda k, d: events.append((k, d)))
    recipe.setup()
    assert recipe.cache_stats["latent_total"] == 8 + 4  # 8 targets, 4 references
    free = [s for s in recipe.samples if not s.references]
    batch = load_batch(free[:2], recipe.cache, recipe.keys, [s.captions[0] for s in free[:2]])
    assert batch.references == []
    result = recipe.train()
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(l)) for _, l in result.losses)
    strips = sorted((tmp_path / "out" / "validation" / "step_000004").glob("*.png"))
    assert len(strips) == 8  # reference-free samples validate as text-to-image
    assert result.lora_path.is_file()


def test_several_manifests_train_as_one(tiny_model, sample_manifest, tmp_path):
    m = read_manifest(sample_manifest)
    rows = m.table.to_pylist()
    folder = sample_manifest.parent
    a = write_manifest(rows[:5], folder / f"a-{tmp_path.name}.parquet", options=m.options)
    b = write_manifest(_drop_references(rows[5:], every=1), folder / f"b-{tmp_path.name}.parquet", options=m.options)
    try:
        runner = CliRunner()
        from kontext_trainer.cli import app

        res = runner.invoke(app, ["train", str(a), str(b), "--print-config"])
        assert res.exit_code == 0, res.output
        cfg = _cfg(os.pathsep.join([str(a), str(b)]), tiny_model, tmp_path / "out", max_train_steps=2)
        assert cfg.manifest_paths == [str(a), str(b)]
        recipe = KontextLoRARecipe(cfg)
        recipe.setup()
        assert len(recipe.samples) == 8 and sum(not s.references for s in recipe.samples) == 3
        # the same rows twice: every repeated sample id is listed, before any model loads
        dup = _cfg(os.pathsep.join([str(a), str(a)]), tmp_path / "no-model", tmp_path / "out2")
        with pytest.raises(TrainError) as exc:
            KontextLoRARecipe(dup).setup()
        assert len(exc.value.problems) == 5 and "unique across manifests" in str(exc.value)
        assert "no-model" not in str(exc.value)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
