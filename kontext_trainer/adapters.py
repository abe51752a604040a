"""LoRA adapters (peft) on the Flux transformer: target presets, attaching, saving in diffusers format.

In: a FluxTransformer2DModel and the LoRA settings. Out: the transformer with a trainable peft adapter named
"default", and `pytorch_lora_weights.safetensors` whose keys are `transformer.<module>.lora_A.weight` /
`.lora_B.weight` (what `FluxKontextPipeline.load_lora_weights` reads). The LoRA config (rank, alpha, targets)
is stored in the safetensors metadata under `lora_adapter_metadata`, as diffusers writes it, so alpha != rank
loads with the right scale; the training config goes under `kontext_training_config`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
PRESETS = {
    "attention": ATTENTION,
    "attention+ffs": ATTENTION + FEED_FORWARD,
}
PRESET_NAMES = ("attention", "attention+ffs", "all")


def target_modules(transformer, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Full module names to adapt: a preset name, `all` (every Linear inside the transformer blocks), or an
    explicit list of module-name suffixes (comma-separated in a string). Raises ValueError naming what matched
    nothing."""
    linear_names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [n for n in linear_names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    if isinstance(targets, str) and targets in ("all",):
        return in_blocks
    if isinstance(targets, str) and targets in PRESETS:
        suffixes = list(PRESETS[targets])
    else:
        suffixes = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    chosen: list[str] = []
    unmatched = []
    for suffix in suffixes:
        hits = [n for n in in_blocks if n == suffix or n.endswith("." + suffix)]
        if not hits:
            hits = [n for n in linear_names if n == suffix]  # a top-level module named in full (x_embedder)
        if not hits:
            unmatched.append(suffix)
        chosen.extend(hits)
    if unmatched:
        raise ValueError(f"LoRA target(s) {unmatched} match no Linear module of the transformer; presets: "
                         f"{', '.join(PRESET_NAMES)}; or module suffixes such as to_q, ff.net.2, proj_mlp")
    return sorted(set(chosen))


def attach_lora(transformer, rank: int, alpha: float | None, dropout: float, targets, init_seed: int = 0):
    """Add a trainable LoRA adapter; base weights stay frozen. Returns the LoraConfig used."""
    from peft import LoraConfig

    modules = target_modules(transformer, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights=True, target_modules=modules)
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    # adapter weights train in float32 even on a bf16 base
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return config


def trainable_parameters(transformer) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """peft state dict of the adapter with diffusers' `transformer.` prefix, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {f"transformer.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def lora_metadata(transformer, training_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    cfg = transformer.peft_config[ADAPTER_NAME].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    packed = {f"transformer.{k}": v for k, v in cfg.items()}
    meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str),
        "kontext.rank": str(cfg.get("r")),
        "kontext.alpha": str(cfg.get("lora_alpha")),
    }
    if training_config is not None:
        meta["kontext_training_config"] = json.dumps(dict(training_config), sort_keys=True, default=str)
    return meta


def save_lora(transformer, out_dir: Path | str, training_config: Mapping[str, Any] | None = None,
              weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the adapter in diffusers format to `out_dir/weight_name` atomically (temp file + os.replace)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / weight_name
    fd, tmp = tempfile.mkstemp(prefix=f".{weight_name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(lora_state_dict(transformer), tmp, metadata=lora_metadata(transformer, training_config))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_lora_into(transformer, path: Path | str) -> None:
    """Load adapter weights saved by `save_lora` into a transformer that already has the same adapter attached
    (used when resuming)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, sd, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} adapter key(s) do not fit this model, e.g. {unexpected[:3]}")
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
