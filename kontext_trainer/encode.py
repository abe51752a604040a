"""The speed side of the cache encoders (kontext_trainer.cache): T5's position bias made contiguous, host copies
without a per-batch sync, a bounded background writer, and opt-in VAE speedups. Nothing here changes a cached
byte on the default path; the exceptions are named where they are defined.

- `patch_t5_position_bias(t5)`: transformers' T5Attention.compute_bias returns its (1, heads, q, k) bias as a
  permuted view whose last dimension has stride `heads`. It reaches SDPA as the attention mask, and PyTorch's fused
  CUDA kernels refuse a mask whose last dimension is not contiguous: every layer then runs the math kernel (measured
  on an H100 for T5-XXL at 512 tokens: ~42 sequences/s, ~93 with the bias contiguous, and 4 GiB less). The patch
  wraps `compute_bias` of each attention module of one model instance; the class is left alone. Where PyTorch
  runs the same kernel either way (the CPU, or the math kernel forced) the outputs are bit-identical; on CUDA the
  fused kernel rounds differently from the math one (`compare_t5_bias_patch` measures by how much: on an H100 with
  random T5-XXL weights up to 0.14 on outputs of up to 4.06, and both exactly as far from a float32 run, RMS error
  0.01357: benchmarks/t5_bias_check.py).
- `to_host(*tensors)`: device -> pinned host copies queued on the current stream, with an event to wait on, so the
  thread that queues GPU work never waits for it.
- `BoundedWriter`: write jobs on background threads, a bounded number in flight, results and errors handed back in
  the caller's thread.
- `vae_speedups(vae, names)`: channels_last weights, cuDNN autotuning, torch.compile of the encoder. Each gives
  latents that differ from the default path's in the last bits; off unless asked for.
"""

from __future__ import annotations

import contextlib
import types
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import torch

# ------------------------------------------------------------------------------------------- T5 position bias


def _contiguous_compute_bias(self, *args, **kwargs):
    # The class's own method (whatever its signature in this transformers version), its result laid out densely.
    return type(self).compute_bias(self, *args, **kwargs).contiguous()


def _is_patched(module) -> bool:
    bound = vars(module).get("compute_bias")
    return getattr(bound, "__func__", None) is _contiguous_compute_bias


def patch_t5_position_bias(model) -> int:
    """Make every relative-attention-bias module of this T5 instance return its bias contiguous. Returns how many
    modules were patched now (0 if already patched: idempotent). A bound method on the instance, not a closure, so
    a deep copy of the model calls its own weights."""
    n = 0
    for m in model.modules():
        if getattr(m, "has_relative_attention_bias", False) and callable(getattr(type(m), "compute_bias", None)):
            if not _is_patched(m):
                m.compute_bias = types.MethodType(_contiguous_compute_bias, m)
                n += 1
    return n


def unpatch_t5_position_bias(model) -> int:
    """Undo `patch_t5_position_bias`; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if _is_patched(m):
            del m.compute_bias
            n += 1
    return n


CHECK_CAPTIONS = (
    "make it red",
    "Replace the cloudy sky with a clear sunset and add warm light on the building's facade.",
    "",
    "remove the person on the left, keep the shadows; change the text on the sign to 'OPEN 24/7'",
)


def compare_t5_bias_patch(t5, tokenizer, device, captions: Sequence[str] = CHECK_CAPTIONS,
                          max_sequence_length: int = 512, force_math: bool = False) -> dict[str, float]:
    """The T5 encoder's output (`last_hidden_state`, as FluxKontextPipeline calls it: padded to
    `max_sequence_length`, no attention mask) without and with `patch_t5_position_bias`, for `captions` as one batch
    on `device`: `max_abs` (the largest |difference|), `max_value` (the largest |output|), `max_rel` (the first over
    the second) and `cosine` (of the flattened outputs). The model is left patched or unpatched as it was found.

    Identical (max_abs 0.0) wherever both runs use the same SDPA kernel: on the CPU, and with `force_math=True`
    (PyTorch's math kernel for both) anywhere. On CUDA without `force_math`, the unpatched model runs the math kernel
    (transformers <= 5.17 passes the permuted bias as is) and the patched one a fused kernel: expect a difference of
    the order of the dtype's rounding of the outputs (a few bf16 ulps of the largest values), not more."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    was_patched = unpatch_t5_position_bias(t5) > 0
    kernel = contextlib.nullcontext()
    if force_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    try:
        with torch.no_grad(), kernel:
            plain = t5(ids, output_hidden_states=False)[0].float()
            patch_t5_position_bias(t5)
            patched = t5(ids, output_hidden_states=False)[0].float()
    finally:
        unpatch_t5_position_bias(t5)
        if was_patched:
            patch_t5_position_bias(t5)
    max_abs = float((plain - patched).abs().max())
    max_value = float(plain.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(plain.flatten(), patched.flatten(), dim=0))
    return {"max_abs": max_abs, "max_value": max_value, "max_rel": max_abs / max(max_value, 1e-30), "cosine": cosine}


def check_t5_bias_patch(t5, tokenizer, device, captions: Sequence[str] = CHECK_CAPTIONS,
                        max_sequence_length: int = 512, force_math: bool = False) -> float:
    """Max |difference| of `compare_t5_bias_patch` (see there)."""
    return compare_t5_bias_patch(t5, tokenizer, device, captions, max_sequence_length, force_math)["max_abs"]


# ------------------------------------------------------------------------------------------- host copies


def to_host(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Host copies of `tensors` and an event that is complete once they are filled (None: ready now).

    CUDA: pinned buffers filled by non-blocking copies on the current stream, so the calling thread can queue the
    next batch at once; the writer thread waits on the event. The copies keep each tensor's values exactly (a copy
    never rounds). Other devices: `.to("cpu")` (CPU tensors are returned as they are)."""
    if not tensors or tensors[0].device.type != "cuda":
        return tuple(t.to("cpu") for t in tensors), None
    out = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensors[0].device))
    return tuple(out), ready


def wait(ready) -> None:
    """Block until the host copies behind `ready` (the event a copy returned; None: nothing pending) are done."""
    if ready is not None:
        ready.synchronize()


# ------------------------------------------------------------------------------------------- background writes


class BoundedWriter:
    """Write jobs on `threads` background threads, at most `depth` of them submitted and not yet collected:
    `submit` first waits for the oldest job beyond that, so memory stays bounded (each job holds one batch).

    A job returns how many items it wrote; `on_written(total)` is called in the caller's thread as jobs are
    collected, in submission order. A job's error is raised in the caller's thread by the `submit` or `drain` that
    collects it. Leaving the `with` block waits for every submitted job (each writes atomically), so no write runs
    on, or is left half-done, after it; when the block is left by an error, the jobs' own errors are not raised over
    it."""

    def __init__(self, depth: int = 2, threads: int = 1, on_written: Callable[[int], None] | None = None):
        self.depth = max(1, depth)
        self.written = 0
        self._on_written = on_written
        self._jobs: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kontext-cache-write")

    def __enter__(self) -> "BoundedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:
            self.drain()

    def submit(self, fn: Callable[..., int], *args) -> None:
        """Run `fn(*args)` on a writer thread, first collecting jobs beyond `depth` (see the class docstring)."""
        self._collect(keep=self.depth - 1)
        self._jobs.append(self._pool.submit(fn, *args))
        self._collect(keep=self.depth)

    def drain(self) -> int:
        """Wait for every submitted job; returns how many items all jobs wrote."""
        self._collect(keep=0)
        return self.written

    def _collect(self, keep: int) -> None:
        # beyond `keep`, wait for the oldest; below it, only take the ones already finished
        while self._jobs and (len(self._jobs) > keep or self._jobs[0].done()):
            self.written += self._jobs.popleft().result()
            if self._on_written:
                self._on_written(self.written)


# ------------------------------------------------------------------------------------------- VAE speedups

VAE_SPEEDUPS = ("channels_last", "cudnn_benchmark", "compile")


@contextlib.contextmanager
def vae_speedups(vae, names: Iterable[str] = ()):
    """Opt-in ways to run the VAE encoder faster, undone on exit. Each changes the latents in the last bits (other
    kernels, other rounding), so none is on by default:

    - "channels_last": the encoder's conv weights in channels_last (the input already is: see
      `cache.images_to_tensor`), so cuDNN runs NHWC kernels without transposing;
    - "cudnn_benchmark": cuDNN times its algorithms per shape and keeps the fastest (one slow first batch per shape);
    - "compile": torch.compile of the encoder's forward (fuses GroupNorm + SiLU, the half of the encode time that is
      not convolution). Compiling costs a minute or more, once per run (a second shape makes it dynamic): worth it
      for thousands of images, not for a few hundred."""
    names = tuple(names or ())
    unknown = sorted(set(names) - set(VAE_SPEEDUPS))
    if unknown:
        raise ValueError(f"unknown VAE speedup(s) {', '.join(unknown)}; known: {', '.join(VAE_SPEEDUPS)}")
    undo: list[Callable[[], Any]] = []
    try:
        if "channels_last" in names:
            vae.encoder.to(memory_format=torch.channels_last)
            undo.append(lambda: vae.encoder.to(memory_format=torch.contiguous_format))
        if "cudnn_benchmark" in names:
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            undo.append(lambda: setattr(torch.backends.cudnn, "benchmark", before))
        if "compile" in names:
            # an instance attribute shadows the class's forward; deleting it restores the module as it was (its
            # state_dict never changes, unlike wrapping the module in an OptimizedModule)
            vae.encoder.forward = torch.compile(vae.encoder.forward)
            undo.append(lambda: vars(vae.encoder).pop("forward", None))
        yield
    finally:
        for fn in reversed(undo):
            fn()
