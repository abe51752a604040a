"""Training configs of other tools in kontext-train's terms: SimpleTuner's `config.json` and `lycoris_config.json`
(plus musubi-tuner's / diffusion-pipe's `blocks_to_swap`).

In: one key of a config (normalized by `normalize_key`) and its value, as a config file or `--set` gives it; or the
path of a `lycoris_config.json`. Out: our field name and value (or no field: a key that is only checked), with
every problem (a value we cannot honour) and note (a value honoured in our own way) appended to the caller's lists.
Our own keys and values pass through unchanged, so one file may mix both vocabularies.
`kontext_trainer.config.resolve_config` calls `translate` for every key, then `apply_use_ema` and
`apply_lycoris_config` once; this module never imports `config` (config imports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from kontext_data.jsonc import strip_jsonc
from kontext_trainer.config_values import parse_bool

Translation = tuple[str | None, Any]
"""(our field name, its value), or (None, None) for a key that maps to no field."""
Handler = Callable[[Any, list[str], list[str]], Translation]
"""(value, problems, notes) -> Translation, for one foreign key."""

# SimpleTuner config.json keys whose value is ours as it is, under another name
ALIASES: dict[str, str] = {
    "pretrained_model_name_or_path": "model",
    "flow_schedule_shift": "flow_shift",
    "flux_guidance_value": "train_guidance",
    "vae_batch_size": "cache_batch_size",
    "vae_enable_tiling": "vae_tiling",
    "text_encoder_batch_size": "cache_batch_size",
    "weight_decay": "adam_weight_decay",
    "tokenizer_max_length": "max_sequence_length",
    "cache_dir_text": "cache_dir",
    "flow_sigmoid_scale": "logit_std",
    "lora_target": "lora_targets",
    "conditioning_multidataset_sampling": "reference_sampling",
    "blocks_to_swap": "offload_blocks",  # musubi-tuner / diffusion-pipe
}
SIMPLETUNER_EMA_DECAY = 0.995  # SimpleTuner's ema_decay default, for a config with use_ema true and no ema_decay

OPTIMIZER_ALIASES = {
    "adamw": "adamw", "adamw_torch": "adamw", "adam": "adamw",
    "lion": "lion", "optimi-lion": "lion", "optimi_lion": "lion",
    "adamw_bf16": "adamw_bf16",
    "optimi-adamw": "optimi-adamw", "optimi_adamw": "optimi-adamw",
}
SCHEDULER_ALIASES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
                     "cosine": "cosine"}
PRECISION_ALIASES = {
    "bf16": "bf16", "no_change": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32",
    "int8-quanto": "int8-quanto", "fp8-quanto": "fp8-quanto",
    # SimpleTuner's fp8-torchao (torchao Float8Linear: fp8 weights, fp8 matmuls) is what fp8-matmul does
    "fp8-matmul": "fp8-matmul", "fp8-torchao": "fp8-matmul",
}
NOT_YET_PRECISIONS = ("int4-quanto", "int2-quanto", "int8-torchao", "fp8uz-quanto", "nf4-bnb", "int4-torchao")
QUANTIZE_VIA = {"accelerator": "gpu", "cuda": "gpu", "gpu": "gpu", "cpu": "cpu"}
ATTENTION_MECHANISMS = {"diffusers": "auto", "sdpa": "auto"}  # SimpleTuner's names for PyTorch's own SDPA


def normalize_key(key: str) -> str:
    """A config key as our field names are spelled: SimpleTuner's config.json may write keys as its command-line
    flags (`--output_dir`), and dashes are underscores (`lora-rank` = `lora_rank`)."""
    return key.lstrip("-").replace("-", "_").strip()


def _text(value: Any) -> str:
    return str(value).strip().lower()


# ------------------------------------------------------------------------------------------ handler kinds


def _checked(allowed: tuple[str, ...], message: Callable[[Any], str]) -> Handler:
    """A key that maps to no field: its value must be one of `allowed` (any case), else `message(value)` is a
    problem."""
    def check(value: Any, problems: list[str], notes: list[str]) -> Translation:
        if _text(value) not in allowed:
            problems.append(message(value))
        return None, None

    return check


def _mapped(field: str, table: dict[str, Any], message: Callable[[Any], str] | None = None) -> Handler:
    """A key whose values map onto `field`'s values through `table` (any case). A value not in the table is
    `message(value)`, a problem; without a message it goes on as it is, for the field's own check."""
    def translate(value: Any, problems: list[str], notes: list[str]) -> Translation:
        v = _text(value)
        if v in table:
            return field, table[v]
        if message is None:
            return field, v
        problems.append(message(value))
        return None, None

    return translate


def _noted(field: str | None, note: str, when: Callable[[Any], bool] = lambda v: True) -> Handler:
    """A key kept as it is (`field`; None drops it) with `note` for the values `when` picks."""
    def translate(value: Any, problems: list[str], notes: list[str]) -> Translation:
        if when(value):
            notes.append(note)
        return (field, value) if field else (None, None)

    return translate


# ------------------------------------------------------------------------------------------ keys of their own


def _base_model_precision(value: Any, problems: list[str], notes: list[str]) -> Translation:
    v = _text(value)
    if v in NOT_YET_PRECISIONS:
        problems.append(f"base_model_precision: {value!r} is not available: use int8-quanto (the guide's choice, "
                        "~24 GB at 1024 px), fp8-quanto, fp8-matmul, bf16 or fp32")
        return None, None
    if v not in PRECISION_ALIASES:
        problems.append(f"base_model_precision: {value!r} is not one of bf16, fp32, int8-quanto, fp8-quanto, "
                        "fp8-matmul (no_change = bf16, fp8-torchao = fp8-matmul)")
        return None, None
    return "base_model_precision", PRECISION_ALIASES[v]


def _uniform_schedule(value: Any, problems: list[str], notes: list[str]) -> Translation:
    uniform = parse_bool(value)
    if uniform is None:
        problems.append(f"flow_use_uniform_schedule: {value!r} is not a boolean")
        return None, None
    return "timestep_sampling", "uniform" if uniform else "logit_normal"


def _use_ema(value: Any, problems: list[str], notes: list[str]) -> Translation:
    """Only checked here: `apply_use_ema` applies it, together with ema_decay."""
    if parse_bool(value) is None:
        problems.append(f"use_ema: {value!r} is not a boolean")
    return None, None


def _ema_validation(value: Any, problems: list[str], notes: list[str]) -> Translation:
    """SimpleTuner's none | ema_only | comparison: we validate both or neither."""
    v = _text(value)
    if v not in ("none", "ema_only", "comparison"):
        problems.append(f"ema_validation: {value!r} is not one of none, ema_only, comparison")
        return None, None
    if v == "ema_only":
        notes.append("ema_validation ema_only: kontext-train validates the plain adapter and the EMA side by side "
                     "(comparison)")
    return "ema_validate", v != "none"


def _validation_resolution(value: Any, problems: list[str], notes: list[str]) -> Translation:
    """SimpleTuner validates at every resolution of a comma list; we validate at the first."""
    text = str(value).strip()
    first = text.split(",")[0].strip()
    if "," in text:
        notes.append(f"validation_resolution: several resolutions given; validating at the first, {first}")
    return "validation_resolution", first


HANDLERS: dict[str, Handler] = {
    "model_family": _checked(("flux", "kontext", "flux_kontext"), lambda v: (
        f"model_family: {v!r} is not supported: this tool trains FLUX.1 Kontext (model_family \"flux\" with "
        "model_flavour \"kontext\")")),
    "model_flavour": _checked(("kontext", "kontext-dev", "kontext_dev"), lambda v: (
        f"model_flavour: {v!r}: only \"kontext\" (FLUX.1 Kontext [dev]) is supported")),
    "model_type": _checked(("lora",), lambda v: f"model_type: {v!r}: only \"lora\" training is supported"),
    "mixed_precision": _checked(("bf16", "no", "fp32"), lambda v: f"mixed_precision: {v!r} is not supported (bf16)"),
    "lora_type": _mapped("adapter", {"standard": "lora", "lycoris": "lokr", "lokr": "lokr"},
                         lambda v: f"lora_type: {v!r} is not one of 'standard', 'lycoris'"),
    "optimizer": _mapped("optimizer", OPTIMIZER_ALIASES, lambda v: (
        f"optimizer: {v!r} is not supported; valid: adamw, lion, optimi-lion, optimi-adamw, adamw_bf16")),
    "lr_scheduler": _mapped("lr_scheduler", SCHEDULER_ALIASES,
                            lambda v: f"lr_scheduler: {v!r} is not one of {', '.join(SCHEDULER_ALIASES)}"),
    "quantize_via": _mapped("quantize_on", QUANTIZE_VIA),
    "attention_backend": _mapped("attention_backend", ATTENTION_MECHANISMS),
    "attention_mechanism": _mapped("attention_backend", ATTENTION_MECHANISMS),
    "base_model_precision": _base_model_precision,
    "flow_use_uniform_schedule": _uniform_schedule,
    "use_ema": _use_ema,
    "ema_validation": _ema_validation,
    "validation_resolution": _validation_resolution,
    "offload_during_startup": _noted(None, "offload_during_startup: encoders are always freed after caching here"),
    "fuse_qkv_projections": _noted(
        "fuse_qkv_projections", "fuse_qkv_projections false (the guide's setting: SimpleTuner's fusion needs "
        "flash-attn): kontext-train's needs nothing extra and keeps the LoRA; true is ~2% faster on an H100",
        when=lambda v: _text(v) in ("false", "0", "no")),
}
HANDLERS["model_flavor"] = HANDLERS["model_flavour"]


def is_known(key: str) -> bool:
    """Whether `key` (normalized) is a foreign key this module reads (our own field names aside)."""
    return key in HANDLERS or key in ALIASES


def field_for(key: str) -> str:
    """Our field name for `key` (normalized): the alias's target, else the key itself."""
    return ALIASES.get(key, key)


def translate(key: str, value: Any, problems: list[str], notes: list[str]) -> Translation:
    """One (normalized) key and its value in our terms: (field, value), or (None, None) for a key that is only
    checked. Values we cannot honour are appended to `problems`, values honoured our own way to `notes`."""
    handler = HANDLERS.get(key)
    if handler is not None:
        return handler(value, problems, notes)
    return field_for(key), value


def apply_use_ema(keyed_values: Iterable[tuple[str, Any]], values: dict[str, Any], notes: list[str]) -> None:
    """SimpleTuner's `use_ema` in `values` (our fields, changed in place): true turns the EMA on with `ema_decay`
    (SimpleTuner's default when none is given), false turns it off whatever `ema_decay` says. `keyed_values`:
    every (normalized key, value) of the config, in order; the last use_ema wins (a command line's over a file's)."""
    use_ema = None
    for key, value in keyed_values:
        if key == "use_ema":
            use_ema = parse_bool(value)
    if use_ema is False and values.get("ema_decay") is not None:
        notes.append(f"use_ema false: the EMA is off (ema_decay {values['ema_decay']:g} ignored)")
        values["ema_decay"] = None
    elif use_ema and values.get("ema_decay") is None:
        values["ema_decay"] = SIMPLETUNER_EMA_DECAY


# ------------------------------------------------------------------------------------------ lycoris_config.json

LYCORIS_KEYS = ("algo", "factor", "full_matrix", "decompose_both", "linear_dim", "linear_alpha", "apply_preset",
                "multiplier")
LYCORIS_FULL_DIM = 10000  # LyCORIS/SimpleTuner: a linear_dim this large means full-matrix factors
LYCORIS_MODULES = {"Attention": "attention", "FeedForward": "ffs"}  # apply_preset module names -> our presets


def read_lycoris_config(path: str | Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """Map a SimpleTuner/LyCORIS `lycoris_config.json` to our fields. Returns (values, warnings, problems): values
    for adapter, lokr_factor, lokr_factor_ff, lokr_full_matrix, lokr_decompose_both, lora_rank, lora_alpha,
    lora_targets; keys we cannot honour are listed in one warning."""
    path = Path(path)
    values: dict[str, Any] = {"adapter": "lokr"}
    data, problem = _read_json_object(path)
    if problem:
        return values, [], [problem]
    problems: list[str] = []
    algo = str(data.get("algo", "lokr")).lower()
    if algo != "lokr":
        problems.append(f"lycoris_config {path}: algo {algo!r} is not supported; only \"lokr\" is")
    unsupported = [key for key in data if key not in LYCORIS_KEYS]
    unsupported += _lycoris_factors(data, values)
    preset = data.get("apply_preset") or {}
    if not isinstance(preset, dict):
        problems.append(f"lycoris_config {path}: apply_preset must be an object")
        preset = {}
    unsupported += _lycoris_preset(preset, values)
    warnings = []
    if unsupported:
        warnings.append(f"lycoris_config {path.name}: {len(unsupported)} key(s) not supported here (ignored): "
                        + ", ".join(unsupported))
    return values, warnings, problems


def _read_json_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """The object of a JSON(C) file, or a problem naming the file."""
    if not path.is_file():
        return {}, f"lycoris_config: no such file {path}"
    try:
        data = json.loads(strip_jsonc(path.read_text(encoding="utf-8")))
    except Exception as exc:
        return {}, f"lycoris_config {path}: cannot parse ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict):
        return {}, f"lycoris_config {path}: the top level must be an object"
    return data, None


def _lycoris_factors(data: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The top-level factor, dimension, alpha and decomposition keys into `values`; returns the keys not honoured."""
    if "factor" in data:
        values["lokr_factor"] = values["lokr_factor_ff"] = int(data["factor"])
    if "linear_dim" in data:
        dim = int(data["linear_dim"])
        values["lokr_full_matrix"] = dim >= LYCORIS_FULL_DIM
        if dim < LYCORIS_FULL_DIM:
            values["lora_rank"] = dim
    if "linear_alpha" in data and not values.get("lokr_full_matrix", True):
        values["lora_alpha"] = float(data["linear_alpha"])
    if "full_matrix" in data:
        values["lokr_full_matrix"] = bool(data["full_matrix"])
    if "decompose_both" in data:
        values["lokr_decompose_both"] = bool(data["decompose_both"])
    return ["multiplier"] if float(data.get("multiplier", 1.0)) != 1.0 else []


def _lycoris_preset(preset: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """apply_preset's target_module (-> lora_targets) and module_algo_map factors into `values`; returns the entries
    not honoured."""
    from kontext_trainer.adapters import FEED_FORWARD

    unsupported = [f"apply_preset.{key}" for key in preset if key not in ("target_module", "module_algo_map")]
    chosen = []
    for name in preset.get("target_module") or []:
        if name in LYCORIS_MODULES:
            chosen.append(LYCORIS_MODULES[name])
        else:
            unsupported.append(f"apply_preset.target_module {name!r}")
    if chosen:
        values["lora_targets"] = "attention+ffs" if "ffs" in chosen else "attention"
        if chosen == ["ffs"]:
            values["lora_targets"] = ",".join(FEED_FORWARD)
    for name, algo_map in (preset.get("module_algo_map") or {}).items():
        if name not in LYCORIS_MODULES or not isinstance(algo_map, dict):
            unsupported.append(f"apply_preset.module_algo_map {name!r}")
            continue
        for k, v in algo_map.items():
            if k == "factor":
                values["lokr_factor" if name == "Attention" else "lokr_factor_ff"] = int(v)
            elif not (k == "algo" and str(v).lower() == "lokr"):
                unsupported.append(f"apply_preset.module_algo_map.{name}.{k}")
    return unsupported


def apply_lycoris_config(values: dict[str, Any], explicit: set[str], warnings: list[str],
                         problems: list[str]) -> None:
    """The lycoris_config file named in `values` read into `values` (our fields, changed in place): keys set
    explicitly (`explicit`, our field names) win over the file's, except `adapter` (the file means LoKr)."""
    lyc_values, lyc_warnings, lyc_problems = read_lycoris_config(values["lycoris_config"])
    problems += lyc_problems
    warnings += lyc_warnings
    for name, value in lyc_values.items():
        if name not in explicit or name == "adapter":
            values[name] = value
