"""The training configuration: one frozen, typed dataclass, read from a config file plus overrides.

In: a config file (JSON with // and /* */ comments, TOML or YAML) and command-line overrides. Out: `TrainConfig`,
every value checked up front; all problems raised together in one ConfigError; keys we do not use listed together
as one warning. Keys and values of SimpleTuner's `config.json` (with or without their leading `--`) are accepted
too: `kontext_trainer.compat` translates them, key by key, before our own checks.
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
from typing import Any, Callable, Literal, Mapping

from kontext_data.jsonc import strip_jsonc
from kontext_data.problems import ProblemsError
from kontext_trainer import compat
from kontext_trainer.compat import normalize_key
from kontext_trainer.config_values import coerce_value
from kontext_trainer.model import DEFAULT_MODEL


class ConfigError(ProblemsError):
    """The configuration is invalid. `problems` lists every problem, one message each."""

    usage = True

    def __init__(self, problems: list[str], source: str | None = None):
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(problems, title=head + f"{len(problems)} configuration problem(s)")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


ATTENTION_BACKENDS = ("auto", "default", "flash", "efficient", "math", "cudnn", "fa4")
"""Every `attention_backend` value, in the order messages list them (the one list: kontext_trainer.attention, which
implements them, reads it from here, so the torch-free config schema need not import torch)."""


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
              "dynamic sequence lengths; paid in the first step; validation runs them eagerly). Default (none): on "
              "when training on CUDA (H100, 1024 px: 1.01 -> 0.81 s/step, same loss), for every base precision, off "
              "elsewhere; true/false force it.")
    fuse_qkv_projections: bool = _f(
        True, "Compute each attention's q/k/v projections (base and LoRA) in one matmul: same adapter, same saved "
              "file, ~2% faster steps on an H100. Needs no flash-attn here (the guide's warning is SimpleTuner's). "
              "LoKr layers stay unfused.")
    attention_backend: Literal[ATTENTION_BACKENDS] = _f(
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
    train_batch_size: int = _f(1, "Samples per micro-batch on each process (all of one bucket and reference "
                                  "count); with N processes a micro-step trains N times as many (batch_semantics).",
                               min=1, cli=())
    batch_semantics: Literal["per_device", "global"] = _f(
        "per_device", "How train_batch_size reads under data parallelism: per_device (as SimpleTuner, diffusers and "
                      "accelerate read it: N processes train N x train_batch_size samples per micro-step, each "
                      "process a batch of its own) or global (the micro-batch of all processes together, shared "
                      "out: N-invariant runs, but a batch smaller than N leaves processes idle).", cli=())
    distributed_timeout_minutes: float = _f(
        120.0, "With several processes: how long one waits for the others (at a barrier or the gradient "
               "all-reduce) before the run stops with a timeout. The longest waits: a machine that encodes what its "
               "own cache lacks while the others wait, rank 0 writing a checkpoint; torch's own NCCL default is 10 "
               "minutes. A process that fails stops the others at once whatever this says.",
        min=0.01)
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
    cache_compile_vae: bool = _f(
        False, "torch.compile the VAE encoder while caching latents: H100, 1024 px, 48 instead of 24 images/s after "
               "~18-25 s of compiling, measured at one image size (a second size compiles once more); worth it from "
               "~1,500 images to encode. Its latents differ from the default path's in the last bits, so they are "
               "cached under keys of their own (switching re-encodes).", cli=())
    max_sequence_length: int = _f(512, "T5 tokens (512 for Kontext dev).", min=1, max=512)

    resolution: int = _f(0, "Informational: the manifest fixes the geometry (kontext-data --resolution). A value "
                            "that differs from the manifest's is reported.", min=0)
    resolution_type: Literal["", "pixel", "area", "pixel_area"] = _f("", "Informational, as resolution.")
    report_to: Literal["tensorboard", "none"] = _f("tensorboard", "Where metrics go (OUTPUT_DIR/logs).")
    logging_steps: int = _f(1, "Log loss/lr/step time every N optimizer steps.", min=1)

    # --- data side: several references, dataset weights, validation prompts ---
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

    # --- model side: quantization and the adapter ---
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
        """Every field by name (what config.resolved.json and the saved adapter's metadata hold)."""
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
        """cache_dir, or OUTPUT_DIR/cache when it is empty."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
"""Each field's declared type, resolved (the dataclass holds them as text)."""
_FIELDS = {f.name: f for f in fields(TrainConfig)}


@dataclass
class ResolvedConfig:
    """A checked TrainConfig, with the warnings (keys not used) and notes (values honoured our own way) to show."""

    config: TrainConfig
    warnings: list[str]
    notes: list[str]


# ------------------------------------------------------------------------------------------ reading files


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
            data = json.loads(strip_jsonc(text))
    except Exception as exc:
        raise ConfigError([f"cannot parse {path.name} ({type(exc).__name__}: {exc})"], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path.name}: the top level must be an object of key: value pairs"], source=str(path))
    # TOML/YAML tables are flattened one level ([lora] rank = 16 -> lora_rank)
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and suffix != ".json" and normalize_key(k) not in TABLE_KEYS:  # those stay tables
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
        number = _table_number(kind, raw)
        if not str(key).strip() or number is None:
            bad.append(f"{key!r}: {raw!r}")
            continue
        out[str(key)] = number
    if bad:
        return (), f"{name}: {'; '.join(bad)}: each value must be {what}"
    return tuple(sorted(out.items())), None


def _table_number(kind: type, raw: Any) -> float | int | None:
    """A table entry's number: a finite float above 0 (weights) or a whole number >= 0 (repeats); None if not."""
    if isinstance(raw, bool):
        return None
    try:
        f = float(raw)
    except (TypeError, ValueError):
        return None
    if kind is float:
        return f if math.isfinite(f) and f > 0 else None
    return int(f) if f.is_integer() and f >= 0 else None


def _sigmas(value: Any) -> tuple[Any, str | None]:
    """validation_sigmas: a list, or comma-separated text (--set validation_sigmas=0.25,0.5,0.75)."""
    items = value if isinstance(value, (list, tuple)) else str(value).strip().strip("[]()").split(",")
    try:
        sigmas = tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        sigmas = ()
    if not sigmas or not all(0.0 < v < 1.0 for v in sigmas):
        return None, f"validation_sigmas: {value!r} is not a list of sigmas, each between 0 and 1 (exclusive)"
    return sigmas, None


def _resolution(value: Any) -> tuple[Any, str | None]:
    """validation_resolution: WxH or N, each a positive multiple of 16; empty: each sample's own size."""
    text = str(value).strip()
    if text and not re.fullmatch(r"\d+(x\d+)?", text):
        return None, f"validation_resolution: {value!r} is not WxH or N"
    if text:
        w, _, h = text.partition("x")
        h = h or w
        if int(w) % 16 or int(h) % 16 or int(w) == 0 or int(h) == 0:
            return None, f"validation_resolution: {text} must be positive multiples of 16"
    return text, None


def _listed(join: Callable[[list[str]], str]) -> Callable[[Any], tuple[Any, str | None]]:
    """A text field that a config file may also give as a list: the list joined by `join`."""
    return lambda value: (join([str(v) for v in value]) if isinstance(value, (list, tuple)) else value, None)


VALUE_FORMS: dict[str, Callable[[Any], tuple[Any, str | None]]] = {
    "validation_sigmas": _sigmas,
    "validation_resolution": _resolution,
    "lora_targets": _listed(",".join),
    "manifest": _listed(join_manifest_paths),
    "dataset_weights": lambda value: parse_table("dataset_weights", value),
    "dataset_repeats": lambda value: parse_table("dataset_repeats", value),
    "resume_from_checkpoint": lambda value: ("" if value is None else value, None),  # JSON null: none
}
"""Fields with a value form beyond their type (a list, a table, comma-separated text): value -> (value, error)."""


def parse_value(name: str, value: Any) -> tuple[Any, str | None]:
    """`value` for the field `name` (our name, our value vocabulary): its value form read (`VALUE_FORMS`), then
    converted to the field's type and checked against its min/max metadata. (value, None), or (None, the error)."""
    form = VALUE_FORMS.get(name)
    if form is not None:
        value, error = form(value)
        if error:
            return None, error
    meta = _FIELDS[name].metadata
    return coerce_value(name, FIELD_TYPES[name], value, meta.get("min"), meta.get("max"))


# ------------------------------------------------------------------------------------------ resolving


def resolve_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
                   source: str | None = None) -> ResolvedConfig:
    """Merge file values (SimpleTuner aliases allowed; unknown keys -> one warning) and overrides (our field names;
    unknown -> error) into a checked TrainConfig. Raises ConfigError listing every problem."""
    problems: list[str] = []
    notes: list[str] = []
    unknown: list[str] = []
    keyed: list[tuple[str, Any]] = []  # every known (normalized key, value), file first
    values: dict[str, Any] = {}
    for layer, strict in ((file_values or {}, False), (overrides or {}, True)):
        for raw_key, raw_value in layer.items():
            key = normalize_key(raw_key)
            if key not in FIELD_NAMES and not compat.is_known(key):
                if strict:
                    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                    problems.append(f"unknown option {raw_key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                else:
                    unknown.append(raw_key)
                continue
            keyed.append((key, raw_value))
            name, value = compat.translate(key, raw_value, problems, notes)
            if name is None:
                continue
            value, err = parse_value(name, value)
            if err:
                problems.append(err)
                continue
            values[name] = value
    warnings = _unused_keys_warning(unknown)
    compat.apply_use_ema(keyed, values, notes)
    problems += cross_field_problems(values)
    if values.get("lycoris_config") and not problems:  # keys set explicitly win over the file's
        compat.apply_lycoris_config(values, {compat.field_for(k) for k, _ in keyed}, warnings, problems)
    if problems:
        raise ConfigError(problems, source=source)
    config = TrainConfig(**values)
    if config.validation_steps and config.validation_steps > config.max_train_steps:
        notes.append(f"validation_steps {config.validation_steps} > max_train_steps {config.max_train_steps}: "
                     "validation runs at the end only")
    return ResolvedConfig(config=config, warnings=warnings, notes=notes)


def _unused_keys_warning(unknown: list[str]) -> list[str]:
    """One warning listing the config file's keys kontext-train does not use, with likely typos; none if none."""
    if not unknown:
        return []
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(normalize_key(k), FIELD_NAMES, n=1, cutoff=0.85)
        if close:
            hints.append(f"{k!r} (did you mean {close[0]!r}?)")
    return [f"{len(unknown)} config key(s) not used by kontext-train (ignored): {', '.join(unknown)}"
            + (f". Possible typos: {'; '.join(hints)}" if hints else "")]


def cross_field_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems of values that are valid alone but not together (or missing): checked after every key is read."""
    problems = []
    if not values.get("manifest"):
        problems.append("manifest: no manifest given (kontext-train MANIFEST.parquet)")
    budget = values.get("activation_memory_budget")
    if budget is not None and budget <= 0:
        problems.append("activation_memory_budget: must be above 0 (0.05 keeps little more than block "
                        "checkpointing; 1 keeps everything)")
    if budget is not None and values.get("compile_blocks") is False:
        problems.append("activation_memory_budget: only compiled blocks have one; with compile_blocks false use "
                        "checkpoint_fraction")
    if values.get("ema_decay") is not None and values["ema_decay"] >= 1.0:
        problems.append(f"ema_decay: {values['ema_decay']} must be below 1 (0.999 is usual; none turns the EMA off)")
    return problems


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


def cli_fields() -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every TrainConfig field that `kontext-train train` has an option for, in field order.

    Such a field's metadata has ``cli``: its option's spellings (empty: ``--field-name``, or ``--x/--no-x`` for a
    bool; one spelling of a bool: an on-only flag such as ``--verify``), and ``path`` when it names a file.
    """
    return [(f, FIELD_TYPES[f.name]) for f in fields(TrainConfig) if "cli" in f.metadata]
