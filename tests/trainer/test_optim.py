"""Optimizers on the real tiny transformer with a LoRA: each lowers a fixed-noise Kontext loss; adamw_bf16 trains
bf16 weights whose small updates Kahan summation keeps; a NaN/Inf loss stops the run cleanly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kontext_trainer.adapters import attach_lora, trainable_parameters
from kontext_trainer.config import TrainConfig
from kontext_trainer.flow import KontextBatch, kontext_forward
from kontext_trainer.optim import OPTIMIZERS, adapter_dtype, build_optimizer
from kontext_trainer.recipe import KontextLoRARecipe, TrainError, list_checkpoints


def _fixed_batch():
    g = torch.Generator().manual_seed(1)
    batch = KontextBatch(target=torch.randn(2, 4, 8, 8, generator=g), references=[torch.randn(2, 4, 8, 8, generator=g)],
                         prompt_embeds=torch.randn(2, 12, 32, generator=g), pooled=torch.randn(2, 32, generator=g))
    return batch, torch.tensor([0.3, 0.7]), torch.randn(2, 4, 8, 8, generator=g)


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("optimi-adamw", 1e-2), ("lion", 1e-2), ("adamw_bf16", 1e-2)])
def test_each_optimizer_lowers_the_loss(tiny_model, name, lr):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    attach_lora(tr, rank=4, alpha=None, dropout=0.0, targets="attention+ffs")
    cfg = TrainConfig(manifest="m", optimizer=name, learning_rate=lr, adam_weight_decay=0.0)
    params = trainable_parameters(tr)
    opt = build_optimizer(cfg, params)
    assert all(p.dtype == adapter_dtype(name) for p in params)
    if name == "lion":
        from optimi import Lion

        assert isinstance(opt, Lion)
    if name == "adamw_bf16":
        assert all(g["kahan_sum"] for g in opt.param_groups)
    batch, sigmas, noise = _fixed_batch()
    losses = []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        loss = kontext_forward(tr, batch, sigmas, noise).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_kahan_summation_keeps_small_bf16_updates():
    """1.0 + 1e-4 rounds back to 1.0 in bf16: plain bf16 AdamW loses every update, Kahan summation keeps them."""
    from optimi import AdamW

    moved = {}
    for kahan in (False, True):
        p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
        opt = AdamW([p], lr=1e-4, weight_decay=0.0, kahan_sum=kahan, foreach=False)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[kahan] = 1.0 - p.float().mean().item()
    assert moved[False] == 0.0
    assert moved[True] == pytest.approx(100 * 1e-4, abs=0.004)  # within one bf16 step of 1.0
    with pytest.raises(ValueError, match="adamw_bf16"):
        build_optimizer(replace(TrainConfig(manifest="m"), optimizer="sgd"), [p])


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, sample_manifest, tmp_path):
    out = tmp_path / "nan"
    cfg = TrainConfig(manifest=str(sample_manifest), model=str(tiny_model), output_dir=str(out), device="cpu",
                      base_model_precision="fp32", max_train_steps=6, lora_rank=4, learning_rate=1e-3,
                      train_batch_size=2, report_to="none", skip_final_validation=True, checkpointing_steps=2,
                      optimizer="lion")
    recipe = KontextLoRARecipe(cfg)
    recipe.setup()
    calls = {"n": 0}

    def poison(module, args, output):  # the forward of optimizer step 3 produces inf
        if not torch.is_grad_enabled():
            return output  # the validation loss's forwards (no grad) are not training steps
        calls["n"] += 1
        if calls["n"] == 3:
            return (output[0] * float("inf"),) + tuple(output[1:])
        return output

    recipe.transformer.register_forward_hook(poison)
    with pytest.raises(TrainError) as exc:
        recipe.train()
    text = str(exc.value)
    assert "step 3" in text and "checkpoint-000002" in text and "--resume" in text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no final adapter from a diverged run
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == [1, 2]
    # the kept checkpoint resumes and trains on
    resumed = KontextLoRARecipe(replace(cfg, resume_from_checkpoint="latest", max_train_steps=3))
    resumed.setup()
    assert resumed.step == 2
    assert [s for s, _ in resumed.train().losses] == [3]


def test_optimizer_names():
    assert set(OPTIMIZERS) == {"adamw", "optimi-adamw", "lion", "adamw_bf16"}
