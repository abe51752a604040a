"""Quantized base models with optimum-quanto: int8-quanto (qint8 weights) and fp8-quanto (qfloat8 weights).

In: the model folder and `base_model_precision` (`load_transformer`, which streams the model in: see below), or a
model already in memory (`quantize_transformer`). Out: the transformer with its Linear weights quantized and frozen
(`optimum.quanto.quantize` + `freeze`), before any adapter is attached, so the adapter (LoRA or LoKr) stays a float32
module on top of the frozen quantized base. The adapter file holds only the adapter's full-precision weights: it
loads into an unquantized pipeline as is. The guide's advice stands: infer at the precision you trained (an
int8-trained adapter is best used on an int8 base).

Excluded from quantization, as SimpleTuner does (fnmatch patterns over full module names, so they name the modules
themselves: `proj_out` is the final projection, not `single_transformer_blocks.N.proj_out`): `*.norm, *.norm1,
*.norm2, *.norm2_context, proj_out, x_embedder, norm_out, context_embedder`. In practice this keeps the input/output
projections (x_embedder, context_embedder, the final proj_out) in bf16; the adaLN modulation Linear inside a norm
(`norm1.linear`, `norm_out.linear`) is quantized, as in SimpleTuner: these hold ~3 B of the 12 B parameters and
keeping them in bf16 would cost ~6 GB.

`to_dequant_linears` then swaps every quanto QLinear for a `DequantLinear` holding the same int8/fp8 data
and scales as plain tensors: the same arithmetic as quanto's CUDA path (dequantize to bf16, bf16 matmul), but made of
ordinary tensors and one autograd Function, so torch.compile can compile the blocks (quanto's tensor subclasses
make dynamo fail) and the dequantization fuses into one kernel; its backward re-dequantizes instead of keeping a
bf16 copy of the weight.

Loading (`load_transformer`, via kontext_trainer.model.load_transformer) streams the base: the model is built on the
meta device from `transformer/config.json` (no memory), then its weights are read from the safetensors file or the
shards of its index one block at a time, in module order (embedders, each double block, each single block, norm_out,
proj_out), tensor by tensor, cast to the compute dtype and copied to the training device; the tensors are exactly
from_pretrained's. For int8-quanto / fp8-quanto each block is quantized and frozen as soon as its weights are there,
before the next block is read, so the whole bf16 model (~24 GB) never exists anywhere; data, scales and the
QuantizeReport are exactly those of loading whole + `quantize_transformer`. For the full 12 B model in int8 (~11.1
GiB once loaded): `quantize_on` "gpu" quantizes each block on the training device, whose peak is the blocks loaded
so far plus one bf16 block (a double block is 0.63 GiB) and quanto's temporaries; the host holds about one block of
memory-mapped file pages. "cpu" quantizes each block in RAM (one bf16 block and its int8 copy, ~1 GB) and then moves
it: the device never holds a bf16 copy of a quantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

QUANTO_EXCLUDE = ("*.norm", "*.norm1", "*.norm2", "*.norm2_context", "proj_out", "x_embedder", "norm_out",
                  "context_embedder")
QUANTIZED_PRECISIONS = {"int8-quanto": "qint8", "fp8-quanto": "qfloat8"}
FP8_MATMUL = "fp8-matmul"  # fp8 weights and fp8 matmuls for the frozen base: kontext_trainer/fp8.py
PRECISIONS = ("bf16", "fp32", *QUANTIZED_PRECISIONS, FP8_MATMUL)


@dataclass
class QuantizeReport:
    """Which Linear modules a quantized load quantized and which it kept, and the weights' bytes before and after."""

    precision: str
    quantized: list[str] = field(default_factory=list)  # Linear modules whose weights are now quantized
    kept: list[str] = field(default_factory=list)  # Linear modules left in the compute dtype (excluded)
    bytes_before: int = 0
    bytes_after: int = 0


def is_quantized(precision: str) -> bool:
    """Whether `precision` is one of the quanto base precisions (int8-quanto, fp8-quanto)."""
    return precision in QUANTIZED_PRECISIONS


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations, the non-quantized modules and the cached latents use for a base precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"base_model_precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return torch.float32 if precision == "fp32" else torch.bfloat16


def _weights_qtype(precision: str):
    from optimum.quanto import qfloat8, qint8

    return {"qint8": qint8, "qfloat8": qfloat8}[QUANTIZED_PRECISIONS[precision]]


def _param_bytes(module: torch.nn.Module) -> int:
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        data = getattr(t, "_data", None)  # quanto tensors: int8/fp8 data + float scale
        if data is not None:
            total += data.numel() * data.element_size()
            scale = getattr(t, "_scale", None)
            if scale is not None:
                total += scale.numel() * scale.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def quantize_transformer(transformer: torch.nn.Module, precision: str,
                         exclude: tuple[str, ...] = QUANTO_EXCLUDE) -> QuantizeReport:
    """Quantize the Linear weights of `transformer` in place (optimum-quanto), then freeze them. Call it before
    attaching an adapter. Raises ValueError for a precision that is not quantized."""
    if not is_quantized(precision):
        raise ValueError(f"{precision!r} is not a quantized precision ({', '.join(QUANTIZED_PRECISIONS)})")
    from optimum.quanto import freeze, quantize

    transformer.requires_grad_(False)
    report = QuantizeReport(precision=precision, bytes_before=_param_bytes(transformer))
    quantize(transformer, weights=_weights_qtype(precision), exclude=list(exclude))
    freeze(transformer)
    transformer.requires_grad_(False)  # freeze() makes new Parameters that would otherwise require grad
    _list_linears(transformer, report)
    report.bytes_after = _param_bytes(transformer)
    return report


def _list_linears(transformer: torch.nn.Module, report: QuantizeReport) -> None:
    from optimum.quanto import QLinear

    for name, module in transformer.named_modules():
        if isinstance(module, QLinear):
            report.quantized.append(name)
        elif isinstance(module, torch.nn.Linear):
            report.kept.append(name)


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ (data * scale)^T (+ bias), the weight dequantized on the fly; gradient for x only (frozen weight).
    Nothing but the quantized weight is kept for backward, which dequantizes it again."""

    @staticmethod
    def forward(ctx, x, data, scale, bias):
        w = (data.to(scale.dtype) * scale).to(x.dtype)  # quanto's dequantize: data.to(scale.dtype) * scale
        ctx.save_for_backward(data, scale)
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        data, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ (data.to(scale.dtype) * scale).to(grad_y.dtype)
        return grad_x, None, None, None


class DequantLinear(torch.nn.Module):
    """A frozen Linear whose weight is a quanto-quantized int8/fp8 tensor `data` [out, in] with one scale per output
    channel, as plain buffers: forward dequantizes and runs a bf16 matmul (quanto's CUDA arithmetic)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = data.shape
        self.register_buffer("weight_data", data)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_qlinear(cls, qlinear: torch.nn.Module) -> "DequantLinear":
        """A DequantLinear sharing a frozen quanto QLinear's quantized data, scales and bias."""
        w = qlinear.qweight if hasattr(qlinear, "qweight") else qlinear.weight
        if getattr(w, "_data", None) is None or getattr(w, "_scale", None) is None:
            raise TypeError(f"{type(qlinear).__name__} holds no frozen quanto weight (call optimum.quanto.freeze)")
        scale = w._scale.detach().reshape(-1, 1)
        bias = None if qlinear.bias is None else qlinear.bias.detach()
        return cls(w._data.detach(), scale, bias)

    def dequantized_weight(self, dtype=torch.bfloat16) -> torch.Tensor:
        """The weight as a plain [out, in] tensor of `dtype` (data times its row scales)."""
        return (self.weight_data.to(self.weight_scale.dtype) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinearFn.apply(x, self.weight_data, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weights={str(self.weight_data.dtype).removeprefix('torch.')} per-channel")


def to_dequant_linears(model: torch.nn.Module) -> int:
    """Replace every frozen quanto QLinear of `model` (also one inside an adapter wrapper, as `base_layer`) by a
    DequantLinear sharing its quantized data, in place; call it after the adapter is attached. Returns how many."""
    from optimum.quanto import QLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QLinear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DequantLinear.from_qlinear(module))
    return len(targets)


def _quantize_block(transformer: torch.nn.Module, name: str, precision: str, exclude: tuple[str, ...],
                    report: QuantizeReport) -> None:
    """Quantize and freeze the Linear modules of one loaded block `name` of `transformer`, as quantize_transformer
    does for the whole model: the exclusions match full module names (`proj_out` is the top-level one only)."""
    from optimum.quanto import freeze, quantize

    if not name:  # tensors of the root module itself: no Linear to quantize
        report.bytes_before += sum(t.numel() * t.element_size() for t in (
            *transformer.parameters(recurse=False), *transformer.buffers(recurse=False)))
        return
    report.bytes_before += _param_bytes(transformer.get_submodule(name))
    # quantize() walks the whole model: `include` limits it to this block, and the module names it matches and
    # records (QLinear.name) are the full ones, so `exclude` means what it means for the whole model
    quantize(transformer, weights=_weights_qtype(precision), include=[name, f"{name}.*"], exclude=list(exclude))
    block = transformer.get_submodule(name)
    freeze(block)
    block.requires_grad_(False)  # freeze() makes new Parameters that would otherwise require grad


def load_transformer(model_dir: Path | str, precision: str, device: torch.device | str, quantize_on: str = "gpu",
                     on_block=None, host_blocks=(), skeleton=None):
    """The frozen base transformer at `precision` on `device`, streamed block by block (module docstring):
    bf16/fp32 as stored, or quantized block by block on the device (`quantize_on` "gpu") or in RAM ("cpu").
    `on_block(name, done, total, transformer)` is called after each block is in place (quantized, on `device`).
    `host_blocks`: blocks that end in CPU memory (those block offload streams), quantized where the others are.
    Returns (transformer, QuantizeReport or None). ModelError (kontext_trainer.model) for a checkpoint that does not
    match its config.json or cannot be streamed."""
    from kontext_trainer import model as model_mod

    dtype = compute_dtype(precision)
    if not is_quantized(precision):  # bf16, fp32, fp8-matmul (converted after the adapter: see to_fp8_matmul)
        return model_mod.load_transformer(model_dir, dtype, device, on_block=on_block, host_blocks=host_blocks,
                                          skeleton=skeleton), None
    if quantize_on not in ("gpu", "cpu"):
        raise ValueError(f"quantize_on {quantize_on!r} is not one of gpu, cpu")
    report = QuantizeReport(precision=precision)
    transformer = model_mod.load_transformer(
        model_dir, dtype, device, read_device=device if quantize_on == "gpu" else "cpu", on_block=on_block,
        prepare=lambda name, tr: _quantize_block(tr, name, precision, QUANTO_EXCLUDE, report),
        host_blocks=host_blocks, skeleton=skeleton)
    _list_linears(transformer, report)
    report.bytes_after = _param_bytes(transformer)
    return transformer, report


def to_fp8_matmul(transformer: torch.nn.Module, device: torch.device | str):
    """fp8-matmul: after the adapter is attached, the frozen base Linear modules (the guide's exclusions kept in
    bf16) become fp8 weights with fp8 matmuls (kontext_trainer/fp8.py). Returns its Fp8Report. RuntimeError when
    the device has no fp8 matmuls."""
    from kontext_trainer import fp8

    fp8.require_fp8_support(device)
    return fp8.convert_base_linears(transformer, exclude=QUANTO_EXCLUDE)
