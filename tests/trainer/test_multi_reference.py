"""Several references per sample: position ids placed as ComfyUI's default "offset" method places several
reference latents; `reference_sampling` combined (all, every step) or random (one per sample per step, seeded by
(seed, sample id, epoch)), exact on resume."""

from __future__ import annotations

import pytest
import torch

from kontext_data.manifest import read_manifest, write_manifest
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import choose_references, samples_from_records
from kontext_trainer.flow import image_ids, kontext_ids, reference_offsets
from kontext_trainer.recipe import KontextLoRARecipe, train


def test_offsets_follow_comfyui_placement():
    # ComfyUI (comfy/ldm/flux/model.py, ref_latents_method "offset"): with (h, w) the extent so far, a reference
    # with ref_h + h > ref_w + w goes right (w_offset = w), else below (h_offset = h); latent px -> tokens // 2.
    # three 8x8 latents: first at 0; second 8+8 > 8+8 is false -> below (row 8 px = 4 tokens);
    # extent (16, 8); third 8+16 > 8+8 -> right (col 8 px = 4 tokens)
    assert reference_offsets([(8, 8), (8, 8), (8, 8)]) == [(0, 0), (4, 0), (0, 4)]
    # tall references go side by side: 8+8 > 4+4 -> right by 4 px = 2 tokens
    assert reference_offsets([(8, 4), (8, 4)]) == [(0, 0), (0, 2)]
    # wide ones stack downwards
    assert reference_offsets([(4, 8), (4, 8)]) == [(0, 0), (2, 0)]


def test_position_ids_of_three_references():
    ids = kontext_ids((8, 8), [(8, 8), (8, 8), (8, 8)])
    n = 16  # tokens of one 8x8 latent
    assert torch.equal(ids[:n], image_ids(8, 8, index=0))
    assert torch.equal(ids[n:2 * n], image_ids(8, 8, index=1))  # where the pipeline puts a single reference
    assert torch.equal(ids[2 * n:3 * n], image_ids(8, 8, index=1, row_offset=4))
    assert torch.equal(ids[3 * n:], image_ids(8, 8, index=1, col_offset=4))
    refs = ids[n:]
    assert len({tuple(r.tolist()) for r in refs}) == len(refs)  # no two reference tokens share a position


def _two_reference_manifest(sample_manifest, folder):
    """The sample pairs with a second reference per row (the edited image itself; any image will do)."""
    m = read_manifest(sample_manifest)
    rows = m.table.to_pylist()
    for r in rows:
        r["reference_paths"] = [r["reference_paths"][0], r["target_path"]]
        r["reference_hashes"] = [r["reference_hashes"][0], r["target_hash"]]
        r["reference_geometry"] = [r["reference_geometry"][0], r["reference_geometry"][0]]
        r["reference_degradations"] = [None, None]
    return write_manifest(rows, folder / "two_refs.parquet", options=m.options)


@pytest.fixture()
def two_refs(manifest_copy):
    return _two_reference_manifest(manifest_copy, manifest_copy.parent)


def test_random_reference_choice_is_seeded_per_sample_and_epoch(two_refs):
    samples = sorted(samples_from_records(read_manifest(two_refs).records()), key=lambda s: s.sample_id)
    same = [s for s in samples if s.bucket == samples[0].bucket]
    assert len(same) >= 2
    alone = [choose_references([s], "random", 5, 0)[0] for s in same]
    together = choose_references(same, "random", 5, 0)
    assert alone == together  # independent of which samples share the batch
    assert all(len(ix) == 1 for ix in together)
    picks = {choose_references([samples[0]], "random", 5, e)[0][0] for e in range(20)}
    assert picks == {0, 1}  # both references get used over the epochs
    assert [choose_references([s], "random", 5, 3) for s in samples] == \
        [choose_references([s], "random", 5, 3) for s in samples]
    assert choose_references(same, "combined", 5, 0) == [(0, 1)] * len(same)


def _cfg(manifest, model, out, **kw):
    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=4, lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True,
                device="cpu", train_batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def test_combined_and_random_train_and_random_resumes_exactly(tiny_model, two_refs, tmp_path):
    recipe = KontextLoRARecipe(_cfg(two_refs, tiny_model, tmp_path / "combined", max_train_steps=2))
    recipe.setup()
    assert recipe.cache_stats["latent_total"] == 16  # targets double as second references: shared entries
    combined = recipe.train().losses
    full = train(_cfg(two_refs, tiny_model, tmp_path / "full", reference_sampling="random"))
    assert [l for _, l in full.losses[:2]] != [l for _, l in combined]  # one reference is not two
    train(_cfg(two_refs, tiny_model, tmp_path / "split", reference_sampling="random", max_train_steps=2,
               checkpointing_steps=2))
    rest = train(_cfg(two_refs, tiny_model, tmp_path / "split", reference_sampling="random",
                      resume_from_checkpoint="latest"))
    assert [s for s, _ in rest.losses] == [3, 4]
    assert [l for _, l in rest.losses] == pytest.approx([l for _, l in full.losses[2:]], rel=1e-5)
