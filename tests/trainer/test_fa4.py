"""FlashAttention 4's kernels as torch ops (kontext_trainer.fa4). The kernels themselves need a Hopper/Blackwell GPU:
they are checked on the GPU by benchmarks/probe_attention.py (outputs and gradients against float32),
bench_train_step.py (loss and gradients against cuDNN) and gpu_e2e.py (kontext-train with attention_backend fa4).
Here: which calls the kernels take, the ops' shapes as torch.compile sees them, and the reasons they cannot run.
Which calls go to them is kontext_trainer.attention's (test_attention.py)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kontext_trainer import fa4


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


def test_on_the_cpu_fa4_is_unavailable_with_a_reason():
    assert "CUDA GPU" in fa4.problem("cpu") and fa4.usable("cpu") == fa4.problem("cpu")
    # a failing install (here: no CPU kernel) is caught by the self-test, not by a training step
    reason = fa4.self_test(torch.device("cpu"))
    assert reason.startswith("FlashAttention 4 failed its self-test here")
