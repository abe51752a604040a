"""Config files (JSON with comments, TOML, YAML) + overrides; all errors at once. (SimpleTuner's keys:
tests/trainer/test_compat.py.)"""

from __future__ import annotations

import pytest

from kontext_trainer.config import ConfigError, read_config_file, resolve_config

def test_overrides_win_and_are_typed():
    r = resolve_config({"learning_rate": 1e-5, "lora_rank": 16},
                       {"manifest": "m.parquet", "learning_rate": "3e-4", "lora_rank": "4", "vae_tiling": "true"})
    assert r.config.learning_rate == 3e-4 and r.config.lora_rank == 4 and r.config.vae_tiling is True


def test_every_error_is_reported_together():
    with pytest.raises(ConfigError) as exc:
        resolve_config({"model_flavour": "dev", "lora_rank": 0, "optimizer": "sgd", "learning_rate": "fast",
                        "lr_scheduler": "polynomial", "validation_resolution": "1000x1000"},
                       {"manifest": "m.parquet", "lora_rnak": 4})
    text = str(exc.value)
    assert len(exc.value.problems) == 7
    for needle in ("model_flavour", "lora_rank", "optimizer", "learning_rate", "lr_scheduler",
                   "validation_resolution", "did you mean 'lora_rank'"):
        assert needle in text


def test_toml_and_yaml(tmp_path):
    (tmp_path / "c.toml").write_text('learning_rate = 2e-4\n[lora]\nrank = 8\ntargets = "attention+ffs"\n')
    (tmp_path / "c.yaml").write_text("learning_rate: 2.0e-4\nlora_rank: 8\noptimizer: lion\n")
    t = resolve_config(read_config_file(tmp_path / "c.toml"), {"manifest": "m"}).config
    y = resolve_config(read_config_file(tmp_path / "c.yaml"), {"manifest": "m"}).config
    assert (t.learning_rate, t.lora_rank, t.lora_targets) == (2e-4, 8, "attention+ffs")
    assert (y.learning_rate, y.lora_rank, y.optimizer) == (2e-4, 8, "lion")


def test_unparseable_file_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"lora_rank": 16,,}')
    with pytest.raises(ConfigError, match="bad.json"):
        read_config_file(p)


def test_compile_blocks_with_a_quanto_base_is_accepted_and_a_budget_needs_compiled_blocks(tmp_path):
    from kontext_trainer.config import ConfigError, resolve_config

    m = str(tmp_path / "m.parquet")
    ok = resolve_config({"manifest": m, "base_model_precision": "int8-quanto", "compile_blocks": True})
    assert ok.config.compile_blocks is True  # quanto's data runs as plain tensors (DequantLinear): it compiles
    assert resolve_config({"manifest": m, "activation_memory_budget": 0.2}).config.activation_memory_budget == 0.2
    with pytest.raises(ConfigError) as exc:
        resolve_config({"manifest": m, "activation_memory_budget": 0.2, "compile_blocks": False})
    assert "activation_memory_budget" in str(exc.value) and "checkpoint_fraction" in str(exc.value)
    with pytest.raises(ConfigError, match="above 0"):
        resolve_config({"manifest": m, "activation_memory_budget": 0})
