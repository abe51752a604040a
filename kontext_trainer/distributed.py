"""Data-parallel training over several processes: `accelerate launch`, `torchrun` or `kontext-train --num-processes N`.

In: the environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Out: `Dist`, this process's
place in the group, with the few collective operations the recipe needs.

How a step is split (DDP semantics): every rank builds the same global batch (same sampler, same seed; its size from
`batch_sizes`: N x train_batch_size per micro-step with the default per_device reading, train_batch_size with the
global one), takes its own contiguous shard of it (`shard_indices`: with per_device, exactly train_batch_size
samples each, of one bucket), and scales its loss by `len(shard) / len(batch)`; after the
micro-batches of one optimizer step the adapter's gradients are summed over the ranks in one flat all-reduce. The
result is the gradient of the global batch's mean loss, as one process with the whole batch computes it (only the
order of the floating-point additions differs). The base model is frozen, so only the adapter's gradients travel,
once per optimizer step (what DDP does with `no_sync` under gradient accumulation); a rank whose shard is empty
(a batch smaller than the number of processes) contributes zeros instead of deadlocking. Noise and sigmas are
drawn per sample (seeded by step and sample id), so they do not depend on which rank holds the sample.

Caching is split too: each rank encodes a disjoint share of the missing cache entries, then all wait at a
barrier. Where the cache folder is not shared between machines (a per-node disk), a second round has each machine
encode what its own cache still lacks, shared out among its local processes. Validation is split as well (the
loss's batches and the images, each rank a contiguous share, gathered to every rank). Rank 0 alone writes
checkpoints, the final LoRA, validation strips, metrics and TensorBoard logs.

Several machines: every node runs the same command under `torchrun --nnodes M --nproc-per-node G --rdzv-backend
c10d --rdzv-endpoint HOST:PORT --rdzv-id RUN` (or `accelerate launch --num_machines M --machine_rank i
--main_process_ip HOST`); ranks are global, LOCAL_WORLD_SIZE tells each its machine's share.

The process group is set up by accelerate's `PartialState` (NCCL on GPUs, gloo on the CPU), so both
`accelerate launch --multi_gpu` and `torchrun` work.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch


class CollectiveTimeout(RuntimeError):
    """This process waited for the others longer than the process group's timeout (distributed_timeout_minutes).
    Raised where the backend reports it to Python (gloo); NCCL's watchdog ends the process itself, with torch's
    "Watchdog caught collective operation timeout" message."""


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


@dataclass
class Dist:
    """This process's rank in the data-parallel group (rank 0 of 1 when not launched distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    """Processes on this machine (node): with several nodes, each node's share of what its own cache lacks."""

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and reports."""
        return self.rank == 0

    def barrier(self, waiting_for: str = "the other processes") -> None:
        """Wait for every rank (nothing when not distributed). Past the process group's timeout, raises
        CollectiveTimeout naming `waiting_for` (what the others were doing, e.g. "rank 0's validation")."""
        if self.enabled:
            import torch.distributed as dist

            with self._waiting(waiting_for):
                dist.barrier()

    @contextlib.contextmanager
    def _waiting(self, waiting_for: str):
        """A collective that may wait long for the others: a timeout becomes CollectiveTimeout."""
        try:
            yield
        except RuntimeError as exc:  # gloo's "Timed out waiting ... for recv", DistBackendError included
            if _is_timeout(exc):
                raise CollectiveTimeout(f"process {self.rank} of {self.world_size} waited past the timeout for "
                                        f"{waiting_for}") from exc
            raise

    def all_reduce_grads(self, params: list[torch.nn.Parameter], timing: dict[str, float] | None = None) -> None:
        """Sum the gradients of `params` over the ranks, in one flat buffer (missing gradients count as 0).

        With `timing`, adds to it this rank's `idle_s` (waiting for the slowest rank to reach the all-reduce:
        measured with a one-element all-reduce first, after the device finished its work) and `allreduce_s` (the
        gradients' all-reduce itself). The extra synchronization costs a few microseconds a step."""
        if not self.enabled:
            return
        import time

        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if timing is not None:
            _synchronize(flat.device)
            t0 = time.perf_counter()
            dist.all_reduce(torch.zeros(1, device=flat.device), op=dist.ReduceOp.SUM)
            _synchronize(flat.device)
            t1 = time.perf_counter()
            timing["idle_s"] = timing.get("idle_s", 0.0) + t1 - t0
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if timing is not None:
            _synchronize(flat.device)
            timing["allreduce_s"] = timing.get("allreduce_s", 0.0) + time.perf_counter() - t1
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def describe(self, device: torch.device) -> str:
        """'2 processes (nccl) on cuda:0, cuda:1': every rank's device, gathered (a collective: call on all ranks)."""
        if not self.enabled:
            return f"1 process on {device}"
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        devices: list = [None] * self.world_size
        dist.all_gather_object(devices, str(device))
        return f"{self.world_size} processes ({dist.get_backend()}) on {', '.join(devices)}"

    def close(self) -> None:
        """Leave the process group once every rank is done: its communication threads are joined here, not torn
        down by the interpreter's exit (where gloo's can abort a finished process: "terminate called without an
        active exception")."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather(self, value: Any, waiting_for: str = "the other processes") -> list[Any]:
        """Every rank's `value` (a picklable object), in rank order, on every rank (a collective; past the timeout,
        CollectiveTimeout naming `waiting_for`)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        with self._waiting(waiting_for):
            dist.all_gather_object(out, value)
        return out

    def sum_scalar(self, value: float, device=None) -> float:
        """`value` summed over the ranks (a collective: call on all ranks)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_sizes(train_batch_size: int, world_size: int, semantics: str) -> tuple[int, int]:
    """(global micro-batch, the largest share one process trains) for `train_batch_size` read as `semantics`:
    per_device: (B x N, B), as SimpleTuner, diffusers and accelerate read it; global: (B, ceil(B / N))."""
    if semantics == "per_device":
        return train_batch_size * world_size, train_batch_size
    return train_batch_size, -(-train_batch_size // world_size)


def describe_batch(train_batch_size: int, world_size: int, semantics: str, accumulation: int) -> str:
    """The start-up line of the batch a step trains, e.g. `batch: 1 per process x 2 processes = 2 samples per
    micro-step (batch_semantics per_device)`; where a global batch leaves processes idle, it says so."""
    total, share = batch_sizes(train_batch_size, world_size, semantics)
    per_step = f"; x {accumulation} accumulated = {total * accumulation} per optimizer step" if accumulation > 1 else ""
    if semantics == "per_device":
        return (f"batch: {train_batch_size} per process x {world_size} processes = {total} samples per micro-step "
                f"(batch_semantics per_device){per_step}")
    idle = (f"; {world_size - total} of {world_size} processes idle every micro-step (batch_semantics per_device "
            f"gives each a batch of its own)" if total < world_size else "")
    return (f"batch: {total} samples per micro-step shared out over {world_size} processes, at most {share} each "
            f"(batch_semantics global){per_step}{idle}")


def world_size_from_env() -> int:
    """WORLD_SIZE as a launcher sets it; 1 when unset or not a number."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_world_size_from_env() -> int:
    """LOCAL_WORLD_SIZE as torchrun (and accelerate launch) sets it: the processes on this machine; WORLD_SIZE when
    unset (one machine), 1 when not a number."""
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size_from_env())
    except ValueError:
        return 1


def gpu_problems(device: str, local_world_size: int, gpus: int) -> list[str]:
    """What keeps `local_world_size` processes on this machine from taking one GPU each: a `device` that names one
    GPU for all of them, or fewer visible GPUs than processes. Empty with one process, on the CPU, or when fine."""
    if local_world_size <= 1 or device == "cpu" or gpus == 0:
        return []
    problems = []
    if device.startswith("cuda:"):
        problems.append(f"--device {device} with {local_world_size} processes would put every process on one GPU: "
                        f"use --device cuda (or auto), and each process takes the GPU of its local rank")
    if local_world_size > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        problems.append(f"{local_world_size} processes on this machine but {gpus} GPU(s) visible"
                        + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                        + f": one process per GPU, so --num-processes {gpus} at most")
    return problems


def init_distributed(device: str, timeout_minutes: float) -> tuple[Dist, torch.device | None]:
    """Join the process group when a launcher started several processes; else a single-process Dist.
    Returns the device accelerate assigns to this rank (None when not distributed). `timeout_minutes`: how long
    a collective (a barrier, the gradient all-reduce) waits for the slowest process before it fails."""
    if world_size_from_env() <= 1:
        return Dist(), None
    from datetime import timedelta

    from accelerate import PartialState

    state = PartialState(cpu=(device == "cpu"), timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index,
                local_world_size=local_world_size_from_env()), state.device


def shard_indices(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of one global batch: sizes differ by at most one, the first ranks take the
    larger shares; a batch smaller than the group leaves the last ranks empty."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (1 if rank < extra else 0)]


def launch(num_processes: int, argv: list[str]) -> int:
    """Run `python -m kontext_trainer ARGV` in `num_processes` processes on this machine (torch.distributed.run,
    the launcher `accelerate launch --multi_gpu` uses) and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
           "-m", "kontext_trainer", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env).returncode
