"""Quantized bases with real optimum-quanto on the tiny model: the exclusions, frozen weights, training on an int8
base (finite, falling loss), and a full-precision adapter file that loads into an unquantized pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kontext_trainer.config import TrainConfig
from kontext_trainer.quantize import QUANTO_EXCLUDE, compute_dtype, load_transformer, quantize_transformer
from kontext_trainer.recipe import KontextLoRARecipe


@pytest.mark.parametrize("precision,qtype", [("int8-quanto", "qint8"), ("fp8-quanto", "qfloat8")])
def test_quantize_excludes_the_guides_modules_and_freezes(tiny_model, precision, qtype):
    from optimum.quanto import QLinear

    tr, report = load_transformer(tiny_model, precision, "cpu", quantize_on="cpu")
    assert report is not None and report.precision == precision
    modules = dict(tr.named_modules())
    # the guide's exclusions stay plain Linear in bf16
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert type(modules[name]) is torch.nn.Linear and modules[name].weight.dtype == torch.bfloat16
        assert name in report.kept
    assert "proj_out" in QUANTO_EXCLUDE and "norm_out" in QUANTO_EXCLUDE
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_k"):
        assert isinstance(modules[name], QLinear) and name in report.quantized
        assert qtype in repr(modules[name].weight.qtype)
    assert not any(p.requires_grad for p in tr.parameters())
    assert report.bytes_after < report.bytes_before
    assert compute_dtype(precision) == torch.bfloat16
    with pytest.raises(ValueError, match="int8-quanto"):
        quantize_transformer(tr, "bf16")


def test_training_on_an_int8_base_saves_a_full_precision_lora(tiny_model, sample_manifest, tmp_path):
    from diffusers import FluxKontextPipeline

    torch.manual_seed(0)
    out = tmp_path / "int8"
    cfg = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), output_dir=str(out), device="cpu",
                      base_model_precision="int8-quanto", quantize_on="cpu", max_train_steps=100, lora_rank=8,
                      lora_targets="attention+ffs", learning_rate=3e-3, train_batch_size=4, report_to="none",
                      skip_final_validation=True, seed=0)
    events = []
    recipe = KontextLoRARecipe(cfg, on_event=lambda k, d: events.append((k, d)))
    recipe.setup()
    assert recipe.quantize_report is not None and len(recipe.quantize_report.quantized) > 10
    assert recipe.params and all("lora_" in n for n, p in recipe.transformer.named_parameters() if p.requires_grad)
    assert any("int8-quanto" in d.get("message", "") for k, d in events if k == "stage")
    result = recipe.train()
    losses = [l for _, l in result.losses]
    assert all(math.isfinite(l) for l in losses)
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20]), (losses[:20], losses[-20:])

    with safe_open(str(result.lora_path), "pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)

    pipe = FluxKontextPipeline.from_pretrained(tiny_model)  # unquantized float32 pipeline
    pipe.load_lora_weights(out)
    live = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    key = next(n for n in live if n.startswith("transformer_blocks.0.attn.to_q.lora_B."))
    assert live[key].dtype == torch.float32
    assert torch.equal(live[key], saved["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])
    from PIL import Image

    ref = Image.new("RGB", (64, 64), (120, 30, 200))
    img = pipe(image=ref, prompt="make it blue", height=64, width=64, max_area=64 * 64, _auto_resize=False,
               num_inference_steps=2, guidance_scale=2.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(img).all()


def test_cli_model_side_options(sample_manifest, tmp_path):
    import json

    from typer.testing import CliRunner

    from kontext_trainer.cli import app

    lyc = tmp_path / "lycoris_config.json"
    lyc.write_text('{"algo": "lokr", "factor": 4, "linear_dim": 10000}')
    r = CliRunner().invoke(app, ["train", str(sample_manifest), "--base-precision", "int8-quanto", "--quantize-on",
                                 "cpu", "--lycoris-config", str(lyc), "--optimizer", "adamw_bf16", "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output[r.output.index("{"):])
    assert (cfg["base_model_precision"], cfg["quantize_on"], cfg["adapter"], cfg["lokr_factor"], cfg["optimizer"]) \
        == ("int8-quanto", "cpu", "lokr", 4, "adamw_bf16")
    r = CliRunner().invoke(app, ["train", str(sample_manifest), "--base-precision", "nf4-bnb", "--print-config"])
    assert r.exit_code == 2 and "int8-quanto" in r.output


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-quanto"])
def test_dequant_linears_compute_what_quanto_computes_and_compile(tiny_model, precision):
    """quanto's frozen weights as plain tensors (DequantLinear): the same outputs and input gradients as quanto's
    own modules (bf16 rounding apart), nothing left of quanto's tensor subclasses, and torch.compile goes through."""
    from optimum.quanto import QLinear

    from kontext_trainer.quantize import DequantLinear, to_dequant_linears

    tr, _ = load_transformer(tiny_model, precision, "cpu", quantize_on="cpu")
    block = tr.single_transformer_blocks[0]
    q = block.proj_mlp
    assert isinstance(q, QLinear)
    x = torch.randn(3, 7, q.in_features, dtype=torch.bfloat16, requires_grad=True)
    y_ref = q(x)
    (y_ref.float() ** 2).sum().backward()
    g_ref, x.grad = x.grad.clone(), None
    n = to_dequant_linears(tr)
    assert n > 10 and not any(isinstance(m, QLinear) for m in tr.modules())
    d = block.proj_mlp
    assert isinstance(d, DequantLinear) and d.weight_data.dtype == q.weight._data.dtype
    assert d.weight_data.data_ptr() == q.weight._data.data_ptr()  # shared, not copied
    y = d(x)
    (y.float() ** 2).sum().backward()
    assert torch.allclose(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(x.grad.flatten().float(), g_ref.flatten().float(), dim=0) > 0.999
    compiled = torch.compile(d, backend="aot_eager", fullgraph=True)  # one graph: no quanto subclass breaks it
    assert torch.equal(compiled(x), y)


def test_an_int8_base_trains_with_compiled_blocks(sample_manifest, tiny_model, tmp_path):
    """compile_blocks with int8-quanto (refused before DequantLinear): same losses as eager, step for step."""
    losses = {}
    for compiled in (False, True):
        cfg = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), output_dir=str(tmp_path / str(compiled)),
                          device="cpu", base_model_precision="int8-quanto", quantize_on="cpu", max_train_steps=4,
                          lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True, seed=3,
                          compile_blocks=compiled)
        recipe = KontextLoRARecipe(cfg)
        recipe.setup()
        losses[compiled] = [loss for _, loss in recipe.train().losses]
    assert all(math.isfinite(v) for v in losses[True])
    assert np.allclose(losses[True], losses[False], rtol=1e-3, atol=1e-5)
