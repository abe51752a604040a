"""fp8-matmul base (kontext_trainer/fp8.py) on the CPU, where torch runs the same `_scaled_mm`: the arithmetic of
Fp8Linear against nn.Linear, its input gradient, which modules convert (never adapter weights, never the guide's
exclusions), training the tiny model end to end, and the config names users bring (SimpleTuner's fp8-torchao)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kontext_trainer import fp8
from kontext_trainer.adapters import attach_lora
from kontext_trainer.config import TrainConfig, resolve_config
from kontext_trainer.quantize import QUANTO_EXCLUDE
from kontext_trainer.recipe import KontextLoRARecipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_quantize_rows_round_trips_within_e4m3_precision():
    t = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64).view(-1, 1)
    q, scale = fp8.quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    assert _rel(back, t) < 0.04  # e4m3: 3 mantissa bits, per-row scale keeps every row's range
    assert torch.allclose(back.abs().amax(dim=1), t.abs().amax(dim=1), rtol=1e-6)  # each row keeps its max
    q0, s0 = fp8.quantize_rows(torch.zeros(2, 16))  # an all-zero row stays zero, no NaN
    assert torch.isfinite(s0).all() and (q0.float() == 0).all()


@pytest.mark.parametrize("rows", [1, 37])
def test_fp8_linear_matches_linear_forward_and_input_gradient(rows):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=g))
    f = fp8.Fp8Linear.from_linear(lin)
    assert f.weight_q.dtype == torch.float8_e4m3fn and f.weight_scale.shape == (48,)
    x = (torch.randn(2, rows, 64, generator=g)).to(torch.bfloat16)
    x_ref, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = lin(x_ref), f(x_f)
    assert y.shape == y_ref.shape == (2, rows, 48) and y.dtype == torch.bfloat16
    assert _rel(y, y_ref) < 0.06
    gy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y_ref.backward(gy)
    y.backward(gy)
    assert x_f.grad.shape == x.shape and x_f.grad.dtype == torch.bfloat16
    assert _rel(x_f.grad, x_ref.grad) < 0.06
    assert not any(p.requires_grad for p in f.parameters()) and list(f.parameters()) == []  # frozen: buffers only


def test_convert_keeps_adapters_and_exclusions_and_trains_the_lora(tiny_model):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    attach_lora(tr, rank=4, alpha=None, dropout=0.0, targets="attention")
    lora_before = {n: p.detach().clone() for n, p in tr.named_parameters() if p.requires_grad}
    report = fp8.convert_base_linears(tr, exclude=QUANTO_EXCLUDE)
    modules = dict(tr.named_modules())
    # peft's wrapper keeps its LoRA; its frozen base_layer is now fp8
    assert isinstance(modules["transformer_blocks.0.attn.to_q.base_layer"], fp8.Fp8Linear)
    assert "transformer_blocks.0.attn.to_q" in report.converted
    assert isinstance(modules["transformer_blocks.0.ff.net.2"], fp8.Fp8Linear)  # not adapted, still converted
    for name in ("x_embedder", "context_embedder", "proj_out"):  # the guide's exclusions stay bf16
        assert type(modules[name]) is torch.nn.Linear and name in report.kept
    assert {n: p for n, p in tr.named_parameters() if p.requires_grad}.keys() == lora_before.keys()
    assert all(p.dtype == torch.float32 for p in tr.parameters() if p.requires_grad)
    assert report.bytes_after < 0.6 * report.bytes_before
    from kontext_trainer.flow import kontext_ids

    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 32, 16, generator=g).bfloat16(), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g).bfloat16(), txt_ids=torch.zeros(12, 3),
                img_ids=kontext_ids((8, 8), [(8, 8)]), return_dict=False)
    tr(**args)[0].float().square().mean().backward()
    grads = [p.grad for p in tr.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().max() > 0 for gr in grads)


def test_require_fp8_support_names_the_alternatives():
    fp8.require_fp8_support("cpu")  # the CPU runs _scaled_mm: no error
    with pytest.raises(RuntimeError, match="fp8-matmul runs on CUDA"):
        fp8.require_fp8_support("meta")


def test_recipe_trains_on_an_fp8_matmul_base(tiny_model, sample_manifest, tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), output_dir=str(tmp_path / "fp8"),
                      device="cpu", base_model_precision="fp8-matmul", max_train_steps=100, lora_rank=8,
                      lora_targets="attention+ffs", learning_rate=3e-3, train_batch_size=4, report_to="none",
                      skip_final_validation=True, seed=0)
    events = []
    recipe = KontextLoRARecipe(cfg, on_event=lambda k, d: events.append((k, d)))
    recipe.setup()
    assert any(isinstance(m, fp8.Fp8Linear) for m in recipe.transformer.modules())
    assert any("fp8-matmul" in d.get("message", "") for k, d in events if k == "stage")
    result = recipe.train()
    losses = [l for _, l in result.losses]
    assert all(math.isfinite(l) for l in losses)
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    from safetensors import safe_open

    with safe_open(str(result.lora_path), "pt") as fh:  # the adapter file stays full precision
        assert all(fh.get_tensor(k).dtype == torch.float32 for k in fh.keys())


def test_simpletuner_fp8_torchao_means_fp8_matmul(sample_manifest):
    cfg = resolve_config({"manifest": str(sample_manifest), "base_model_precision": "fp8-torchao"})
    assert cfg.config.base_model_precision == "fp8-matmul"
