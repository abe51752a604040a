"""fp8 matmuls for the frozen base: the `fp8-matmul` base precision (SimpleTuner's fp8-torchao does the same).

In: a FluxTransformer2DModel in bf16 with its adapter attached (peft LoRA or LoKr). Out: the same model where every
frozen nn.Linear of the base (also the `base_layer` inside each adapter wrapper), except the guide's exclusions
(`quantize.QUANTO_EXCLUDE`: x_embedder, context_embedder, proj_out ...), is replaced by `Fp8Linear`:

- weights: float8 e4m3 with one float32 scale per output channel (amax / 448), so the base takes ~12 GB instead of
  ~24 GB, as with int8-quanto;
- forward: the input is quantized per row (per token) to e4m3 on the fly and multiplied with `torch._scaled_mm`,
  Hopper's fp8 tensor cores, twice the bf16 rate (optimum-quanto, by contrast, dequantizes to bf16 before a bf16
  matmul: memory only);
- backward: the base is frozen, so only the input's gradient is needed: grad_x = (grad_y * w_scale) @ w_fp8, with
  grad_y * w_scale quantized per row to e4m3, again on fp8 tensor cores. Nothing is saved for backward but the
  weights themselves.

The adapter itself (LoRA A/B, LoKr factors) is untouched: float32 weights, bf16/fp32 matmuls, exact gradients. What
changes is the base's arithmetic, by fp8 rounding of the inputs: benchmarks/bench_train_step.py compares loss and
adapter gradients with the bf16 step on the same batch (the numbers are in docs/performance.md). It is an option,
not the default.

CUDA needs compute capability 8.9 or newer (Ada, Hopper) for fp8 matmuls; `require_fp8_support` says so clearly.
On the CPU torch runs the same `_scaled_mm` (slowly): the tests check the arithmetic there.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_EPS = 1e-12


def require_fp8_support(device: torch.device | str) -> None:
    """Raise RuntimeError with the reason when `device` cannot run fp8 matmuls."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise RuntimeError(f"fp8-matmul needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                               f"{name} is {major}.{minor}. Use int8-quanto or fp8-quanto (fp8 storage, bf16 matmuls).")
    elif device.type != "cpu":
        raise RuntimeError(f"fp8-matmul runs on CUDA (compute capability 8.9+) or, slowly, on the CPU; not {device}")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D tensor: returns (q [M, K] float8, scale [M, 1] float32), t ~= q * scale."""
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_min(_EPS) / FP8_MAX
    q = (t.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


@torch.library.custom_op("kontext::fp8_mm", mutates_args=())
def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale).T for fp8 a [M, K], b [N, K] (scales [M, 1], [1, N]) on fp8 tensor cores.

    An opaque op for torch.compile: inductor fuses the quantization around it but keeps the row-major layouts the
    kernel needs (lowered as plain `_scaled_mm`, inductor was seen to hand it a column-major input)."""
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=a_scale.contiguous(),
                            scale_b=b_scale.contiguous(), out_dtype=out_dtype)


@fp8_mm.register_fake
def _fp8_mm_fake(a, a_scale, b, b_scale, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x @ (w_q * w_scale)^T (+ bias) with fp8 inputs; grad only for x (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_rows(x2)
        y = fp8_mm(x_q, x_scale, w_q, w_scale.view(1, -1), x.dtype)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(w_q, w_scale)
        ctx.x_dtype = x.dtype
        return y.view(*shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        w_q, w_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            n, k = w_q.shape
            g = grad_y.reshape(-1, n).float() * w_scale.view(1, -1)
            g_q, g_scale = quantize_rows(g)
            w_t = w_q.t().contiguous()  # [K, N]: grad_x = g @ w_t.T
            ones = torch.ones(1, k, device=w_q.device, dtype=torch.float32)
            grad_x = fp8_mm(g_q, g_scale, w_t, ones, ctx.x_dtype).view(*grad_y.shape[:-1], k)
        return grad_x, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen Linear with e4m3 weights (one scale per output channel) and fp8 matmuls both ways."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        w_q, scale = quantize_rows(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_q, scale.view(-1).contiguous(), bias)

    def dequantized_weight(self, dtype=torch.bfloat16) -> torch.Tensor:
        return (self.weight_q.float() * self.weight_scale.view(-1, 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight_q, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


@dataclass
class Fp8Report:
    converted: list[str] = field(default_factory=list)  # base Linear modules now Fp8Linear
    kept: list[str] = field(default_factory=list)  # frozen base Linear modules left in bf16 (excluded / odd shapes)
    bytes_before: int = 0
    bytes_after: int = 0


def _base_name(name: str) -> str:
    """The model's own module name of a Linear: peft's wrapper keeps the original under `.base_layer`."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def convert_base_linears(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> Fp8Report:
    """Replace every frozen nn.Linear of `model` (adapter weights, which require grad, are left alone) whose name
    matches none of the fnmatch patterns in `exclude` and whose sizes are multiples of 16 (what the fp8 kernels
    need) by an Fp8Linear, in place. Call it after the adapter is attached; the bf16 weights are freed."""
    report = Fp8Report()
    targets = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad:
            continue
        base = _base_name(name)
        if any(fnmatch.fnmatch(base, p) for p in exclude) or module.in_features % 16 or module.out_features % 16:
            report.kept.append(base)
            continue
        targets.append((name, module))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        report.bytes_before += module.weight.numel() * module.weight.element_size()
        new = Fp8Linear.from_linear(module)
        report.bytes_after += new.weight_q.numel() + new.weight_scale.numel() * 4
        setattr(parent, child, new)
        report.converted.append(_base_name(name))
        del module
    return report
