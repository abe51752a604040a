"""FlashAttention 4 for the training step's attention: `attention_backend: fa4`.

In: diffusers' SDPA calls (`torch.nn.functional.scaled_dot_product_attention`, looked up at call time by its attention
processors). Out: the same attention computed by FlashAttention 4's Hopper/Blackwell kernels (the `flash-attn-4`
package, `flash_attn.cute`), forward and backward, as two opaque custom ops (`kontext::fa4_attention` and its
backward), so torch.compile's regional graphs call them as they call any attention kernel.

Why custom ops and not torch's own flash attention registry (`activate_flash_attention_impl("FA4")`): the registry's
FA4 glue in torch 2.11 expects an older flash-attn-4 interface and fails on the current one ("too many values to
unpack"); these ops use only `_flash_attn_fwd` / `_flash_attn_bwd`, the functions flash-attn-4's own autograd
function calls.

Calls FA4 cannot take (an attention mask, dropout, causal, grouped-query, float32, a head size it does not support,
the CPU) go to the SDPA kernels `auto` picks. `auto` itself uses FA4 where it is installed and passes a self-test, for
sequences of at least AUTO_MIN_TOKENS. Measured on H100s: the whole 1024 px step (8,704 tokens) 0.807 -> 0.767 s and
0.787 -> 0.749 s against cuDNN, same loss; the attention kernel alone (benchmarks/probe_attention.py, diffusers'
layout) within +-4% of cuDNN from 4,096 to 8,704 tokens, 10% faster at 12,800, 10% slower at 2,560 (512 px).
Nothing here imports flash_attn until the first call on the GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kontext_trainer.speed import _SDPA, _sdpa_contiguous_grad, sdpa_replaced

INSTALL = "pip install flash-attn-4 (and nvidia-cutlass-dsl[cu13] with a CUDA 13 build of torch)"
AUTO_MIN_TOKENS = 4096
"""`auto` sends an attention to FA4 from this many tokens on (at 2,560 tokens cuDNN's kernel was 10% faster)."""
_USABLE: dict[int, str | None] = {}  # CUDA device index -> usable()


def problem(device: torch.device | str) -> str | None:
    """Why FlashAttention 4 cannot run on `device` (None when it can): it needs the flash-attn-4 package and a Hopper
    (SM90) or Blackwell (SM100) GPU. Imports nothing from flash_attn."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "FlashAttention 4 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FlashAttention 4 runs on Hopper (SM90) and Blackwell (SM100) GPUs, not SM{major}{minor}"
    try:  # imports the parent package flash_attn: FlashAttention 2's, where that is installed beside it
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn at all
        found = False
    except Exception as exc:  # a broken flash_attn package (e.g. an FA2 build for another torch)
        return f"the flash_attn package fails to import ({type(exc).__name__}: {str(exc)[:200]})"
    if not found:
        return f"flash-attn-4 is not installed: {INSTALL}"
    return None


def _interface():
    # FA4's compiled kernels are kept on disk between runs (its cache is off unless asked for): later starts skip
    # the seconds of compiling. Read when flash_attn.cute is first imported; a user's own setting wins.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    from flash_attn.cute import interface

    return interface


def usable(device: torch.device | str) -> str | None:
    """`problem(device)`, then (once per GPU and process) a self-test: FA4's forward and backward on a small random
    attention against float32 attention. None when FA4 can serve, else why not: a broken or mismatched flash-attn-4
    install makes `auto` fall back instead of failing a step."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return problem(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _USABLE:
        _USABLE[index] = problem(device) or _self_test(torch.device("cuda", index))
    return _USABLE[index]


def _self_test(device: torch.device) -> str | None:
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(1, 2, 256, 128, device=device, generator=g) for _ in range(4))
        got = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
        ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fa4_attention(*(t.transpose(1, 2) for t in got), 128 ** -0.5)[0].transpose(1, 2)
        out.backward(grad.to(torch.bfloat16))
        ref_out = _SDPA(*ref)
        ref_out.backward(grad)
        for a, b in zip([out] + [t.grad for t in got], [ref_out] + [t.grad for t in ref]):
            cos = float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0))
            if not cos > 0.999:
                raise ValueError(f"results differ from float32 attention (cosine {cos:.4f})")
    except Exception as exc:  # any failure of the optional kernels means: do not use them
        return f"FlashAttention 4 failed its self-test here ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("kontext::fa4_attention", mutates_args=(), device_types="cuda")
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (B, N, H, D) q/k/v (FlashAttention's layout): the output (B, N, H, D) and the log-sum-exp
    (B, H, N) float32 its backward needs."""
    out, lse = _interface()._flash_attn_fwd(_dense(q), _dense(k), _dense(v), softmax_scale=scale,
                                            return_lse=True)[:2]
    return out, lse


@fa4_attention.register_fake
def _(q, k, v, scale):
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("kontext::fa4_attention_backward", mutates_args=(), device_types="cuda")
def fa4_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _interface()._flash_attn_bwd(_dense(q), _dense(k), _dense(v), _dense(out), grad.contiguous(), lse,
                                              softmax_scale=scale)[:3]
    return dq, dk, dv


@fa4_attention_backward.register_fake
def _(grad, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_attention_backward(grad, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


fa4_attention.register_autograd(_backward, setup_context=_setup_context)


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
          is_causal: bool = False, enable_gqa: bool = False) -> bool:
    """Whether an SDPA call with these arguments goes to FlashAttention 4 (else to the fallback kernels)."""
    return (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and query.is_cuda
            and query.dim() == 4 and query.dtype in (torch.bfloat16, torch.float16)
            and key.dtype == query.dtype and value.dtype == query.dtype
            and query.shape[1] == key.shape[1] == value.shape[1]
            and query.shape[-1] == key.shape[-1] and query.shape[-1] % 8 == 0 and value.shape[-1] % 8 == 0
            and query.shape[-1] <= 256 and value.shape[-1] <= 256)


def _sdpa_fa4(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              min_tokens: int = 0):
    """SDPA with FlashAttention 4 where `takes` allows (and the sequence has at least min_tokens), else the SDPA
    kernels selected around it, with the contiguous gradient cuDNN needs."""
    if not takes(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) or query.shape[-2] < min_tokens:
        return _sdpa_contiguous_grad(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    s = float(scale) if scale is not None else query.shape[-1] ** -0.5
    out, _ = fa4_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s)
    return out.transpose(1, 2)


def _sdpa_fa4_long(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`auto`'s SDPA: FlashAttention 4 from AUTO_MIN_TOKENS tokens on."""
    return _sdpa_fa4(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, AUTO_MIN_TOKENS)


def sdpa_through_fa4(long_only: bool = False):
    """Within the block, torch.nn.functional.scaled_dot_product_attention goes to FlashAttention 4 (every call it
    takes, or with long_only those of at least AUTO_MIN_TOKENS tokens). Must span forward AND backward."""
    return sdpa_replaced(_sdpa_fa4_long if long_only else _sdpa_fa4)
