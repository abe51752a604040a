"""Loss masks from the manifest to the loss: cached at latent resolution through the target's crop, weighted into
the loss (errors outside weigh mask_loss_weight; an all-ones mask is exactly the plain loss), and a recipe run that
trains with them, says so at start-up, and with mask_loss false trains exactly the unmasked losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_data.geometry import GeometryOptions
from kontext_data.manifest import read_manifest
from kontext_data.pairing import PairConfig, pair_folders
from kontext_trainer.cache import FeatureCache, mask_key
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import load_batch, samples_from_records
from kontext_trainer.flow import KontextBatch, kontext_forward, masked_loss
from kontext_trainer.recipe import KontextLoRARecipe, TrainError


def _cfg(manifest, model, out, **kw):
    # validation_loss off where this version has it: these tests look at the training losses only
    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=3, lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True,
                device="cpu", train_batch_size=2, validation_num_inference_steps=2, validation_loss=False)
    base.update(kw)
    return TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__})


def _rgb(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_mask_is_cached_at_latent_resolution_through_the_targets_crop(tmp_path):
    """A 96x64 pair at resolution 64 is resized to 72x48 and center-cropped to 64x48 (4 px off the left). Its mask is
    white on the left half (x < 48 of 96): after the same resize and crop that is x < 32 of 64, i.e. latent columns
    0-3 of 8 exactly. Ignoring the crop would put the edge inside column 4."""
    for folder in ("edited", "reference", "masks"):
        (tmp_path / folder).mkdir()
    _rgb(96, 64, 0).save(tmp_path / "edited" / "a.png")
    _rgb(96, 64, 1).save(tmp_path / "reference" / "a.png")
    (tmp_path / "edited" / "a.txt").write_text("make it red")
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :48] = 255
    mask[:8, 48:] = 128  # a gray band, top right: weighs half
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    res = pair_folders(PairConfig(edited=tmp_path / "edited", references=(tmp_path / "reference",),
                                  masks=tmp_path / "masks", out=tmp_path / "m.parquet", workers=1,
                                  geometry=GeometryOptions(resolution=64)))
    assert res.ok, res.problems
    (rec,) = read_manifest(res.manifest).records()
    assert (rec["intermediary_width"], rec["intermediary_height"], rec["crop_left"], rec["crop_top"],
            rec["bucket_width"], rec["bucket_height"]) == (72, 48, 4, 0, 64, 48)
    (sample,) = samples_from_records([rec])
    assert sample.mask.geometry == sample.target.geometry  # the target's geometry, none of its own
    cache = FeatureCache(tmp_path / "cache")
    key = mask_key(sample.mask)
    assert cache.encode_masks({key: sample.mask}) == 1
    m = cache.load_mask(key)
    assert m.shape == (48 // 8, 64 // 8) and m.dtype == torch.float32
    assert torch.equal(m[:, :4], torch.ones(6, 4))
    assert torch.equal(m[1:, 4:], torch.zeros(5, 4))
    # the gray band covers source rows 0-7 -> rows 0-5 of the 48 px crop: 6 of latent row 0's 8 pixel rows
    assert torch.allclose(m[0, 4:], torch.full((4,), 128 / 255 * 6 / 8), atol=1e-6)
    assert cache.encode_masks({key: sample.mask}) == 0  # cached: nothing to do
    # the key is content + geometry (+ the mask format), never a model's: another crop is another key
    other = dataclasses.replace(sample.mask, geometry=(72, 48, 0, 0, 64, 48))
    assert mask_key(other) != key and mask_key(dataclasses.replace(sample.mask, file_hash="x")) != key


def _tokens(values_per_token, d=4):
    """(1, T, d) tokens whose every channel holds the given value."""
    return torch.tensor(values_per_token, dtype=torch.float32).view(1, -1, 1).expand(1, -1, d).contiguous()


def test_errors_outside_the_mask_weigh_mask_loss_weight():
    """Two tokens (a 2x4 latent): token 0 inside the mask with squared error 1 per channel, token 1 outside with 4.
    weight = m + w (1 - m): (4*1*1 + 4*w*4) / (4*1 + 4*w)."""
    pred, target = _tokens([1.0, 2.0]), torch.zeros(1, 2, 4)
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])  # token 0 = columns 0-1, token 1 = 2-3
    for w in (0.1, 0.25, 1.0):
        assert masked_loss(pred, target, mask, w).item() == pytest.approx((4 + 16 * w) / (4 + 4 * w), rel=1e-6)
    assert masked_loss(pred, target, mask, 0.0).item() == pytest.approx(1.0)  # only the inside counts
    # a half-covered token (mean of its 2x2 patch 0.5) weighs 0.5 + 0.5 w
    half = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    w = 0.2
    assert masked_loss(pred, target, half, w).item() == pytest.approx((4 * (0.5 + 0.5 * w) + 16 * w)
                                                                       / (4 * (0.5 + 0.5 * w) + 4 * w), rel=1e-6)
    # the gradient of the outside token is scaled by the weight too
    p = pred.clone().requires_grad_(True)
    masked_loss(p, target, mask, 0.25).backward()
    assert p.grad[0, 1, 0].item() == pytest.approx(0.25 * 2 * p.grad[0, 0, 0].item(), rel=1e-6)
    # every weight zero (weight 0, empty masks): a zero loss, not NaN
    assert masked_loss(pred, target, torch.zeros_like(mask), 0.0).item() == 0.0


def test_all_ones_mask_is_bitwise_the_plain_loss(tiny_pipeline):
    tr = tiny_pipeline.transformer
    g = torch.Generator().manual_seed(0)
    batch = KontextBatch(target=torch.randn(2, 4, 8, 12, generator=g),
                         references=[torch.randn(2, 4, 8, 12, generator=g)],
                         prompt_embeds=torch.randn(2, 16, 32, generator=g), pooled=torch.randn(2, 32, generator=g))
    sigmas, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 4, 8, 12, generator=g)
    params = [p for p in tr.parameters()][:6]

    def loss_and_grads(b):
        tr.zero_grad()
        loss = kontext_forward(tr, b, sigmas, noise, 1.0, mask_loss_weight=0.1).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    plain, plain_grads = loss_and_grads(batch)
    ones, ones_grads = loss_and_grads(dataclasses.replace(batch, mask=torch.ones(2, 8, 12)))
    left_half = (torch.arange(12) < 6).float().expand(2, 8, 12)
    masked, _ = loss_and_grads(dataclasses.replace(batch, mask=left_half))
    tr.zero_grad()
    assert torch.equal(plain, ones)  # bit for bit, and so are the gradients
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ones_grads))
    assert not torch.equal(plain, masked)
    # also through the batch's move to the training dtype: the mask stays float32, so 1.0 stays 1.0
    half = dataclasses.replace(batch, mask=torch.ones(2, 8, 12)).to("cpu", torch.bfloat16)
    assert half.mask.dtype == torch.float32 and bool(half.mask.eq(1).all())


def _masked_manifests(root: Path) -> tuple[Path, Path]:
    """The sample pairs paired twice: with masks (white where the edit changed the image, found by comparing the
    edited and reference pixels) and without. Same rows otherwise."""
    from conftest import load_make_sample

    data = root / "data"
    load_make_sample().make_sample(data, n=8, size=64, seed=0)
    for edited in sorted((data / "edited").rglob("*.png")):
        rel = edited.relative_to(data / "edited")
        a = np.asarray(Image.open(edited).convert("RGB"), np.int16)
        b = np.asarray(Image.open(data / "reference" / rel).convert("RGB"), np.int16)
        changed = (np.abs(a - b).max(axis=2) > 8).astype(np.uint8) * 255
        out = data / "masks" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(changed).save(out)
    common = dict(edited=data / "edited", references=(data / "reference",), workers=1,
                  geometry=GeometryOptions(resolution=64))
    with_masks = pair_folders(PairConfig(masks=data / "masks", out=root / "masked.parquet", **common))
    without = pair_folders(PairConfig(out=root / "plain.parquet", **common))
    assert with_masks.ok and without.ok, (with_masks.problems, without.problems)
    return with_masks.manifest, without.manifest


def test_recipe_trains_with_masks_and_mask_loss_false_is_the_unmasked_run(tiny_model, tmp_path):
    masked, plain = _masked_manifests(tmp_path)
    cache = tmp_path / "cache"  # shared: the runs reuse each other's latents and captions
    runs = {}
    for name, manifest, kw in (("masked", masked, {}), ("off", masked, {"mask_loss": False}), ("plain", plain, {})):
        events = []
        recipe = KontextLoRARecipe(_cfg(manifest, tiny_model, tmp_path / name, cache_dir=str(cache), **kw),
                                   on_event=lambda k, d, events=events: events.append((k, d)))
        recipe.setup()
        runs[name] = recipe, recipe.train(), events
    recipe, result, events = runs["masked"]
    stages = [d["message"] for k, d in events if k == "stage"]
    assert "masked loss: 8 of 8 training samples have a loss mask; errors outside it weigh 0.1 (mask_loss_weight)" \
        in stages
    stats = [d for k, d in events if k == "cache"][-1]
    assert stats["mask_total"] == 8 and stats["mask_encoded"] == 8
    assert all(np.isfinite(l) for _, l in result.losses) and len(result.losses) == 3
    # the loss masks change the losses; mask_loss false gives exactly the run without masks
    off, plain_losses = runs["off"][1].losses, runs["plain"][1].losses
    assert off == plain_losses
    assert result.losses != plain_losses
    assert any("masked loss off (mask_loss false): the loss masks of 8 training samples are ignored" in d["message"]
               for k, d in runs["off"][2] if k == "stage")
    assert not any("masked loss" in d["message"] for k, d in runs["plain"][2] if k == "stage")
    assert runs["off"][0].keys.mask == {} and "mask_total" not in [d for k, d in runs["off"][2] if k == "cache"][-1]
    # a batch: the masks are the cached ones at latent resolution, and a sample without a mask in a batch with
    # masked ones gets an all-ones mask
    by_bucket: dict = {}
    for s in recipe.samples:
        by_bucket.setdefault(s.bucket, []).append(s)
    a, b = next(group for group in by_bucket.values() if len(group) >= 2)[:2]
    batch = load_batch([a, dataclasses.replace(b, mask=None)], recipe.cache, recipe.keys, [a.captions[0]] * 2)
    assert batch.mask.shape == (2, *batch.target.shape[-2:])
    assert torch.equal(batch.mask[0], recipe.cache.load_mask(recipe.keys.mask[a.mask]))
    assert torch.equal(batch.mask[1], torch.ones_like(batch.mask[1]))
    assert 0 < batch.mask[0].mean() < 1  # the edit changed part of the image
    unmasked = load_batch([dataclasses.replace(s, mask=None) for s in (a, b)], recipe.cache, recipe.keys,
                          [a.captions[0]] * 2)
    assert unmasked.mask is None


def test_manifest_without_mask_columns_trains_without_masks(sample_manifest):
    """A schema 1.0 manifest (no mask columns, as conftest writes it through write_manifest without them)."""
    m = read_manifest(sample_manifest)
    assert m.table.column("mask_path").null_count == len(m)
    assert all(s.mask is None for s in samples_from_records(m.records()))


def test_missing_mask_file_is_a_manifest_problem_before_the_model(tmp_path):
    masked, _ = _masked_manifests(tmp_path)
    rec = read_manifest(masked).records()[0]
    Path(rec["mask_path"]).unlink()
    with pytest.raises(TrainError) as exc:
        KontextLoRARecipe(_cfg(masked, tmp_path / "no-such-model", tmp_path / "out")).setup()
    assert f"mask file missing: {rec['mask_path']}" in str(exc.value) and "no-such-model" not in str(exc.value)


def test_no_mask_loss_option_and_weight_bounds(sample_manifest):
    import json

    from typer.testing import CliRunner

    from kontext_trainer.cli import app

    def config(*args):
        r = CliRunner().invoke(app, ["train", str(sample_manifest), "--print-config", *args])
        return r.exit_code, r.output

    code, out = config()
    assert code == 0 and json.loads(out)["mask_loss"] is True and json.loads(out)["mask_loss_weight"] == 0.1
    code, out = config("--no-mask-loss", "--set", "mask_loss_weight=0.25")
    assert code == 0 and json.loads(out)["mask_loss"] is False and json.loads(out)["mask_loss_weight"] == 0.25
    code, out = config("--set", "mask_loss_weight=1.5")
    assert code == 2 and "mask_loss_weight" in out
