"""Validation loss: "is it learning?" as a number, measured the same way at every evaluation.

In: the training transformer (adapter attached), a set of samples, a function that loads a bucketed batch of them
from the caches, fixed sigmas and the run seed. Out: a `LossReport`: the flow-matching loss of the samples at each
sigma and the mean over sigmas.

Everything random is fixed, so two evaluations differ only by the adapter's weights:
- sigmas: the given list (`validation_sigmas`, raw sigmas, no shift), every sample evaluated at every one of them;
- noise: one tensor per sample, drawn on the CPU from a generator keyed by (run seed, sample id) and not by the
  step, and reused at every sigma;
- caption: the sample's first caption, never dropped; references: all of them.

The forward is the training step's own (`flow.kontext_forward`, under the training attention context and
guidance) without backward, under `torch.no_grad` and in eval mode (no LoRA dropout), as the image validation runs
(compiled blocks: one more graph per block type, compiled by the first evaluation). Batches hold samples of one
bucket, at most the training micro-batch size, so the shapes are the training steps'. A batch's loss is the mean
over its samples (every sample of a bucket has the same number of target tokens), so the report weights every
sample equally; with loss masks it is the training loss's weighted mean, whose weights are the masks.

With several processes each evaluates a contiguous share of those batches (the same batches one process forms) and
the per-sigma sums are gathered: every process gets the report one process computes (up to float32 summation
order), in 1/N of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from kontext_trainer.data import Sample
from kontext_trainer.attention import attention_context
from kontext_trainer.distributed import shard_indices
from kontext_trainer.flow import KontextBatch, kontext_forward

@dataclass
class LossReport:
    """The loss of `samples` samples: `by_sigma` maps each sigma (as written by `sigma_name`) to the mean over the
    samples, `mean` is the mean of those."""

    mean: float
    by_sigma: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def sigma_name(sigma: float) -> str:
    """The key of one sigma in reports, metrics.jsonl and TensorBoard tags: `0.1`, `0.25`."""
    return f"{sigma:g}"


def eval_seed(run_seed: int, sample_id: str) -> int:
    """The seed of one sample's evaluation noise: depends on the run seed and the sample only."""
    import xxhash

    return xxhash.xxh64_intdigest(f"{run_seed}:{sample_id}:validation-loss".encode()) & ((1 << 63) - 1)


def eval_noise(run_seed: int, sample_id: str, shape: Sequence[int]) -> torch.Tensor:
    """The fixed noise of one sample (float32, on the CPU, so it is the same on every device)."""
    gen = torch.Generator().manual_seed(eval_seed(run_seed, sample_id))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def eval_batches(samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    """Samples grouped by bucket (buckets in a fixed order, samples by id), in batches of at most `batch_size`."""
    buckets: dict[tuple, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.sample_id):
        buckets.setdefault(s.bucket, []).append(s)
    out = []
    for key in sorted(buckets, key=repr):
        group = buckets[key]
        out.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return out


def pick_train_eval(samples: Sequence[Sample], exclude: set[str], n: int, run_seed: int) -> list[Sample]:
    """`n` training samples to evaluate beside the validation set (the gap shows over-fitting): not among
    `exclude` (validation samples that are training samples), chosen by a seeded hash of the sample id, so the set
    is fixed for a run, spread over the dataset, and independent of the manifest's row order."""
    pool = [s for s in samples if s.sample_id not in exclude]
    pool.sort(key=lambda s: (eval_seed(run_seed, "train-eval:" + s.sample_id), s.sample_id))
    return pool[:n]


def evaluate_loss(transformer, samples: Sequence[Sample], load: Callable[[list[Sample]], KontextBatch], *,
                  sigmas: Sequence[float], seed: int, batch_size: int, device, dtype, guidance: float = 1.0,
                  attention_backend: str = "auto", mask_loss_weight: float | None = None,
                  share: tuple[int, int] = (0, 1), gather: Callable[[Any], list[Any]] | None = None
                  ) -> LossReport | None:
    """The loss of `samples` at each of `sigmas` with their fixed noise (see the module docstring). `load(batch)`
    returns the batch's cached tensors (first captions, all references, loss masks as training loads them).
    `mask_loss_weight`: the training loss's weight outside a loss mask (None: kontext_forward's default). None when
    there are no samples. Raises FloatingPointError for a non-finite loss (on every process).

    With several processes: `share` is (this process's rank, the number of processes) and `gather(value)` returns
    every process's value in rank order (a collective, called once by every process)."""
    if not samples:
        return None
    try:
        part = loss_share(transformer, samples, load, sigmas=sigmas, seed=seed, batch_size=batch_size,
                          device=device, dtype=dtype, guidance=guidance, attention_backend=attention_backend,
                          mask_loss_weight=mask_loss_weight, share=share)
    except FloatingPointError as exc:
        if share[1] == 1:
            raise
        part = LossShare({}, 0, str(exc))  # said after the gather, on every process: none is left waiting in it
    return combine_shares(gather(part) if share[1] > 1 else [part])


@dataclass
class LossShare:
    """One process's part of a validation loss: per-sigma sums of batch loss x batch size, the samples counted,
    and the error that stopped it (None when none did)."""

    totals: dict[str, float]
    count: int
    failure: str | None = None


def loss_share(transformer, samples: Sequence[Sample], load: Callable[[list[Sample]], KontextBatch], *,
               sigmas: Sequence[float], seed: int, batch_size: int, device, dtype, guidance: float = 1.0,
               attention_backend: str = "auto", mask_loss_weight: float | None = None,
               share: tuple[int, int] = (0, 1)) -> LossShare:
    """Process `share[0]` of `share[1]`: the sums over its contiguous share of the batches one process forms
    (`eval_batches`), so that the shares of all processes add up to one process's sums."""
    rank, world = share
    batches = eval_batches(samples, batch_size)
    mine = [batches[i] for i in shard_indices(list(range(len(batches))), rank, world)]
    totals = {sigma_name(s): 0.0 for s in sigmas}
    count = _loss_sums(transformer, mine, load, totals, sigmas, seed, device, dtype, guidance, attention_backend,
                       {} if mask_loss_weight is None else {"mask_loss_weight": mask_loss_weight})
    return LossShare(totals, count)


def combine_shares(parts: Sequence[LossShare]) -> LossReport:
    """The report of every process's share together; raises FloatingPointError where a share failed."""
    failure = next((p.failure for p in parts if p.failure), None)
    if failure:
        raise FloatingPointError(failure)
    totals: dict[str, float] = {}
    for p in parts:
        for k, v in p.totals.items():
            totals[k] = totals.get(k, 0.0) + v
    count = sum(p.count for p in parts)
    by_sigma = {k: v / count for k, v in totals.items()}
    return LossReport(mean=sum(by_sigma.values()) / len(by_sigma), by_sigma=by_sigma, samples=count)


def _loss_sums(transformer, batches: list[list[Sample]], load, totals: dict[str, float], sigmas, seed: int, device,
               dtype, guidance: float, attention_backend: str, extra: dict) -> int:
    """Add each batch's loss x its size to `totals` (by sigma); returns the number of samples evaluated."""
    count = 0
    was_training = transformer.training
    transformer.eval()
    try:
        for group in batches:
            batch = load(group).to(device, dtype)
            noise = torch.stack([eval_noise(seed, s.sample_id, z.shape) for s, z in zip(group, batch.target)])
            # as kontext_step hands noise to kontext_forward: on the device, in the latents' dtype
            noise = noise.to(device=batch.target.device, dtype=batch.target.dtype)
            for sigma in sigmas:
                sig = torch.full((len(group),), float(sigma), dtype=torch.float32)
                ctx = attention_context(attention_backend, batch.target.device)
                with ctx, torch.no_grad():
                    value = float(kontext_forward(transformer, batch, sig, noise, guidance, **extra).loss)
                if not math.isfinite(value):
                    raise FloatingPointError(f"non-finite validation loss {value} at sigma {sigma}")
                totals[sigma_name(sigma)] += value * len(group)
            count += len(group)
    finally:
        if was_training:
            transformer.train()
    return count

