"""Validation loss (kontext_trainer/evaluate.py and its wiring in the recipe): it falls when the adapter learns, it is
exactly constant when the adapter does not change, it is written to metrics.jsonl / TensorBoard / the console, and
each per-sigma value is what the training forward computes."""

from __future__ import annotations

import json

import pytest
import torch

from kontext_trainer.config import ConfigError, TrainConfig, resolve_config
from kontext_trainer.recipe import KontextLoRARecipe, train
from conftest import tiny_cpu_config


def _cfg(manifest, model, out, **kw):
    return tiny_cpu_config(manifest, model, out, **kw)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inverted_manifest(tmp_path_factory):
    """8 pairs whose target is the colour-inverted reference (a task the tiny model learns in a few dozen steps),
    2 of them in the eval split."""
    from PIL import ImageOps

    from conftest import write_sample_manifest

    return write_sample_manifest(tmp_path_factory.mktemp("inverted"), n=8, eval_ids=2,
                                 target_from_reference=ImageOps.invert)


def test_validation_loss_falls_while_the_adapter_learns(inverted_manifest, tiny_model, tmp_path):
    out = tmp_path / "out"
    result = train(_cfg(inverted_manifest, tiny_model, out, max_train_steps=40, learning_rate=5e-3, lora_rank=8,
                        lora_targets="attention+ffs", validation_steps=20))
    evals = result.validation_losses
    # the baseline before the first step, every validation_steps, and the end (skip_final_validation skips the
    # images only)
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[0]["val_samples"] == 2 and evals[0]["train_eval_samples"] == 2
    assert evals[-1]["val_loss"] < 0.9 * evals[0]["val_loss"], evals
    assert evals[-1]["train_eval_loss"] < 0.9 * evals[0]["train_eval_loss"], evals
    assert list(evals[0]["val_loss_by_sigma"]) == ["0.1", "0.3", "0.5", "0.7", "0.9"]
    assert evals[0]["val_loss"] == pytest.approx(sum(evals[0]["val_loss_by_sigma"].values()) / 5, rel=1e-12)
    assert [p.name for p in (out / "validation").iterdir()] == ["step_000020"]  # strips mid-run only
    assert result.timings["validation loss_s"] > 0 and result.timings["validation loss_count"] == 3


def test_loss_is_exactly_constant_when_the_adapter_does_not_change(sample_manifest, tiny_model, tmp_path):
    result = train(_cfg(sample_manifest, tiny_model, tmp_path / "out", max_train_steps=3, learning_rate=0.0,
                        validation_steps=1, lora_dropout=0.5))
    evals = [{k: v for k, v in e.items() if k != "step"} for e in result.validation_losses]
    assert [e["step"] for e in result.validation_losses] == [0, 1, 2, 3]
    assert all(e == evals[0] for e in evals), evals  # == to the last digit: fixed sigmas, noise, captions, no dropout


def test_evaluation_does_not_change_training(sample_manifest, tiny_model, tmp_path):
    from safetensors.torch import load_file

    runs = {on: train(_cfg(sample_manifest, tiny_model, tmp_path / f"v{on}", validation_steps=2, validation_loss=on))
            for on in (True, False)}
    assert [l for _, l in runs[True].losses] == [l for _, l in runs[False].losses]
    a, b = load_file(str(runs[True].lora_path)), load_file(str(runs[False].lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[False].validation_losses == [] and "validation loss_s" not in runs[False].timings
    assert all("val_loss" not in m for m in _metrics(tmp_path / "vFalse"))


def test_metrics_line_tensorboard_and_console(sample_manifest, tiny_model, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kontext_trainer.cli import Reporter

    out = tmp_path / "out"
    events = []
    result = train(_cfg(sample_manifest, tiny_model, out, max_train_steps=2, report_to="tensorboard",
                        validation_sigmas=(0.25, 0.75)), on_event=lambda k, d: events.append((k, d)))
    lines = _metrics(out)
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in lines] == [0, 1, 2, 2]  # the baseline, the two steps, the end
    assert [m["step"] for m in evals] == [0, 2] and evals == result.validation_losses
    assert set(evals[0]) == {"step", "val_loss", "val_loss_by_sigma", "train_eval_loss", "train_eval_loss_by_sigma",
                             "val_samples", "train_eval_samples"}
    assert set(evals[0]["val_loss_by_sigma"]) == {"0.25", "0.75"}
    assert [d for k, d in events if k == "validation_loss"] == evals

    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/loss", "val/loss_sigma_0.25", "val/loss_sigma_0.75", "train_eval/loss",
            "train_eval/loss_sigma_0.25"} <= tags
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2]
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(evals[-1]["val_loss"], rel=1e-6)

    capsys.readouterr()
    reporter = Reporter(quiet=False, json_lines=True)
    reporter("validation_loss", evals[-1])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"event": "validation_loss", **evals[-1]}
    line = f"validation loss {evals[-1]['val_loss']:.4f} (train {evals[-1]['train_eval_loss']:.4f}) at step 2"
    assert line in captured.err


def test_per_sigma_values_are_the_training_forward_of_one_sample(sample_manifest, tiny_model, tmp_path):
    from kontext_trainer.data import load_batch
    from kontext_trainer.evaluate import eval_noise, evaluate_loss
    from kontext_trainer.flow import kontext_forward

    recipe = KontextLoRARecipe(_cfg(sample_manifest, tiny_model, tmp_path / "out"))
    recipe.setup()
    sample = recipe.val_samples[0]

    def load(group):
        return load_batch(group, recipe.cache, recipe.keys, [s.captions[0] for s in group])

    sigmas = (0.1, 0.5, 0.9)
    report = evaluate_loss(recipe.transformer, [sample], load, sigmas=sigmas, seed=7, batch_size=2,
                           device=recipe.device, dtype=recipe.dtype)
    assert report.samples == 1 and recipe.transformer.training  # train mode restored
    batch = load([sample]).to(recipe.device, recipe.dtype)
    noise = eval_noise(7, sample.sample_id, batch.target.shape[1:])[None]
    recipe.transformer.eval()
    with torch.no_grad():
        direct = {f"{s:g}": float(kontext_forward(recipe.transformer, batch, torch.tensor([s]), noise).loss)
                  for s in sigmas}
    assert report.by_sigma == direct
    # the noise is keyed by the seed and the sample, not by the step or the batch it is in
    assert torch.equal(eval_noise(7, sample.sample_id, (4, 8, 8)), eval_noise(7, sample.sample_id, (4, 8, 8)))
    assert not torch.equal(eval_noise(7, sample.sample_id, (4, 8, 8)), eval_noise(8, sample.sample_id, (4, 8, 8)))


def test_shares_of_several_processes_add_up_to_one_process_loss(sample_manifest, tiny_model, tmp_path):
    """Each of 3 processes evaluates a contiguous share of the batches one process forms; their shares together
    give one process's report (float summation order aside), and a share that hit a non-finite loss fails all."""
    from kontext_trainer.data import load_batch
    from kontext_trainer.evaluate import LossShare, combine_shares, eval_batches, evaluate_loss, loss_share

    recipe = KontextLoRARecipe(_cfg(sample_manifest, tiny_model, tmp_path / "out"))
    recipe.setup()
    samples = recipe.samples

    def load(group):
        return load_batch(group, recipe.cache, recipe.keys, [s.captions[0] for s in group])

    kw = dict(sigmas=(0.2, 0.8), seed=3, batch_size=2, device=recipe.device, dtype=recipe.dtype)
    assert len(eval_batches(samples, 2)) >= 3
    whole = evaluate_loss(recipe.transformer, samples, load, **kw)
    parts = [loss_share(recipe.transformer, samples, load, share=(r, 3), **kw) for r in range(3)]
    assert all(p.count > 0 for p in parts) and sum(p.count for p in parts) == whole.samples == len(samples)
    together = combine_shares(parts)
    assert together.mean == pytest.approx(whole.mean, rel=1e-12)
    assert together.by_sigma == pytest.approx(whole.by_sigma, rel=1e-12)
    with pytest.raises(FloatingPointError, match="non-finite validation loss"):
        combine_shares(parts[:2] + [LossShare({}, 0, "non-finite validation loss nan at sigma 0.8")])


def test_holdout_and_the_training_samples_beside(sample_manifest, tiny_model, tmp_path):
    plain = KontextLoRARecipe(_cfg(sample_manifest, tiny_model, tmp_path / "a", validation_samples=2))
    plain.setup()
    val_ids = {s.sample_id for s in plain.val_samples}
    assert val_ids <= {s.sample_id for s in plain.samples}  # default: validation samples still train
    train_ids = {s.sample_id for s in plain.train_eval_samples}
    assert len(train_ids) == 2 and not train_ids & val_ids

    held = KontextLoRARecipe(_cfg(sample_manifest, tiny_model, tmp_path / "b", validation_samples=2,
                                  validation_holdout=True))
    held.setup()
    assert {s.sample_id for s in held.val_samples} == val_ids
    assert all(s.split == "eval" for s in held.val_samples)
    assert not val_ids & {s.sample_id for s in held.samples}
    assert len(held.samples) == len(plain.samples) - 2
    assert held.train().validation_losses[-1]["val_loss"] > 0


def test_config_keys():
    cfg = resolve_config({"validation_sigmas": [0.2, 0.4]}, {"manifest": "m.parquet"}).config
    assert cfg.validation_sigmas == (0.2, 0.4) and cfg.validation_loss and not cfg.validation_holdout
    cfg = resolve_config({}, {"manifest": "m.parquet", "validation_sigmas": "0.25, 0.5"}).config
    assert cfg.validation_sigmas == (0.25, 0.5)
    assert TrainConfig().validation_sigmas == (0.1, 0.3, 0.5, 0.7, 0.9)
    with pytest.raises(ConfigError) as exc:
        resolve_config({}, {"manifest": "m.parquet", "validation_sigmas": "0.5,1.0"})
    assert "validation_sigmas" in str(exc.value)
