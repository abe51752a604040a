"""EMA of the adapter: an exponential moving average of the trainable adapter weights, saved beside the adapter.

In: the transformer's trainable adapter parameters (by name), `ema_decay`, whether to warm up. Out: float32 copies on
the training device, updated after every optimizer step; `pytorch_lora_weights_ema.safetensors` in the adapter's own
key format (so `FluxKontextPipeline.load_lora_weights(dir, weight_name=EMA_WEIGHT_NAME)` reads it); a state for
checkpoints that resumes exactly; the EMA weights swapped into the live adapter for validation and back.

Update rule after optimizer step t (t = 1, 2, ...):

    d_t = min(decay, (1 + (t - 1)) / (10 + (t - 1)))   with warm-up (the default; diffusers' EMAModel schedule)
    d_t = decay                                        without
    ema = d_t * ema + (1 - d_t) * param

The EMA starts as a copy of the initial adapter. The warm-up lets it follow the fast early changes: without it, with
decay 0.999 the EMA at step 100 is still ~90% the initial adapter, which is a no-op for LoRA. d_t depends only on the
optimizer step, which checkpoints keep, so a resumed run's EMA is the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The decay of the update after optimizer step `step` (1 for the first)."""
    if not warmup:
        return float(decay)
    t = max(0, step - 1)
    return min(float(decay), (1 + t) / (10 + t))


class AdapterEMA:
    """float32 shadows of named parameters, on the parameters' device."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay {decay} is not in [0, 1)")
        named = list(named_params)
        self.names = [n for n, _ in named]
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow = [p.detach().to(torch.float32, copy=True) for _, p in named]
        self.step = 0

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter], step: int) -> float:
        """Fold the parameters after optimizer step `step` into the average; returns the decay used."""
        d = ema_decay_at(step, self.decay, self.warmup)
        current = [p.detach().float() for p in params]  # the float32 parameters themselves (no copy), or casts
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, current, alpha=1.0 - d)
        self.step = step
        return d

    # -------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The exact EMA state (float32 shadows on the CPU, decay, warm-up, step) for a checkpoint."""
        return {"decay": self.decay, "warmup": self.warmup, "step": self.step,
                "shadow": {n: t.detach().to("cpu", copy=True) for n, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The shadows of a checkpoint (same adapter); ValueError naming what does not fit. The decay and warm-up
        stay this run's (a resumed run may change them)."""
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        extra = [n for n in shadow if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"the checkpoint's EMA holds other adapter weights ({len(missing)} missing, e.g. "
                             f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
        for i, n in enumerate(self.names):
            if tuple(shadow[n].shape) != tuple(self.shadow[i].shape):
                raise ValueError(f"the checkpoint's EMA weight {n} has shape {tuple(shadow[n].shape)}, the adapter "
                                 f"{tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(shadow[n].to(torch.float32))
        self.step = int(state.get("step", 0))

    # -------------------------------------------------------------------------------- use

    @contextlib.contextmanager
    def applied(self, params: list[torch.nn.Parameter]):
        """The EMA weights in the live parameters (copied in place, in the parameters' dtype: the modules, fused
        projections and compiled graphs see the same tensors), then the training weights back, exactly."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    @contextlib.contextmanager
    def as_parameters(self, params: list[torch.nn.Parameter]):
        """The parameters pointing at the float32 shadows themselves, for reading a state dict (no forward may run
        inside: a bf16 adapter then has float32 tensors), then back to their own tensors."""
        own = [p.data for p in params]
        try:
            for p, s in zip(params, self.shadow):
                p.data = s
            yield
        finally:
            for p, t in zip(params, own):
                p.data = t

    def save(self, transformer, params: list[torch.nn.Parameter], out_dir: Path | str,
             training_config: Mapping[str, Any] | None = None) -> Path:
        """Write `out_dir/EMA_WEIGHT_NAME` in the adapter's diffusers format (same keys and metadata as the adapter
        file), from the float32 shadows."""
        from kontext_trainer import adapters

        meta = dict(training_config or {})
        meta.update(ema_decay=self.decay, ema_warmup=self.warmup, ema_step=self.step)
        with self.as_parameters(params):
            return adapters.save_lora(transformer, out_dir, training_config=meta, weight_name=EMA_WEIGHT_NAME)
