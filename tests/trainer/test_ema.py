"""EMA of the adapter (kontext_trainer/ema.py and its wiring in the recipe): the update rule, exact resume, the file
diffusers loads, validation with the EMA weights swapped in and back, off by default."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kontext_trainer.config import ConfigError, TrainConfig, resolve_config
from kontext_trainer.ema import EMA_WEIGHT_NAME, AdapterEMA, ema_decay_at
from kontext_trainer.recipe import list_checkpoints, train


def _cfg(manifest, model, out, **kw):
    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=6, lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True,
                device="cpu", train_batch_size=2, validation_num_inference_steps=2, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def test_update_rule_on_tiny_tensors():
    a = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    b = torch.nn.Parameter(torch.tensor([[2.0]], dtype=torch.bfloat16))
    ema = AdapterEMA([("a", a), ("b", b)], decay=0.5, warmup=False)
    assert [t.dtype for t in ema.shadow] == [torch.float32, torch.float32]
    with torch.no_grad():
        a.copy_(torch.tensor([3.0, 5.0]))
        b.fill_(4.0)
    assert ema.update([a, b], step=1) == 0.5
    assert torch.equal(ema.shadow[0], torch.tensor([2.0, 4.0]))  # 0.5 * [1, 3] + 0.5 * [3, 5]
    assert torch.equal(ema.shadow[1], torch.tensor([[3.0]]))

    # any values: decay * ema + (1 - decay) * param
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    ema = AdapterEMA([("p", p)], decay=0.99)
    expected = p.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            p.add_(torch.randn(5, 3, generator=gen))
        d = ema.update([p], step)
        assert d == min(0.99, step / (9 + step))  # warm-up: (1 + t) / (10 + t) with t = step - 1
        expected = d * expected + (1 - d) * p.detach()
        torch.testing.assert_close(ema.shadow[0], expected, rtol=1e-6, atol=1e-7)
    assert ema_decay_at(1, 0.999) == 0.1 and ema_decay_at(100_000, 0.999) == 0.999
    assert ema_decay_at(1, 0.999, warmup=False) == 0.999


def test_swapping_in_and_out_is_exact():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    ema = AdapterEMA([("p", p)], decay=0.9)
    with torch.no_grad():
        p.mul_(3.0)
    before = p.detach().clone()
    storage = p.data_ptr()
    ema.shadow[0].add_(0.123)
    with ema.applied([p]):
        assert torch.equal(p.detach(), ema.shadow[0].to(torch.bfloat16)) and p.data_ptr() == storage
    assert torch.equal(p.detach(), before) and p.data_ptr() == storage
    with ema.as_parameters([p]):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), ema.shadow[0])
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), before) and p.data_ptr() == storage


@pytest.fixture(scope="module")
def runs(sample_manifest, tiny_model, tmp_path_factory):
    """The same 6 steps uninterrupted and as 3 + 3 through a checkpoint (EMA decay 0.9, warm-up)."""
    root = tmp_path_factory.mktemp("ema")
    full = train(_cfg(sample_manifest, tiny_model, root / "full"))
    first = train(_cfg(sample_manifest, tiny_model, root / "split", max_train_steps=3, checkpointing_steps=3))
    rest = train(_cfg(sample_manifest, tiny_model, root / "split", resume_from_checkpoint="latest"))
    return full, first, rest


def test_resume_gives_the_uninterrupted_ema_exactly(runs):
    full, first, rest = runs
    assert full.ema_path == full.lora_path.parent / EMA_WEIGHT_NAME and full.ema_path.is_file()
    ckpt = first.checkpoints[0]
    assert (ckpt / EMA_WEIGHT_NAME).is_file()
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    assert state["ema"]["step"] == 3 and state["ema"]["decay"] == 0.9
    a, b = load_file(str(full.ema_path)), load_file(str(rest.ema_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the EMA is not the adapter: it lags behind it
    lora = load_file(str(full.lora_path))
    assert lora.keys() == a.keys() and not all(torch.equal(a[k], lora[k]) for k in a)


def test_the_ema_file_loads_in_the_pipeline(runs, tiny_model):
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    full = runs[0]
    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(full.ema_path.parent, weight_name=EMA_WEIGHT_NAME)
    (name,) = pipe.transformer.peft_config  # diffusers names the adapter itself
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
    saved = load_file(str(full.ema_path))
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        assert torch.equal(loaded[key[len("transformer."):]].float(), value), key


def test_ema_validation_swaps_back_exactly(sample_manifest, tiny_model, tmp_path, runs):
    out = tmp_path / "out"
    result = train(_cfg(sample_manifest, tiny_model, out, validation_steps=3, ema_validate=True,
                        skip_final_validation=False))
    full = runs[0]
    # validating with the EMA weights in between changed nothing of the training
    assert [l for _, l in result.losses] == [l for _, l in full.losses]
    a, b = load_file(str(result.lora_path)), load_file(str(full.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "validation" / "step_000006" / "ema").glob("*.png")) == \
        sorted(p.name for p in (out / "validation" / "step_000006").glob("*.png"))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[0]["ema_val_loss"] == evals[0]["val_loss"]  # at step 0 the EMA is the adapter
    assert evals[-1]["ema_val_loss"] != evals[-1]["val_loss"] and set(evals[-1]["ema_val_loss_by_sigma"]) == {
        "0.1", "0.3", "0.5", "0.7", "0.9"}
    from kontext_trainer.cli import validation_loss_line

    assert validation_loss_line(evals[-1]).endswith(
        f"at step 6; EMA {evals[-1]['ema_val_loss']:.4f} (train {evals[-1]['ema_train_eval_loss']:.4f})")


def test_off_by_default(sample_manifest, tiny_model, tmp_path):
    assert TrainConfig().ema_decay is None
    out = tmp_path / "out"
    result = train(_cfg(sample_manifest, tiny_model, out, ema_decay=None, max_train_steps=2, checkpointing_steps=2))
    assert result.ema_path is None and not (out / EMA_WEIGHT_NAME).exists()
    ckpt = list_checkpoints(out)[-1]
    assert not (ckpt / EMA_WEIGHT_NAME).exists()
    assert torch.load(ckpt / "training_state.pt", weights_only=False)["ema"] is None
    with pytest.raises(ConfigError):
        resolve_config({}, {"manifest": "m.parquet", "ema_decay": "1.0"})
