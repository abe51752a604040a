"""Fused q/k/v projections (kontext_trainer/fuse.py) on the tiny model with real peft LoRA: the same loss and
gradients as the three separate layers, the same adapter file, no weight stored twice, and LoKr left alone."""

from __future__ import annotations

import pytest
import torch

from kontext_trainer import adapters, fp8, quantize
from kontext_trainer.flow import KontextBatch, kontext_step
from kontext_trainer.fuse import FusedProjection, fuse_qkv


def _model(tiny_model, precision="bf16"):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    if precision == "int8-quanto":
        quantize.quantize_transformer(model, precision)
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention")
    if precision == "int8-quanto":
        quantize.to_dequant_linears(model)
    if precision == "fp8-matmul":
        fp8.convert_base_linears(model, exclude=quantize.QUANTO_EXCLUDE)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to say
        g = torch.Generator().manual_seed(3)
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(dtype=torch.bfloat16) -> KontextBatch:
    g = torch.Generator().manual_seed(0)
    return KontextBatch(target=torch.randn(1, 4, 8, 8, generator=g).to(dtype),
                        references=[torch.randn(1, 4, 8, 8, generator=g).to(dtype)],
                        prompt_embeds=torch.randn(1, 8, 32, generator=g).to(dtype),
                        pooled=torch.randn(1, 32, generator=g).to(dtype))


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = kontext_step(model, _batch(), torch.Generator().manual_seed(1), attention_backend="math")
    grads = torch.cat([p.grad.float().flatten() for p in adapters.trainable_parameters(model)])
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("precision", ["bf16", "int8-quanto", "fp8-matmul"])
def test_fused_qkv_trains_the_same_lora_as_separate_layers(tiny_model, precision):
    model = _model(tiny_model, precision)
    loss, grads = _loss_and_grads(model)
    keys = sorted(adapters.lora_state_dict(model))
    n_params = sum(p.numel() for p in model.parameters())
    assert fuse_qkv(model) == 2  # the tiny model: one double block, one single block
    attn = model.transformer_blocks[0].attn
    assert attn.fused_projections and isinstance(attn.to_qkv, FusedProjection)
    assert isinstance(attn.to_added_qkv, FusedProjection)
    fused_loss, fused_grads = _loss_and_grads(model)
    # one matmul instead of three: bf16 rounding differs, nothing else
    assert abs(fused_loss - loss) / loss < 2e-3
    assert torch.nn.functional.cosine_similarity(grads, fused_grads, dim=0) > 0.9999
    # same adapter: same keys in the saved file, same trainable parameters, nothing counted twice
    assert sorted(adapters.lora_state_dict(model)) == keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_fused_weights_are_views_not_copies(tiny_model):
    model = _model(tiny_model)
    fuse_qkv(model)
    attn = model.single_transformer_blocks[0].attn
    fused = attn.to_qkv.weight
    q = attn.to_q.base_layer.weight
    v = attn.to_v.base_layer.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(v, fused[-v.shape[0]:])
    assert not q.requires_grad and not fused.requires_grad


def test_a_disabled_adapter_falls_back_to_the_separate_layers(tiny_model):
    model = _model(tiny_model)
    fuse_qkv(model)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    attn = model.single_transformer_blocks[0].attn
    with_adapter = attn.to_qkv(x)
    for m in (attn.to_q, attn.to_k, attn.to_v):
        m.enable_adapters(False)
    without = attn.to_qkv(x)
    base = torch.cat([m.base_layer(x) for m in (attn.to_q, attn.to_k, attn.to_v)], dim=-1)
    assert torch.equal(without, base)
    assert not torch.allclose(with_adapter, base)


def test_lokr_attentions_stay_unfused(tiny_model):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    adapters.attach_lokr(model, "attention", factor=4, factor_ff=4, full_matrix=True)
    assert fuse_qkv(model) == 0
    assert not model.transformer_blocks[0].attn.fused_projections


def test_partial_targets_fuse_only_what_keeps_every_adapter(tiny_model):
    """LoRA on q/k/v only: the text stream's add_q/k/v (no adapter) fuse as a plain base; LoRA on to_q alone leaves
    every attention unfused (one of three adapted cannot share the fused matmul)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="to_q,to_k,to_v")
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.normal_(std=0.05)
    loss, grads = _loss_and_grads(model)
    assert fuse_qkv(model) == 2
    fused_loss, fused_grads = _loss_and_grads(model)
    assert abs(fused_loss - loss) / loss < 2e-3
    assert torch.nn.functional.cosine_similarity(grads, fused_grads, dim=0) > 0.9999

    only_q = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    adapters.attach_lora(only_q, rank=4, alpha=None, dropout=0.0, targets="to_q")
    assert fuse_qkv(only_q) == 0
