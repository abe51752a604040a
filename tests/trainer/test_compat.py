"""SimpleTuner's config.json keys and values (the Kontext guide's config), its EMA keys and lycoris_config.json, in
kontext-train's terms (kontext_trainer.compat), through the real loader."""

from __future__ import annotations

import json

import pytest

from kontext_trainer.compat import read_lycoris_config
from kontext_trainer.config import ConfigError, read_config_file, resolve_config

GUIDE_CONFIG = """{
  "model_family":   "flux",
  "model_flavour": "kontext",                       // <-- cambia esto de "dev" a "kontext"
  "base_model_precision": "bf16",
  "gradient_checkpointing": true,
  "fuse_qkv_projections": false,                    // honoured, with a note (ours needs no flash-attn)
  "lora_rank": 16,
  "learning_rate": 1e-5,
  "optimizer": "optimi-lion",
  "max_train_steps": 10000,
  "validation_guidance": 2.5,
  "validation_resolution": "1024x1024",
  "conditioning_multidataset_sampling": "random",
  "--output_dir": "out/kontext", /* SimpleTuner also writes keys with dashes */
  "train_batch_size": 2,
  "gradient_accumulation_steps": 4,
  "seed": 7,
  "lr_scheduler": "constant_with_warmup",
  "lr_warmup_steps": 100,
  "validation_steps": 250,
  "checkpointing_steps": 500,
  "resolution": 1024,
  "resolution_type": "pixel_area",
  "data_backend_config": "config/multidatabackend.json",
}
"""

SIMPLETUNER_LYCORIS = {
    "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
    "apply_preset": {"target_module": ["Attention", "FeedForward"],
                     "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}},
    "use_scalar": True, "dropout": 0.0,
}


def test_guide_config_is_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(GUIDE_CONFIG)
    r = resolve_config(read_config_file(path), {"manifest": "m.parquet"})
    c = r.config
    assert (c.optimizer, c.learning_rate, c.lora_rank, c.max_train_steps) == ("lion", 1e-5, 16, 10000)
    assert (c.validation_guidance, c.validation_resolution, c.output_dir) == (2.5, "1024x1024", "out/kontext")
    assert (c.train_batch_size, c.gradient_accumulation_steps, c.seed) == (2, 4, 7)
    assert c.batch_semantics == "per_device"  # SimpleTuner's reading: 2 samples per GPU per micro-step
    assert (c.lr_scheduler, c.lr_warmup_steps, c.validation_steps, c.checkpointing_steps) == ("constant", 100, 250, 500)
    assert (c.resolution, c.resolution_type, c.base_model_precision) == (1024, "pixel_area", "bf16")
    assert len(r.warnings) == 1  # the unused keys, listed together
    assert "data_backend_config" in r.warnings[0]
    # the guide's fuse_qkv_projections false (SimpleTuner's needs flash-attn) is honoured, with what ours costs
    assert c.fuse_qkv_projections is False
    assert any("fuse_qkv_projections" in n and "flash-attn" in n for n in r.notes)
    assert c.reference_sampling == "random"  # conditioning_multidataset_sampling is SimpleTuner's reference_sampling


def test_guide_precisions_adapters_and_optimizers_resolve():
    r = resolve_config({"base_model_precision": "int8-quanto", "lora_type": "lycoris", "quantize_via": "cpu",
                        "optimizer": "optimi-lion"}, {"manifest": "m"})
    c = r.config
    assert (c.base_model_precision, c.adapter, c.quantize_on, c.optimizer) == ("int8-quanto", "lokr", "cpu", "lion")
    r2 = resolve_config({"optimizer": "adamw_bf16", "quantize_via": "accelerator", "lora_type": "standard"},
                        {"manifest": "m"}).config
    assert (r2.optimizer, r2.quantize_on, r2.adapter) == ("adamw_bf16", "gpu", "lora")
    with pytest.raises(ConfigError) as exc:
        resolve_config({"base_model_precision": "nf4-bnb", "lora_type": "loha"}, {"manifest": "m"})
    assert "int8-quanto" in exc.value.problems[0] and "lycoris" in exc.value.problems[1]


def test_simpletuner_ema_keys_keep_their_meaning():
    """use_ema turns the EMA on (SimpleTuner's default decay 0.995 when no ema_decay is given) or off (whatever
    ema_decay says); ema_validation comparison/ema_only validates the EMA too, none does not."""
    from kontext_trainer.config import ConfigError, resolve_config

    on = resolve_config({"use_ema": True, "manifest": "m.parquet"}).config
    assert on.ema_decay == 0.995 and not on.ema_validate
    off = resolve_config({"use_ema": False, "ema_decay": 0.99, "manifest": "m.parquet"})
    assert off.config.ema_decay is None and any("use_ema false" in n for n in off.notes)
    both = resolve_config({"use_ema": "true", "ema_decay": 0.9, "ema_validation": "comparison",
                           "manifest": "m.parquet"}).config
    assert both.ema_decay == 0.9 and both.ema_validate
    assert not resolve_config({"ema_validation": "none", "manifest": "m.parquet"}).config.ema_validate
    with pytest.raises(ConfigError, match="ema_validation"):
        resolve_config({"ema_validation": "sometimes", "manifest": "m.parquet"})


def test_lycoris_config_is_mapped_with_one_warning(tmp_path):
    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps(SIMPLETUNER_LYCORIS))
    values, warnings, problems = read_lycoris_config(path)
    assert not problems
    assert values == {"adapter": "lokr", "lokr_factor": 16, "lokr_factor_ff": 8, "lokr_full_matrix": True,
                      "lora_targets": "attention+ffs"}
    assert len(warnings) == 1 and "use_scalar" in warnings[0] and "dropout" in warnings[0]
    r = resolve_config({"lycoris_config": str(path), "lora_type": "lycoris", "lokr_factor": 4}, {"manifest": "m"})
    c = r.config
    assert (c.adapter, c.lokr_factor, c.lokr_factor_ff, c.lora_targets) == ("lokr", 4, 8, "attention+ffs")
    assert any("use_scalar" in w for w in r.warnings)
    path.write_text(json.dumps({"algo": "loha", "linear_dim": 8}))
    with pytest.raises(ConfigError, match="loha"):
        resolve_config({"lycoris_config": str(path)}, {"manifest": "m"})
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config({"lycoris_config": str(tmp_path / "none.json")}, {"manifest": "m"})


def test_simpletuner_attention_mechanism_and_a_command_line_use_ema():
    """SimpleTuner's attention_mechanism "diffusers" (its default: PyTorch's SDPA) is our auto; a use_ema on the
    command line wins over the file's, as every override does."""
    assert resolve_config({"attention_mechanism": "diffusers", "manifest": "m"}).config.attention_backend == "auto"
    assert resolve_config({"use_ema": True}, {"manifest": "m", "use_ema": "false"}).config.ema_decay is None
    assert resolve_config({"use_ema": False}, {"manifest": "m", "use_ema": "on"}).config.ema_decay == 0.995
