"""Block offload for small GPUs: keep the frozen weights of the first N transformer blocks in CPU memory and stream
each one to the GPU only while it runs (musubi-tuner's and diffusion-pipe's `blocks_to_swap`).

In: a FluxTransformer2DModel with its adapter attached (and, if any, its base converted to DequantLinear / Fp8Linear
and its q/k/v fused), `n_blocks` and the training device. Out: the same model, whose first `n_blocks` blocks of
`model.transformer_blocks(model)` (the double-stream blocks first, then the single-stream ones; the blocks that
`memory.set_activation_checkpointing` checkpoints first) hold their frozen tensors (parameters that do not require
grad, and buffers) in host memory, and an `OffloadReport` with what moved and what a step copies. Trainable adapter
weights (LoRA/LoKr) stay on the device. `disable_block_offload(model)` puts everything back as it was;
`block_bytes(model)` gives the frozen bytes of every block, for the memory planner.

How a block runs:
- forward (training or no_grad validation): a forward pre-hook brings the block in and starts copying the next
  offloaded block; a forward hook releases the block when its forward is done;
- backward: an identity autograd Function on the block's outputs brings the block back before its backward and
  before gradient checkpointing recomputes its forward (and starts copying the block before it); one on its inputs
  releases it once its backward is done. What is still resident when a backward ends is released then.
The trainer checkpoints every offloaded block (non-reentrant, as memory.set_activation_checkpointing does):
otherwise the tensors autograd saves in the forward (transposed weights) keep the device copies alive until the
backward, and offloading saves no memory (the results stay right).

The tensors themselves are swapped with `tensor.data = ...`: the Parameter and buffer objects stay the same (module
identity, state_dict keys, torch.compile's guards), only their storage changes. The frozen tensors of a block are
grouped by storage and each storage is copied once, the tensors re-pointed into the copy with their own offset, size
and stride, so views stay views (fuse.py's q/k/v views into the fused weight) and nothing is stored twice. Outside
the window in which its block runs, an offloaded tensor is a 0-element placeholder on the device: any use of it
fails loudly instead of computing with something stale, and `model.to(device)` finds nothing of it to move back.

On CUDA the host copy is pinned (registered with CUDA at its exact size: torch's pinned allocator rounds every
allocation up to a power of two) and each block's frozen tensors are one flat buffer, copied in one transfer on a
side stream while the block before it computes. Ordering (see _fetch, _use, _release): a block's device buffer is
allocated on the compute stream; the side stream first waits for all compute work queued so far (the buffer may be
memory that a just-released block's queued kernels still read), then copies and records an event; the compute stream
waits for that event before the block runs, and again before the buffer is dropped (a prefetched block released
unused). Freed memory then goes back to the compute stream's pool, reused only by work queued after everything that
read it. So at most two offloaded blocks are on the device at once (the running one and the next), and no copy
races compute. On the CPU (the tests) the same mechanism is emulated: the offloader keeps the host copy privately
and a fetch hands the block a fresh clone of it.

Not supported: a later `.to()` of the model to another dtype or device, or diffusers' model CPU offload, which
replace buffer objects (the offload then fails loudly); torch.compile of the whole model or with CUDA graphs
(regional compilation of the blocks, what the trainer does, works: the hooks run outside the compiled blocks).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from kontext_trainer.model import transformer_blocks

_ALIGN = 256  # every storage starts on a 256-byte boundary in the host and device copies: kernels keep alignment
_ATTR = "_kontext_block_offload"


@dataclass(frozen=True)
class OffloadReport:
    """What `enable_block_offload` moved to host memory and what a step copies back."""

    blocks: int
    """Blocks whose frozen tensors live in host memory."""
    total_blocks: int
    offloaded_bytes: int
    """Frozen bytes moved off the device."""
    bytes_per_step: int
    """Bytes copied to the device per training step: each offloaded block once in the forward, once in the backward
    (a forward-only pass copies half of it)."""
    host: str
    """Where the blocks live: "pinned CPU memory" on CUDA."""

    @property
    def offloaded_gib(self) -> float:
        """offloaded_bytes in GiB."""
        return self.offloaded_bytes / 2**30

    @property
    def copied_gib_per_step(self) -> float:
        """bytes_per_step in GiB."""
        return self.bytes_per_step / 2**30

    def describe(self) -> str:
        """The trainer's start-up line."""
        return (f"offloading {self.blocks} of {self.total_blocks} blocks ({self.offloaded_gib:.1f} GiB) to "
                f"{self.host}, {self.copied_gib_per_step:.1f} GiB copied per step")


@dataclass
class _Group:
    """One storage of a block: the bytes [start, start + nbytes) of it that the block's tensors view, where they go
    in the block's copy (`base`), and each tensor with its byte offset in the storage, size and stride."""
    start: int
    nbytes: int
    device: torch.device
    tensors: list = field(default_factory=list)
    base: int = 0


def _frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    out, seen = [], set()
    for t in itertools.chain((p for p in block.parameters() if not p.requires_grad), block.buffers()):
        if t is None or id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(f"block offload cannot move a {type(t).__name__} (a tensor subclass, such as quanto's "
                             f"quantized weights); convert the base first (quantize.to_dequant_linears)")
        out.append(t)
    return out


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _groups(block: torch.nn.Module, keep_alignment: bool = False) -> list[_Group]:
    """The frozen tensors of `block` grouped by the storage they view; `base` laid out one after the other, each on
    a 256-byte boundary (as a fresh CUDA allocation would be) or, with `keep_alignment` (the CPU emulation), at the
    original address modulo 256: CPU matmul kernels round differently at other alignments, and the emulation must
    compute exactly what the model computes without it."""
    groups: dict[tuple, _Group] = {}
    spans: dict[tuple, list[int]] = {}
    for t in _frozen_tensors(block):
        key = _storage_key(t)
        offset = t.storage_offset() * t.element_size()
        extent = (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        lo, hi = spans.setdefault(key, [offset, offset + extent])
        spans[key] = [min(lo, offset), max(hi, offset + extent)]
        groups.setdefault(key, _Group(0, 0, t.device)).tensors.append((t, offset, tuple(t.shape), t.stride()))
    base = 0
    for key, g in groups.items():
        lo, hi = spans[key]
        g.start = lo // _ALIGN * _ALIGN  # keeps every offset a multiple of its tensor's element size
        g.nbytes = hi - g.start
        shift = (key[1] + g.start) % _ALIGN if keep_alignment else 0
        if any(shift % t.element_size() for t, *_ in g.tensors):
            shift = 0
        g.base = base + shift
        base += -(-(shift + g.nbytes) // _ALIGN) * _ALIGN
    return list(groups.values())


def block_bytes(model: torch.nn.Module) -> list[int]:
    """Frozen bytes of each block of `model.transformer_blocks(model)`, in that order (storages shared by several
    tensors, such as fused q/k/v, counted once): what offloading that block takes off the device."""
    offloader = getattr(model, _ATTR, None)
    sizes = []
    for i, block in enumerate(transformer_blocks(model)):
        if offloader is not None and i < len(offloader.blocks):
            sizes.append(offloader.blocks[i].nbytes)
        else:
            sizes.append(sum(g.nbytes for g in _groups(block)))
    return sizes


def _view(storage_holder: torch.Tensor, byte_offset: int, t: torch.Tensor, size, stride) -> torch.Tensor:
    """A tensor of t's dtype viewing `storage_holder`'s storage at `byte_offset` with `size` and `stride`."""
    offset = storage_holder.storage_offset() * storage_holder.element_size() + byte_offset
    return torch.empty(0, dtype=t.dtype, device=storage_holder.device).set_(
        storage_holder.untyped_storage(), offset // t.element_size(), size, stride)


def _register_pinned(nbytes: int) -> tuple[torch.Tensor, int | None]:
    """`nbytes` of page-locked host memory: a plain CPU buffer registered with CUDA at its exact size, or, where
    registering fails, torch's pinned allocator (which rounds up to a power of two). Returns (buffer, the address
    registered, to unregister at the end, or None)."""
    page = 4096
    size = -(-nbytes // page) * page
    if size == 0:
        return torch.empty(0, dtype=torch.uint8), None
    raw = torch.empty(size + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page  # whole pages of our own: no other allocation shares a registered page
    host = raw[start:start + size]
    try:
        err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), size, 0)
        if int(getattr(err, "value", err)) == 0:
            return host, host.data_ptr()
        # CUDA keeps a failed call's error for the next check, which torch makes after its next kernel launch and
        # would report there: launch one now and drop what it reports
        try:
            torch.zeros(1, device="cuda")
        except RuntimeError:
            pass
    except (AttributeError, RuntimeError):
        pass
    return torch.empty(size, dtype=torch.uint8, pin_memory=True), None


class _OnBackward(torch.autograd.Function):
    """Identity on some tensors whose backward calls `callback` once the gradients of all of them are complete.
    On an offloaded block's outputs it runs before any backward of the block and before gradient checkpointing
    recomputes the block's forward (bring the block in); on its inputs, after the block's backward (let it go); on
    the model's output, first in a backward (start copying the block needed first)."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _pass_through(callback, *containers) -> bool:
    """Pass the tensors that require grad among the items of `containers` (lists and dicts, changed in place)
    through ONE _OnBackward, so that `callback` runs once the gradients of all of them are complete. False where
    none requires grad."""
    slots = [(c, k) for c in containers for k, v in (c.items() if isinstance(c, dict) else enumerate(c))
             if isinstance(v, torch.Tensor) and v.requires_grad]
    if not slots:
        return False
    for (c, k), out in zip(slots, _OnBackward.apply(callback, *[c[k] for c, k in slots])):
        c[k] = out
    return True


def _pass_output_through(callback, output):
    """`output` (a tensor, a tuple / list or a dict of them, as modules return) with its tensors passed through
    _pass_through; None (keep it as it is) where nothing requires grad or the type is another."""
    if isinstance(output, torch.Tensor):
        items = [output]
        return items[0] if _pass_through(callback, items) else None
    if type(output) in (tuple, list):
        items = list(output)
        return type(output)(items) if _pass_through(callback, items) else None
    if isinstance(output, dict):  # diffusers' BaseOutput is a dict: changed in place, keys and attributes alike
        return output if _pass_through(callback, output) else None
    return None


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread: then the block's forward is checkpointing's
    recomputation, inside the block's backward (its weights are already in and must stay)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Block:
    module: torch.nn.Module
    groups: list[_Group]
    host_offset: int
    nbytes: int  # frozen bytes (what block_bytes reports)
    size: int  # bytes of its copy, alignment included


class _Offloader:
    def __init__(self, model: torch.nn.Module, n_blocks: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        all_blocks = transformer_blocks(model)
        self.total_blocks = len(all_blocks)
        self.blocks: list[_Block] = []
        offset = 0
        for block in all_blocks[:n_blocks]:
            groups = _groups(block, keep_alignment=not self.cuda)
            size = -(-(groups[-1].base + groups[-1].nbytes) // _ALIGN) * _ALIGN if groups else 0
            self.blocks.append(_Block(block, groups, offset, sum(g.nbytes for g in groups), size))
            offset += size
        self._check_not_shared(model)
        self.registered = None
        if self.cuda:
            self.host, self.registered = _register_pinned(offset)
            self.copy_stream = torch.cuda.Stream(device)
        else:
            self.host = torch.empty(offset, dtype=torch.uint8)
        self.placeholders: dict[torch.dtype, torch.Tensor] = {}
        with torch.no_grad(), torch.inference_mode(False):
            for b in self.blocks:
                for g in b.groups:
                    src = torch.empty(0, dtype=torch.uint8, device=g.device).set_(
                        g.tensors[0][0].untyped_storage(), g.start, (g.nbytes,), (1,))
                    self.host[b.host_offset + g.base:b.host_offset + g.base + g.nbytes].copy_(src)
                self._point_at_placeholders(b)
        self.resident: dict[int, tuple] = {}  # index -> (device copy, ready event, stream it was allocated on)
        self.backward_callback_queued = False
        self.hooks = [model.register_forward_pre_hook(self._model_pre_hook),
                      model.register_forward_hook(self._model_post_hook)]
        for i, b in enumerate(self.blocks):
            self.hooks.append(b.module.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self.hooks.append(b.module.register_forward_hook(self._post_hook(i)))

    def _check_not_shared(self, model):
        """Refuse what this cannot do right: a storage viewed both by an offloaded block and by something else
        (another block, a trainable parameter, a module outside the blocks) would be stored twice or go stale."""
        owner = {}
        for i, b in enumerate(self.blocks):
            for g in b.groups:
                key = _storage_key(g.tensors[0][0])
                if owner.setdefault(key, i) != i:
                    raise ValueError(f"offloaded blocks {owner[key]} and {i} share the memory of frozen weights: "
                                     f"block offload cannot move them")
        frozen = {id(t) for b in self.blocks for g in b.groups for t, *_ in g.tensors}
        for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                       model.named_buffers(remove_duplicate=False)):
            if t is None or t.numel() == 0 or id(t) in frozen:
                continue
            if _storage_key(t) in owner:
                raise ValueError(f"{name} shares memory with the frozen weights of offloaded block "
                                 f"{owner[_storage_key(t)]}: block offload cannot move that block")

    # ------------------------------------------------------------------ moving tensors

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.placeholders:
            self.placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self.placeholders[dtype]

    def _point_at_placeholders(self, b: _Block) -> None:
        for g in b.groups:
            for t, *_ in g.tensors:
                t.data = self._placeholder(t.dtype)

    @staticmethod
    def _point_into(b: _Block, copy: torch.Tensor) -> None:
        """Re-point every frozen tensor of `b` into `copy` (its flat uint8 copy), each view where it was."""
        for g in b.groups:
            for t, offset, size, stride in g.tensors:
                t.data = _view(copy, g.base + offset - g.start, t, size, stride)

    def _fetch(self, i: int) -> None:
        """Start bringing block i to the device (nothing if it is there or coming)."""
        if i in self.resident or not 0 <= i < len(self.blocks):
            return
        b = self.blocks[i]
        host = self.host[b.host_offset:b.host_offset + b.size]
        with torch.no_grad(), torch.inference_mode(False):
            if not self.cuda:  # the emulation: a fresh copy each time, like a new transfer
                copy, ready, stream = host.clone(), None, None
            else:
                # The copy is allocated on the compute stream, so the caching allocator may hand it memory that a
                # block released earlier on that stream still uses in kernels queued there. The side stream waits for
                # everything queued so far before writing into it; the compute stream waits for `ready` before
                # reading it (_use), and before the copy is freed (_release).
                stream = torch.cuda.current_stream(self.device)
                copy = torch.empty(b.size, dtype=torch.uint8, device=self.device)
                self.copy_stream.wait_stream(stream)
                with torch.cuda.stream(self.copy_stream):
                    copy.copy_(host, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(self.copy_stream)
            self._point_into(b, copy)
        self.resident[i] = (copy, ready, stream)

    def _use(self, i: int) -> None:
        """Block i is about to compute on the current stream: have it there."""
        self._fetch(i)
        copy, ready, stream = self.resident[i]
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            if current != stream:  # used on a stream it was not allocated on: keep it until that work is done
                copy.record_stream(current)

    def _release(self, i: int) -> None:
        entry = self.resident.pop(i, None)
        if entry is None:
            return
        copy, ready, stream = entry
        if ready is not None:
            stream.wait_event(ready)  # a prefetched copy never waited for: freed only after it landed
        with torch.no_grad(), torch.inference_mode(False):
            self._point_at_placeholders(self.blocks[i])
        # `copy` goes out of scope here: stream-ordered, its memory is reused only after the kernels queued on
        # `stream` (and on any stream it was recorded on) are done with it

    def _release_all(self) -> None:
        for i in list(self.resident):
            self._release(i)

    # ------------------------------------------------------------------ hooks

    def _model_pre_hook(self, module, args):
        if _in_backward():
            return
        # a new pass: whatever an interrupted backward left behind goes (a finished one leaves nothing)
        self.backward_callback_queued = False
        self._release_all()
        self._fetch(0)  # the first block's copy overlaps the embedders

    def _model_post_hook(self, module, args, output):
        if _in_backward() or not torch.is_grad_enabled() or not self.blocks:
            return None
        return _pass_output_through(self._backward_starts, output)

    def _pre_hook(self, i: int):
        @torch.compiler.disable  # side effects: runs eagerly, the compiled block is what comes between the hooks
        def hook(module, args, kwargs):
            self._use(i)
            if _in_backward():
                return None
            self._fetch(i + 1)
            args, kwargs = list(args), dict(kwargs)
            if torch.is_grad_enabled() and _pass_through(functools.partial(self._release, i), args, kwargs):
                return tuple(args), kwargs
            return None
        return hook

    def _post_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args, output):
            if _in_backward():
                return None
            self._release(i)
            if not torch.is_grad_enabled():
                return None
            if not (isinstance(output, (torch.Tensor, dict)) or type(output) in (tuple, list)):
                raise TypeError(f"block offload: offloaded block {i} returned a {type(output).__name__}; it handles "
                                f"blocks that return tensors, or tuples, lists or dicts of them")
            return _pass_output_through(functools.partial(self._backward_begins, i), output)
        return hook

    def _queue_backward_end(self) -> None:
        if not self.backward_callback_queued:
            # whatever a backward leaves resident (the first block, whose inputs need no gradient, so its input
            # callback never runs) is released when it ends
            self.backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_starts(self) -> None:
        # the gradient reached the model's output: copy the last offloaded block, needed first, while the blocks
        # after it run their backward
        self._queue_backward_end()
        self._fetch(len(self.blocks) - 1)

    def _backward_begins(self, i: int) -> None:
        self._queue_backward_end()
        self._use(i)
        self._fetch(i - 1)

    def _backward_ends(self) -> None:
        self.backward_callback_queued = False
        self._release_all()

    # ------------------------------------------------------------------ undo

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self._release_all()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        with torch.no_grad(), torch.inference_mode(False):
            for b in self.blocks:
                for g in b.groups:
                    host = self.host[b.host_offset + g.base:b.host_offset + g.base + g.nbytes]
                    copy = host.to(g.device, copy=True)
                    for t, offset, size, stride in g.tensors:
                        t.data = _view(copy, offset - g.start, t, size, stride)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            if self.registered is not None:
                torch.cuda.cudart().cudaHostUnregister(self.registered)
        self.host = None

    def report(self) -> OffloadReport:
        total = sum(b.nbytes for b in self.blocks)
        return OffloadReport(len(self.blocks), self.total_blocks, total, 2 * total,
                             "pinned CPU memory" if self.cuda else "CPU memory (emulated: training on the CPU)")


def enable_block_offload(model: torch.nn.Module, n_blocks: int, device: torch.device | str) -> OffloadReport:
    """Offload the frozen tensors of the first `n_blocks` blocks of `model.transformer_blocks(model)` to host memory;
    they come to `device` (CUDA, or the CPU, emulated) only while their block runs (see the module docstring).

    Call it once the adapter is attached and the base converted / fused, before the training starts and before or
    after torch.compile of the blocks. The offloaded blocks may be on the CPU or on `device`; the rest of the model
    is not moved (a later `model.to(device)` moves nothing of the offloaded blocks but their trainable weights; a
    later change of dtype breaks the offload). Raises ValueError for an `n_blocks` out of range, a device that is
    neither CUDA nor the CPU, or blocks that cannot be offloaded (quanto tensor subclasses, storages shared with
    something outside the block)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    blocks = transformer_blocks(model)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 0 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks {n_blocks!r} is not a number of blocks between 0 and {len(blocks)} "
                         f"(the model has {len(blocks)} transformer blocks)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"block offload streams blocks to a CUDA device (or, emulated, the CPU), not {device}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("block offload is already enabled on this model; disable_block_offload(model) first")
    offloader = _Offloader(model, n_blocks, device)
    setattr(model, _ATTR, offloader)
    return offloader.report()


def disable_block_offload(model: torch.nn.Module) -> bool:
    """Undo enable_block_offload: every frozen tensor back on the device it came from, in its own storage again
    (views still views), the hooks removed. Returns False where offload was not enabled."""
    offloader = getattr(model, _ATTR, None)
    if offloader is None:
        return False
    offloader.remove()
    delattr(model, _ATTR)
    return True
