"""Data-parallel training over several processes: `accelerate launch`, `torchrun` or `kontext-train --num-processes N`.

In: the environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Out: `Dist`, this process's
place in the group, with the few collective operations the recipe needs.

How a step is split (DDP semantics): every rank builds the same global batch (same sampler, same seed), takes its
own contiguous shard of it (`shard_indices`), and scales its loss by `len(shard) / len(batch)`; after the
micro-batches of one optimizer step the adapter's gradients are summed over the ranks in one flat all-reduce. The
result is the gradient of the global batch's mean loss, as one process with the whole batch computes it (only the
order of the floating-point additions differs). The base model is frozen, so only the adapter's gradients travel,
once per optimizer step (what DDP does with `no_sync` under gradient accumulation); a rank whose shard is empty
(a batch smaller than the number of processes) contributes zeros instead of deadlocking. Noise and sigmas are
drawn per sample (seeded by step and sample id), so they do not depend on which rank holds the sample.

Caching is split too: each rank encodes a disjoint share of the missing cache entries, then all wait at a
barrier. Rank 0 alone writes checkpoints, the final LoRA, validation strips, metrics and TensorBoard logs.

The process group is set up by accelerate's `PartialState` (NCCL on GPUs, gloo on the CPU), so both
`accelerate launch --multi_gpu` and `torchrun` work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's rank in the data-parallel group (rank 0 of 1 when not launched distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing when not distributed)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in one flat buffer (missing gradients count as 0)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
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

    def sum_scalar(self, value: float, device=None) -> float:
        """`value` summed over the ranks (a collective: call on all ranks)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def world_size_from_env() -> int:
    """WORLD_SIZE as a launcher sets it; 1 when unset or not a number."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str) -> tuple[Dist, torch.device | None]:
    """Join the process group when a launcher started several processes; else a single-process Dist.
    Returns the device accelerate assigns to this rank (None when not distributed)."""
    if world_size_from_env() <= 1:
        return Dist(), None
    from accelerate import PartialState

    state = PartialState(cpu=(device == "cpu"))
    return Dist(rank=state.process_index, world_size=state.num_processes,
                local_rank=state.local_process_index), state.device


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
