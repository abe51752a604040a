"""torch.compile of the transformer blocks, measured in benchmarks/bench_train_step.py.

In: a FluxTransformer2DModel (with its adapter, and the activation memory budget the memory plan picked). Out: the
same model whose repeated blocks are compiled:
- `compile_blocks(model, memory_budget)`: regional torch.compile of the repeated transformer blocks (one compile per
  block type for every sequence length: dynamic shapes), with the compiler's activation memory budget: instead of
  recomputing whole blocks, torch's partitioner keeps the activations that are dear to recompute up to that
  fraction and recomputes the rest.
- `keep_attention_outputs()`: makes that partitioner count cuDNN attention (and FlashAttention 4's op) as expensive,
  so the attention outputs are the first thing it keeps; without it every budget below ~0.5 re-ran all 57 attention
  forwards in backward. H100, 1024 px, bf16, budget 0.2: 1.023 -> 0.939 s/step (27.75 -> 29.66 GiB), against 1.14 s
  at 26.6 GiB with every block checkpointed.
- `steady_block_inputs(model)`: every block of a type sees inputs alike (requires_grad, strides), so dynamo keeps
  one graph per block type instead of two (the first step of a full-size bf16 run compiled four graphs in 111 s on
  an H100).
- `eager()`: a context where the compiled blocks run eagerly (validation: no-grad, eval-mode graphs would be compiles
  of their own, for a few dozen forwards).
- `can_compile_cuda()`: whether torch.compile can generate CUDA kernels here.
"""

from __future__ import annotations

import contextlib
import os

import torch


def can_compile_cuda() -> bool:
    """Whether torch.compile can generate CUDA kernels here (inductor needs Triton; Windows wheels lack it)."""
    from torch.utils._triton import has_triton

    return has_triton()


# Attention ops torch's partitioner (2.11 to 2.14) does not list as compute-intensive, while it lists the flash and
# efficient SDPA kernels: it then takes cuDNN attention for free to recompute (see keep_attention_outputs).
_UNLISTED_ATTENTION_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable")


def keep_attention_outputs() -> bool:
    """Make torch's activation partitioner treat cuDNN attention like the flash/efficient SDPA kernels it already
    treats as compute-intensive: never recomputed for free, so with an activation memory budget below 1 its output
    is kept (when the budget allows) instead of re-running the attention forward in the backward pass.

    Without this, every budget below ~0.5 re-ran the cuDNN attention forward of all 57 blocks in backward (114
    forward kernels per step instead of 57, ~90 ms of an H100 step at 1024 px): the partitioner's aggressive
    stage only weighs the ops it bans from recomputation, and cuDNN attention is not among them. Process-wide (it
    changes the partitioner's op list, a private torch function; wrapped, not replaced); returns False, changing
    nothing, where that function is not there."""
    try:
        from torch._functorch import partitioners
    except ImportError:  # pragma: no cover - torch without functorch
        return False
    original = getattr(partitioners, "get_default_op_list", None)
    if original is None:
        return False
    if getattr(original, "_keeps_attention", False):
        return True
    from kontext_trainer import fa4  # registers kontext::fa4_attention (attention_backend fa4, auto)

    ops = [getattr(torch.ops.aten, name) for name in _UNLISTED_ATTENTION_OPS if hasattr(torch.ops.aten, name)]
    ops.append(torch.ops.kontext.fa4_attention)

    def op_list():
        types = original()
        for op in ops:
            types.compute_intensive_ops.add(op)
        return types

    op_list._keeps_attention = True
    partitioners.get_default_op_list = op_list
    return True


def _inputs_require_grad(module, args, output):
    """A frozen embedder's output, made to require grad while autograd records: the first block then sees what every
    later block sees (an input that requires grad). Without it the first double block compiles a graph of its own;
    the price is the input gradient of that one block (estimated at ~0.4% of a step; not measured apart)."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_()
    return None


def _standard_strides(t: torch.Tensor) -> torch.Tensor:
    """`t` with the strides of a new tensor of its shape: a copy where it is not contiguous; for a batch of one a
    view (a size-1 dimension's stride is never used, but torch keeps it, and dynamo guards on it)."""
    t = t.contiguous()
    return t[0].unsqueeze(0) if t.dim() > 1 and t.shape[0] == 1 else t


@torch.compiler.disable  # a view (a copy for larger batches) between two compiled blocks: nothing to compile
def _contiguous_outputs(module, args, output):
    """A single block returns views into one buffer (text tokens, then image tokens): their batch stride is that of
    the whole buffer, while the first single block gets the double blocks' own tensors. Outputs with standard
    strides give every single block the same inputs, so one graph serves them all (a batch of one stays views; a
    larger batch is copied, ~40 us a block on an H100 at 1024 px)."""
    if isinstance(output, tuple):
        return tuple(_standard_strides(o) if isinstance(o, torch.Tensor) else o for o in output)
    return None


# The model's entry points whose outputs start the block stack (FluxTransformer2DModel's attribute names)
_EMBEDDERS = ("x_embedder", "context_embedder")
_SINGLE_BLOCKS = "single_transformer_blocks"


def steady_block_inputs(model) -> int:
    """Hooks (once per model) so that every block of a type sees inputs alike: the embedders' outputs require grad
    while training (the later blocks' inputs do, through the adapter), and the single blocks return tensors with
    standard strides. Same numbers (tests/trainer/test_compile.py); returns how many hooks it added (0 on a second call or a
    model without these modules)."""
    if getattr(model, "_kontext_steady_inputs", False):
        return 0
    added = 0
    for name in _EMBEDDERS:
        embedder = getattr(model, name, None)
        if isinstance(embedder, torch.nn.Module):
            embedder.register_forward_hook(_inputs_require_grad)
            added += 1
    for block in getattr(model, _SINGLE_BLOCKS, None) or []:
        block.register_forward_hook(_contiguous_outputs)
        added += 1
    model._kontext_steady_inputs = True
    return added


@contextlib.contextmanager
def eager():
    """The compiled blocks run eagerly inside (torch.compiler's force_eager stance): validation's no-grad, eval-mode
    forwards would otherwise compile graphs of their own (one more per block type and mode), which costs more than
    the few dozen forwards of a validation gain from them."""
    with torch.compiler.set_stance("force_eager"):
        yield


# torch's own variable for inductor's coalesce tiling analysis: where the user set it, compile_blocks leaves it be
COALESCE_TILING_ENV = "TORCHINDUCTOR_COALESCE_TILING_ANALYSIS"
RECOMPILE_LIMIT = 64  # graphs per compiled block: a safety margin above the few that dynamic shapes need


def compile_blocks(model, memory_budget: float = 1.0, keep_attention: bool = True, dynamic: bool | None = True,
                   **kwargs) -> None:
    """Regional compilation: torch.compile each repeated block (diffusers' compile_repeated_blocks), with dynamic
    sequence lengths, so one compile per block type serves every bucket of a run.

    With static shapes (dynamic=False) every bucket shape compiled its own graph, so a dataset of many aspect
    ratios paid for each compile in its first steps (benchmarks/full_run.py times them); dynamic shapes
    keep that to one graph per block type and grad mode (training, validation), whatever the number of buckets
    (counted in tests/trainer/test_compile.py), and steady_block_inputs makes that one graph per block type in
    training. Sizes of 0 or 1 (a batch of one) stay specialized, as dynamo does.
    The recompile limit is still raised to RECOMPILE_LIMIT (never lowered): a shape dynamo must specialize (say, a
    bucket's last batch of one after batches of two) costs one more graph instead of dynamo's silent eager fallback.

    `memory_budget` (0..1] is torch's `activation_memory_budget` for the blocks' backward graphs: 1.0 keeps what the
    default partitioner keeps; lower values recompute more (cheapest per byte first). It is a process-wide setting
    read when a graph compiles, so it is set here, before the first step compiles the blocks. `keep_attention`:
    see keep_attention_outputs (on by default; False only to measure without it)."""
    import torch._dynamo
    import torch._functorch.config

    if not 0.0 < memory_budget <= 1.0:
        raise ValueError(f"memory_budget {memory_budget} is not in (0, 1]")
    torch._functorch.config.activation_memory_budget = float(memory_budget)
    if keep_attention:
        keep_attention_outputs()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # dynamic=True also makes float attributes (the norms' eps) symbolic; a later pass then gives up on them and
    # dynamo traces and partitions every block type a second time. They never change: constants from the start.
    torch._dynamo.config.specialize_float = True
    # duck shaping gives equal sizes one symbol; a text as long as the image sequence (512 T5 tokens beside a
    # 256 x 256 px target and reference: 512 image tokens) then specialized both to constants, one more graph for
    # that bucket and another for the next
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:  # pragma: no cover - a torch without it keeps duck shaping
        fx_config = None
    if hasattr(fx_config, "use_duck_shape"):
        fx_config.use_duck_shape = False
    # inductor's coalesce tiling analysis does not handle dynamic shapes (its own config says so) and asserts in
    # get_pw_red_splits on some of them: the tiny model's second bucket on an H100 (torch 2.11) failed its run there.
    # Off, unless the user set torch's own variable for it (a newer torch that fixed it, or a benchmark of both)
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "coalesce_tiling_analysis") and COALESCE_TILING_ENV not in os.environ:
        inductor_config.triton.coalesce_tiling_analysis = False
    steady_block_inputs(model)
    model.compile_repeated_blocks(dynamic=dynamic, **kwargs)
