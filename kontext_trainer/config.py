"""The training configuration: one frozen, typed dataclass, read from a config file plus overrides.

In: a config file (JSON with // and /* */ comments, TOML or YAML; SimpleTuner's `config.json` keys accepted as
aliases, with or without their leading `--`) and command-line overrides. Out: `TrainConfig`, every value checked
up front; all problems raised together in one ConfigError; keys we do not use listed together as one warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

from kontext_data.jsonc import strip_jsonc
from kontext_trainer.model import DEFAULT_MODEL
from kontext_data.problems import ProblemsError


class ConfigError(ProblemsError):
    """The configuration is invalid. `problems` lists every problem, one message each."""

    usage = True

    def __init__(self, problems: list[str], source: str | None = None):
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(problems, title=head + f"{len(problems)} configuration problem(s)")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one `kontext-train` run needs. Each field's metadata['help'] is its documentation."""

    manifest: str = _f("", "Path of the Parquet manifest written by `kontext-data`; several manifests (rows "
                           "concatenated, sample ids unique across them) are joined with the OS path separator "
                           "(':' on Linux), or given as a list in a config file / several CLI arguments "
                           "(PATH:WEIGHT arguments weigh a manifest: see dataset_weights). Paths that contain the "
                           "separator are kept as a JSON list.")
    model: str = _f(DEFAULT_MODEL, "Local FLUX.1 Kontext [dev] directory (diffusers layout) or a hub id, looked up "
                                   "in the local Hugging Face cache.", cli=())
    download: bool = _f(False, "Allow downloading --model from the hub when it is not cached.",
                        cli=("--download",))
    output_dir: str = _f("kontext-lora", "Where the LoRA, checkpoints, validation strips and logs go.",
                         cli=("--output-dir", "-o"))
    cache_dir: str = _f("", "Text-embedding and latent cache (default: OUTPUT_DIR/cache). Shared between runs: "
                            "entries are keyed by content.", cli=())
    verify: bool = _f(False, "Re-hash every image file and compare with the manifest's hashes before training.",
                      cli=("--verify",))

    base_model_precision: Literal["bf16", "fp32", "int8-quanto", "fp8-quanto", "fp8-matmul"] = _f(
        "bf16", "Precision of the frozen base model: bf16; fp32 (CPU tests); int8-quanto / fp8-quanto (optimum-quanto "
                "qint8 / qfloat8 weights, bf16 compute, the adapter in float32); fp8-matmul (e4m3 weights and fp8 "
                "tensor-core matmuls both ways, Ada/Hopper; the adapter in float32). Infer at the precision you "
                "trained.", cli=("--base-precision", "--precision"))
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory.")
    checkpoint_fraction: float | None = _f(
        None, "Fraction of the transformer blocks whose activations are recomputed (1.0 = all, 0 = none; only with "
              "gradient_checkpointing). Default: on CUDA the fastest that fits the card's memory (measured model, "
              "see docs/performance.md), said at start-up; 1.0 elsewhere. With compiled blocks the default is "
              "activation_memory_budget instead; setting this uses block checkpointing.", min=0.0, max=1.0)
    activation_memory_budget: float | None = _f(
        None, "Compiled blocks only: the share (0-1] of a step's activations torch's compiler keeps for backward; "
              "it recomputes the rest, cheapest first (no block checkpointing then). Default: on CUDA the largest "
              "of 1, 0.5, 0.3, 0.2, 0.05 that fits the card with 2 GiB spare (H100, bf16, 1024 px: 0.81-0.83 s at "
              "59.5 GiB with 1, 0.90 s at 38.1 GiB with 0.5, 0.93-0.96 s at 29.6 GiB with 0.2), said at start-up.",
        min=0.0, max=1.0)
    compile_blocks: bool | None = _f(
        None, "Regional torch.compile of the repeated transformer blocks (one compile per block type for every bucket: "
              "dynamic sequence lengths; paid in the first step). Default (none): on when training on CUDA (H100, "
              "1024 px: 1.01 -> 0.81 s/step, same loss), for every base precision, off elsewhere; true/false force it.")
    fuse_qkv_projections: bool = _f(
        True, "Compute each attention's q/k/v projections (base and LoRA) in one matmul: same adapter, same saved "
              "file, ~2% faster steps on an H100. Needs no flash-attn here (the guide's warning is SimpleTuner's). "
              "LoKr layers stay unfused.")
    attention_backend: Literal["auto", "default", "flash", "efficient", "math", "cudnn", "fa4"] = _f(
        "auto", "SDPA kernels for training: auto = on CUDA FlashAttention 4 for samples of 4,096+ tokens where "
                "flash-attn-4 is installed and passes a self-test (Hopper/Blackwell; ~5% faster 1024 px steps on an "
                "H100), cuDNN attention with a contiguous gradient (the fix for its backward crash; ~1.2x faster "
                "steps than flash) otherwise, then flash/mem-efficient; PyTorch's default elsewhere. fa4 forces "
                "FlashAttention 4 and fails at start-up where it cannot run.")
    device: str = _f("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.", cli=())
    memory_limit_gib: float | None = _f(
        None, "Use at most this many GiB of the GPU: PyTorch's allocator is held to it and the memory plan plans for "
              "it (a card shared with a display or another job; or measuring a smaller card on a bigger one). "
              "Default: the whole card.", min=1.0)
    offload_blocks: int | None = _f(
        None, "Frozen transformer blocks kept in pinned CPU memory and copied to the GPU ahead of use, overlapped "
              "with compute, in forward and backward (musubi-tuner's blocks_to_swap): what lets 16 and 12 GB cards "
              "train at 1024 px. Offloaded blocks are always checkpointed. Default: on CUDA as few as the memory "
              "plan needs (none when the model fits), said at start-up; 0 never offloads.", min=0)

    lora_rank: int = _f(16, "LoRA rank.", min=1, cli=())
    lora_alpha: float | None = _f(None, "LoRA alpha (default: equal to the rank, as SimpleTuner).")
    lora_dropout: float = _f(0.0, "LoRA dropout probability.", min=0.0, max=1.0)
    lora_targets: str = _f("attention", "attention (q/k/v/out + add_q/k/v_proj + to_add_out), attention+ffs, all, or "
                                        "a comma-separated list of module suffixes.", cli=())

    learning_rate: float = _f(1e-4, "Peak learning rate (the guide: 1e-5 with Lion, 5e-4 with AdamW).", min=0.0,
                              cli=("--learning-rate", "--lr"))
    optimizer: Literal["adamw", "lion", "optimi-adamw", "adamw_bf16"] = _f(
        "adamw", "adamw (torch.optim.AdamW), lion (torch-optimi Lion; the guide's optimi-lion), optimi-adamw "
                 "(torch-optimi AdamW) or adamw_bf16 (adapter weights in bf16, torch-optimi AdamW with Kahan "
                 "summation).", cli=())
    adam_beta1: float = _f(0.9, "AdamW/Lion beta1.")
    adam_beta2: float = _f(0.999, "AdamW/Lion beta2 (0.99 is usual for Lion).")
    adam_weight_decay: float = _f(1e-2, "Decoupled weight decay.", min=0.0)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0.0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "constant, linear or cosine decay after "
                                                                           "the warmup.")
    lr_warmup_steps: int = _f(0, "Linear warmup from 0 over this many optimizer steps.", min=0)

    max_train_steps: int = _f(1000, "Optimizer steps to train.", min=1, cli=())
    train_batch_size: int = _f(1, "Samples per micro-batch (all of one bucket and reference count).", min=1, cli=())
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1, cli=())
    seed: int = _f(42, "Seed of shuffling, noise, sigmas and caption choices.", cli=())

    timestep_sampling: Literal["logit_normal", "uniform"] = _f("logit_normal", "How sigmas are drawn.")
    logit_mean: float = _f(0.0, "Mean of the logit-normal.")
    logit_std: float = _f(1.0, "Scale of the logit-normal.", min=0.0)
    flow_shift: float = _f(3.0, "Sigma shift s*sigma/(1+(s-1)*sigma) (SimpleTuner's flow_schedule_shift; 1 = off).",
                           min=0.0)
    train_guidance: float = _f(1.0, "Guidance embedding value during training (1.0 by consensus).")
    caption_dropout_probability: float = _f(0.0, "Probability of blanking the instruction (the reference stays).",
                                            min=0.0, max=1.0)
    mask_loss: bool = _f(True, "Weigh the loss by the manifest's loss masks (kontext-data pair --masks) where a "
                               "sample has one; false ignores the masks (every token weighs 1).", cli=())
    mask_loss_weight: float = _f(0.1, "Weight of the squared error outside a loss mask (1 inside, grays in between; "
                                      "the loss is divided by the sum of the weights). Not 0: outside the edit the "
                                      "model must still learn to keep the reference (ai-toolkit's mask_min_value).",
                                 min=0.0, max=1.0)

    validation_steps: int = _f(0, "Validate every N optimizer steps (0: only at the end).", min=0, cli=())
    validation_samples: int = _f(0, "Validate on N training samples when the manifest has no eval split "
                                    "(0: eval split, else 2 training samples).", min=0, cli=())
    validation_guidance: float = _f(2.5, "Guidance for validation images (2.5 recommended for Kontext).")
    validation_num_inference_steps: int = _f(28, "Denoising steps for validation images.", min=1)
    validation_resolution: str = _f("", "WxH (or N for NxN) of validation outputs; empty: each sample's own size.")
    validation_seed: int = _f(0, "Seed of validation noise.")
    skip_final_validation: bool = _f(False, "Do not render validation images at the end of training (the "
                                            "validation loss still runs; validation_loss false turns it off).")
    validation_loss: bool = _f(True, "Measure the flow-matching loss of the validation samples (and of as many "
                                     "training samples) at fixed sigmas with fixed noise: before the first step, "
                                     "every validation_steps and at the end.")
    validation_sigmas: tuple[float, ...] = _f((0.1, 0.3, 0.5, 0.7, 0.9), "Sigmas of the validation loss (each in "
                                              "(0, 1), no shift): a list, or comma-separated.")
    validation_holdout: bool = _f(False, "Without an eval split: take the validation_samples training samples out "
                                         "of training, so the validation loss is measured on pairs never trained on.")
    ema_decay: float | None = _f(None, "Keep an EMA of the adapter with this decay (e.g. 0.999; none: off), saved as "
                                       "pytorch_lora_weights_ema.safetensors.", min=0.0)
    ema_warmup: bool = _f(True, "EMA warm-up: decay min(ema_decay, (1 + t) / (10 + t)) at step t + 1.")
    ema_validate: bool = _f(False, "Also validate (loss and images) with the EMA weights.")

    checkpointing_steps: int = _f(0, "Save a resumable checkpoint every N optimizer steps (0: off).", min=0, cli=())
    checkpoints_total_limit: int = _f(3, "Keep the newest K checkpoints.", min=1)
    resume_from_checkpoint: str = _f("", "'latest' or a checkpoint folder to resume from.", cli=("--resume",))

    cache_batch_size: int = _f(0, "Images per VAE encode call and captions per text-encoder call (0: automatic, "
                                  "batches sized for the device: several on CUDA, 1 on the CPU).", min=0, cli=())
    vae_tiling: bool = _f(False, "Encode with VAE tiling (diffusers tiles only above 1024 px).", cli=())
    max_sequence_length: int = _f(512, "T5 tokens (512 for Kontext dev).", min=1, max=512)

    resolution: int = _f(0, "Informational: the manifest fixes the geometry (kontext-data --resolution). A value "
                            "that differs from the manifest's is reported.", min=0)
    resolution_type: Literal["", "pixel", "area", "pixel_area"] = _f("", "Informational, as resolution.")
    report_to: Literal["tensorboard", "none"] = _f("tensorboard", "Where metrics go (OUTPUT_DIR/logs).")
    logging_steps: int = _f(1, "Log loss/lr/step time every N optimizer steps.", min=1)

    # --- data side (issue 6) ---
    reference_sampling: Literal["combined", "random"] = _f(
        "combined", "Samples with several references: combined = all references in every step; random = one "
                    "reference per sample per step, drawn from (seed, sample id, epoch) (SimpleTuner's "
                    "conditioning_multidataset_sampling).", cli=())
    dataset_weights: tuple[tuple[str, float], ...] = _f(
        (), "Weight per dataset: {dataset id or manifest path: w}; its samples are seen w times per epoch (2 = twice, "
            "0.5 = a seeded half each epoch). `kontext-train a.parquet:2` sets it for a manifest. Entries that apply "
            "to a sample multiply, with each other and with its repeats.")
    dataset_repeats: tuple[tuple[str, int], ...] = _f(
        (), "SimpleTuner's repeats per dataset: {dataset id or manifest path: r}; seen r + 1 times per epoch (0 = "
            "once). Replaces, for that dataset id, the repeats `kontext-data import-simpletuner` stored in the "
            "manifest.")
    validation_prompts: str = _f(
        "", "A JSONL file of extra validation edits, one {\"image\" or \"images\", \"prompt\", optional \"seed\", "
            "\"width\"/\"height\" or \"size\"} per line (image paths relative to the file's folder allowed); "
            "rendered at every validation beside the eval strips, checked at start-up.", cli=(), path=True)

    # --- model side (issue 6) ---
    quantize_on: Literal["gpu", "cpu"] = _f("gpu", "Where int8/fp8-quanto quantizes the base (the guide's "
                                                   "quantize_via). The base loads block by block, each block quantized "
                                                   "before the next is read, so neither needs the whole bf16 model: "
                                                   "gpu = on the training device (fast; the card holds the quantized "
                                                   "blocks plus one bf16 block, ~12 GB for the full model), cpu = each "
                                                   "block in RAM (~1 GB), then moved (the card holds only quantized "
                                                   "blocks).", cli=())
    adapter: Literal["lora", "lokr"] = _f("lora", "lora (peft LoRA) or lokr (peft LoKr, LyCORIS' Kronecker adapter).",
                                          cli=())
    lokr_factor: int = _f(16, "LoKr decomposition factor on attention modules (SimpleTuner default 16; -1 = "
                              "near-square).", min=-1)
    lokr_factor_ff: int = _f(8, "LoKr factor on feed-forward modules (default 8). diffusers loads one factor per "
                                "file: set it equal to lokr_factor to load an attention+ffs LoKr in diffusers.", min=-1)
    lokr_full_matrix: bool = _f(True, "LoKr factors as full matrices (SimpleTuner's full dimension); false: the second "
                                      "factor is decomposed with rank lora_rank.")
    lokr_decompose_both: bool = _f(False, "LoKr: also decompose the first factor (rank lora_rank).")
    lycoris_config: str = _f("", "A SimpleTuner/LyCORIS lycoris_config.json (algo lokr): its factor, full_matrix, "
                                 "linear_dim/alpha and apply_preset are mapped to the lokr_* keys.", cli=(), path=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def manifest_paths(self) -> list[str]:
        """The manifest(s): `manifest` split on the OS path separator, or a JSON list (`join_manifest_paths` writes
        one when a path contains the separator)."""
        import os

        text = self.manifest.strip()
        if text.startswith("["):
            try:
                return [str(p) for p in json.loads(text) if p]
            except ValueError:
                pass
        return [p for p in self.manifest.split(os.pathsep) if p]

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))

# SimpleTuner config.json keys -> ours (None: same name). Value translations are in _translate.
ALIASES: dict[str, str] = {
    "pretrained_model_name_or_path": "model",
    "checkpoints_total_limit": "checkpoints_total_limit",
    "flow_schedule_shift": "flow_shift",
    "flux_guidance_value": "train_guidance",
    "vae_batch_size": "cache_batch_size",
    "vae_enable_tiling": "vae_tiling",
    "text_encoder_batch_size": "cache_batch_size",
    "adam_weight_decay": "adam_weight_decay",
    "weight_decay": "adam_weight_decay",
    "tokenizer_max_length": "max_sequence_length",
    "cache_dir_text": "cache_dir",
    "logit_mean": "logit_mean",
    "flow_sigmoid_scale": "logit_std",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_targets": "lora_targets",
    "lora_target": "lora_targets",
    "attention_mechanism": "attention_backend",
    "conditioning_multidataset_sampling": "reference_sampling",
    "quantize_via": "quantize_on",
    "blocks_to_swap": "offload_blocks",  # musubi-tuner / diffusion-pipe
}
# keys whose value we check but that map to no field (checked in _translate)
CHECKED_ONLY = ("model_family", "model_flavour", "model_type", "lora_type", "flow_use_uniform_schedule",
                "offload_during_startup", "mixed_precision", "use_ema", "ema_validation")
SIMPLETUNER_EMA_DECAY = 0.995  # SimpleTuner's ema_decay default, for a config with use_ema true and no ema_decay

OPTIMIZER_ALIASES = {
    "adamw": ("adamw", None),
    "adamw_torch": ("adamw", None),
    "adam": ("adamw", None),
    "lion": ("lion", None),
    "optimi-lion": ("lion", None),
    "optimi_lion": ("lion", None),
    "adamw_bf16": ("adamw_bf16", None),
    "optimi-adamw": ("optimi-adamw", None),
    "optimi_adamw": ("optimi-adamw", None),
    "adamw_schedulefree": None,
}
SCHEDULER_ALIASES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear",
                     "cosine": "cosine"}
PRECISION_ALIASES = {"bf16": "bf16", "no_change": "bf16", "fp32": "fp32", "float32": "fp32", "bfloat16": "bf16"}
PRECISION_ALIASES.update({"int8-quanto": "int8-quanto", "fp8-quanto": "fp8-quanto"})  # model side (issue 6)
# SimpleTuner's fp8-torchao (torchao Float8Linear: fp8 weights, fp8 matmuls) is what fp8-matmul does (issue 7)
PRECISION_ALIASES.update({"fp8-matmul": "fp8-matmul", "fp8-torchao": "fp8-matmul"})
NOT_YET_PRECISIONS = ("int4-quanto", "int2-quanto", "int8-torchao",
                      "fp8uz-quanto", "nf4-bnb", "int4-torchao")


@dataclass
class ResolvedConfig:
    config: TrainConfig
    warnings: list[str]
    notes: list[str]


# ------------------------------------------------------------------------------------------ reading files


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments and trailing commas outside strings (JSON with comments, as the guide)."""
    return strip_jsonc(text)


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Parse a JSON(C)/TOML/YAML config file into a flat dict. Raises ConfigError with the file name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"no such config file: {path}"])
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(strip_json_comments(text))
    except Exception as exc:
        raise ConfigError([f"cannot parse {path.name} ({type(exc).__name__}: {exc})"], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path.name}: the top level must be an object of key: value pairs"], source=str(path))
    # TOML/YAML tables are flattened one level ([lora] rank = 16 -> lora_rank)
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and suffix != ".json" and _norm_key(k) not in TABLE_KEYS:  # those stay tables
            for k2, v2 in v.items():
                flat[f"{k}_{k2}"] = v2
        else:
            flat[k] = v
    return flat


# ------------------------------------------------------------------------------------------ values

# keys whose value is a table {dataset id or manifest path: number}, and the number each holds
TABLE_KEYS = {"dataset_weights": float, "dataset_repeats": int}


def join_manifest_paths(paths: list[str]) -> str:
    """The `manifest` value for several paths: joined with the OS path separator, or a JSON list when a path
    contains the separator (':' is legal in POSIX file names), which `TrainConfig.manifest_paths` reads back."""
    import os

    if any(os.pathsep in p or p.lstrip().startswith("[") for p in paths):
        return json.dumps(list(paths))
    return os.pathsep.join(paths)


def parse_table(name: str, value: Any) -> tuple[tuple[tuple[str, Any], ...], str | None]:
    """A dataset table from a config file's object, a list of [key, number] pairs (config.resolved.json), JSON
    text or `KEY=N,KEY=N` (--set): sorted (key, number) pairs, or an error naming every bad entry."""
    kind = TABLE_KEYS[name]
    what = "a number above 0" if kind is float else "a whole number >= 0"
    example = f'{{"faces": {2 if kind is float else 1}}}'
    items: list = []
    if value is None or (isinstance(value, str) and not value.strip()):
        return (), None
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return (), f"{name}: {value!r} is not valid JSON ({exc}); e.g. {example}"
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        for part in value.split(","):
            key, sep, number = part.rpartition("=")
            if not sep or not key.strip():
                return (), f"{name}: {part.strip()!r} is not KEY=N; write {name}=faces=2,scenes=1 or JSON {example}"
            items.append((key.strip(), number.strip()))
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        return (), f"{name}: {value!r} is not a table of dataset id or manifest: {what}; e.g. {example}"
    out: dict[str, Any] = {}
    bad: list[str] = []
    for key, raw in items:
        number = None
        if not isinstance(raw, bool):
            try:
                if kind is float:
                    number = float(raw)
                    number = number if math.isfinite(number) and number > 0 else None
                else:
                    f = float(raw)
                    number = int(f) if f.is_integer() and f >= 0 else None
            except (TypeError, ValueError):
                number = None
        if not str(key).strip() or number is None:
            bad.append(f"{key!r}: {raw!r}")
            continue
        out[str(key)] = number
    if bad:
        return (), f"{name}: {'; '.join(bad)}: each value must be {what}"
    return tuple(sorted(out.items())), None


def _norm_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_").strip()


def _type_of(name: str):
    hints = typing.get_type_hints(TrainConfig)
    return hints[name]


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Value converted to the field's type, or an error message."""
    tp = _type_of(name)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    meta = next(f for f in fields(TrainConfig) if f.name == name).metadata
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None, None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin is Literal:
            v = str(value).strip()
            if v not in args:
                return None, f"{name}: {value!r} is not one of {', '.join(repr(a) for a in args if a)}"
            return v, None
        if tp is bool:
            if isinstance(value, bool):
                return value, None
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True, None
            if s in ("0", "false", "no", "off"):
                return False, None
            return None, f"{name}: {value!r} is not a boolean (true/false)"
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            v = int(str(value).strip()) if not isinstance(value, int) else value
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        elif tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            v = str(value)
        else:  # pragma: no cover - all fields are covered above
            v = value
    except (TypeError, ValueError):
        return None, f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}"
    if "min" in meta and v < meta["min"]:
        return None, f"{name}: {v} is below the minimum {meta['min']}"
    if "max" in meta and v > meta["max"]:
        return None, f"{name}: {v} is above the maximum {meta['max']}"
    return v, None


def _translate(key: str, value: Any, problems: list[str], notes: list[str]) -> tuple[str | None, Any]:
    """Map one (normalized) key and value to our field, checking SimpleTuner values. (None, _) = consumed."""
    if key == "model_family":
        if str(value).lower() not in ("flux", "kontext", "flux_kontext"):
            problems.append(f"model_family: {value!r} is not supported: this tool trains FLUX.1 Kontext "
                            "(model_family \"flux\" with model_flavour \"kontext\")")
        return None, None
    if key in ("model_flavour", "model_flavor"):
        if str(value).lower() not in ("kontext", "kontext-dev", "kontext_dev"):
            problems.append(f"model_flavour: {value!r}: only \"kontext\" (FLUX.1 Kontext [dev]) is supported")
        return None, None
    if key == "model_type":
        if str(value).lower() != "lora":
            problems.append(f"model_type: {value!r}: only \"lora\" training is supported")
        return None, None
    if key == "lora_type":
        v = str(value).lower()
        if v in ("lycoris", "lokr"):
            return "adapter", "lokr"
        if v != "standard":
            problems.append(f"lora_type: {value!r} is not one of 'standard', 'lycoris'")
            return None, None
        return "adapter", "lora"
    if key == "flow_use_uniform_schedule":
        ok, err = _coerce("vae_tiling", value)
        if err:
            problems.append(f"flow_use_uniform_schedule: {value!r} is not a boolean")
            return None, None
        return "timestep_sampling", "uniform" if ok else "logit_normal"
    if key == "use_ema":  # SimpleTuner turns its EMA on with use_ema; resolve_config applies it with ema_decay
        ok, err = _coerce("vae_tiling", value)
        if err:
            problems.append(f"use_ema: {value!r} is not a boolean")
        return None, None
    if key == "ema_validation":  # SimpleTuner: none | ema_only | comparison
        v = str(value).strip().lower()
        if v not in ("none", "ema_only", "comparison"):
            problems.append(f"ema_validation: {value!r} is not one of none, ema_only, comparison")
            return None, None
        if v == "ema_only":
            notes.append("ema_validation ema_only: kontext-train validates the plain adapter and the EMA side by "
                         "side (comparison)")
        return "ema_validate", v != "none"
    if key == "offload_during_startup":
        notes.append("offload_during_startup: encoders are always freed after caching here")
        return None, None
    if key == "mixed_precision":
        if str(value).lower() not in ("bf16", "no", "fp32"):
            problems.append(f"mixed_precision: {value!r} is not supported (bf16)")
        return None, None
    if key == "base_model_precision":
        v = str(value).lower()
        if v in NOT_YET_PRECISIONS:
            problems.append(f"base_model_precision: {value!r} is not available: use int8-quanto (the guide's "
                            "choice, ~24 GB at 1024 px), fp8-quanto, fp8-matmul, bf16 or fp32")
            return None, None
        if v not in PRECISION_ALIASES:
            problems.append(f"base_model_precision: {value!r} is not one of bf16, fp32, int8-quanto, fp8-quanto, "
                            "fp8-matmul (no_change = bf16, fp8-torchao = fp8-matmul)")
            return None, None
        return key, PRECISION_ALIASES[v]
    if key == "optimizer":
        v = str(value).lower()
        hit = OPTIMIZER_ALIASES.get(v)
        if hit is None:
            problems.append(f"optimizer: {value!r} is not supported; valid: adamw, lion, optimi-lion, "
                            "optimi-adamw, adamw_bf16")
            return None, None
        if hit[1]:
            notes.append(hit[1])
        return key, hit[0]
    if key == "lr_scheduler":
        v = str(value).lower()
        if v not in SCHEDULER_ALIASES:
            problems.append(f"lr_scheduler: {value!r} is not one of {', '.join(SCHEDULER_ALIASES)}")
            return None, None
        return key, SCHEDULER_ALIASES[v]
    if key == "validation_sigmas":  # a list, or comma-separated text (--set validation_sigmas=0.25,0.5,0.75)
        items = value if isinstance(value, (list, tuple)) else str(value).strip().strip("[]()").split(",")
        try:
            sigmas = tuple(float(v) for v in items if str(v).strip())
        except (TypeError, ValueError):
            sigmas = ()
        if not sigmas or not all(0.0 < v < 1.0 for v in sigmas):
            problems.append(f"validation_sigmas: {value!r} is not a list of sigmas, each between 0 and 1 (exclusive)")
            return None, None
        return key, sigmas
    if key == "validation_resolution":
        text = str(value).strip()
        first = text.split(",")[0].strip()
        if "," in text:
            notes.append(f"validation_resolution: several resolutions given; validating at the first, {first}")
        if first and not re.fullmatch(r"\d+(x\d+)?", first):
            problems.append(f"validation_resolution: {value!r} is not WxH or N")
            return None, None
        if first:
            w, _, h = first.partition("x")
            h = h or w
            if int(w) % 16 or int(h) % 16 or int(w) == 0 or int(h) == 0:
                problems.append(f"validation_resolution: {first} must be positive multiples of 16")
                return None, None
        return key, first
    if key in ("lora_targets",) and isinstance(value, (list, tuple)):
        return key, ",".join(str(v) for v in value)
    if key == "manifest" and isinstance(value, (list, tuple)):
        return key, join_manifest_paths([str(v) for v in value])
    if key in TABLE_KEYS:  # {dataset id or manifest: number}, see kontext_trainer.weighting
        table, error = parse_table(key, value)
        if error:
            problems.append(error)
            return None, None
        return key, table
    if key == "resume_from_checkpoint" and value is None:
        return key, ""
    if key == "attention_backend" and str(value) in ("diffusers", "sdpa"):
        return key, "auto"
    if key == "fuse_qkv_projections" and str(value).strip().lower() in ("false", "0", "no"):
        notes.append("fuse_qkv_projections false (the guide's setting: SimpleTuner's fusion needs flash-attn): "
                     "kontext-train's needs nothing extra and keeps the LoRA; true is ~2% faster on an H100")
    if key == "quantize_via":  # model side (issue 6): SimpleTuner's accelerator|cpu
        v = str(value).strip().lower()
        return "quantize_on", {"accelerator": "gpu", "cuda": "gpu", "gpu": "gpu", "cpu": "cpu"}.get(v, v)
    return ALIASES.get(key, key), value


def resolve_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
                   source: str | None = None) -> ResolvedConfig:
    """Merge file values (SimpleTuner aliases allowed; unknown keys -> one warning) and overrides (our field names;
    unknown -> error) into a checked TrainConfig. Raises ConfigError listing every problem."""
    problems: list[str] = []
    notes: list[str] = []
    unknown: list[str] = []
    values: dict[str, Any] = {}
    for layer, strict in ((file_values or {}, False), (overrides or {}, True)):
        for raw_key, raw_value in layer.items():
            key = _norm_key(raw_key)
            if key not in FIELD_NAMES and key not in ALIASES and key not in CHECKED_ONLY and key not in (
                    "model_flavor", "base_model_precision", "optimizer", "lr_scheduler", "validation_resolution"):
                if strict:
                    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                    problems.append(f"unknown option {raw_key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                else:
                    unknown.append(raw_key)
                continue
            name, value = _translate(key, raw_value, problems, notes)
            if name is None:
                continue
            coerced, err = _coerce(name, value)
            if err:
                problems.append(err)
                continue
            values[name] = coerced
    warnings: list[str] = []
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(_norm_key(k), FIELD_NAMES, n=1, cutoff=0.85)
            if close:
                hints.append(f"{k!r} (did you mean {close[0]!r}?)")
        warnings.append(f"{len(unknown)} config key(s) not used by kontext-train (ignored): {', '.join(unknown)}"
                        + (f". Possible typos: {'; '.join(hints)}" if hints else ""))
    if not values.get("manifest"):
        problems.append("manifest: no manifest given (kontext-train MANIFEST.parquet)")
    if values.get("activation_memory_budget") is not None and values["activation_memory_budget"] <= 0:
        problems.append("activation_memory_budget: must be above 0 (0.05 keeps little more than block "
                        "checkpointing; 1 keeps everything)")
    if values.get("activation_memory_budget") is not None and values.get("compile_blocks") is False:
        problems.append("activation_memory_budget: only compiled blocks have one; with compile_blocks false use "
                        "checkpoint_fraction")
    use_ema = next((_coerce("vae_tiling", v)[0] for layer in (file_values or {}, overrides or {})
                    for k, v in layer.items() if _norm_key(k) == "use_ema"), None)
    if use_ema is False and values.get("ema_decay") is not None:
        notes.append(f"use_ema false: the EMA is off (ema_decay {values['ema_decay']:g} ignored)")
        values["ema_decay"] = None
    elif use_ema and values.get("ema_decay") is None:
        values["ema_decay"] = SIMPLETUNER_EMA_DECAY
    if values.get("ema_decay") is not None and values["ema_decay"] >= 1.0:
        problems.append(f"ema_decay: {values['ema_decay']} must be below 1 (0.999 is usual; none turns the EMA off)")
    if values.get("lycoris_config") and not problems:  # model side (issue 6): keys set explicitly win
        from kontext_trainer.adapters import read_lycoris_config

        explicit = {ALIASES.get(_norm_key(k), _norm_key(k)) for layer in (file_values or {}, overrides or {})
                    for k in layer}
        lyc_values, lyc_warnings, lyc_problems = read_lycoris_config(values["lycoris_config"])
        problems += lyc_problems
        warnings += lyc_warnings
        for name, value in lyc_values.items():
            if name not in explicit or name == "adapter":
                values[name] = value
    if problems:
        raise ConfigError(problems, source=source)
    config = TrainConfig(**values)
    if config.validation_steps and config.validation_steps > config.max_train_steps:
        notes.append(f"validation_steps {config.validation_steps} > max_train_steps {config.max_train_steps}: "
                     "validation runs at the end only")
    return ResolvedConfig(config=config, warnings=warnings, notes=notes)


def parse_set_options(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--set key=value` items -> dict; malformed items are reported as problems."""
    out: dict[str, str] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        out[key.strip()] = value
    return out, problems


def field_docs() -> list[tuple[str, str, str, Any]]:
    """(name, type, help, default) per field, for docs and --help."""
    hints = typing.get_type_hints(TrainConfig)
    rows = []
    for f in fields(TrainConfig):
        tp = hints[f.name]
        rows.append((f.name, str(tp).replace("typing.", ""), f.metadata.get("help", ""), f.default))
    return rows


def cli_fields() -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every TrainConfig field that `kontext-train train` has an option for, in field order.

    Such a field's metadata has ``cli``: its option's spellings (empty: ``--field-name``, or ``--x/--no-x`` for a
    bool; one spelling of a bool: an on-only flag such as ``--verify``), and ``path`` when it names a file.
    """
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in fields(TrainConfig) if "cli" in f.metadata]
