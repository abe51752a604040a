"""The memory side of the training step: what a step will take on the card, and the levers that make it fit.

In: the step's shape (`StepShape`: tokens of the longest sample, base precision, batch size, adapter width, model
size, FlashAttention 4 or not), the card's GiB and the blocks' sizes (`estimate_block_bytes`, from the model's shapes
before loading). Out: a `MemoryPlan` (the checkpointed fraction of the blocks, the compiled blocks' activation memory
budget, the blocks to offload, the predicted peak and the reason, said at start-up):
- `predict_peak_gib` / `StepShape.peak_gib`: the memory model, fitted to H100 measurements (benchmarks/results);
- `plan_memory(...)`: picks the budget (compiled) or the checkpointed fraction (eager) that fits the card
  (overridable), and says why; `plan_with_offload` adds block offload (kontext_trainer.offload) when nothing else
  fits, `blocks_to_offload` picks how many;
- `set_activation_checkpointing(model, fraction)`: checkpoint only the first `fraction` of the 57 blocks (1.0 = all,
  0 = none): memory scales with the blocks kept, speed with the blocks recomputed;
- `use_expandable_segments()` / `allocator_headroom_gib()`: the CUDA allocator's setting and the headroom the plan
  leaves beside its prediction; `others_on_card_gib(...)`: what other processes hold of the card, which the plan
  leaves to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kontext_trainer.model import transformer_blocks


def set_activation_checkpointing(model, fraction: float) -> int:
    """Checkpoint the first round(fraction * n_blocks) blocks; returns how many. 0 disables checkpointing."""
    blocks = transformer_blocks(model)
    n = int(round(max(0.0, min(1.0, fraction)) * len(blocks)))
    if n == 0:
        if getattr(model, "gradient_checkpointing", False):
            model.disable_gradient_checkpointing()
        return 0
    selected = {id(b) for b in blocks[:n]}

    def checkpoint_some(module, *args):
        if id(module) in selected:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
    return n


@dataclass(frozen=True)
class MemoryPlan:
    """The memory setting of a run: what is checkpointed, compiled with which budget, offloaded; and why."""

    fraction: float
    """Fraction of the blocks checkpointed (1.0 = all)."""
    peak_gib: float
    """Predicted peak GPU memory of a step."""
    reason: str
    budget: float = 1.0
    """Activation memory budget of the compiled blocks (1.0 = the compiler's default; only with compiled blocks)."""
    offload_blocks: int = 0
    """The first N blocks keep their frozen weights in pinned CPU memory (kontext_trainer.offload); they are
    checkpointed."""


# Fitted to the H100 runs in benchmarks/results/bench_train_step-NVIDIA_H100_80GB_HBM3-2026-11-26b-*.json
# (full-size Kontext, batch 1, one reference, AdamW, LoRA in the activations' dtype): peak = weights + checkpointed
# activations + (1 - fraction) * activations, both activation terms linear in the tokens per step (8,704 at 1024 px
# with one reference, 2,560 at 512 px). LoRA rank 16 on the attention preset: 26.6 / 42.0 / 58.4 GiB at fractions
# 1 / 0.5 / 0 (1024 px), 23.7 / 33.2 (512 px); int8-quanto 15.6 GiB at 1; fp8-matmul 16.4 / 31.8 / 48.2 at
# 1 / 0.5 / 0. Compiled blocks peak within 3% of eager (58.7 bf16, 47.5 fp8-matmul at fraction 0).
# LoKr (factor 16/8, attention+ffs, full matrix; benchmarks/results/...-2026-11-26-fp8+lokr.json): 28.0 / 61.6 GiB
# at 1 / 0.5, out of memory at 0. Adapters on more than the attention modules (LoKr, LoRA with attention+ffs or all)
# use the LoKr figures: x1.355 checkpointed, x2.11 the rest (LoRA beyond attention is not measured: assumed like LoKr).
_WEIGHTS_GIB = {"bf16": 22.5, "int8-quanto": 11.6, "fp8-quanto": 11.6, "fp8-matmul": 12.4, "fp32": 45.0}
_CHECKPOINTED_GIB_PER_TOKEN = 0.000470
_ACTIVATION_GIB_PER_TOKEN = 0.003655
_WIDE_CHECKPOINTED, _WIDE_ACTIVATIONS = 1.355, 2.11
FULL_TRANSFORMER_PARAMS = 11.9e9  # FLUX.1 Kontext's transformer; smaller models scale every term by their size
FRACTIONS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.85, 0.9, 1.0)
# Compiled blocks, no block checkpointing, the partitioner's activation memory budget b: the activations kept are a
# share of the uncheckpointed step's (the checkpointed + rest terms above, with the wide-adapter factors). Measured on
# an H100 at 1024 px with the blocks compiled as kontext-train compiles them now (keep_attention_outputs,
# steady_block_inputs, dynamic shapes; benchmarks/results/probe_levers-NVIDIA_H100_80GB_HBM3-2026-12-05{a,b}-*.json),
# fused q/k/v, peak allocated GiB:
#   bf16 LoRA     59.4 / 40.6 / 36.05 / 30.55 / 29.6 at b = 1 / 0.5 / 0.3 / 0.2 / 0.05 (1: the whole run,
#                 full_run-...-2026-12-05-e.json)
#   fp8-matmul    27.7 / 19.45 / 18.56 at 0.5 / 0.2 / 0.05
#   int8-quanto   33.4 / 27.7 / 21.05 / 18.65 at 0.5 / 0.3 / 0.2 / 0.05 (0.2: 21.1 in the whole run on a 24 GB
#                 card, full_run-...-2026-12-05-i.json)
#   LoKr bf16     62.2 / 42.9 / 34.1 at 0.5 / 0.2 / 0.05; LoKr int8 34.8 / 23.4 at 0.2 / 0.05
# Most are 1 to 6 GiB above what the blocks took on 2026-11-26 (probe_levers-...-2026-11-26e-*.json, an earlier
# compile set-up: bf16 38.15 / 30.5 / 29.66 / 26.8 at 0.5 / 0.3 / 0.2 / 0.05, int8 21.3 / 19.6 / 15.9 at 0.3 / 0.2 /
# 0.05, LoKr bf16 59.4 at 0.5; fp8-matmul at 0.5 and int8 at 0.5 took the same); the two budgets not measured again
# keep the older share: fp8-matmul 48.4 at 1, int8 64.2 at 1 (the compiler keeps dequantized weights too).
#   LoRA r16 on attention+ffs, bf16 (before keep_attention_outputs): 74.2 / 47.9 / 34.7 / 28.1 at 1 / 0.5 / 0.2 /
#   0.05 (probe_levers-...-26c-...json): well below LoKr's, whose shares (used for every wide adapter) over-predict it
# The share is not linear in b (the partitioner saves whole kinds of tensors, in every block at once) and differs by
# base, so each measured (precision, wide adapter) pair has its own shares; anything unmeasured takes the largest
# share measured at that budget, capped by what the same pair keeps at a higher budget.
BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.05)
_BUDGET_KEEP_MAX = {1.0: 1.47, 0.5: 0.61, 0.3: 0.45, 0.2: 0.32, 0.05: 0.20}
_BUDGET_KEEP = {
    ("bf16", False): {1.0: 1.03, 0.5: 0.505, 0.3: 0.378, 0.2: 0.225, 0.05: 0.198},
    ("fp8-matmul", False): {1.0: 1.0, 0.5: 0.428, 0.2: 0.197, 0.05: 0.172},
    ("int8-quanto", False): {1.0: 1.466, 0.5: 0.607, 0.3: 0.449, 0.2: 0.264, 0.05: 0.197},
    ("bf16", True): {0.5: 0.547, 0.2: 0.281, 0.05: 0.16},
    ("int8-quanto", True): {0.2: 0.32, 0.05: 0.163},
}
_SAME_MODULES = {"fp8-quanto": "int8-quanto", "fp32": "bf16"}  # DequantLinear either way; fp32: CPU tests
# With FlashAttention 4 (kontext_trainer.attention) the partitioner kept more at budgets 0.5 and 0.3: bf16 on an
# H100 took 42.37 / 34.54 GiB there against cuDNN's 38.15 / 30.5 at the time, and the same at 1, 0.2 and 0.05
# (59.33 / 29.58 / 26.82; benchmarks/results/bench_train_step-NVIDIA_H100_80GB_HBM3-2026-11-26f-*.json). The extra
# share, measured with bf16, is added for every base (unmeasured with the others). FA4 was not measured with the
# current compile set-up (flash-attn-4 was not installed on the H100 of 2026-12-05): cuDNN's new shares plus the
# extra predict more than FA4 took then, never less.
_FA4_EXTRA_KEEP = {0.5: 0.12, 0.3: 0.115}


@dataclass(frozen=True)
class StepShape:
    """What the memory model needs beyond the checkpointed fraction."""
    tokens: int
    """Sequence length of the longest sample (target + references + text)."""
    precision: str = "bf16"
    batch_size: int = 1
    wide_adapter: bool = False
    """An adapter on more than the attention modules (LoKr, or LoRA with attention+ffs / all)."""
    scale: float = 1.0
    """Parameters of the transformer / FULL_TRANSFORMER_PARAMS (the tiny test model: ~1e-6)."""
    fa4: bool = False
    """The attention runs FlashAttention 4 (the compiled blocks keep more at some budgets)."""

    def peak_gib(self, fraction: float, budget: float = 1.0, compiled: bool = False) -> float:
        """predict_peak_gib for a step of this shape."""
        return predict_peak_gib(fraction, self.tokens, self.precision, self.batch_size,
                                wide_adapter=self.wide_adapter, scale=self.scale, budget=budget, compiled=compiled,
                                fa4=self.fa4)


def _budget_keep(budget: float, precision: str, wide_adapter: bool, fa4: bool = False) -> float:
    """The kept share for a budget: that of the next listed budget at or above it (no interpolation: the
    partitioner's choices come in steps), measured for this base and adapter width where there is a measurement;
    else the largest share measured at that budget, but never more than this base keeps at a higher budget
    (a lower budget never keeps more); with FlashAttention 4, plus its extra share."""
    measured = _BUDGET_KEEP.get((_SAME_MODULES.get(precision, precision), wide_adapter), {})
    for b in sorted(_BUDGET_KEEP_MAX):
        if budget <= b + 1e-9:
            above = [share for at, share in measured.items() if at > b]
            share = measured.get(b, min([_BUDGET_KEEP_MAX[b], *above]))
            return share + (_FA4_EXTRA_KEEP.get(b, 0.0) if fa4 else 0.0)
    return _BUDGET_KEEP_MAX[1.0]


def predict_peak_gib(fraction: float, tokens: int, precision: str = "bf16", batch_size: int = 1, *,
                     wide_adapter: bool = False, scale: float = 1.0, budget: float = 1.0,
                     compiled: bool = False, fa4: bool = False) -> float:
    """Predicted peak GiB of one step: `fraction` of the blocks checkpointed, or (compiled, fraction 0) the
    partitioner's activation memory `budget` (1.0: its default choice); `fa4`: the attention runs FlashAttention 4."""
    weights = _WEIGHTS_GIB.get(precision, _WEIGHTS_GIB["bf16"])
    checkpointed = _CHECKPOINTED_GIB_PER_TOKEN * (_WIDE_CHECKPOINTED if wide_adapter else 1.0)
    rest = _ACTIVATION_GIB_PER_TOKEN * (_WIDE_ACTIVATIONS if wide_adapter else 1.0)
    if compiled and fraction == 0.0:
        activations = (checkpointed + rest) * _budget_keep(budget, precision, wide_adapter, fa4)
    else:
        activations = checkpointed + (1.0 - fraction) * rest
    return (weights + activations * tokens * batch_size) * scale


_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch reads either (the second is the newer name)


def use_expandable_segments() -> None:
    """Unless the user configured PyTorch's CUDA allocator, let it grow segments in place (expandable_segments):
    memory freed between the blocks' differently-sized activations is reused instead of left stranded in fixed
    segments, so the reserved peak stays near the allocated one and the memory plan's choices fit the card. Call it
    before the first CUDA allocation (the allocator reads it once); child processes inherit it. kontext-train and
    the GPU benchmarks call it."""
    import os

    if not any(os.environ.get(v) for v in _ALLOC_VARS):
        os.environ[_ALLOC_VARS[0]] = "expandable_segments:True"


def allocator_headroom_gib() -> float:
    """GiB of a card to leave beside the predicted peak: the CUDA context and libraries' workspaces (~0.6 GiB), the
    allocator's reserved-but-unused memory and the prediction's error. With expandable segments (what kontext-train
    sets unless the user configured the allocator) the reserved peak was 0.2-0.25 GiB above the allocated one for
    bf16 and 0.2-0.55 GiB for int8 on an H100, so 2 GiB; with fixed segments it was up to 3.7 GiB above (fp8-matmul,
    budget 0.2), so 3 GiB."""
    import os

    conf = ",".join(os.environ.get(v, "") for v in _ALLOC_VARS).lower()
    return 2.0 if "expandable_segments:true" in conf.replace(" ", "") else 3.0


OWN_CONTEXT_GIB = 0.85  # this process's CUDA context and library workspaces: 0.75-0.84 GiB on an H100 (full_run)


def others_on_card_gib(total_bytes: int, free_bytes: int, reserved_bytes: int) -> float:
    """GiB of the card that other processes hold (a desktop's display, another job), from what the driver reports
    (`torch.cuda.mem_get_info`: free and total) and what this process's allocator holds (`memory_reserved`): the
    used memory beyond both and this process's own context (OWN_CONTEXT_GIB, an estimate; never below 0)."""
    used = (total_bytes - free_bytes - reserved_bytes) / 2**30
    return max(0.0, used - OWN_CONTEXT_GIB)


def plan_memory(total_gib: float, shape: StepShape, headroom_gib: float = 3.0, compiled: bool = False) -> MemoryPlan:
    """The fastest memory setting whose predicted peak fits the card with headroom (the trainer passes
    allocator_headroom_gib()).

    Compiled blocks: the largest activation memory budget in BUDGETS that fits (no block checkpointing; measured to
    be faster than checkpointing blocks at the same memory), else every block checkpointed. Eager: the smallest
    checkpointed fraction that fits."""
    def peak(fraction, budget=1.0):
        return shape.peak_gib(fraction, budget, compiled)

    limit = total_gib - headroom_gib
    where = f"of {total_gib:.0f} GiB, {shape.tokens:,} tokens per sample"
    if compiled:
        for budget in BUDGETS:
            p = peak(0.0, budget)
            if p <= limit:
                what = ("no checkpointing" if budget == 1.0 else
                        f"compiled blocks with activation memory budget {budget:g} (the compiler recomputes the rest)")
                return MemoryPlan(0.0, p, f"{what} (predicted peak {p:.1f} GiB {where})", budget)
    else:
        for fraction in FRACTIONS:
            p = peak(fraction)
            if p <= limit:
                what = "no checkpointing" if fraction == 0 else f"checkpointing {fraction:.0%} of the blocks"
                return MemoryPlan(fraction, p, f"{what} (predicted peak {p:.1f} GiB {where})")
    p = peak(1.0)
    if p <= limit:
        return MemoryPlan(1.0, p, f"checkpointing every block (predicted peak {p:.1f} GiB {where})")
    return MemoryPlan(1.0, p, f"checkpointing every block; the predicted peak {p:.1f} GiB is over the card's "
                              f"{total_gib:.0f} GiB: lower the resolution or use fp8-matmul / int8-quanto")


def out_of_memory_advice(phase: str, plan: MemoryPlan | None, precision: str, n_blocks: int) -> list[str]:
    """What to change after running out of GPU memory in `phase` (a phase of kontext_trainer.phases: "training"
    for the steps), given the run's memory plan (None before it was made) and base precision: the settings that
    lower that phase's memory, most effective first, each as the option to pass."""
    if phase in ("text cache", "text encoders load"):
        return ["--set cache_batch_size=1 (fewer captions per text-encoder call)",
                "free the card of other processes: T5-XXL alone takes ~9 GiB in bf16"]
    if phase in ("latent cache", "vae load"):
        return ["--set cache_batch_size=1 (one image per VAE call)",
                "--set vae_tiling=true (tiles images above 1024 px)",
                "a lower training resolution (kontext-data pair --resolution 768, then a new manifest)"]
    if phase in ("validation", "validation loss"):
        return ["--set vae_tiling=true (the VAE decodes validation images in tiles)",
                "fewer validation samples (--set validation_samples=N, or a smaller eval split)",
                "--set validation_steps=0 (validate only at the end) or --set skip_final_validation=true"]
    out = []
    offloaded = plan.offload_blocks if plan else 0
    if plan is not None and plan.fraction == 0.0 and plan.budget > min(BUDGETS):
        lower = max(b for b in BUDGETS if b < plan.budget)
        out.append(f"--set activation_memory_budget={lower:g} (this run kept {plan.budget:g} of the activations)")
    if offloaded < n_blocks:
        more = min(n_blocks, offloaded + max(4, n_blocks // 8))
        out.append(f"--set offload_blocks={more} (this run offloaded {offloaded}; each block offloaded frees its "
                   f"weights from the card)")
    if precision in ("bf16", "fp32"):
        out.append("--base-precision int8-quanto (halves the base's 22.5 GiB)")
    out.append("a lower training resolution (kontext-data pair --resolution 768) or fewer references: the step's "
               "memory grows with its tokens; --set train_batch_size=1")
    if phase == "model load" and precision.endswith("-quanto"):
        out.insert(0, "--quantize-on cpu (quantize the base in CPU memory, block by block)")
    return out


OFFLOAD_SLOTS = 2  # offloaded blocks on the device at once: the one running and the next one being copied


def blocks_to_offload(block_bytes: list[int], need_gib: float, slots: int = OFFLOAD_SLOTS) -> int | None:
    """The fewest first blocks (in `transformer_blocks` order: the blocks checkpointing and offloading take first)
    whose offloading frees `need_gib` of the device, counting that `slots` of the offloaded blocks are on the device
    at any time (the largest ones, to be safe). 0 when nothing is needed; None when offloading every block is not
    enough."""
    if need_gib <= 0:
        return 0
    for n in range(1, len(block_bytes) + 1):
        resident = sum(sorted(block_bytes[:n], reverse=True)[:slots])
        if (sum(block_bytes[:n]) - resident) / 2**30 >= need_gib:
            return n
    return None


_WEIGHT_BYTES = {"bf16": 2, "fp32": 4, "int8-quanto": 1, "fp8-quanto": 1, "fp8-matmul": 1}
_SCALE_BYTES = {"int8-quanto": 2, "fp8-quanto": 2, "fp8-matmul": 4}  # one scale per output row (bf16 for quanto)


def estimate_block_bytes(model, precision: str) -> list[int]:
    """Frozen bytes of each block in `transformer_blocks` order once loaded at `precision`, from the parameters'
    shapes alone (the model may be on the meta device, before any weight is read): the blocks' Linear weights at the
    base's bytes per weight plus one scale per output row where quantized, everything else in the compute
    dtype. Inside the blocks every Linear is quantized (the quantization exclusions name modules outside them), so
    this is what offload.block_bytes measures after loading, up to alignment."""
    weight = _WEIGHT_BYTES.get(precision, 2)
    other = 4 if precision == "fp32" else 2
    sizes = []
    for block in transformer_blocks(model):
        total = 0
        for m in block.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, torch.nn.Linear) and name == "weight":
                    total += p.numel() * weight + m.out_features * _SCALE_BYTES.get(precision, 0)
                else:
                    total += p.numel() * other
        sizes.append(total)
    return sizes


def plan_with_offload(plan: MemoryPlan, limit_gib: float, block_bytes: list[int], shape: "StepShape",
                      compiled: bool) -> MemoryPlan:
    """When `plan` does not fit `limit_gib` (the card less headroom), the plan that does: every block checkpointed
    and the fewest first blocks offloaded to pinned CPU memory. `plan` itself when it fits or when even offloading
    every block would not."""
    if plan.peak_gib <= limit_gib:
        return plan
    base = shape.peak_gib(1.0, 1.0, compiled)
    n = blocks_to_offload(block_bytes, base - limit_gib)
    if not n:
        return plan
    resident = sum(sorted(block_bytes[:n], reverse=True)[:OFFLOAD_SLOTS])
    peak = base - (sum(block_bytes[:n]) - resident) / 2**30
    return MemoryPlan(1.0, peak, f"checkpointing every block and offloading the first {n} of {len(block_bytes)} "
                                 f"blocks to pinned CPU memory (predicted peak {peak:.1f} GiB of {limit_gib:.1f} "
                                 f"usable, {shape.tokens:,} tokens per sample)", 1.0, n)


def quantized_instead(plan: MemoryPlan, precision: str, card_gib: float, headroom_gib: float, shape: StepShape,
                      quantized_block_bytes: list[int], compiled: bool) -> str | None:
    """A start-up hint when the plan offloads blocks of a bf16 base: what an int8-quanto base (half the weights'
    bytes) would run on the same card, where it offloads fewer blocks. None otherwise. On a 24 GB card bf16 offloads
    11 blocks (1.157 s/step, an H200) where int8 offloads none (0.935 s, an H100); the choice stays the user's,
    since int8 rounds the base's weights. `quantized_block_bytes`: estimate_block_bytes for int8-quanto."""
    if precision != "bf16" or not plan.offload_blocks:
        return None
    q = replace(shape, precision="int8-quanto")
    alt = plan_with_offload(plan_memory(card_gib, q, headroom_gib=headroom_gib, compiled=compiled),
                            card_gib - headroom_gib, quantized_block_bytes, q, compiled)
    if alt.peak_gib > card_gib - headroom_gib or alt.offload_blocks >= plan.offload_blocks:
        return None
    return (f"a bf16 base fits this card only with {plan.offload_blocks} blocks offloaded; --base-precision "
            f"int8-quanto (half the base's memory, its weights rounded to int8) would run {alt.reason}, usually "
            f"faster (docs/train.md, \"Small cards\")")


def sample_tokens(target_size: tuple[int, int], reference_sizes, text_tokens: int = 512) -> int:
    """Sequence length of one sample: 2x2 latent patches of the target and each reference (8 px VAE), + text."""
    def n(size):
        return (int(size[0]) // 16) * (int(size[1]) // 16)

    return n(target_size) + sum(n(r) for r in reference_sizes) + text_tokens
