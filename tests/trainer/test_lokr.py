"""LoKr (peft LoKrConfig) on the tiny model: SimpleTuner's factors and full matrices, training through the recipe,
and the saved file loading into a diffusers pipeline. (lycoris_config.json: tests/trainer/test_compat.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import forward_backward

from kontext_trainer.adapters import attach_lokr, load_adapter, save_lora
from kontext_trainer.config import TrainConfig
from kontext_trainer.flow import kontext_ids
from kontext_trainer.recipe import KontextLoRARecipe

def _args():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 32, 16, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), txt_ids=torch.zeros(12, 3),
                img_ids=kontext_ids((8, 8), [(8, 8)]), return_dict=False)


def test_factors_full_matrices_and_zero_start(tiny_model):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    with torch.no_grad():
        before = tr(**_args())[0]
    attach_lokr(tr, "attention+ffs", factor=16, factor_ff=8)
    shapes = {n: tuple(p.shape) for n, p in tr.named_parameters() if "lokr_" in n}
    # attention 32x32 with factor 16: (16x16) kron (2x2); feed-forward 32->128 with factor 8: (8x8) kron (16x4)
    assert shapes["transformer_blocks.0.attn.to_q.lokr_w1.default"] == (16, 16)
    assert shapes["transformer_blocks.0.attn.to_q.lokr_w2.default"] == (2, 2)
    assert shapes["transformer_blocks.0.ff.net.0.proj.lokr_w1.default"] == (8, 8)
    assert shapes["transformer_blocks.0.ff.net.0.proj.lokr_w2.default"] == (16, 4)
    assert not any(n.split(".lokr_")[1].startswith(("w1_a", "w2_a")) for n in shapes)  # full matrices
    assert all(p.requires_grad and p.dtype == torch.float32 for n, p in tr.named_parameters() if "lokr_" in n)
    assert not any(p.requires_grad for n, p in tr.named_parameters() if "lokr_" not in n)
    with torch.no_grad():
        assert torch.allclose(tr(**_args())[0], before, atol=1e-6)  # starts as the base model
    tr2 = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    attach_lokr(tr2, "attention", factor=2, factor_ff=2, full_matrix=False, rank=1)  # w2 16x16: decomposed
    names = {n for n, _ in tr2.named_parameters() if "lokr_" in n}
    assert "transformer_blocks.0.attn.to_q.lokr_w2_a.default" in names


def test_lokr_trains_and_loads_into_the_pipeline(tiny_model, sample_manifest, tmp_path):
    from diffusers import FluxKontextPipeline

    out = tmp_path / "lokr"
    cfg = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), output_dir=str(out), device="cpu",
                      base_model_precision="fp32", adapter="lokr", lora_targets="attention+ffs", lokr_factor_ff=16,
                      max_train_steps=100,  # one factor (16) on every module: plain diffusers can load it
                      learning_rate=1e-2, train_batch_size=4, report_to="none", skip_final_validation=True, seed=0)
    recipe = KontextLoRARecipe(cfg)
    recipe.setup()
    result = recipe.train()
    losses = [l for _, l in result.losses]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-20:]) < 0.85 * np.mean(losses[:20])
    with safe_open(str(result.lora_path), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        assert all(fh.get_tensor(k).dtype == torch.float32 for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lokr_w1" in keys and meta["kontext.adapter"] == "lokr"
    tr = recipe.transformer.eval()
    with torch.no_grad():
        live = tr(**_args())[0]

    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="lora"):  # diffusers 0.42: load_lora_weights rejects LoKr keys
        pipe.load_lora_weights(out)
    load_adapter(pipe, out)  # -> pipe.transformer.load_lora_adapter
    with torch.no_grad():
        loaded = pipe.transformer(**_args())[0]
        base = FluxKontextPipeline.from_pretrained(tiny_model).transformer(**_args())[0]
    assert torch.allclose(live, loaded, atol=1e-5)
    assert not torch.allclose(live, base, atol=1e-3)


def _random_two_factor_lokr(tiny_model):
    """The tiny transformer with a LoKr of factor 16 (attention) / 8 (ffs), random weights, and its output."""
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    attach_lokr(tr, "attention+ffs", factor=16, factor_ff=8)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lokr_" in n:
                p.normal_(std=0.1)
        live = tr(**_args())[0]
    return tr, live


def test_two_factor_lokr_loads_through_our_loader(tiny_model, tmp_path):
    from diffusers import FluxKontextPipeline

    tr, live = _random_two_factor_lokr(tiny_model)
    save_lora(tr, tmp_path / "two")
    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    load_adapter(pipe, tmp_path / "two")
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(**_args())[0], live, atol=1e-5)


def test_two_factor_lokr_survives_a_comfyui_round_trip(tiny_model, tmp_path):
    from diffusers import FluxKontextPipeline

    from kontext_trainer.export import export_adapter

    tr, live = _random_two_factor_lokr(tiny_model)
    save_lora(tr, tmp_path / "two")
    comfy = export_adapter(tmp_path / "two", "comfyui").path
    back = export_adapter(comfy, "diffusers", tmp_path / "back" / "pytorch_lora_weights.safetensors").path
    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    load_adapter(pipe, back.parent)
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(**_args())[0], live, atol=1e-5)


def test_lokr_with_adamw_bf16_resumes_exactly(tiny_model, sample_manifest, tmp_path):
    from dataclasses import replace

    from kontext_trainer.recipe import train

    base = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), device="cpu", base_model_precision="fp32",
                       adapter="lokr", optimizer="adamw_bf16", lora_targets="attention+ffs", max_train_steps=6,
                       learning_rate=1e-2, train_batch_size=2, report_to="none", skip_final_validation=True,
                       output_dir=str(tmp_path / "full"))
    full = train(base)
    first = train(replace(base, output_dir=str(tmp_path / "split"), max_train_steps=3, checkpointing_steps=3))
    rest = train(replace(base, output_dir=str(tmp_path / "split"), resume_from_checkpoint="latest"))
    assert [s for s, _ in rest.losses] == [4, 5, 6]
    assert [l for _, l in first.losses + rest.losses] == pytest.approx([l for _, l in full.losses], rel=1e-6)



@pytest.mark.parametrize("full_matrix,decompose_both", [(True, False), (False, False), (False, True)])
def test_kron_matmul_equals_peft_full_delta(tiny_model, full_matrix, decompose_both):
    """The fast LoKr path (activations reshaped against the two Kronecker factors, no full delta matrix) gives
    peft's outputs and gradients on the whole model, float32 closely and bf16 within bf16 tolerance."""
    from diffusers import FluxTransformer2DModel
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    from kontext_trainer.adapters import use_kron_matmul

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    attach_lokr(tr, "attention+ffs", factor=4, factor_ff=8, full_matrix=full_matrix, decompose_both=decompose_both,
                rank=2, alpha=1.0)
    assert all(type(m).__name__ == "KronLoKrLinear" for m in tr.modules() if isinstance(m, LoKrLinear))
    g = torch.Generator().manual_seed(1)
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:  # non-zero factors, so the delta is not trivially zero
        p.data = torch.randn(p.shape, generator=g) * 0.2

    def run(fast: bool):
        use_kron_matmul(tr, enable=fast)
        return forward_backward(tr, args, params)

    args = _args()
    ref_out, ref_grad = run(False)
    out, grad = run(True)
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-6)
    tr.to(torch.bfloat16)
    for p in params:  # bf16 base, float32 adapter: as the trainer runs it
        p.data = p.data.float()
    args = {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in _args().items()}
    out16, grad16 = run(True)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out16.flatten(), ref_out.flatten(), dim=0) > 0.999
    assert cos(grad16, ref_grad, dim=0) > 0.99
