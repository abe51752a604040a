"""FlashAttention 4 routing (kontext_trainer.fa4). The kernels themselves need a Hopper/Blackwell GPU: they are
checked on the GPU by benchmarks/probe_attention.py (outputs and gradients against float32), bench_train_step.py
(loss and gradients against cuDNN) and gpu_e2e.py (kontext-train with attention_backend fa4). Here: which calls go to
FA4, the op's shapes as torch.compile sees them, the fallbacks, and what kontext-train says and plans."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from kontext_trainer import fa4, speed
from kontext_trainer.flow import attention_context

FA4 = "kontext.fa4_attention.default"


def _targets(fn, *shape, dtype=torch.bfloat16, **kwargs) -> set[str]:
    """The ops a forward SDPA call with CUDA tensors of `shape` (B, H, N, D) traces to (fake tensors: no GPU
    needed)."""
    with FakeTensorMode():
        q = torch.empty(*shape, dtype=dtype, device="cuda")
        gm = make_fx(lambda a: fn(a, a, a, **kwargs))(q)
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_long_sequences_go_to_fa4_and_short_ones_to_cudnn_under_auto():
    n = fa4.AUTO_MIN_TOKENS
    assert FA4 in _targets(fa4._sdpa_fa4_long, 1, 24, n, 128)
    short = _targets(fa4._sdpa_fa4_long, 1, 24, n - 16, 128)
    assert FA4 not in short and any("softmax" in t or "attention" in t for t in short)  # PyTorch's own SDPA
    # forced (attention_backend fa4): every call it can take, whatever its length
    assert FA4 in _targets(fa4._sdpa_fa4, 1, 2, 64, 16)


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
    assert FA4 not in _targets(fa4._sdpa_fa4, *shape, dtype=dtype, **kwargs)


def test_grouped_query_and_cpu_tensors_are_not_taken():
    q = torch.empty(1, 4, 4096, 64, dtype=torch.bfloat16)
    assert not fa4.takes(q, q, q)  # CPU
    with FakeTensorMode():
        q = torch.empty(1, 4, 4096, 64, dtype=torch.bfloat16, device="cuda")
        kv = torch.empty(1, 2, 4096, 64, dtype=torch.bfloat16, device="cuda")
        assert fa4.takes(q, q, q)
        assert not fa4.takes(q, kv, kv, enable_gqa=True)


def test_fake_shapes_are_what_the_kernels_return():
    """torch.compile plans memory and layouts from these: (B, N, H, D) out, (B, H, N) float32 log-sum-exp, and
    gradients shaped like q/k/v."""
    with FakeTensorMode():
        q = torch.empty(2, 8704, 24, 128, dtype=torch.bfloat16, device="cuda")
        out, lse = fa4.fa4_attention(q, q, q, 0.1)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 24, 8704) and lse.dtype == torch.float32
        dq, dk, dv = fa4.fa4_attention_backward(out, q, q, q, out, lse, 0.1)
        assert dq.shape == dk.shape == dv.shape == q.shape


def test_on_the_cpu_fa4_is_unavailable_with_a_reason_and_falls_back():
    assert "CUDA GPU" in fa4.problem("cpu") and fa4.usable("cpu") == fa4.problem("cpu")
    # a failing install (here: no CPU kernel) is caught by the self-test, not by a training step
    reason = fa4._self_test(torch.device("cpu"))
    assert reason.startswith("FlashAttention 4 failed its self-test here")
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    with attention_context("fa4", "cpu"):  # the CPU has no such kernels: PyTorch's own attention, same result
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out = fa4._sdpa_fa4(q, k, v)  # CPU tensors through the FA4 entry point: the fallback
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_the_compiled_blocks_keep_the_fa4_output():
    from torch._functorch import partitioners

    assert speed.keep_attention_outputs()
    assert torch.ops.kontext.fa4_attention in partitioners.get_default_op_list().compute_intensive_ops


def test_memory_plan_counts_fa4s_extra_activations():
    """Measured on an H100 (bf16, 8,704 tokens): 42.37 / 34.54 GiB at budgets 0.5 / 0.3 with FA4, 38.15 / 30.5
    with cuDNN, the same elsewhere."""
    tokens = speed.sample_tokens((1024, 1024), [(1024, 1024)])
    cudnn, flash4 = speed.StepShape(tokens), speed.StepShape(tokens, fa4=True)
    for budget, measured in ((0.5, 42.37), (0.3, 34.54), (0.2, 29.58), (0.05, 26.82), (1.0, 59.33)):
        p = flash4.peak_gib(0.0, budget, compiled=True)
        assert measured * 0.98 <= p <= measured * 1.05, (budget, p)
    assert flash4.peak_gib(0.0, 0.5, True) > cudnn.peak_gib(0.0, 0.5, True) + 4
    assert flash4.peak_gib(0.0, 0.2, True) == cudnn.peak_gib(0.0, 0.2, True)
    peaks = [flash4.peak_gib(0.0, b, True) for b in sorted(speed.BUDGETS)]
    assert peaks == sorted(peaks)
    # a 48 GB card: budget 0.5 still fits with FA4's extra (42.5 + 2 GiB headroom)
    assert speed.plan_memory(47.5, flash4, headroom_gib=2.0, compiled=True).budget == 0.5
    assert speed.plan_memory(44.0, flash4, headroom_gib=2.0, compiled=True).budget == 0.3
