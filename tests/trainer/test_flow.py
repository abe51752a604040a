"""The Kontext step matches what FluxKontextPipeline builds: packing, position ids, latent normalization; the loss
sees target tokens only; sigma sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_trainer.cache import encode_images
from kontext_trainer.flow import (KontextBatch, image_ids, kontext_forward, kontext_ids, kontext_step,
                                  pack_latents, sample_sigmas, shift_sigmas, unpack_latents)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12), (12, 6)])
def test_pack_and_unpack_match_the_pipeline(tiny_pipeline, h, w):
    z = torch.randn(2, 4, h, w)
    ours = pack_latents(z)
    theirs = tiny_pipeline._pack_latents(z, 2, 4, h, w)
    assert torch.equal(ours, theirs)
    # the pipeline unpacks from pixel sizes (latent * 8)
    assert torch.equal(unpack_latents(ours, h, w), tiny_pipeline._unpack_latents(theirs, h * 8, w * 8, 8))
    assert torch.equal(unpack_latents(ours, h, w), z)


@pytest.mark.parametrize("target_hw,ref_hw", [((64, 64), (64, 64)), ((64, 96), (48, 80)), ((96, 48), (64, 64))])
def test_position_ids_and_reference_latents_match_prepare_latents(tiny_pipeline, target_hw, ref_hw):
    """Same image sizes through FluxKontextPipeline.prepare_latents and through our cache + ids."""
    pipe = tiny_pipeline
    th, tw = target_hw
    rh, rw = ref_hw
    ref = _image(rw, rh, seed=1)
    processed = pipe.image_processor.preprocess(ref, rh, rw)
    gen = torch.Generator().manual_seed(0)
    latents, image_latents, latent_ids, ref_ids = pipe.prepare_latents(
        processed, 1, 4, th, tw, torch.float32, torch.device("cpu"), gen)
    pipeline_ids = torch.cat([latent_ids, ref_ids], dim=0)  # what __call__ feeds the transformer
    ours = kontext_ids((th // 8, tw // 8), [(rh // 8, rw // 8)])
    assert torch.equal(ours, pipeline_ids)
    assert ours[: (th // 16) * (tw // 16), 0].eq(0).all() and ours[(th // 16) * (tw // 16):, 0].eq(1).all()
    # latent normalization: our cache encoding == the pipeline's encoding of the reference
    cached = encode_images(pipe.vae, [ref], "cpu")
    assert torch.allclose(pack_latents(cached), image_latents, atol=1e-5)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    assert shift != 0 and scale != 1  # the test model really exercises the shift/scale
    raw = pipe.vae.encode(pipe.image_processor.preprocess(ref, rh, rw)).latent_dist.mode()
    assert torch.allclose(cached, (raw - shift) * scale, atol=1e-5)


def test_extra_references_do_not_overlap():
    ids = kontext_ids((8, 8), [(8, 8), (8, 6), (4, 4)])
    refs = ids[16:]
    assert len({tuple(r.tolist()) for r in refs}) == len(refs)
    assert refs[:, 0].eq(1).all()
    # the first reference sits exactly where the pipeline puts a single reference
    assert torch.equal(refs[:16], image_ids(8, 8, index=1))


def _tiny_batch(transformer, b=2, refs=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KontextBatch(target=torch.randn(b, 4, 8, 8, generator=g),
                        references=[torch.randn(b, 4, 8, 8, generator=g) for _ in range(refs)],
                        prompt_embeds=torch.randn(b, 16, 32, generator=g), pooled=torch.randn(b, 32, generator=g))


def test_loss_is_on_target_tokens_only(tiny_pipeline):
    tr = tiny_pipeline.transformer
    batch = _tiny_batch(tr, refs=2)
    for r in batch.references:
        r.requires_grad_(True)
    sigmas = torch.tensor([0.3, 0.8])
    noise = torch.randn_like(batch.target)
    out = kontext_forward(tr, batch, sigmas, noise)
    n = out.num_target_tokens
    assert out.prediction.shape[1] == n + 2 * 16
    grad = torch.autograd.grad(out.loss, out.prediction, retain_graph=True)[0]
    assert grad[:, n:].abs().max() == 0  # nothing from the reference positions reaches the loss
    assert grad[:, :n].abs().max() > 0
    out.loss.backward()
    assert all(r.grad is None for r in batch.references)  # references enter as clean, detached latents
    # the loss is exactly MSE(prediction on target tokens, noise - z)
    expected = torch.nn.functional.mse_loss(out.prediction[:, :n], pack_latents(noise - batch.target))
    assert torch.allclose(out.loss, expected)


def test_references_change_the_prediction(tiny_pipeline):
    """The reference tokens are in the sequence: other references give another prediction of the target."""
    tr = tiny_pipeline.transformer
    batch = _tiny_batch(tr)
    sigmas, noise = torch.tensor([0.5, 0.5]), torch.randn_like(batch.target)
    with torch.no_grad():
        a = kontext_forward(tr, batch, sigmas, noise).prediction[:, :16]
        batch.references = [torch.randn_like(batch.references[0])]
        b = kontext_forward(tr, batch, sigmas, noise).prediction[:, :16]
    assert not torch.allclose(a, b)


def test_kontext_step_is_reproducible_and_backpropagates(tiny_pipeline):
    tr = tiny_pipeline.transformer
    batch = _tiny_batch(tr)
    l1 = kontext_step(tr, batch, torch.Generator().manual_seed(3), backward=False)
    l2 = kontext_step(tr, batch, torch.Generator().manual_seed(3), backward=False)
    l3 = kontext_step(tr, batch, torch.Generator().manual_seed(4), backward=False)
    assert l1 == l2 and l1 != l3


def test_sigma_sampling():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, g, "logit_normal", shift=1.0)
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.02
    shifted = sample_sigmas(20000, torch.Generator().manual_seed(0), "logit_normal", shift=3.0)
    assert torch.allclose(shifted, shift_sigmas(s, 3.0))
    assert shifted.median() > 0.7  # shift 3 moves the median 0.5 to 0.75
    u = sample_sigmas(20000, torch.Generator().manual_seed(0), "uniform", shift=1.0)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs((u < 0.25).float().mean().item() - 0.25) < 0.02
    assert torch.equal(sample_sigmas(8, torch.Generator().manual_seed(5)), sample_sigmas(8, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="uniform"):
        sample_sigmas(2, g, "cosine")
