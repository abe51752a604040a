"""Attention selection (kontext_trainer.attention): which SDPA calls go to FlashAttention 4 and which to PyTorch's
kernels, the backends' fallbacks off CUDA, what kontext-train says at start-up, and that the replacements change no
numbers. FlashAttention 4's kernels themselves are tested in test_fa4.py (and on the GPU by the benchmarks)."""

from __future__ import annotations

import typing

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from kontext_trainer import attention, fa4
from kontext_trainer.attention import attention_context

FA4 = "kontext.fa4_attention.default"


def _targets(fn, *shape, dtype=torch.bfloat16, **kwargs) -> set[str]:
    """The ops a forward SDPA call with CUDA tensors of `shape` (B, H, N, D) traces to (fake tensors: no GPU
    needed)."""
    with FakeTensorMode():
        q = torch.empty(*shape, dtype=dtype, device="cuda")
        gm = make_fx(lambda a: fn(a, a, a, **kwargs))(q)
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_long_sequences_go_to_fa4_and_short_ones_to_cudnn_under_auto():
    n = attention.AUTO_MIN_TOKENS
    assert FA4 in _targets(attention.sdpa_fa4_long, 1, 24, n, 128)
    short = _targets(attention.sdpa_fa4_long, 1, 24, n - 16, 128)
    assert FA4 not in short and any("softmax" in t or "attention" in t for t in short)  # PyTorch's own SDPA
    # forced (attention_backend fa4): every call it can take, whatever its length
    assert FA4 in _targets(attention.sdpa_fa4, 1, 2, 64, 16)


@pytest.mark.parametrize("kwargs, shape, dtype", [
    ({"attn_mask": "mask"}, (1, 2, 4096, 64), torch.bfloat16),
    ({"is_causal": True}, (1, 2, 4096, 64), torch.bfloat16),
    ({"dropout_p": 0.1}, (1, 2, 4096, 64), torch.bfloat16),
    ({}, (1, 2, 4096, 64), torch.float32),  # FA4 is bf16/fp16 only
    ({}, (1, 2, 4096, 60), torch.bfloat16),  # head size not a multiple of 8
    ({}, (1, 2, 4096, 512), torch.bfloat16),  # head size over 256
])
def test_calls_fa4_cannot_take_fall_back(kwargs, shape, dtype):
    if kwargs.get("attn_mask") == "mask":
        kwargs = {"attn_mask": None}  # the mask is built inside the fake mode below
        with FakeTensorMode():
            q = torch.empty(*shape, dtype=dtype, device="cuda")
            mask = torch.ones(shape[2], shape[2], dtype=torch.bool, device="cuda")
            assert not fa4.takes(q, q, q, attn_mask=mask)
        return
    assert FA4 not in _targets(attention.sdpa_fa4, *shape, dtype=dtype, **kwargs)


def test_fa4_on_the_cpu_falls_back_to_pytorchs_attention():
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    with attention_context("fa4", "cpu"):  # the CPU has no such kernels: PyTorch's own attention, same result
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out = attention.sdpa_fa4(q, k, v)  # CPU tensors through the FA4 entry point: the fallback
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_contiguous_attention_grads_change_nothing_but_layout():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    k = torch.randn(1, 2, 8, 4, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(q, k, k).permute(0, 2, 1, 3).square().sum().backward()
    expected = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    with attention.contiguous_attention_grads():
        torch.nn.functional.scaled_dot_product_attention(q, k, k).permute(0, 2, 1, 3).square().sum().backward()
    assert torch.equal(q.grad, expected[0]) and torch.equal(k.grad, expected[1])
    assert torch.nn.functional.scaled_dot_product_attention is attention.SDPA  # restored


def test_attention_backend_choice():
    with attention_context("auto", "cpu"):
        pass
    with attention_context("efficient", "cpu"):  # falls back to math on the CPU
        q = torch.randn(1, 2, 4, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match="valid"):
        with attention_context("fastest", "cpu"):
            pass


def test_the_policy_picks_kernels_by_device_and_availability():
    """On a CUDA device without a usable FlashAttention 4 (here: no GPU at all) `auto` is cuDNN with the contiguous
    gradient, then flash / mem-efficient, and `fa4` stops with the reason; off CUDA PyTorch chooses, and forced
    kernels fall back to its math kernels."""
    from torch.nn.attention import SDPBackend

    assert fa4.usable("cuda") is not None  # the tests run without a Hopper/Blackwell GPU
    auto = attention.select("auto", "cuda")
    assert auto.kernels == (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    assert auto.sdpa is attention.sdpa_contiguous_grad
    with pytest.raises(attention.AttentionUnavailable, match="fa4: .*; or set attention_backend auto"):
        attention.select("fa4", "cuda")
    assert attention.select("auto", "cpu") == attention.Selection(None)
    assert attention.select("default", "cuda") == attention.Selection(None)
    assert attention.select("cudnn", "cpu") == attention.Selection((SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH),
                                                                  attention.sdpa_contiguous_grad)
    assert attention.select("math", "cpu") == attention.Selection((SDPBackend.MATH,))
    assert attention.select("flash", "cuda") == attention.Selection((SDPBackend.FLASH_ATTENTION,))
    assert not attention.runs_fa4("auto", "cuda", 100_000) and not attention.runs_fa4("fa4", "cpu", 100_000)


def test_what_kontext_train_says_about_the_attention():
    assert attention.announce("auto", "cpu") is None and attention.announce("default", "cuda") is None
    assert attention.announce("math", "cpu") == ("stage", "attention: math (attention_backend)")
    assert attention.announce("cudnn", "cuda") == ("stage", "attention: cudnn (attention_backend)")
    for backend in attention.CUDA_ONLY:
        assert attention.announce(backend, "cpu") == (
            "warning", f"attention_backend {backend}: no such kernels on cpu; PyTorch's own attention runs there")
    kind, message = attention.announce("auto", "cuda")
    assert kind == "stage" and message.startswith("attention: cuDNN (auto; FlashAttention 4 not used: ")
    with pytest.raises(attention.AttentionUnavailable) as caught:
        attention.announce("fa4", "cuda")
    assert str(caught.value) == f"attention_backend fa4: {fa4.usable('cuda')}; or set attention_backend auto"


def test_the_config_offers_exactly_the_backends():
    from kontext_trainer.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["attention_backend"]) == attention.BACKENDS
