"""LoRA and LoKr adapters (peft) on the Flux transformer: target presets, attaching, saving in diffusers format.

In: a FluxTransformer2DModel and the LoRA settings. Out: the transformer with a trainable peft adapter named
"default", and `pytorch_lora_weights.safetensors` whose keys are `transformer.<module>.lora_A.weight` /
`.lora_B.weight` (what `FluxKontextPipeline.load_lora_weights` reads). The LoRA config (rank, alpha, targets)
is stored in the safetensors metadata under `lora_adapter_metadata`, as diffusers writes it, so alpha != rank
loads with the right scale; the training config goes under `kontext_training_config`.

LoKr (`adapter lokr`, peft's LoKrConfig, LyCORIS' Kronecker adapter): factor 16 on attention modules and 8 on
feed-forward modules, factors as full matrices (SimpleTuner's defaults). Saved in the same file name with keys
`transformer.<module>.lokr_w1` / `.lokr_w2` (`_a`/`_b` when decomposed). diffusers 0.42 reads such a file with
`pipe.transformer.load_lora_adapter(dir, prefix="transformer", weight_name=...)` (`load_adapter` here does it), but
not with `FluxKontextPipeline.load_lora_weights`, which rejects keys without "lora"; diffusers infers one
decomposition factor per file, so a file with two factors (attention+ffs, 16/8) loads through our loader, the
ComfyUI export (`kontext-train export --format comfyui`) and merging, not through diffusers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from kontext_data.fileio import atomic_path

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


ADAPTER_MARKERS = ("lora_", "lokr_")  # names of adapter parameters contain one of these


def _is_adapter_param(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


def _train_adapter_params(transformer, dtype: torch.dtype = torch.float32) -> None:
    for name, p in transformer.named_parameters():
        if _is_adapter_param(name):
            p.data = p.data.to(dtype)
            p.requires_grad_(True)


def is_feed_forward(module_name: str) -> bool:
    """Whether `module_name` is one of the feed-forward Linears (`FEED_FORWARD`), which LoKr gives its own factor."""
    return any(module_name == s or module_name.endswith("." + s) for s in FEED_FORWARD)


def attach_lokr(transformer, targets, factor: int = 16, factor_ff: int = 8, full_matrix: bool = True,
                decompose_both: bool = False, rank: int = 16, alpha: float | None = None, init_seed: int = 0):
    """Add a trainable LoKr adapter (peft LoKrConfig): `factor` on attention modules, `factor_ff` on feed-forward
    ones. full_matrix: both Kronecker factors are full matrices (rank/alpha unused, scale 1); else the second factor
    (and the first with decompose_both) is decomposed with `rank`, scaled alpha/rank. Returns the LoKrConfig."""
    import dataclasses

    from peft import LoKrConfig

    modules = target_modules(transformer, targets)
    if full_matrix:
        linears = [transformer.get_submodule(n) for n in modules]
        r = max(max(m.in_features, m.out_features) for m in linears)
        a = float(r)
    else:
        r, a = rank, float(alpha if alpha is not None else rank)
    config = LoKrConfig(r=r, alpha=a, decompose_factor=factor, decompose_both=decompose_both and not full_matrix,
                        target_modules=modules, init_weights=True)
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
        if factor_ff != factor:
            ff_config = dataclasses.replace(config, decompose_factor=factor_ff)
            for name in modules:
                if not is_feed_forward(name):
                    continue
                layer = transformer.get_submodule(name)
                for params in (layer.lokr_w1, layer.lokr_w1_a, layer.lokr_w1_b, layer.lokr_w2, layer.lokr_w2_a,
                               layer.lokr_w2_b, layer.lokr_t2):
                    if ADAPTER_NAME in params:
                        del params[ADAPTER_NAME]
                layer.update_layer(ADAPTER_NAME, r, a, config=ff_config)
    _train_adapter_params(transformer)
    use_kron_matmul(transformer)
    transformer._kontext_lokr_factors = {"attention": factor, "feed_forward": factor_ff}
    return config


def _lokr_factor(layer, which: str, adapter_name: str) -> torch.Tensor:
    full = getattr(layer, f"lokr_{which}")
    if adapter_name in full:
        return full[adapter_name]
    return getattr(layer, f"lokr_{which}_a")[adapter_name] @ getattr(layer, f"lokr_{which}_b")[adapter_name]


def kron_delta_activations(layer, adapter_name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """What peft's LoKr Linear adds to the base output, `x @ (scale * kron(w1, w2)).T`, without building the
    Kronecker product: with w1 (a0, a1) and w2 (b0, b1), x viewed as (..., a1, b1) gives
    y = scale * w1 @ (x @ w2.T), (..., a0, b0). peft builds the full (out, in) delta in float32 and multiplies the
    float32-cast activations with it: a second full-size matmul per layer in float32 plus a float32 copy of every
    input kept for backward (a 1024 px step on an H200: 10.5 s with peft's path, 1.7 s with this one). Here the factors
    are cast to the activations' dtype, the activations stay as they are, and the work is ~1/15 of a base matmul
    at factor 16. Falls back to peft's path for rank dropout."""
    if (layer.training and layer.rank_dropout[adapter_name]) or adapter_name in layer.lokr_t2:
        from peft.tuners.lokr.layer import Linear as LoKrLinear

        return LoKrLinear._get_delta_activations(layer, adapter_name, x, *args, **kwargs)
    w1 = _lokr_factor(layer, "w1", adapter_name)
    w2 = _lokr_factor(layer, "w2", adapter_name)
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else w2.dtype
    (a0, a1), (b0, b1) = w1.shape, w2.shape
    z = x.to(dtype).reshape(*x.shape[:-1], a1, b1) @ w2.to(dtype).t()  # (..., a1, b0)
    y = torch.einsum("ij,...jk->...ik", (w1 * layer.scaling[adapter_name]).to(dtype), z)
    return y.reshape(*x.shape[:-1], a0 * b0)


def use_kron_matmul(transformer, enable: bool = True) -> int:
    """Route every peft LoKr Linear of `transformer` through `kron_delta_activations` (enable=False: back to
    peft's own full-matrix path, which the benchmark compares against). Returns how many layers changed.

    The layers become `KronLoKrLinear`, a subclass of peft's class that differs only in that method: peft's saving,
    merging and isinstance checks see the same layer, and torch.compile inlines one method for every block (a
    per-layer bound function made each layer recompile)."""
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    return _swap_layer_class(transformer, LoKrLinear, _kron_class() if enable else LoKrLinear)


def _swap_layer_class(transformer, base: type, cls: type) -> int:
    """Give every `base` layer of `transformer` the class `cls` (a subclass of `base`, or `base` itself)."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, base):
            module.__class__ = cls
            n += 1
    return n


@functools.cache
def _kron_class():
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    class KronLoKrLinear(LoKrLinear):
        """peft's LoKr Linear with the Kronecker-factored delta matmul (`kron_delta_activations`)."""

        def _get_delta_activations(self, adapter_name, input, *args, **kwargs):
            return kron_delta_activations(self, adapter_name, input, *args, **kwargs)

        def forward(self, x, *args, **kwargs):
            """peft's forward without its module-dropout coin flip when module dropout is 0 (the flip,
            `torch.rand(1) > p` in a Python `if`, breaks the torch.compile graph at every layer)."""
            active = [a for a in self.active_adapters if a in self._available_adapters]
            if self.disable_adapters or self.merged or any(self.module_dropout[a] for a in active):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for adapter_name in active:
                result = result + self._get_delta_activations(adapter_name, x, *args, **kwargs)
            return result.to(x.dtype)

    return KronLoKrLinear


def attach_from_config(transformer, cfg, init_seed: int | None = None):
    """LoRA or LoKr as `cfg.adapter` says (a TrainConfig). Returns the peft config used."""
    seed = cfg.seed if init_seed is None else init_seed
    if getattr(cfg, "adapter", "lora") == "lokr":
        return attach_lokr(transformer, cfg.lora_targets, factor=cfg.lokr_factor, factor_ff=cfg.lokr_factor_ff,
                           full_matrix=cfg.lokr_full_matrix, decompose_both=cfg.lokr_decompose_both,
                           rank=cfg.lora_rank, alpha=cfg.lora_alpha, init_seed=seed)
    return attach_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, init_seed=seed)


def is_lokr_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether an adapter state dict holds LoKr factors (else LoRA)."""
    return any(".lokr_" in k for k in state_dict)


def load_adapter(pipe, path: Path | str, adapter_name: str | None = None) -> None:
    """Load a LoRA or LoKr file saved by this trainer (a folder or the .safetensors file) into a diffusers Flux
    pipeline: LoRA through `pipe.load_lora_weights`, LoKr through `pipe.transformer.load_lora_adapter` (which
    diffusers 0.42's `FluxKontextPipeline.load_lora_weights` does not route LoKr files to)."""
    from safetensors import safe_open

    path = Path(path)
    folder, weight_name = (path, LORA_WEIGHT_NAME) if path.is_dir() else (path.parent, path.name)
    with safe_open(str(folder / weight_name), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata() or {}
        lokr = any(".lokr_" in k for k in keys)
        factors = json.loads(meta.get("kontext.lokr_factors", "{}"))
        if lokr and len(set(factors.values())) > 1:
            # two factors: diffusers cannot build this; attach the same LoKr ourselves and load the weights
            sd = {k[len("transformer."):]: fh.get_tensor(k) for k in keys if k.startswith("transformer.")}
    if lokr and len(set(factors.values())) > 1:
        from peft.utils import set_peft_model_state_dict

        modules = sorted({k.rpartition(".lokr_")[0] for k in sd})
        decomposed = [k for k in sd if k.endswith(("_a", "_b"))]
        rank = next((v.shape[1] for k, v in sd.items() if k.endswith(("lokr_w2_a", "lokr_w1_a"))), 16)
        alpha = float(meta.get("kontext.alpha", rank)) if decomposed else None
        attach_lokr(pipe.transformer, modules, factor=factors["attention"], factor_ff=factors["feed_forward"],
                    full_matrix=not decomposed, decompose_both=any("lokr_w1_a" in k for k in decomposed),
                    rank=rank, alpha=alpha)
        result = set_peft_model_state_dict(pipe.transformer, sd, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder / weight_name}: keys that fit no module, e.g. {result.unexpected_keys[:3]}")
        pipe.transformer.requires_grad_(False)
    elif lokr:
        pipe.transformer.load_lora_adapter(str(folder), prefix="transformer", weight_name=weight_name,
                                           adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)


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
    _train_adapter_params(transformer)
    use_activation_dtype_lora(transformer)
    return config


def use_activation_dtype_lora(transformer, enable: bool = True) -> int:
    """Compute every peft LoRA Linear of `transformer` in the activations' dtype (enable=False: peft's own forward).

    peft casts each adapted layer's bf16 input to the adapter's float32, runs both LoRA matmuls and the addition to
    the base output in float32, then casts back: per layer, full-size float32 copies of the input and the output
    (written, read, and the input kept for backward), on every one of the ~270 adapted layers of a Kontext step.
    `ActivationDtypeLoraLinear` (a subclass of peft's layer; saving, merging and loading see the same layer) casts
    the two small factors to bf16 instead, as autocast would: the master weights, their gradients and the optimizer
    stay float32. float32 activations (CPU tests), DoRA and other variants, LoRA biases and mixed-adapter batches
    use peft's forward unchanged. Returns how many layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return _swap_layer_class(transformer, LoraLinear, act_dtype_lora_class() if enable else LoraLinear)


@functools.cache
def act_dtype_lora_class():
    """The class `use_activation_dtype_lora` gives peft's LoRA Linear layers (one class per process): peft's layer
    with both LoRA matmuls in the input's half-precision dtype. fuse.py fuses only layers of this class."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class ActivationDtypeLoraLinear(LoraLinear):
        """peft's LoRA Linear with both LoRA matmuls in the input's (half-precision) dtype."""

        def forward(self, x, *args, **kwargs):
            if (x.dtype not in (torch.bfloat16, torch.float16) or self.disable_adapters or self.merged
                    or kwargs.get("adapter_names") is not None or self.lora_variant
                    or any(self.lora_bias.values())):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                h = torch.nn.functional.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype))
                delta = torch.nn.functional.linear(h, self.lora_B[name].weight.to(x.dtype))
                result = result + delta * self.scaling[name]
            return result

    return ActivationDtypeLoraLinear


def trainable_parameters(transformer) -> list[torch.nn.Parameter]:
    """The parameters that train (the adapter's; the base is frozen), in module order."""
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """peft state dict of the adapter with diffusers' `transformer.` prefix, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    # full precision on disk whatever the training dtype (quantized base, adamw_bf16)
    return {f"transformer.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def lora_metadata(transformer, training_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The safetensors metadata of a saved adapter: diffusers' `lora_adapter_metadata` (the peft config, so alpha
    loads right), rank/alpha/adapter kind and LoKr factors under `kontext.*`, and the training config."""
    cfg = transformer.peft_config[ADAPTER_NAME].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    packed = {f"transformer.{k}": v for k, v in cfg.items()}
    meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str),
        "kontext.rank": str(cfg.get("r")),
        "kontext.alpha": str(cfg.get("lora_alpha", cfg.get("alpha"))),
    }
    factors = getattr(transformer, "_kontext_lokr_factors", None)
    if str(cfg.get("peft_type", "")).upper().endswith("LOKR"):
        meta["kontext.adapter"] = "lokr"
        if factors:
            meta["kontext.lokr_factors"] = json.dumps(factors, sort_keys=True)
            if len(set(factors.values())) > 1 and any(is_feed_forward(m) for m in cfg.get("target_modules") or []):
                # one LoKrConfig cannot describe two factors: leave diffusers nothing wrong to read
                del meta["lora_adapter_metadata"]
    if training_config is not None:
        meta["kontext_training_config"] = json.dumps(dict(training_config), sort_keys=True, default=str)
    return meta


def save_lora(transformer, out_dir: Path | str, training_config: Mapping[str, Any] | None = None,
              weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the adapter in diffusers format to `out_dir/weight_name` atomically (`kontext_data.fileio.atomic_path`)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / weight_name
    with atomic_path(path) as tmp:
        save_file(lora_state_dict(transformer), str(tmp), metadata=lora_metadata(transformer, training_config))
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
    _train_adapter_params(transformer)
