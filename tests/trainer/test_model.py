"""Model resolution: local folders checked file by file, hub ids from the local cache only, the tiny model."""

from __future__ import annotations

import shutil

import pytest

from kontext_trainer.model import ModelError, check_layout, fingerprint, resolve_model_dir


def test_tiny_model_is_a_complete_layout(tiny_model, tiny_pipeline):
    assert check_layout(tiny_model) == []
    assert resolve_model_dir(str(tiny_model)) == tiny_model.resolve()
    assert type(tiny_pipeline).__name__ == "FluxKontextPipeline"
    assert tiny_pipeline.transformer.config.in_channels == 16 and tiny_pipeline.vae_scale_factor == 8


def test_missing_parts_are_listed_by_name(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as exc:
        resolve_model_dir(str(broken))
    text = str(exc.value)
    assert "text_encoder_2/" in text and "vae" in text and "no weights" in text


def test_uncached_hub_id_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as exc:
        resolve_model_dir("black-forest-labs/FLUX.1-Kontext-dev")
    text = str(exc.value)
    assert "hf download black-forest-labs/FLUX.1-Kontext-dev" in text and "--model DIR" in text


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_fingerprint_changes_with_weights(tiny_model, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    before = fingerprint(copy, "vae")
    assert before == fingerprint(tiny_model, "vae")
    cfg = copy / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace('"scaling_factor": 1.5035', '"scaling_factor": 1.5'))
    assert fingerprint(copy, "vae") != before
