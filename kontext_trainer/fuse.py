"""Fused q/k/v projections with their adapters (the guide's `fuse_qkv_projections`).

In: a FluxTransformer2DModel with its adapter attached (and its base converted to fp8-matmul / DequantLinear, if
any). Out: the same model where each attention computes its three input projections in one matmul:

- the base: the to_q/to_k/to_v weights (and the text stream's add_q/k/v_proj) are concatenated into one
  [3 * 3072, 3072] weight, and the three original layers keep views into it, so nothing is stored twice and every
  module name and state-dict key stays as it was;
- LoRA: the three A matrices are stacked ([3r, in]: the input is read once instead of three times) and the three
  B matrices, scaled, form a block-diagonal [3 * out, 3r] matrix whose product is added in the matmul's epilogue
  (`addmm`), so the adapter is exactly the three separate LoRAs: same parameters, same gradients, same saved file.

diffusers' attention processors already know `attn.fused_projections` / `attn.to_qkv` / `attn.to_added_qkv` (its
own `fuse_projections()` drops the adapters); this supplies modules that keep them. Measured on an H100 at
1024 px, compiled, nothing checkpointed: 0.834 -> 0.819 s/step, gradient cosine 0.999997
(benchmarks/results/, docs/performance.md).

Only plain LoRA is fused (no DoRA or other variants, no LoRA bias, no dropout, one adapter, not merged, not
disabled): any other state falls back to the three layers' own forwards, whose base weights are the views.
LoKr layers are left unfused.
"""

from __future__ import annotations

import torch


def _base(layer: torch.nn.Module) -> torch.nn.Module:
    return getattr(layer, "base_layer", layer)


def _row_tensors(base: torch.nn.Module) -> dict[str, torch.Tensor | None] | None:
    """The tensors of a frozen Linear-like base that hold one row per output feature, by attribute name; None for a
    module this cannot fuse."""
    from kontext_trainer.fp8 import Fp8Linear
    from kontext_trainer.quantize import DequantLinear

    if type(base) is torch.nn.Linear and not base.weight.requires_grad:
        return {"weight": base.weight, "bias": base.bias}
    if isinstance(base, Fp8Linear):
        return {"weight_q": base.weight_q, "weight_scale": base.weight_scale, "bias": base.bias}
    if isinstance(base, DequantLinear):
        return {"weight_data": base.weight_data, "weight_scale": base.weight_scale, "bias": base.bias}
    return None


def _lora_class():
    from kontext_trainer.adapters import _act_dtype_lora_class

    return _act_dtype_lora_class()


def _fusable(layers) -> bool:
    parts = [_row_tensors(_base(m)) for m in layers]
    if any(p is None for p in parts) or len({type(_base(m)) for m in layers}) != 1:
        return False
    if len({m.in_features for m in map(_base, layers)}) != 1:
        return False
    if any((p["bias"] is None) != (parts[0]["bias"] is None) for p in parts):
        return False
    wrapped = [hasattr(m, "base_layer") for m in layers]  # any peft adapter layer (LoRA, LoKr, ...)
    if any(wrapped) and not (all(wrapped) and all(isinstance(m, _lora_class()) for m in layers)):
        return False  # LoKr or another adapter type, or only some of the three adapted
    return True


class FusedProjection(torch.nn.Module):
    """One matmul for several projections of the same input, their plain LoRAs included (see the module docstring).

    The layers are held in a tuple, not as submodules: they stay registered where they were (state dict, saving,
    loading), and this module adds only the concatenated base tensors, as buffers. Moving the model to another
    device after fusing copies views and fused tensors separately: fuse on the training device."""

    def __init__(self, layers):
        super().__init__()
        self._layers = tuple(layers)
        bases = [_base(m) for m in layers]
        rows = [_row_tensors(b) for b in bases]
        self.out_features = sum(b.out_features for b in bases)
        self.in_features = bases[0].in_features
        fused = {k: None if rows[0][k] is None else torch.cat([r[k].detach() for r in rows])
                 for k in rows[0]}
        if type(bases[0]) is torch.nn.Linear:  # buffers, not Parameters: parameter counts see the weights once
            self.base = None
            self.register_buffer("weight", fused["weight"])
            self.register_buffer("bias", fused["bias"])
        else:
            self.base = type(bases[0])(*fused.values())
        start = 0
        for b in bases:  # the originals become views into the fused tensors: nothing is stored twice
            stop = start + b.out_features
            for k, t in fused.items():
                if t is None:
                    continue
                view = t[start:stop]
                if isinstance(getattr(b, k), torch.nn.Parameter):
                    setattr(b, k, torch.nn.Parameter(view, requires_grad=False))
                else:
                    setattr(b, k, view)
            start = stop

    def _lora_ready(self, x: torch.Tensor) -> bool:
        from kontext_trainer.adapters import ADAPTER_NAME

        for m in self._layers:
            if (x.dtype not in (torch.bfloat16, torch.float16) or m.disable_adapters or m.merged or m.lora_variant
                    or any(m.lora_bias.values()) or list(m.active_adapters) != [ADAPTER_NAME]
                    or ADAPTER_NAME not in m.lora_A or not isinstance(m.lora_dropout[ADAPTER_NAME],
                                                                      torch.nn.Identity)):
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kontext_trainer.adapters import ADAPTER_NAME

        adapted = hasattr(self._layers[0], "base_layer")
        if adapted and not self._lora_ready(x):
            return torch.cat([m(x) for m in self._layers], dim=-1)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.nn.functional.linear(x2, self.weight, self.bias) if self.base is None else self.base(x2)
        if adapted:
            a = torch.cat([m.lora_A[ADAPTER_NAME].weight for m in self._layers]).to(x.dtype)
            b = torch.block_diag(*[m.lora_B[ADAPTER_NAME].weight * m.scaling[ADAPTER_NAME]
                                   for m in self._layers]).to(x.dtype)
            y = torch.addmm(y, torch.nn.functional.linear(x2, a), b.t())
        return y.view(*shape[:-1], self.out_features)


def fuse_qkv(model: torch.nn.Module) -> int:
    """Give every FluxAttention of `model` fused projections (to_qkv, and to_added_qkv where it has a text stream)
    and switch the processor to them. Attentions whose layers cannot be fused (LoKr, mixed bases) are left as they
    are. Returns how many attentions were fused."""
    n = 0
    for mod in model.modules():
        if type(mod).__name__ != "FluxAttention" or getattr(mod, "fused_projections", False):
            continue
        groups = [("to_qkv", [mod.to_q, mod.to_k, mod.to_v])]
        if getattr(mod, "added_kv_proj_dim", None) is not None:
            groups.append(("to_added_qkv", [mod.add_q_proj, mod.add_k_proj, mod.add_v_proj]))
        if not all(_fusable(layers) for _, layers in groups):
            continue
        for attr, layers in groups:
            setattr(mod, attr, FusedProjection(layers))
        mod.fused_projections = True
        n += 1
    return n
