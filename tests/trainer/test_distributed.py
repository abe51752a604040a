"""Data-parallel training: shards of every batch per rank, caching split without duplication, rank 0 writes.
The CI run uses 2 CPU processes (gloo) through `kontext-train --num-processes 2` (torch.distributed.run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from kontext_data.manifest import read_manifest
from kontext_trainer.cache import shard_of
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import BucketBatchSampler, samples_from_records
from kontext_trainer.distributed import shard_indices
from kontext_trainer.recipe import train


def test_batch_shards_are_disjoint_and_cover_the_batch():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            idx = list(range(100, 100 + n))
            parts = [shard_indices(idx, r, world) for r in range(world)]
            assert sum(parts, []) == idx  # in order, each sample exactly once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_cache_shares_are_disjoint():
    keys = [f"{i:032x}" for i in range(11)]
    shares = [shard_of(keys, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(keys)
    assert shard_of(keys, 0, 1) == sorted(keys)


STEPS, BATCH = 4, 3


@pytest.fixture(scope="module")
def manifest7(tmp_path_factory):
    from conftest import write_sample_manifest

    return write_sample_manifest(tmp_path_factory.mktemp("dist"), n=7)


def test_two_processes_match_one(tiny_model, manifest7, tmp_path):
    """batch_semantics global: N processes share one micro-batch out and follow the 1-process run exactly; the
    validation loss and the final validation images are shared out too (each process computes some) and come out
    as one process's."""
    # the global batches of these steps include a batch of one sample: rank 1 then holds an empty shard
    samples = samples_from_records(read_manifest(manifest7).records())
    it = BucketBatchSampler(samples, BATCH, 42).iterate()
    sizes = [len(next(it)[2]) for _ in range(STEPS)]
    assert 1 in sizes and 3 in sizes

    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "kontext_trainer", "train", str(manifest7), "--model", str(tiny_model),
           "--output-dir", str(out2), "--device", "cpu", "--precision", "fp32", "--max-train-steps", str(STEPS),
           "--train-batch-size", str(BATCH), "--lora-rank", "4", "--lr", "1e-3", "--seed", "42",
           "--checkpointing-steps", "2", "--set", "report_to=none", "--set", "validation_samples=3", "--set",
           "validation_num_inference_steps=4", "--set", "batch_semantics=global", "--num-processes", "2", "--json",
           "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # rank 0 alone reports; it encoded only its share of the cache (the other rank did the rest)
    cache = [e for e in events if e["event"] == "cache"]
    assert len(cache) == 1 and 0 < cache[0]["latent_encoded"] < cache[0]["latent_total"] == 14
    assert len([e for e in events if e["event"] == "done"]) == 1
    assert any(e["event"] == "stage" and e["message"] == "data parallel: 2 processes (gloo) on cpu, cpu; a process "
               "waits at most 120 min for the others (distributed_timeout_minutes)" for e in events)
    latents = list((out2 / "cache" / "latents").rglob("*.safetensors"))
    assert len(latents) == 14  # every entry encoded, once
    assert (out2 / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    two = [m["loss"] for m in map(json.loads, (out2 / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    one = train(TrainConfig(manifest=str(manifest7), model=str(tiny_model), output_dir=str(tmp_path / "one"),
                            device="cpu", base_model_precision="fp32", max_train_steps=STEPS,
                            train_batch_size=BATCH, lora_rank=4, learning_rate=1e-3, seed=42, report_to="none",
                            validation_samples=3, validation_num_inference_steps=4))
    # Same samples, same per-sample noise and sigmas, same global-batch mean: the runs differ only in the order
    # of float32 additions (a batch of 3 split 2 + 1, partial means summed, gradients all-reduced), about 1e-7
    # relative per operation; Adam's division by sqrt(v) amplifies it in near-zero gradient components (measured:
    # ~4e-6 relative on the loss after 4 steps). 1e-4 leaves a 25x margin, while a real mistake (a shard lost or
    # counted twice, unweighted shard means) moves the loss by more than 1e-2.
    assert two == pytest.approx([l for _, l in one.losses], rel=1e-4)
    a = load_file(str(out2 / "pytorch_lora_weights.safetensors"))
    b = load_file(str(one.lora_path))
    assert a.keys() == b.keys()

    # validation: rank 0 took 2 of the 3 strips, rank 1 the third; rank 0 wrote all three, as one process does;
    # the loss batches were shared out the same way, and the losses are one process's
    timings = next(e for e in events if e["event"] == "timings")
    assert all(r["validation"] > 0 and r["validation loss"] > 0 for r in timings["per_rank"])
    val = [m for m in map(json.loads, (out2 / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    assert [m["step"] for m in val] == [r["step"] for r in one.validation_losses] == [0, STEPS]
    for m, r in zip(val, one.validation_losses):
        for key in ("val_loss", "train_eval_loss"):
            assert m[key] == pytest.approx(r[key], rel=1e-5)
            assert m[key + "_by_sigma"] == pytest.approx(r[key + "_by_sigma"], rel=1e-5)
    (shown,) = [e for e in events if e["event"] == "validation"]
    strips = sorted(Path(f).name for f in shown["files"])
    assert len(strips) == 3 and strips == sorted(p.name for p in one.validation_dirs[-1].glob("*.png"))
    for name in strips:
        with Image.open(out2 / "validation" / "step_000004" / name) as x, \
                Image.open(one.validation_dirs[-1] / name) as y:
            assert x.size == y.size
            diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
            assert diff.max() <= 2, name  # the adapters differ by float32 summation order only


def test_batch_sizes_per_device_and_global():
    from kontext_trainer.distributed import batch_sizes, describe_batch

    assert batch_sizes(1, 2, "per_device") == (2, 1)  # SimpleTuner's reading: each GPU a batch of its own
    assert batch_sizes(3, 4, "per_device") == (12, 3)
    assert batch_sizes(3, 2, "global") == (3, 2) and batch_sizes(1, 2, "global") == (1, 1)
    assert describe_batch(1, 2, "per_device", 1) == ("batch: 1 per process x 2 processes = 2 samples per "
                                                     "micro-step (batch_semantics per_device)")
    assert "1 of 2 processes idle" in describe_batch(1, 2, "global", 1)
    assert "x 4 accumulated = 8 per optimizer step" in describe_batch(1, 2, "per_device", 4)


def test_processes_that_cannot_each_have_a_gpu_are_refused_before_they_start(monkeypatch):
    """One process per GPU: more processes than visible GPUs, or one GPU named for all, is said in words (the
    processes would otherwise fail on a bare CUDA or NCCL error); CPU runs and single processes are not checked."""
    from kontext_trainer.distributed import gpu_problems

    assert gpu_problems("auto", 2, 2) == [] and gpu_problems("cuda", 4, 8) == []
    assert gpu_problems("cpu", 4, 1) == [] and gpu_problems("auto", 4, 0) == [] and gpu_problems("cuda:1", 1, 1) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    (too_many,) = gpu_problems("auto", 4, 2)
    assert too_many == ("4 processes on this machine but 2 GPU(s) visible (CUDA_VISIBLE_DEVICES=0,1): one process "
                        "per GPU, so --num-processes 2 at most")
    one_gpu, fewer = gpu_problems("cuda:0", 3, 2)
    assert "--device cuda:0 with 3 processes would put every process on one GPU: use --device cuda" in one_gpu
    assert fewer.startswith("3 processes on this machine but 2 GPU(s) visible")


def _train_cmd(manifest, model, out, *extra) -> list[str]:
    return ["-m", "kontext_trainer", "train", str(manifest), "--model", str(model), "--output-dir", str(out),
            "--device", "cpu", "--precision", "fp32", "--max-train-steps", str(STEPS), "--train-batch-size", "1",
            "--lora-rank", "4", "--lr", "1e-3", "--seed", "42", "--set", "report_to=none", "--set",
            "skip_final_validation=true", "--json", "--quiet", *extra]


def _losses(out) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.fixture(scope="module")
def one_process_batch_two(tiny_model, manifest7, tmp_path_factory):
    """The reference run: one process, a micro-batch of 2."""
    return train(TrainConfig(manifest=str(manifest7), model=str(tiny_model),
                             output_dir=str(tmp_path_factory.mktemp("one2")), device="cpu",
                             base_model_precision="fp32", max_train_steps=STEPS, train_batch_size=2, lora_rank=4,
                             learning_rate=1e-3, seed=42, report_to="none", skip_final_validation=True))


def test_per_device_batches_train_n_times_the_samples(tiny_model, manifest7, tmp_path, one_process_batch_two):
    """The default reading, as SimpleTuner's: 2 processes with train_batch_size 1 train 2 samples per micro-step,
    say so at start-up, and follow the 1-process run with a batch of 2; each rank reports its all-reduce time."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *_train_cmd(manifest7, tiny_model, out, "--num-processes", "2")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert any(e["event"] == "stage" and e["message"] == "batch: 1 per process x 2 processes = 2 samples per "
               "micro-step (batch_semantics per_device)" for e in events)
    timings = next(e for e in events if e["event"] == "timings")
    assert timings["samples_per_step"] == 2 and timings["processes"] == 2
    assert len(timings["per_rank"]) == 2 and all(r["allreduce_s"] > 0 and r["idle_s"] >= 0
                                                 for r in timings["per_rank"])
    assert _losses(out) == pytest.approx([l for _, l in one_process_batch_two.losses], rel=1e-4)


def test_two_nodes_through_a_rendezvous_with_caches_of_their_own(tiny_model, manifest7, tmp_path,
                                                                  one_process_batch_two):
    """Two "machines" (torchrun --nnodes 2, one process each, a c10d rendezvous on localhost), each with its own
    cache and output folder as on machines without a shared disk: each machine's cache ends up complete (the
    second caching round encodes what the other machine wrote elsewhere), rank 0 alone writes the adapter, and
    the run follows the 1-process run with a batch of 2."""
    results = _two_nodes(manifest7, tiny_model, tmp_path)
    for code, stdout, stderr in results:
        assert code == 0, stdout[-3000:] + stderr[-3000:]
    for node in (0, 1):
        assert len(list((tmp_path / f"cache{node}" / "latents").rglob("*.safetensors"))) == 14
    written = [(tmp_path / f"out{node}" / "pytorch_lora_weights.safetensors").is_file() for node in (0, 1)]
    assert written.count(True) == 1  # rank 0's machine; which one it is, the rendezvous decides
    main = tmp_path / f"out{written.index(True)}"
    assert _losses(main) == pytest.approx([l for _, l in one_process_batch_two.losses], rel=1e-4)


def test_a_wait_past_the_timeout_stops_the_run_with_what_to_change_and_the_adapter_kept(tiny_model, manifest7,
                                                                                       tmp_path):
    """distributed_timeout_minutes reaches the process group: while rank 0 renders the one final validation image
    (4000 denoising steps, ~20 s here; the other process has no share) the other waits at most 9 s, then the run
    stops with one message that names the setting and what it waited for; the adapter, written before the
    images, is whole."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cmd = _train_cmd(manifest7, tiny_model, out, "--num-processes", "2", "--set", "validation_loss=false", "--set",
                     "skip_final_validation=false", "--set", "validation_samples=1", "--set",
                     "validation_num_inference_steps=4000", "--set", "distributed_timeout_minutes=0.15")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert ("process 1 of 2 waited past the timeout for the other processes' validation images (0.15 min, "
            "distributed_timeout_minutes)") in proc.stderr, proc.stderr[-3000:]
    assert "--set distributed_timeout_minutes=120" in proc.stderr
    lora = out / "pytorch_lora_weights.safetensors"
    assert f"the trained adapter was written by rank 0 before the final validation images: {lora}" in proc.stderr
    assert load_file(lora)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(manifest, model, tmp_path, attempts: int = 2) -> list[tuple[int, str, str]]:
    """Run the two "machines" and return (exit code, stdout, stderr) of each. Node 0 hosts the rendezvous store
    (is_host) and is started first. A run that fails in the rendezvous itself (a port taken meanwhile on a busy
    CI host) is tried once more on a new port; any other failure is returned as it is."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for attempt in range(attempts):
        port = _free_port()
        procs = []
        for node in (0, 1):
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                        f"kontext-test-{attempt}", "--rdzv-conf", f"is_host={int(node == 0)}"]
            cmd = launcher + _train_cmd(manifest, model, tmp_path / f"out{node}", "--cache-dir",
                                        str(tmp_path / f"cache{node}"))
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            if node == 0:
                time.sleep(1.0)  # the store is up before the other machine asks for it
        results = [(p, *p.communicate(timeout=300)) for p in procs]
        out = [(p.returncode, stdout, stderr) for p, stdout, stderr in results]
        rendezvous_failed = any(code and "Rendezvous" in stderr for code, _, stderr in out)
        if not rendezvous_failed or attempt == attempts - 1:
            return out
    return out
