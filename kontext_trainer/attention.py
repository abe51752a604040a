"""Which attention kernels the training step runs: the one place that knows the backends and picks among them.

In: `attention_backend` (one of BACKENDS) and the training device. Out: `attention_context(backend, device)`, the
context every step, evaluation and validation runs its forward AND backward in (gradient checkpointing recomputes the
forward inside backward, so it must span both); `announce` (what kontext-train says about it at start-up, or why
`fa4` cannot run) and `runs_fa4` (whether FlashAttention 4 serves a sample of so many tokens: the memory plan
counts its extra share).

The auto policy (`select`): on CUDA, FlashAttention 4 (kontext_trainer.fa4) for sequences of at least
AUTO_MIN_TOKENS where flash-attn-4 is installed and passes its self-test, and below that (or without it) cuDNN
attention with a contiguous gradient, then flash / mem-efficient; elsewhere PyTorch's default. `flash`,
`efficient`, `math`, `cudnn` force one kernel family (plus PyTorch's math kernels off CUDA, which has none of
theirs); `fa4` uses FlashAttention 4 for every call it takes (auto's kernels for the others) and fails clearly
where it cannot run; `default` leaves PyTorch's choice.

How the kernels are switched: torch's `sdpa_kernel` picks among PyTorch's own SDPA kernels; for the rest this module
replaces `torch.nn.functional.scaled_dot_product_attention` within the context (`sdpa_replaced`: diffusers'
attention processors look it up at call time), with `sdpa_contiguous_grad` (cuDNN's backward crashed with an illegal
memory access on H100 on the strided gradient diffusers hands it: diffusers permutes the attention output; with a
contiguous one the cuDNN kernels, ~1.9x faster than FA2 at 8.7k tokens, are usable in training; verified on an H100
to give the same loss and LoRA gradients as flash, cosine 1.0000, at ~1.2x the step speed) or with `sdpa_fa4` /
`sdpa_fa4_long` (FlashAttention 4 where it takes the call, else the former). Measured on H100s with FA4: the whole
1024 px step (8,704 tokens) 0.807 -> 0.767 s and 0.787 -> 0.749 s against cuDNN, same loss; the attention kernel
alone within +-4% of cuDNN from 4,096 to 8,704 tokens, 10% faster at 12,800, 10% slower at 2,560 (512 px): hence
AUTO_MIN_TOKENS.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from kontext_trainer import fa4
from kontext_trainer.config import ATTENTION_BACKENDS

BACKENDS = ATTENTION_BACKENDS
"""Every `attention_backend` value, in the order messages list them (declared once, in the config schema)."""
CUDA_ONLY = ("flash", "efficient", "cudnn", "fa4")
"""Backends whose kernels exist only on CUDA: elsewhere PyTorch's own (math) attention runs instead."""
AUTO_MIN_TOKENS = 4096
"""`auto` sends an attention to FA4 from this many tokens on (at 2,560 tokens cuDNN's kernel was 10% faster)."""

SDPA = torch.nn.functional.scaled_dot_product_attention
"""PyTorch's own SDPA, as it was when this module was imported: what the replacements call."""


class AttentionUnavailable(RuntimeError):
    """`attention_backend fa4` where FlashAttention 4 cannot run; the message says why and what to set instead."""

    def __init__(self, problem: str):
        super().__init__(f"attention_backend fa4: {problem}; or set attention_backend auto")
        self.problem = problem


# ------------------------------------------------------------------------------------------ the SDPA patch point


@contextlib.contextmanager
def sdpa_replaced(fn: Callable) -> Iterator[None]:
    """Within the block, torch.nn.functional.scaled_dot_product_attention is `fn` (diffusers looks it up at call
    time). `fn` should be a module-level function: torch.compile's guards then see the same callable every step.
    Must span forward AND backward (gradient checkpointing re-runs the forward inside backward)."""
    previous = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fn
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = previous


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous copy of the incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def sdpa_contiguous_grad(*args, **kwargs) -> torch.Tensor:
    """SDPA whose backward receives a contiguous gradient (what cuDNN attention's backward needs)."""
    return ContiguousGrad.apply(SDPA(*args, **kwargs))


def contiguous_attention_grads():
    """Within the block, every torch.nn.functional.scaled_dot_product_attention call passes a contiguous gradient to
    the attention backward. Must span forward AND backward."""
    return sdpa_replaced(sdpa_contiguous_grad)


def sdpa_fa4(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             min_tokens: int = 0) -> torch.Tensor:
    """SDPA with FlashAttention 4 where `fa4.takes` allows (and the sequence has at least min_tokens), else the SDPA
    kernels selected around it, with the contiguous gradient cuDNN needs."""
    if (not fa4.takes(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
            or query.shape[-2] < min_tokens):
        return sdpa_contiguous_grad(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    s = float(scale) if scale is not None else query.shape[-1] ** -0.5
    out, _ = fa4.fa4_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s)
    return out.transpose(1, 2)


def sdpa_fa4_long(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> torch.Tensor:
    """`auto`'s SDPA: FlashAttention 4 from AUTO_MIN_TOKENS tokens on."""
    return sdpa_fa4(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, AUTO_MIN_TOKENS)


# ------------------------------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class Selection:
    """What attention_context applies: the SDPA kernels allowed (None: PyTorch's own choice, nothing replaced) and
    the function that replaces SDPA within the context (None: SDPA itself)."""

    kernels: tuple | None
    sdpa: Callable | None = None


def select(backend: str, device: torch.device | str) -> Selection:
    """The auto policy and the forced backends (module docstring). Raises ValueError for a name not in BACKENDS and
    AttentionUnavailable for `fa4` on a CUDA device where FlashAttention 4 cannot run."""
    from torch.nn.attention import SDPBackend

    dev = torch.device(device).type
    forced = {
        "flash": (SDPBackend.FLASH_ATTENTION,),
        "efficient": (SDPBackend.EFFICIENT_ATTENTION,),
        "math": (SDPBackend.MATH,),
        "cudnn": (SDPBackend.CUDNN_ATTENTION,),
        "fa4": (SDPBackend.FLASH_ATTENTION,),  # on the CPU; on CUDA see below
    }
    if backend == "default" or (backend == "auto" and dev != "cuda"):
        return Selection(None)
    if backend in ("auto", "fa4") and dev == "cuda":
        # FlashAttention 4 where installed and working (auto: for long sequences only, where it is the fastest),
        # else / below that cuDNN with the contiguous gradient, flash / mem-efficient where cuDNN is missing
        kernels = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
        problem = fa4.usable(device)
        if problem is None:
            return Selection(kernels, sdpa_fa4_long if backend == "auto" else sdpa_fa4)
        if backend == "fa4":
            raise AttentionUnavailable(problem)
        return Selection(kernels, sdpa_contiguous_grad)
    if backend not in forced:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    kernels = forced[backend]
    if dev != "cuda" and backend in CUDA_ONLY:
        kernels = kernels + (SDPBackend.MATH,)  # the CPU has no fused kernels of that name; let it fall back
    return Selection(kernels, sdpa_contiguous_grad if backend == "cudnn" else None)


@contextlib.contextmanager
def attention_context(backend: str, device: torch.device | str) -> Iterator[None]:
    """Run the block's SDPA calls on the kernels `select(backend, device)` picks. Must span forward AND backward."""
    from torch.nn.attention import sdpa_kernel

    selection = select(backend, device)
    if selection.kernels is None:
        yield
        return
    replaced = sdpa_replaced(selection.sdpa) if selection.sdpa else contextlib.nullcontext()
    with sdpa_kernel(list(selection.kernels)), replaced:
        yield


def announce(backend: str, device: torch.device | str) -> tuple[str, str] | None:
    """What kontext-train says at start-up about the attention its steps will run: ("warning", message) for kernels
    the device does not have, ("stage", message) for a choice worth stating, None for PyTorch's default. Raises
    AttentionUnavailable for `fa4` where FlashAttention 4 cannot run (checked before any caching)."""
    dev = torch.device(device).type
    if dev != "cuda" and backend in CUDA_ONLY:
        return "warning", f"attention_backend {backend}: no such kernels on {dev}; PyTorch's own attention runs there"
    if dev != "cuda" or backend not in ("auto", "fa4"):
        return None if backend in ("auto", "default") else ("stage", f"attention: {backend} (attention_backend)")
    problem = fa4.usable(device)
    if backend == "fa4":
        if problem:
            raise AttentionUnavailable(problem)
        return "stage", "attention: FlashAttention 4 (attention_backend fa4)"
    if problem:
        return "stage", f"attention: cuDNN (auto; FlashAttention 4 not used: {problem})"
    return "stage", f"attention: FlashAttention 4 from {AUTO_MIN_TOKENS:,} tokens per sample, cuDNN below (auto)"


def runs_fa4(backend: str, device: torch.device | str, tokens: int) -> bool:
    """Whether an attention over `tokens` tokens runs FlashAttention 4 under `backend` on `device`."""
    if torch.device(device).type != "cuda" or backend not in ("auto", "fa4") or fa4.usable(device):
        return False
    return backend == "fa4" or tokens >= AUTO_MIN_TOKENS
