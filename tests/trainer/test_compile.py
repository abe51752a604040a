"""Compiled transformer blocks give the eager step's loss and gradients, with or without an activation memory budget,
compile once per block type whatever the buckets, and keep the attention outputs (cuDNN's and FlashAttention 4's)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_batch
from kontext_trainer.compile import COALESCE_TILING_ENV, compile_blocks, keep_attention_outputs
from kontext_trainer.flow import KontextBatch, kontext_step


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
    assert keep_attention_outputs() is True
    wrapped = partitioners.get_default_op_list
    assert keep_attention_outputs() is True and partitioners.get_default_op_list is wrapped
    assert classify(cudnn)
    assert classify(torch.ops.aten._scaled_dot_product_flash_attention.default)  # torch's own entries stay
    assert classify(torch.ops.aten.mm.default)
    assert not classify(torch.ops.aten.add.Tensor)


def test_the_compiled_blocks_keep_the_fa4_output():
    from torch._functorch import partitioners

    assert keep_attention_outputs()
    assert torch.ops.kontext.fa4_attention in partitioners.get_default_op_list().compute_intensive_ops


def _lora_model_and_eager_step(tiny_model):
    """The tiny model with a LoRA, a batch, and the eager step's loss and LoRA gradients (then zeroed)."""
    from diffusers import FluxTransformer2DModel

    from kontext_trainer import adapters

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention")
    batch = tiny_batch(torch.Generator().manual_seed(0))
    eager = kontext_step(model, batch, torch.Generator().manual_seed(1))
    expected = [p.grad.clone() for p in adapters.trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return model, batch, eager, expected


def test_compiled_blocks_give_the_same_loss_and_gradients(tiny_model):
    from kontext_trainer import adapters

    import torch._inductor.config as inductor_config

    model, batch, eager, expected = _lora_model_and_eager_step(tiny_model)
    compile_blocks(model)
    # off: inductor's coalesce tiling analysis asserts on some dynamic shapes (a GPU run of the tiny model failed)
    if COALESCE_TILING_ENV not in os.environ:
        assert inductor_config.triton.coalesce_tiling_analysis is False
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
        compile_blocks(model, memory_budget=0.0)
    before = fconf.activation_memory_budget
    try:
        compile_blocks(model, memory_budget=0.05, backend="aot_eager")  # the partitioner, no codegen
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
        compile_blocks(model, backend="aot_eager")
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


def test_one_graph_per_block_type_with_many_blocks_and_no_compile_for_validation():
    """A transformer of several blocks of each type (as the real one: 19 double, 38 single): the first double block
    gets frozen embedders' outputs and the later single blocks get views, yet training compiles one graph per block
    type for every bucket, with eager's loss and gradients; validation under `eager()` (no grad, eval mode) compiles
    nothing and gives eager's loss."""
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    from kontext_trainer import adapters, builder
    from kontext_trainer.compile import eager
    from kontext_trainer.flow import kontext_forward

    def batch(g, h, w):  # 7 text tokens: no image sequence as long as the text (dynamo would specialize that)
        return KontextBatch(target=torch.randn(1, 4, h, w, generator=g), references=[torch.randn(1, 4, h, w, generator=g)],
                            prompt_embeds=torch.randn(1, 7, 32, generator=g), pooled=torch.randn(1, 32, generator=g))

    shapes = [(4, 6), (4, 8), (8, 8), (6, 10)]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(builder.TINY["transformer"], num_layers=3, num_single_layers=4))
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention")
    params = adapters.trainable_parameters(model)

    def train_all():
        out = []
        for i, (h, w) in enumerate(shapes):
            loss = kontext_step(model, batch(torch.Generator().manual_seed(i), h, w), torch.Generator().manual_seed(i))
            out.append((loss, [p.grad.clone() for p in params]))
            model.zero_grad(set_to_none=True)
        return out

    def validate():
        model.eval()
        with torch.no_grad():
            b = batch(torch.Generator().manual_seed(9), 6, 8)
            noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(3))
            val = float(kontext_forward(model, b, torch.tensor([0.5]), noise, 1.0).loss)
        model.train()
        return val

    expected, expected_val = train_all(), validate()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    try:
        compile_blocks(model, backend="aot_eager")
        got = train_all()
        training_graphs = counters["stats"]["unique_graphs"] - before
        with eager():
            val = validate()
        all_graphs = counters["stats"]["unique_graphs"] - before
    finally:
        torch._dynamo.reset()
    assert training_graphs == 2  # one double-block graph, one single-block graph, for all 4 shapes and 7 blocks
    assert all_graphs == training_graphs
    for (loss, grads), (e_loss, e_grads) in zip(got, expected):
        assert abs(loss - e_loss) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, e_grads))
    assert abs(val - expected_val) < 1e-6


def test_a_user_setting_of_the_coalesce_tiling_analysis_is_left_as_set(tiny_model, monkeypatch):
    """torch's own TORCHINDUCTOR_COALESCE_TILING_ANALYSIS wins over the trainer's default (off): a torch that fixed
    the analysis, or a benchmark timing both, can turn it back on."""
    import torch._inductor.config as inductor_config
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(inductor_config.triton, "coalesce_tiling_analysis", True)
    monkeypatch.setenv(COALESCE_TILING_ENV, "1")
    compile_blocks(FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer"))
    assert inductor_config.triton.coalesce_tiling_analysis is True
    monkeypatch.delenv(COALESCE_TILING_ENV)
    compile_blocks(FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer"))
    assert inductor_config.triton.coalesce_tiling_analysis is False
