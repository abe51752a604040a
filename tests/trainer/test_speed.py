"""Speed levers keep the step's numbers: contiguous attention gradients, partial checkpointing, memory plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kontext_trainer import speed
from kontext_trainer.flow import KontextBatch, kontext_step


def test_contiguous_attention_grads_change_nothing_but_layout():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    k = torch.randn(1, 2, 8, 4, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(q, k, k).permute(0, 2, 1, 3).square().sum().backward()
    expected = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    with speed.contiguous_attention_grads():
        torch.nn.functional.scaled_dot_product_attention(q, k, k).permute(0, 2, 1, 3).square().sum().backward()
    assert torch.equal(q.grad, expected[0]) and torch.equal(k.grad, expected[1])
    assert torch.nn.functional.scaled_dot_product_attention is speed._SDPA  # restored


def _batch(g):
    return KontextBatch(target=torch.randn(1, 4, 8, 8, generator=g), references=[torch.randn(1, 4, 8, 8, generator=g)],
                        prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled=torch.randn(1, 32, generator=g))


def test_partial_checkpointing_selects_blocks_and_keeps_gradients(tiny_model):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    batch = _batch(torch.Generator().manual_seed(0))
    grads = {}
    for fraction in (0.0, 0.5, 1.0):
        n = speed.set_activation_checkpointing(model, fraction)
        assert n == round(fraction * len(speed.transformer_blocks(model)))
        model.zero_grad(set_to_none=True)
        kontext_step(model, batch, torch.Generator().manual_seed(1))
        grads[fraction] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[0.0], grads[0.5], atol=1e-6) and torch.allclose(grads[0.0], grads[1.0], atol=1e-6)
    assert not model.gradient_checkpointing or speed.set_activation_checkpointing(model, 0.0) == 0


def test_memory_plan_matches_the_h100_measurements_and_fits_smaller_cards():
    tokens_1024 = speed.sample_tokens((1024, 1024), [(1024, 1024)])
    assert tokens_1024 == 8704
    shape = speed.StepShape(tokens_1024)
    # measured on an H100 (benchmarks/results, 2026-11-26): (fraction, precision, wide adapter) -> GiB
    measured = {(1.0, "bf16", False): 26.59, (0.5, "bf16", False): 42.01, (0.0, "bf16", False): 58.4,
                (1.0, "int8-quanto", False): 15.61, (1.0, "fp8-matmul", False): 16.42,
                (0.5, "fp8-matmul", False): 31.82, (0.0, "fp8-matmul", False): 48.18,
                (0.6, "fp8-matmul", False): 27.76, (0.85, "fp8-matmul", False): 20.03,
                (1.0, "bf16", True): 28.04, (0.5, "bf16", True): 61.64}
    for (fraction, precision, wide), gib in measured.items():
        predicted = speed.predict_peak_gib(fraction, tokens_1024, precision, wide_adapter=wide)
        assert abs(predicted - gib) / gib < 0.08, (fraction, precision, wide, predicted, gib)
    tokens_512 = speed.sample_tokens((512, 512), [(512, 512)])
    assert abs(speed.predict_peak_gib(0.0, tokens_512) - 33.15) / 33.15 < 0.05
    assert speed.plan_memory(79.2, shape).fraction == 0.0  # an 80 GB card: no checkpointing
    small = speed.plan_memory(32.0, shape)
    assert 0.0 < small.fraction <= 1.0 and small.peak_gib <= 29.0
    assert "int8" in speed.plan_memory(24.0, shape).reason  # bf16 does not fit 24 GB at 1024 px
    assert speed.plan_memory(24.0, dataclasses.replace(shape, precision="int8-quanto")).peak_gib <= 21.0
    # LoKr on attention+ffs ran out of 80 GB without checkpointing; fp8-matmul fits 32 GB with some checkpointed
    assert speed.plan_memory(79.2, dataclasses.replace(shape, wide_adapter=True)).fraction > 0.0
    fp8_32 = speed.plan_memory(32.0, dataclasses.replace(shape, precision="fp8-matmul"))
    assert fp8_32.fraction < 1.0 and fp8_32.peak_gib <= 29.0
    # a model 1e-6 the size (the tiny test model) predicts next to nothing
    assert speed.predict_peak_gib(0.0, tokens_1024, scale=1e-6) < 0.01


def test_memory_plan_for_compiled_blocks_picks_the_largest_activation_budget_that_fits():
    shape = speed.StepShape(speed.sample_tokens((1024, 1024), [(1024, 1024)]))
    # measured on H100s with compiled blocks (fused q/k/v for LoRA) and keep_attention_outputs, no block
    # checkpointing, 1024 px (benchmarks/results/probe_levers-NVIDIA_H100_80GB_HBM3-2026-11-26e-*.json):
    # (budget, precision, wide) -> GiB
    measured = {(1.0, "bf16", False): 59.5, (0.5, "bf16", False): 38.15, (0.3, "bf16", False): 30.53,
                (0.2, "bf16", False): 29.66, (0.05, "bf16", False): 26.79, (1.0, "fp8-matmul", False): 48.37,
                (0.5, "fp8-matmul", False): 27.76, (0.2, "fp8-matmul", False): 19.39,
                (0.05, "fp8-matmul", False): 15.77, (1.0, "int8-quanto", False): 64.21,
                (0.5, "int8-quanto", False): 33.49, (0.3, "int8-quanto", False): 21.32,
                (0.2, "int8-quanto", False): 19.63, (0.05, "int8-quanto", False): 15.9, (0.5, "bf16", True): 59.38,
                (0.2, "bf16", True): 40.02, (0.05, "bf16", True): 31.34, (0.2, "int8-quanto", True): 32.03,
                (0.05, "int8-quanto", True): 20.57}
    for (budget, precision, wide), gib in measured.items():
        predicted = speed.predict_peak_gib(0.0, shape.tokens, precision, wide_adapter=wide, budget=budget,
                                           compiled=True)
        assert -0.02 < (predicted - gib) / gib < 0.05, (budget, precision, wide, predicted, gib)  # never much below
    # LoRA on attention+ffs (measured lower than LoKr) is predicted with LoKr's shares: never below what it took
    for budget, gib in {0.5: 47.85, 0.2: 34.73, 0.05: 28.1}.items():
        assert speed.predict_peak_gib(0.0, shape.tokens, "bf16", wide_adapter=True, budget=budget,
                                      compiled=True) >= gib
    # unmeasured combinations take the largest share measured at that budget: never below a measured one, and
    # never below what the same combination keeps at a lower budget
    for budget in speed.BUDGETS:
        assert speed.predict_peak_gib(0.0, shape.tokens, "fp8-quanto", budget=budget, compiled=True) >= \
            speed.predict_peak_gib(0.0, shape.tokens, "int8-quanto", budget=budget, compiled=True) - 1e-9
    for precision in ("bf16", "fp8-matmul", "int8-quanto"):
        for wide in (False, True):
            peaks = [speed.predict_peak_gib(0.0, shape.tokens, precision, wide_adapter=wide, budget=b, compiled=True)
                     for b in sorted(speed.BUDGETS)]
            assert peaks == sorted(peaks), (precision, wide, peaks)

    def plan(total, s):  # as the trainer plans it: expandable segments, so 2 GiB of headroom
        return speed.plan_memory(total, s, headroom_gib=2.0, compiled=True)

    assert plan(79.2, shape).budget == 1.0  # an 80 GB card keeps everything: 0.81 s/step
    on_48 = plan(48.0, shape)
    assert on_48.budget == 0.5  # 0.886 s at 38.2 GiB
    on_32 = plan(32.0, shape)  # 0.93-0.95 s/step; ran with PyTorch held to 31.3 GiB
    assert on_32.fraction == 0.0 and on_32.budget == 0.2 and on_32.peak_gib <= 30.0 and "budget 0.2" in on_32.reason
    # a 5090's 31.8 GiB still takes budget 0.2; fixed allocator segments (3 GiB of headroom) do not
    assert plan(31.8, shape).budget == 0.2
    assert speed.plan_memory(31.8, shape, headroom_gib=3.0, compiled=True).budget == 0.05
    fp8_32 = plan(32.0, dataclasses.replace(shape, precision="fp8-matmul"))
    assert fp8_32.budget == 0.5 and fp8_32.peak_gib <= 30.0  # 0.78 s/step at 27.8 GiB measured
    int8 = dataclasses.replace(shape, precision="int8-quanto")
    assert plan(24.0, int8).budget == 0.3  # 0.93 s at 21.2 GiB, run with PyTorch held to 23.0 GiB
    assert plan(19.0, int8).budget == 0.05  # 1.06 s at 15.9 GiB
    # int8 without recomputation took 64 GiB (the compiler kept dequantized weights): not planned for a 48 GB card
    assert plan(48.0, int8).budget < 1.0
    lokr = dataclasses.replace(shape, wide_adapter=True)
    assert plan(79.2, lokr).budget == 0.5  # 1.13 s at 59.4 GiB; budget 1: out of memory
    assert plan(24.0, dataclasses.replace(int8, wide_adapter=True)).budget == 0.05
    # nothing fits: every block checkpointed, and the message says what to change
    tiny_card = plan(16.0, shape)
    assert tiny_card.fraction == 1.0 and tiny_card.budget == 1.0 and "fp8-matmul" in tiny_card.reason


def test_expandable_segments_are_set_unless_the_user_configured_the_allocator(monkeypatch):
    """kontext-train lets the CUDA allocator grow segments (the memory plan's headroom assumes it); a user's own
    allocator settings, under either variable name, are left alone."""
    import os

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    speed.use_expandable_segments()
    assert speed.allocator_headroom_gib() == 2.0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    speed.use_expandable_segments()
    assert speed.allocator_headroom_gib() == 3.0
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")
    speed.use_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_allocator_headroom_follows_the_allocator_configuration(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert speed.allocator_headroom_gib() == 2.0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert speed.allocator_headroom_gib() == 3.0
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:256")
    assert speed.allocator_headroom_gib() == 2.0


def test_keep_attention_outputs_counts_cudnn_attention_as_compute_intensive():
    """torch's partitioner weighs recomputing only the ops it lists as compute-intensive; with cuDNN attention
    unlisted it re-ran every attention forward in backward under a memory budget. After the call it is listed
    (next to the flash kernels torch lists itself), the rest of the list is torch's, and a second call wraps
    nothing twice."""
    import torch.fx as fx
    from torch._functorch import partitioners

    def classify(op):
        g = fx.Graph()
        node = g.call_function(op, ())
        return partitioners.get_default_op_list().is_compute_intensive(node)

    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention.default
    assert speed.keep_attention_outputs() is True
    wrapped = partitioners.get_default_op_list
    assert speed.keep_attention_outputs() is True and partitioners.get_default_op_list is wrapped
    assert classify(cudnn)
    assert classify(torch.ops.aten._scaled_dot_product_flash_attention.default)  # torch's own entries stay
    assert classify(torch.ops.aten.mm.default)
    assert not classify(torch.ops.aten.add.Tensor)


def _lora_model_and_eager_step(tiny_model):
    """The tiny model with a LoRA, a batch, and the eager step's loss and LoRA gradients (then zeroed)."""
    from diffusers import FluxTransformer2DModel

    from kontext_trainer import adapters

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention")
    batch = _batch(torch.Generator().manual_seed(0))
    eager = kontext_step(model, batch, torch.Generator().manual_seed(1))
    expected = [p.grad.clone() for p in adapters.trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return model, batch, eager, expected


def test_compiled_blocks_give_the_same_loss_and_gradients(tiny_model):
    from kontext_trainer import adapters

    model, batch, eager, expected = _lora_model_and_eager_step(tiny_model)
    speed.compile_blocks(model)
    compiled = kontext_step(model, batch, torch.Generator().manual_seed(1))
    got = [p.grad for p in adapters.trainable_parameters(model)]
    assert abs(compiled - eager) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, got))


def test_an_activation_memory_budget_recomputes_without_changing_the_numbers(tiny_model):
    """Compiled blocks with a low activation memory budget (the partitioner recomputes most of the forward in
    backward): the same loss and gradients as eager."""
    import torch._functorch.config as fconf

    from kontext_trainer import adapters

    model, batch, eager, expected = _lora_model_and_eager_step(tiny_model)
    with pytest.raises(ValueError, match="memory_budget"):
        speed.compile_blocks(model, memory_budget=0.0)
    before = fconf.activation_memory_budget
    try:
        speed.compile_blocks(model, memory_budget=0.05, backend="aot_eager")  # the partitioner, no codegen
        assert fconf.activation_memory_budget == 0.05
        compiled = kontext_step(model, batch, torch.Generator().manual_seed(1))
    finally:
        fconf.activation_memory_budget = before
        torch._dynamo.reset()
    got = [p.grad for p in adapters.trainable_parameters(model)]
    assert abs(compiled - eager) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, got))


def test_compiles_do_not_grow_with_the_number_of_buckets(tiny_model):
    """Training steps over 3 and then 9 more bucket shapes (target + reference grids of different aspect ratios):
    the blocks compile once per block type for all of them (dynamic sequence length), and every compiled step
    gives the eager step's loss and LoRA gradients."""
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    from kontext_trainer import adapters

    def batch(g, h, w):
        return KontextBatch(target=torch.randn(1, 4, h, w, generator=g), references=[torch.randn(1, 4, h, w, generator=g)],
                            prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled=torch.randn(1, 32, generator=g))

    shapes = [(4, 4), (4, 8), (8, 4), (6, 8), (8, 6), (4, 10), (10, 4), (8, 8), (6, 12), (12, 6), (10, 8), (8, 12)]
    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention")
    params = adapters.trainable_parameters(model)
    eager = []
    for i, (h, w) in enumerate(shapes):
        loss = kontext_step(model, batch(torch.Generator().manual_seed(i), h, w), torch.Generator().manual_seed(i))
        eager.append((loss, [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    graphs = []
    try:
        # aot_eager: dynamo's guards and the partitioner as in training, without inductor's code generation
        speed.compile_blocks(model, backend="aot_eager")
        for i, (h, w) in enumerate(shapes):
            loss = kontext_step(model, batch(torch.Generator().manual_seed(i), h, w), torch.Generator().manual_seed(i))
            assert abs(loss - eager[i][0]) < 1e-5
            assert all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(params, eager[i][1]))
            model.zero_grad(set_to_none=True)
            graphs.append(counters["stats"]["unique_graphs"] - before)
    finally:
        torch._dynamo.reset()
    assert graphs[2] <= 2 * 2  # two block types (double, single); at most one specialization each
    assert graphs[-1] == graphs[2]  # 9 more buckets, no more compiles

def test_offload_plan_takes_the_fewest_blocks_that_fit_and_counts_the_resident_ones():
    gib = 2**30
    sizes = [int(0.34 * gib)] * 19 + [int(0.14 * gib)] * 38  # int8 FLUX: double blocks, then single blocks
    assert speed.blocks_to_offload(sizes, 0.0) == 0
    n = speed.blocks_to_offload(sizes, 1.7)
    # two offloaded blocks are on the device at any time: 8 blocks free 6 x 0.34 = 2.04 GiB, 7 free 1.7 - rounding
    assert n == 8
    assert speed.blocks_to_offload(sizes, 100.0) is None
    shape = speed.StepShape(8704, "int8-quanto")
    fits = speed.plan_memory(80.0, shape, headroom_gib=2.0, compiled=True)
    assert speed.plan_with_offload(fits, 78.0, sizes, shape, compiled=True) is fits  # nothing to offload
    small = speed.plan_memory(12.0, shape, headroom_gib=2.0, compiled=True)
    assert small.peak_gib > 10.0  # int8 at 1024 px does not fit a 12 GB card without offloading
    plan = speed.plan_with_offload(small, 10.0, sizes, shape, compiled=True)
    assert plan.offload_blocks and plan.fraction == 1.0 and plan.peak_gib <= 10.0
    assert f"offloading the first {plan.offload_blocks} of 57 blocks" in plan.reason
    assert speed.plan_with_offload(small, 1.0, sizes, shape, compiled=True) is small  # even all is not enough
