"""The recipe: manifest problems before any model loads; checkpoints atomic, newest K kept; resume reproduces
the uninterrupted run exactly."""

from __future__ import annotations

import os

import numpy as np
import torch
import pytest

from kontext_data.manifest import read_manifest
from kontext_trainer.recipe import KontextLoRARecipe, TrainError, list_checkpoints, train
from conftest import tiny_cpu_config


def _cfg(manifest, model, out, **kw):
    return tiny_cpu_config(manifest, model, out, **kw)


def test_manifest_problems_come_together_before_the_model(manifest_copy, tmp_path):
    recs = read_manifest(manifest_copy).records()
    os.remove(recs[0]["target_path"])
    os.remove(recs[1]["reference_paths"][0])
    with open(recs[2]["target_path"], "ab") as fh:
        fh.write(b"\0")  # changed since the manifest: found with --verify
    cfg = _cfg(manifest_copy, tmp_path / "no-such-model", tmp_path / "out", verify=True)
    with pytest.raises(TrainError) as exc:
        KontextLoRARecipe(cfg).setup()
    text = str(exc.value)
    assert len(exc.value.problems) == 3
    assert "target file missing" in text and "reference 1 file missing" in text and "changed since" in text
    assert "no-such-model" not in text  # the model was never looked at


@pytest.mark.parametrize("schedule", [{}, {"lr_scheduler": "cosine", "lr_warmup_steps": 4}])
def test_resume_reproduces_the_uninterrupted_run(tiny_model, sample_manifest, tmp_path, schedule):
    """Also mid-warmup with a decaying schedule: the first resumed step runs at the checkpoint's learning rate."""
    full = train(_cfg(sample_manifest, tiny_model, tmp_path / "full", max_train_steps=6, **schedule))
    first = train(_cfg(sample_manifest, tiny_model, tmp_path / "split", max_train_steps=3, checkpointing_steps=3,
                       **schedule))
    assert [c.name for c in first.checkpoints] == ["checkpoint-000003"]
    rest = train(_cfg(sample_manifest, tiny_model, tmp_path / "split", max_train_steps=6,
                      resume_from_checkpoint="latest", **schedule))
    assert [s for s, _ in rest.losses] == [4, 5, 6]
    assert [l for _, l in rest.losses] == pytest.approx([l for _, l in full.losses[3:]], rel=1e-5)
    assert [l for _, l in first.losses] == pytest.approx([l for _, l in full.losses[:3]], rel=1e-6)


def test_resume_with_another_batch_says_the_batches_differ(tiny_model, sample_manifest, tmp_path):
    """A checkpoint of a run with 2 samples per micro-step, resumed with 1 (as when the number of processes changes
    under per-device batches): it goes on from its step, with a warning that the batches differ from here."""
    train(_cfg(sample_manifest, tiny_model, tmp_path / "out", max_train_steps=2, checkpointing_steps=2))
    events = []
    rest = train(_cfg(sample_manifest, tiny_model, tmp_path / "out", max_train_steps=3, train_batch_size=1,
                      resume_from_checkpoint="latest"), on_event=lambda kind, data: events.append((kind, data)))
    assert [s for s, _ in rest.losses] == [3]
    assert any(kind == "warning" and "trained 2 samples per micro-step, this run 1" in data["message"]
               for kind, data in events)


def test_checkpoints_keep_the_newest(tiny_model, sample_manifest, tmp_path):
    out = tmp_path / "out"
    result = train(_cfg(sample_manifest, tiny_model, out, max_train_steps=4, checkpointing_steps=1,
                        checkpoints_total_limit=2))
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["checkpoint-000003", "checkpoint-000004"]
    for p in list_checkpoints(out):
        assert {"pytorch_lora_weights.safetensors", "training_state.pt", "config.resolved.json"} <= set(os.listdir(p))
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]  # no temp folders left
    assert result.lora_path == out / "pytorch_lora_weights.safetensors" and result.lora_path.is_file()


def test_validation_strips_from_the_eval_split(tiny_model, tmp_path):
    from conftest import write_sample_manifest

    manifest = write_sample_manifest(tmp_path / "data", n=6, eval_ids=2)
    out = tmp_path / "out"
    events = []
    recipe = KontextLoRARecipe(_cfg(manifest, tiny_model, out, max_train_steps=2, validation_steps=1,
                                    skip_final_validation=False), on_event=lambda k, d: events.append((k, d)))
    recipe.setup()
    assert sorted(s.split for s in recipe.val_samples) == ["eval", "eval"]
    assert all(s.split == "train" for s in recipe.samples)
    result = recipe.train()
    assert [p.name for p in result.validation_dirs] == ["step_000001", "step_000002"]
    strips = sorted((out / "validation" / "step_000002").glob("*.png"))
    assert len(strips) == 2
    from PIL import Image

    with Image.open(strips[0]) as im:
        assert im.width > 3 * 64  # reference | output | target
    assert sum(k == "validation" for k, _ in events) == 2


def test_compiled_blocks_train_the_same_losses_as_eager(sample_manifest, tiny_model, tmp_path):
    """compile_blocks (the default on CUDA) through the whole recipe: the same seeded run, step for step, and the
    same validation losses; validation (loss and images) runs the blocks eagerly, so the whole compiled run
    compiles only the training graphs (one per block type)."""
    from torch._dynamo.utils import counters

    losses, val, graphs, events = {}, {}, {}, []
    for compiled in (False, True):
        cfg = _cfg(sample_manifest, tiny_model, tmp_path / f"c{compiled}", max_train_steps=6, compile_blocks=compiled,
                   skip_final_validation=False, validation_samples=2, train_batch_size=1)  # a batch of 2 and one
        torch._dynamo.reset()  # of 1 (a bucket's last) would be two graphs: dynamo keeps a size of 1 specialized
        before = counters["stats"]["unique_graphs"]
        recipe = KontextLoRARecipe(cfg, on_event=lambda k, d: events.append((k, d)))
        recipe.setup()
        result = recipe.train()
        graphs[compiled] = counters["stats"]["unique_graphs"] - before
        losses[compiled] = [l for _, l in result.losses]
        val[compiled] = [r["val_loss"] for r in recipe.validation_losses]
    torch._dynamo.reset()
    assert np.allclose(losses[True], losses[False], rtol=1e-4), losses
    assert len(val[True]) == 2 and np.allclose(val[True], val[False], rtol=1e-4), val  # before step 1 and at the end
    assert graphs == {False: 0, True: 2}
    assert sum(k == "validation" for k, _ in events) == 2  # the image strips ran in both runs
    assert any("torch.compile of the transformer blocks (compile_blocks)" in d.get("message", "")
               for k, d in events if k == "stage")


def test_attention_backend_said_at_start_up_and_gpu_only_kernels_warned_on_the_cpu(sample_manifest, tiny_model,
                                                                                       tmp_path):
    """fa4 (or cudnn/flash) asked for on the CPU: one warning that PyTorch's own attention runs there, and the run
    trains the same losses as auto."""
    losses = {}
    for backend in ("auto", "fa4"):
        events = []
        cfg = _cfg(sample_manifest, tiny_model, tmp_path / backend, max_train_steps=2, attention_backend=backend)
        recipe = KontextLoRARecipe(cfg, on_event=lambda k, d: events.append((k, d)))
        recipe.setup()
        losses[backend] = [l for _, l in recipe.train().losses]
        warnings = [d["message"] for k, d in events if k == "warning" and "attention_backend" in d["message"]]
        if backend == "fa4":
            assert warnings == ["attention_backend fa4: no such kernels on cpu; PyTorch's own attention runs there"]
        else:
            assert not warnings
    assert losses["fa4"] == losses["auto"]


def test_offloaded_blocks_train_the_same_losses_and_the_run_reports_its_phases(sample_manifest, tiny_model, tmp_path):
    """offload_blocks through the whole recipe (validation and checkpoints included): the same seeded losses as
    without, said at start-up; and the phase table a user reads at the end of a run."""
    runs = {}
    for n in (0, 2):
        events = []
        cfg = _cfg(sample_manifest, tiny_model, tmp_path / f"o{n}", max_train_steps=4, offload_blocks=n,
                   checkpointing_steps=2, validation_steps=2, skip_final_validation=False, memory_limit_gib=8)
        runs[n] = train(cfg, on_event=lambda k, d: events.append((k, d))), events
    assert [l for _, l in runs[2][0].losses] == pytest.approx([l for _, l in runs[0][0].losses], rel=1e-6)
    stages = [d["message"] for k, d in runs[2][1] if k == "stage"]
    assert any("offloading 2 of 2 blocks" in s for s in stages), stages
    assert not any("offloading" in d["message"] for k, d in runs[0][1] if k == "stage")
    warnings = [d["message"] for k, d in runs[0][1] if k == "warning"]
    assert any("memory_limit_gib 8: only CUDA devices" in w for w in warnings)
    t = runs[0][0].timings
    assert t["steps"] == 4 and 1 <= t["step_shapes"] <= 4
    for key in ("manifest_s", "text cache_s", "text cache_per_s", "latent cache_s", "latent cache_per_s",
                "model load_s", "first_steps_of_shapes_s", "validation_s", "checkpoint_s", "save_s", "total_s"):
        assert t[key] >= 0, key
    assert t["validation_count"] == 2 and t["checkpoint_count"] == 2  # step 2, the end (and step 4's final save)
    assert [e for k, e in runs[0][1] if k == "timings"] == [t]


@pytest.mark.parametrize("when", ["latent cache", "training", "final validation"])
def test_out_of_memory_names_the_phase_the_plan_and_what_to_change(tiny_model, sample_manifest, tmp_path, when):
    """Running out of GPU memory (raised here from the event callback, as PyTorch raises it mid-phase): one
    TrainError that says in which phase, what the memory plan was, what to change for that phase, and that the
    checkpoints written so far are intact. In the final validation images, the trained adapter is already saved."""

    def on_event(kind, data):
        if when == "latent cache" and kind == "progress" and data["stage"] == "latents":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if when == "training" and kind == "step" and data["step"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if when == "final validation" and kind == "validation":  # its strips are written, then this
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = _cfg(sample_manifest, tiny_model, tmp_path / "out", max_train_steps=3, checkpointing_steps=1,
               skip_final_validation=when != "final validation", validation_samples=1)
    with pytest.raises(TrainError) as exc:
        train(cfg, on_event=on_event)
    text = str(exc.value)
    assert exc.value.title == "out of GPU memory"
    assert "Tried to allocate 2.00 GiB" in text
    if when == "latent cache":
        assert "out of GPU memory in latent cache on cpu" in text
        assert "vae_tiling=true" in text and "cache_batch_size=1" in text
        assert "memory plan" not in text and "resume" not in text  # no plan, no checkpoint yet
    elif when == "final validation":
        assert "out of GPU memory in validation on cpu" in text and "skip_final_validation" in text
        lora = tmp_path / "out" / "pytorch_lora_weights.safetensors"
        assert f"the trained adapter was saved before the final validation images: {lora}" in text
        from safetensors.torch import load_file

        assert load_file(lora)  # whole, and the last checkpoint too
        assert [c.name for c in list_checkpoints(tmp_path / "out")][-1] == "checkpoint-000003"
    else:
        assert "out of GPU memory in training at step 3" in text
        assert "the memory plan: checkpointing every block" in text
        assert "offload_blocks=" in text and "--base-precision int8-quanto" in text
        assert "resume with --resume latest" in text
        assert [c.name for c in list_checkpoints(tmp_path / "out")] == ["checkpoint-000001"]
