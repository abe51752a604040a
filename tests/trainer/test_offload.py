"""Block offload (kontext_trainer/offload.py) on the tiny model with real peft LoRA, on the CPU, where the offloader
emulates the host copy: the same losses and LoRA gradients with and without offload (plain, fused q/k/v, int8
DequantLinear bases), the weights there only while their block runs (at most two offloaded blocks at a time), the
model exactly as before after undo, forward-only pipelines, torch.compile without recompiles, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kontext_trainer import adapters, memory, quantize
from kontext_trainer.flow import KontextBatch, kontext_step
from kontext_trainer.fuse import fuse_qkv
from kontext_trainer.model import load_transformer, transformer_blocks
from kontext_trainer.offload import block_bytes, disable_block_offload, enable_block_offload


def _transformer(tiny_model, precision="fp32", fuse=False, layers=None):
    """The tiny transformer with a LoRA on its attention (random A and B, so every gradient is non-zero);
    `layers` = (double, single) blocks: a deeper random model of the same config."""
    if layers is not None:
        from diffusers import FluxTransformer2DModel

        config = dict(FluxTransformer2DModel.load_config(tiny_model, subfolder="transformer"))
        config.update(num_layers=layers[0], num_single_layers=layers[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FluxTransformer2DModel.from_config(config).requires_grad_(False)
    else:
        model = load_transformer(tiny_model, torch.bfloat16 if precision == "int8-quanto" else torch.float32, "cpu")
    if precision == "int8-quanto":
        quantize.quantize_transformer(model, precision)
    adapters.attach_lora(model, rank=4, alpha=None, dropout=0.0, targets="attention", init_seed=0)
    if precision == "int8-quanto":
        quantize.to_dequant_linears(model)
    if fuse:
        assert fuse_qkv(model) == len(transformer_blocks(model))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(step: int, dtype=torch.float32) -> KontextBatch:
    g = torch.Generator().manual_seed(100 + step)
    return KontextBatch(target=torch.randn(2, 4, 8, 8, generator=g).to(dtype),
                        references=[torch.randn(2, 4, 8, 8, generator=g).to(dtype)],
                        prompt_embeds=torch.randn(2, 8, 32, generator=g).to(dtype),
                        pooled=torch.randn(2, 32, generator=g).to(dtype))


def _train(model, steps=3, dtype=torch.float32, checkpointed=1.0):
    """Losses and LoRA gradients of `steps` AdamW steps, every block checkpointed (or that fraction of them)."""
    memory.set_activation_checkpointing(model, checkpointed)
    params = adapters.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(kontext_step(model, _batch(step, dtype), torch.Generator().manual_seed(step),
                                   attention_backend="math"))
        grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
        opt.step()
    return losses, grads


def _offloaded(model, n):
    """The frozen tensors of each of the first n blocks (what the offloader moves)."""
    return [[t for t in list(b.parameters()) + list(b.buffers()) if not t.requires_grad]
            for b in transformer_blocks(model)[:n]]


def _holding(frozen) -> list[int]:
    """Which of those blocks hold their weights now (not the 0-element placeholders)."""
    return [i for i, ts in enumerate(frozen) if all(t.numel() > 0 for t in ts)]


@pytest.mark.parametrize("n_blocks,checkpointed", [(1, 1.0), (2, 1.0), (2, 0.0)])
def test_training_with_offload_is_exactly_training_without(tiny_model, n_blocks, checkpointed):
    """3 AdamW steps. The trainer checkpoints every offloaded block; without checkpointing (the blocks called with
    keyword arguments, the weights autograd saved re-fetched for the backward) it must still be right."""
    losses, grads = _train(_transformer(tiny_model), checkpointed=checkpointed)
    model = _transformer(tiny_model)
    report = enable_block_offload(model, n_blocks, "cpu")
    assert report.blocks == n_blocks and report.total_blocks == 2
    off_losses, off_grads = _train(model, checkpointed=checkpointed)
    assert off_losses == losses  # the same floats: the same arithmetic on the same weights
    for g, h in zip(grads, off_grads):
        assert torch.equal(g, h) and g.abs().max() > 0
    assert _holding(_offloaded(model, n_blocks)) == []  # nothing left on the "device" after the steps


@pytest.mark.parametrize("precision,fuse", [("fp32", True), ("int8-quanto", False), ("int8-quanto", True)])
def test_fused_and_int8_bases_train_the_same_with_offload(tiny_model, precision, fuse):
    dtype = torch.bfloat16 if precision == "int8-quanto" else torch.float32
    losses, grads = _train(_transformer(tiny_model, precision, fuse), steps=2, dtype=dtype)
    model = _transformer(tiny_model, precision, fuse)
    enable_block_offload(model, 2, "cpu")
    if precision == "int8-quanto":  # the int8 data and scales are plain buffers: offloaded too
        data = model.single_transformer_blocks[0].proj_mlp.weight_data
        assert data.dtype == torch.int8 and data.numel() == 0
    off_losses, off_grads = _train(model, steps=2, dtype=dtype)
    assert off_losses == losses
    assert all(torch.equal(g, h) for g, h in zip(grads, off_grads))


def test_weights_are_there_only_while_their_block_runs(tiny_model):
    """A deeper model (3 double + 3 single blocks), 4 offloaded. Forward: block i holds its weights and the next
    offloaded block is already coming; backward (where checkpointing recomputes each forward): block i and the one
    before it, the last offloaded block from the start of the backward. Never more than two offloaded blocks at
    once, placeholders otherwise, the last two blocks untouched. Then a forward with gradients but no backward, and
    a training step again."""
    reference = _transformer(tiny_model, layers=(3, 3))
    model = _transformer(tiny_model, layers=(3, 3))
    blocks = transformer_blocks(model)
    frozen = _offloaded(model, 4)
    report = enable_block_offload(model, 4, "cpu")
    assert report.total_blocks == 6 and report.offloaded_bytes == sum(block_bytes(model)[:4])
    events = []

    def watch(phase, i):
        events.append((phase, i, _holding(frozen)))
        assert all(t.numel() > 0 for b in blocks[4:] for t in b.parameters())

    for i, block in enumerate(blocks):
        block.attn.register_forward_hook(lambda *a, i=i: watch("forward", i))
        # block i's LoRA gradient is computed inside block i's backward
        block.attn.to_q.lora_A["default"].weight.register_hook(lambda g, i=i: watch("backward", i))
    assert _train(model, steps=2)[0] == _train(reference, steps=2)[0]
    forward = [("forward", 0, [0, 1]), ("forward", 1, [1, 2]), ("forward", 2, [2, 3]), ("forward", 3, [3]),
               ("forward", 4, []), ("forward", 5, [])]
    # the backward starts copying the last offloaded block (3) while the blocks after it run their backward
    backward = [(phase, i, held) for i, held in [(5, [3]), (4, [3]), (3, [2, 3]), (2, [1, 2]), (1, [0, 1]), (0, [0])]
                for phase in ("forward", "backward")]  # each block recomputed, then its backward
    assert events == (forward + backward) * 2
    assert _holding(frozen) == []

    loss = kontext_step(model, _batch(0), torch.Generator().manual_seed(0), attention_backend="math",
                        backward=False)  # with gradients, never backpropagated
    assert _holding(frozen) == [] and np.isfinite(loss)
    assert _train(model, steps=1)[0] == _train(reference, steps=1)[0]  # both trained the same two steps before


def test_outside_the_window_weights_are_placeholders_and_undo_restores_everything(tiny_model):
    model = _transformer(tiny_model, fuse=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = {n: p.detach().clone() for n, p in trainable.items()}
    attn = model.single_transformer_blocks[0].attn
    q, fused = attn.to_q.base_layer.weight, attn.to_qkv.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()

    report = enable_block_offload(model, 2, "cpu")
    frozen = _offloaded(model, 2)
    assert _holding(frozen) == [] and all(t.numel() == 0 for ts in frozen for t in ts)
    # the same Parameter objects, only their data moved: state-dict keys and module identity are unchanged
    assert attn.to_q.base_layer.weight is q and sorted(model.state_dict()) == sorted(before)
    # a frozen weight used outside its block's window fails loudly instead of computing with something stale
    with pytest.raises(RuntimeError):
        attn.to_q.base_layer(torch.randn(3, 32))
    # the adapter stays where it was, untouched
    assert all(p.numel() > 0 and torch.equal(p, lora[n]) for n, p in trainable.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    # fused q/k/v counted once: the bytes offloaded are those of the unfused model's frozen tensors
    plain = _transformer(tiny_model)
    assert report.offloaded_bytes == sum(block_bytes(plain)) == sum(block_bytes(model))
    assert block_bytes(plain) == [sum(t.numel() * t.element_size() for t in ts) for ts in _offloaded(plain, 2)]

    _train(model, steps=1)
    assert disable_block_offload(model) and not disable_block_offload(model)
    after = model.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), k
    q, fused = attn.to_q.base_layer.weight, attn.to_qkv.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # views are views again
    assert torch.equal(fused[:q.shape[0]], q)
    assert not model._forward_pre_hooks and not any(b._forward_hooks for b in transformer_blocks(model))


def test_forward_only_under_no_grad_matches(tiny_model):
    """Validation: a plain transformer forward and FluxKontextPipeline, both under no_grad, give what they give
    without offload."""
    from diffusers import FluxKontextPipeline
    from PIL import Image

    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    model = _transformer(tiny_model)
    pipe.transformer = model
    batch = _batch(0)
    hidden = torch.randn(2, 32, 16)
    call = dict(hidden_states=hidden, timestep=torch.tensor([0.3, 0.7]), guidance=torch.ones(2),
                pooled_projections=batch.pooled, encoder_hidden_states=batch.prompt_embeds,
                txt_ids=torch.zeros(8, 3), img_ids=torch.randn(32, 3), return_dict=False)
    ref = Image.new("RGB", (64, 64), (120, 30, 200))

    def outputs():
        with torch.no_grad():
            out = model(**call)[0]
        image = pipe(image=ref, prompt="make it blue", height=64, width=64, max_area=64 * 64, _auto_resize=False,
                     num_inference_steps=2, guidance_scale=2.5, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        return out, image

    out, image = outputs()
    enable_block_offload(model, 2, "cpu")
    off_out, off_image = outputs()
    assert torch.equal(out, off_out) and np.array_equal(image, off_image)
    assert _holding(_offloaded(model, 2)) == []


def test_compiled_blocks_do_not_recompile(tiny_model):
    """Swapping the tensors' data between steps keeps torch.compile's guards satisfied: steps after the first (and a
    no_grad forward) run the graphs compiled in the first, with the losses of the uncompiled model."""
    import torch._dynamo

    losses = _train(_transformer(tiny_model), steps=3)[0]
    torch._dynamo.reset()
    model = _transformer(tiny_model)
    model.compile_repeated_blocks(backend="aot_eager", dynamic=False)
    enable_block_offload(model, 2, "cpu")
    memory.set_activation_checkpointing(model, 1.0)
    params = adapters.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    compiled = []
    try:
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                kontext_step(model, _batch(step), torch.Generator().manual_seed(step), attention_backend="math",
                             backward=False)
            compiled.append(kontext_step(model, _batch(step), torch.Generator().manual_seed(step),
                                         attention_backend="math"))
            opt.step()
            torch._dynamo.config.error_on_recompile = True  # from the second step on
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert compiled == pytest.approx(losses, rel=1e-5)


def test_bad_arguments_are_clear_errors(tiny_model):
    model = _transformer(tiny_model)
    for n in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match="between 0 and 2"):
            enable_block_offload(model, n, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        enable_block_offload(model, 1, "meta")
    enable_block_offload(model, 1, "cpu")
    with pytest.raises(ValueError, match="already enabled"):
        enable_block_offload(model, 1, "cpu")
    assert disable_block_offload(model)

    quanto = load_transformer(tiny_model, torch.bfloat16, "cpu")
    quantize.quantize_transformer(quanto, "int8-quanto")  # quanto's own QLinear: tensor subclasses
    with pytest.raises(ValueError, match="to_dequant_linears"):
        enable_block_offload(quanto, 1, "cpu")
    report = enable_block_offload(_transformer(tiny_model), 0, "cpu")
    assert report.blocks == 0 and report.offloaded_bytes == 0

    # memory shared between an offloaded block and something outside it: refused, the model left as it was
    shared = _transformer(tiny_model)
    rows, cols = shared.proj_out.weight.shape
    shared.proj_out.weight.data = shared.transformer_blocks[0].norm1.linear.weight.data[:rows, :cols]
    with pytest.raises(ValueError, match="proj_out.weight shares memory with the frozen weights of offloaded block 0"):
        enable_block_offload(shared, 1, "cpu")
    assert shared.transformer_blocks[0].norm1.linear.weight.numel() > 0 and not shared._forward_pre_hooks


def test_report_says_what_moves():
    from kontext_trainer.offload import OffloadReport

    report = OffloadReport(19, 57, int(6.4 * 2**30), int(12.8 * 2**30), "pinned CPU memory")
    assert report.describe() == ("offloading 19 of 57 blocks (6.4 GiB) to pinned CPU memory, "
                                 "12.8 GiB copied per step")
