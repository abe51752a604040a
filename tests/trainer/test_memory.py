"""The memory plan and its levers keep the step's numbers: partial checkpointing, the memory model against the H100
measurements, the allocator setting and its headroom, block offload planning."""

from __future__ import annotations

import dataclasses

import torch

from conftest import tiny_batch
from kontext_trainer import memory
from kontext_trainer.flow import kontext_step
from kontext_trainer.model import transformer_blocks


def test_partial_checkpointing_selects_blocks_and_keeps_gradients(tiny_model):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    batch = tiny_batch(torch.Generator().manual_seed(0))
    grads = {}
    for fraction in (0.0, 0.5, 1.0):
        n = memory.set_activation_checkpointing(model, fraction)
        assert n == round(fraction * len(transformer_blocks(model)))
        model.zero_grad(set_to_none=True)
        kontext_step(model, batch, torch.Generator().manual_seed(1))
        grads[fraction] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[0.0], grads[0.5], atol=1e-6) and torch.allclose(grads[0.0], grads[1.0], atol=1e-6)
    assert not model.gradient_checkpointing or memory.set_activation_checkpointing(model, 0.0) == 0


def test_memory_plan_matches_the_h100_measurements_and_fits_smaller_cards():
    tokens_1024 = memory.sample_tokens((1024, 1024), [(1024, 1024)])
    assert tokens_1024 == 8704
    shape = memory.StepShape(tokens_1024)
    # measured on an H100 (benchmarks/results, 2026-11-26): (fraction, precision, wide adapter) -> GiB
    measured = {(1.0, "bf16", False): 26.59, (0.5, "bf16", False): 42.01, (0.0, "bf16", False): 58.4,
                (1.0, "int8-quanto", False): 15.61, (1.0, "fp8-matmul", False): 16.42,
                (0.5, "fp8-matmul", False): 31.82, (0.0, "fp8-matmul", False): 48.18,
                (0.6, "fp8-matmul", False): 27.76, (0.85, "fp8-matmul", False): 20.03,
                (1.0, "bf16", True): 28.04, (0.5, "bf16", True): 61.64}
    for (fraction, precision, wide), gib in measured.items():
        predicted = memory.predict_peak_gib(fraction, tokens_1024, precision, wide_adapter=wide)
        assert abs(predicted - gib) / gib < 0.08, (fraction, precision, wide, predicted, gib)
    tokens_512 = memory.sample_tokens((512, 512), [(512, 512)])
    assert abs(memory.predict_peak_gib(0.0, tokens_512) - 33.15) / 33.15 < 0.05
    assert memory.plan_memory(79.2, shape).fraction == 0.0  # an 80 GB card: no checkpointing
    small = memory.plan_memory(32.0, shape)
    assert 0.0 < small.fraction <= 1.0 and small.peak_gib <= 29.0
    assert "int8" in memory.plan_memory(24.0, shape).reason  # bf16 does not fit 24 GB at 1024 px
    assert memory.plan_memory(24.0, dataclasses.replace(shape, precision="int8-quanto")).peak_gib <= 21.0
    # LoKr on attention+ffs ran out of 80 GB without checkpointing; fp8-matmul fits 32 GB with some checkpointed
    assert memory.plan_memory(79.2, dataclasses.replace(shape, wide_adapter=True)).fraction > 0.0
    fp8_32 = memory.plan_memory(32.0, dataclasses.replace(shape, precision="fp8-matmul"))
    assert fp8_32.fraction < 1.0 and fp8_32.peak_gib <= 29.0
    # a model 1e-6 the size (the tiny test model) predicts next to nothing
    assert memory.predict_peak_gib(0.0, tokens_1024, scale=1e-6) < 0.01


def test_memory_plan_for_compiled_blocks_picks_the_largest_activation_budget_that_fits():
    shape = memory.StepShape(memory.sample_tokens((1024, 1024), [(1024, 1024)]))
    # measured on an H100 with the blocks compiled as kontext-train compiles them (fused q/k/v for LoRA,
    # keep_attention_outputs, steady_block_inputs), no block checkpointing, 1024 px
    # (benchmarks/results/probe_levers-NVIDIA_H100_80GB_HBM3-2026-12-05{a,b,c}-*.json; bf16 at 1: the whole run,
    # full_run-...-2026-12-05-e.json; fp8-matmul and int8 at 1: -2026-11-26e-*.json): (budget, precision, wide) -> GiB
    measured = {(1.0, "bf16", False): 59.38, (0.5, "bf16", False): 40.6, (0.3, "bf16", False): 36.05,
                (0.2, "bf16", False): 30.55, (0.05, "bf16", False): 29.61, (1.0, "fp8-matmul", False): 48.37,
                (0.5, "fp8-matmul", False): 27.71, (0.2, "fp8-matmul", False): 19.45,
                (0.05, "fp8-matmul", False): 18.56, (1.0, "int8-quanto", False): 64.21,
                (0.5, "int8-quanto", False): 33.38, (0.3, "int8-quanto", False): 27.69,
                (0.2, "int8-quanto", False): 21.05, (0.05, "int8-quanto", False): 18.65, (0.5, "bf16", True): 62.21,
                (0.2, "bf16", True): 42.86, (0.05, "bf16", True): 34.1, (0.2, "int8-quanto", True): 34.8,
                (0.05, "int8-quanto", True): 23.38}
    for (budget, precision, wide), gib in measured.items():
        predicted = memory.predict_peak_gib(0.0, shape.tokens, precision, wide_adapter=wide, budget=budget,
                                           compiled=True)
        assert -0.02 < (predicted - gib) / gib < 0.05, (budget, precision, wide, predicted, gib)  # never much below
    # LoRA on attention+ffs (measured lower than LoKr) is predicted with LoKr's shares: never below what it took
    for budget, gib in {0.5: 47.85, 0.2: 34.73, 0.05: 28.1}.items():
        assert memory.predict_peak_gib(0.0, shape.tokens, "bf16", wide_adapter=True, budget=budget,
                                      compiled=True) >= gib
    # unmeasured combinations take the largest share measured at that budget: never below a measured one, and
    # never below what the same combination keeps at a lower budget
    for budget in memory.BUDGETS:
        assert memory.predict_peak_gib(0.0, shape.tokens, "fp8-quanto", budget=budget, compiled=True) >= \
            memory.predict_peak_gib(0.0, shape.tokens, "int8-quanto", budget=budget, compiled=True) - 1e-9
    for precision in ("bf16", "fp8-matmul", "int8-quanto"):
        for wide in (False, True):
            peaks = [memory.predict_peak_gib(0.0, shape.tokens, precision, wide_adapter=wide, budget=b, compiled=True)
                     for b in sorted(memory.BUDGETS)]
            assert peaks == sorted(peaks), (precision, wide, peaks)

    def plan(total, s):  # as the trainer plans it: expandable segments, so 2 GiB of headroom
        return memory.plan_memory(total, s, headroom_gib=2.0, compiled=True)

    assert plan(79.2, shape).budget == 1.0  # an 80 GB card keeps everything: 0.81 s/step
    on_48 = plan(48.0, shape)
    assert on_48.budget == 0.5  # 0.881 s at 40.6 GiB
    # a 32 GB card (a 5090's 31.8 GiB too): budget 0.2 took 30.55 GiB, over 32 less 2 GiB of headroom; 0.05 took
    # 29.6 GiB at the same 0.933 s/step
    for card in (32.0, 31.8):
        on_32 = plan(card, shape)
        assert on_32.fraction == 0.0 and on_32.budget == 0.05 and on_32.peak_gib <= 30.0
        assert "budget 0.05" in on_32.reason
    # with fixed allocator segments (3 GiB of headroom) nothing compiled fits 32 GB: every block checkpointed
    assert memory.plan_memory(31.8, shape, headroom_gib=3.0, compiled=True).fraction == 1.0
    fp8_32 = plan(32.0, dataclasses.replace(shape, precision="fp8-matmul"))
    assert fp8_32.budget == 0.5 and fp8_32.peak_gib <= 30.0  # 0.749 s/step at 27.7 GiB measured
    int8 = dataclasses.replace(shape, precision="int8-quanto")
    on_24 = plan(24.0, int8)  # the whole run with PyTorch held to 23.2 GiB: 0.935 s/step, 21.1 GiB (22.7 reserved)
    assert on_24.budget == 0.2 and on_24.peak_gib >= 21.05
    assert plan(21.0, int8).budget == 0.05  # 0.955 s at 18.65 GiB
    assert plan(19.0, int8).fraction == 1.0  # below that, every block checkpointed (15.6 GiB)
    # int8 without recomputation took 64 GiB (the compiler kept dequantized weights): not planned for a 48 GB card
    assert plan(48.0, int8).budget < 1.0
    lokr = dataclasses.replace(shape, wide_adapter=True)
    assert plan(79.2, lokr).budget == 0.5  # 1.08 s at 62.2 GiB; budget 1: out of memory
    assert plan(26.0, dataclasses.replace(int8, wide_adapter=True)).budget == 0.05  # 1.24 s at 23.4 GiB
    assert plan(24.0, dataclasses.replace(int8, wide_adapter=True)).fraction == 1.0
    # nothing fits: every block checkpointed, and the message says what to change
    tiny_card = plan(16.0, shape)
    assert tiny_card.fraction == 1.0 and tiny_card.budget == 1.0 and "fp8-matmul" in tiny_card.reason


def test_memory_plan_counts_fa4s_extra_activations():
    """Measured on an H100 with the compile set-up of 2026-11-26 (bf16, 8,704 tokens): 42.37 / 34.54 GiB at budgets
    0.5 / 0.3 with FA4, 38.15 / 30.5 with cuDNN then, the same elsewhere. cuDNN's blocks take more now; the FA4
    prediction (cuDNN's share now plus FA4's extra) stays above what FA4 took, by at most 17%."""
    tokens = memory.sample_tokens((1024, 1024), [(1024, 1024)])
    cudnn, flash4 = memory.StepShape(tokens), memory.StepShape(tokens, fa4=True)
    for budget, measured in ((0.5, 42.37), (0.3, 34.54), (0.2, 29.58), (0.05, 26.82), (1.0, 59.33)):
        p = flash4.peak_gib(0.0, budget, compiled=True)
        assert measured * 0.98 <= p <= measured * 1.17, (budget, p)
    assert flash4.peak_gib(0.0, 0.5, True) > cudnn.peak_gib(0.0, 0.5, True) + 4
    assert flash4.peak_gib(0.0, 0.2, True) == cudnn.peak_gib(0.0, 0.2, True)
    peaks = [flash4.peak_gib(0.0, b, True) for b in sorted(memory.BUDGETS)]
    assert peaks == sorted(peaks)
    # a 48 GB card: budget 0.5 still fits with FA4's extra (42.5 + 2 GiB headroom)
    assert memory.plan_memory(47.5, flash4, headroom_gib=2.0, compiled=True).budget == 0.5
    assert memory.plan_memory(44.0, flash4, headroom_gib=2.0, compiled=True).budget == 0.3


def test_expandable_segments_are_set_unless_the_user_configured_the_allocator(monkeypatch):
    """kontext-train lets the CUDA allocator grow segments (the memory plan's headroom assumes it); a user's own
    allocator settings, under either variable name, are left alone."""
    import os

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    memory.use_expandable_segments()
    assert memory.allocator_headroom_gib() == 2.0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    memory.use_expandable_segments()
    assert memory.allocator_headroom_gib() == 3.0
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")
    memory.use_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_allocator_headroom_follows_the_allocator_configuration(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert memory.allocator_headroom_gib() == 2.0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert memory.allocator_headroom_gib() == 3.0
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:256")
    assert memory.allocator_headroom_gib() == 2.0


def test_offload_plan_takes_the_fewest_blocks_that_fit_and_counts_the_resident_ones():
    gib = 2**30
    sizes = [int(0.34 * gib)] * 19 + [int(0.14 * gib)] * 38  # int8 FLUX: double blocks, then single blocks
    assert memory.blocks_to_offload(sizes, 0.0) == 0
    n = memory.blocks_to_offload(sizes, 1.7)
    # two offloaded blocks are on the device at any time: 8 blocks free 6 x 0.34 = 2.04 GiB, 7 free 1.7 - rounding
    assert n == 8
    assert memory.blocks_to_offload(sizes, 100.0) is None
    shape = memory.StepShape(8704, "int8-quanto")
    fits = memory.plan_memory(80.0, shape, headroom_gib=2.0, compiled=True)
    assert memory.plan_with_offload(fits, 78.0, sizes, shape, compiled=True) is fits  # nothing to offload
    small = memory.plan_memory(12.0, shape, headroom_gib=2.0, compiled=True)
    assert small.peak_gib > 10.0  # int8 at 1024 px does not fit a 12 GB card without offloading
    plan = memory.plan_with_offload(small, 10.0, sizes, shape, compiled=True)
    assert plan.offload_blocks and plan.fraction == 1.0 and plan.peak_gib <= 10.0
    assert f"offloading the first {plan.offload_blocks} of 57 blocks" in plan.reason
    assert memory.plan_with_offload(small, 1.0, sizes, shape, compiled=True) is small  # even all is not enough


def test_the_plan_leaves_other_processes_their_share_of_the_card():
    """A 24 GB card whose desktop holds 1.5 GiB: the plan counts the rest, and the int8 step then takes a lower
    activation budget than on an idle card; this process's own allocator and context are not counted as others."""
    gib = 2**30
    total = int(23.99 * gib)
    idle = memory.others_on_card_gib(total, total - int(0.6 * gib), 0)  # only this process's context
    assert idle == 0.0
    ours = memory.others_on_card_gib(total, total - int(0.8 * gib) - 5 * gib, 5 * gib)  # 5 GiB in our allocator
    assert ours == 0.0
    desktop = memory.others_on_card_gib(total, total - int((0.85 + 1.5) * gib), 0)
    assert abs(desktop - 1.5) < 1e-6
    shape = memory.StepShape(memory.sample_tokens((1024, 1024), [(1024, 1024)]), precision="int8-quanto")
    alone = memory.plan_memory(23.99, shape, headroom_gib=2.0, compiled=True)
    shared = memory.plan_memory(23.99 - desktop, shape, headroom_gib=2.0, compiled=True)
    assert alone.budget == 0.2 and shared.budget == 0.05
    assert shared.peak_gib <= 23.99 - desktop - 2.0


def test_out_of_memory_advice_fits_the_phase_and_the_plan():
    budget = memory.MemoryPlan(0.0, 21.1, "compiled blocks with activation memory budget 0.2", 0.2)
    tips = memory.out_of_memory_advice("training", budget, "int8-quanto", 57)
    assert tips[0].startswith("--set activation_memory_budget=0.05")
    assert any(t.startswith("--set offload_blocks=7 ") for t in tips)  # none offloaded: a first few
    assert not any("int8-quanto" in t for t in tips)  # already quantized
    offloaded = memory.MemoryPlan(1.0, 13.2, "checkpointing every block and offloading 10", 1.0, 10)
    tips = memory.out_of_memory_advice("training", offloaded, "bf16", 57)
    assert "activation_memory_budget" not in " ".join(tips)  # nothing compiled keeps activations here
    assert any(t.startswith("--set offload_blocks=17 ") for t in tips) and any("int8-quanto" in t for t in tips)
    everything = memory.MemoryPlan(1.0, 9.0, "offloading all", 1.0, 57)
    assert "offload_blocks" not in " ".join(memory.out_of_memory_advice("training", everything, "int8-quanto", 57))
    assert "vae_tiling=true" in " ".join(memory.out_of_memory_advice("validation", budget, "bf16", 57))
    assert "cache_batch_size=1" in " ".join(memory.out_of_memory_advice("text cache", None, "bf16", 57))
    assert memory.out_of_memory_advice("model load", None, "int8-quanto", 57)[0].startswith("--quantize-on cpu")


def test_a_bf16_base_that_must_offload_is_told_what_int8_would_run_instead():
    """bf16 at 1024 px on a 24 GB card offloads blocks; int8-quanto fits there with compiled blocks alone, and the
    start-up hint says so. Nothing to say when bf16 fits or when the base is already int8."""
    gib = 2**30
    bf16 = [int(0.68 * gib)] * 19 + [int(0.28 * gib)] * 38  # FLUX's double blocks, then its single blocks
    int8 = [n // 2 for n in bf16]
    shape = memory.StepShape(8704, "bf16")
    card, headroom = 23.2, 2.0
    plan = memory.plan_with_offload(memory.plan_memory(card, shape, headroom_gib=headroom, compiled=True),
                                    card - headroom, bf16, shape, compiled=True)
    assert plan.offload_blocks > 0
    hint = memory.quantized_instead(plan, "bf16", card, headroom, shape, int8, compiled=True)
    assert hint.startswith(f"a bf16 base fits this card only with {plan.offload_blocks} blocks offloaded")
    assert "--base-precision int8-quanto" in hint and "activation memory budget" in hint and "offloading" not in hint
    big = memory.plan_memory(80.0, shape, headroom_gib=headroom, compiled=True)
    assert memory.quantized_instead(big, "bf16", 80.0, headroom, shape, int8, compiled=True) is None
    int8_shape = memory.StepShape(8704, "int8-quanto")
    small = memory.plan_with_offload(memory.plan_memory(12.0, int8_shape, headroom_gib=headroom, compiled=True),
                                     10.0, int8, int8_shape, compiled=True)
    assert memory.quantized_instead(small, "int8-quanto", 12.0, headroom, int8_shape, int8, compiled=True) is None
