"""End to end on the tiny model: sample pairs -> `kontext-data pair` -> `kontext-train` with a config in the
guide's style -> the loss falls -> FluxKontextPipeline.load_lora_weights(output_dir) edits a training reference
measurably closer to its target than the base model. Plus the CLI's exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_manifest
from kontext_data.manifest import load_image, read_manifest
from kontext_trainer.cache import encode_images
from kontext_trainer.cli import app
from kontext_trainer.flow import pack_latents

GUIDE_STYLE = """{
  // the SimpleTuner guide's keys (fp32 base for the CPU test; the guide uses bf16/int8 on GPUs)
  "model_family": "flux",
  "model_flavour": "kontext",
  "base_model_precision": "fp32",
  "gradient_checkpointing": true,
  "fuse_qkv_projections": false,
  "lora_rank": 8,
  "learning_rate": 2e-3,
  "optimizer": "adamw_bf16",
  "max_train_steps": 200,
  "validation_guidance": 2.5,
  "validation_resolution": "64x64",
  "validation_steps": 100,
  "validation_num_inference_steps": 4,
  "train_batch_size": 2,
  "gradient_accumulation_steps": 1,
  "lr_scheduler": "constant",
  "lr_warmup_steps": 10,
  "seed": 0,
  "resolution": 64,
  "resolution_type": "pixel_area",
  "conditioning_multidataset_sampling": "random"
}
"""


def _latent_error(pipe, records) -> float:
    """Mean squared error between the pipeline's output latents for each training reference and the target's."""
    errors = []
    for rec in records:
        ref = load_image(rec["reference_paths"][0], rec["reference_geometry"][0])
        target = load_image(rec["target_path"], rec)
        w, h = target.size
        out = pipe(image=ref, prompt=rec["caption"], height=h, width=w, max_area=h * w, _auto_resize=False,
                   guidance_scale=1.0, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
        errors.append((out - pack_latents(encode_images(pipe.vae, [target], "cpu"))).pow(2).mean().item())
    return float(np.mean(errors))


def test_train_end_to_end_and_load_in_diffusers(tiny_model, tmp_path, monkeypatch):
    from diffusers import FluxKontextPipeline

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # kontext-train sets up the allocator itself
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)

    manifest = make_manifest(tmp_path / "data", n=6, size=64)
    config = tmp_path / "config.json"
    config.write_text(GUIDE_STYLE)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(manifest), "--model", str(tiny_model), "--config", str(config),
                                      "--output-dir", str(out), "--lora-targets", "attention+ffs", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "fuse_qkv_projections" in result.output  # the note on the guide's false (ours needs no flash-attn)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]  # step lines; the others are validation losses
    assert len(losses) == 200
    # the validation loss: before the first step, at the validation step and at the end, falling
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 100, 200] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.75 * first, (first, last)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "config.resolved.json").read_text())["optimizer"] == "adamw_bf16"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000100", "step_000200"]
    assert len(list((out / "validation" / "step_000200").glob("*.png"))) == 2
    assert list((out / "logs").glob("events.out.tfevents.*"))

    records = [r for r in read_manifest(manifest).records() if r["split"] == "train"][:4]
    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    without = _latent_error(pipe, records)
    pipe.load_lora_weights(out)
    with_lora = _latent_error(pipe, records)
    assert with_lora < 0.75 * without, (without, with_lora)


def test_config_errors_exit_2_with_every_problem(tmp_path, sample_manifest):
    config = tmp_path / "bad.json"
    config.write_text('{"model_flavour": "dev", "optimizer": "sgd", "lora_rank": -1}')
    result = CliRunner().invoke(app, ["train", str(sample_manifest), "--config", str(config),
                                      "--set", "learning_rte=1"])
    assert result.exit_code == 2
    for needle in ("model_flavour", "optimizer", "lora_rank", "learning_rte"):
        assert needle in result.output


def test_config_errors_with_json_are_one_json_line(tmp_path, sample_manifest):
    result = CliRunner().invoke(app, ["train", str(sample_manifest), "--set", "learning_rte=1", "--set", "seed",
                                      "--json"])
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    doc = json.loads(line)
    assert doc["ok"] is False and doc["exit_code"] == 2 and doc["title"] == "invalid configuration"
    assert doc["event"] == "error" and len(doc["errors"]) == 2 and "learning_rte" in " ".join(doc["errors"])


def test_train_help_lists_every_config_option_with_its_help():
    from kontext_trainer.config import TrainConfig, cli_fields

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "1000"})  # one line per option
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    fields = cli_fields()
    assert len(fields) == 29 and {f.name for f, _ in fields} <= set(TrainConfig.__dataclass_fields__)
    for field, _ in fields:
        flag = (field.metadata["cli"] or ("--" + field.name.replace("_", "-"),))[0]
        (line,) = [line for line in lines if line.strip("│ ").startswith((f"{flag} ", f"{flag},"))]
        assert " ".join(field.metadata["help"].split()) in line, (field.name, line)
    for flag in ("--lr", "--precision", "-o", "--no-mask-loss", "--no-vae-tiling", "--verify", "--download"):
        assert any(f" {flag} " in line or f",{flag} " in line for line in lines), flag


def test_manifest_problems_exit_1(tmp_path, manifest_copy, tiny_model):
    rec = read_manifest(manifest_copy).records()[0]
    import os

    os.remove(rec["target_path"])
    result = CliRunner().invoke(app, ["train", str(manifest_copy), "--model", str(tiny_model), "-o",
                                      str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    assert "target file missing" in result.output


def test_make_tiny_model_command(tmp_path):
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "transformer" / "config.json").is_file()
    assert (tmp_path / "m" / "model_index.json").is_file()


def test_bare_manifest_argument_means_train(tmp_path, sample_manifest, monkeypatch):
    import sys

    from kontext_trainer import cli

    monkeypatch.setattr(sys, "argv", ["kontext-train", str(sample_manifest), "--print-config",
                                      "--set", "lora_rank=3"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0



def test_manifest_weight_suffix(tmp_path, monkeypatch):
    from kontext_trainer.cli import parse_manifest_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "odd:name.parquet").write_bytes(b"")  # ':' is legal in a file name: an existing file is a path
    paths, weights, problems = parse_manifest_arguments(
        ["a.parquet:2", "odd:name.parquet", "odd:name.parquet:0.5", "missing.parquet:3", "C:\\data\\x.parquet"])
    assert paths == ["a.parquet", "odd:name.parquet", "odd:name.parquet", "missing.parquet", "C:\\data\\x.parquet"]
    assert weights == {"a.parquet": 2.0, "odd:name.parquet": 0.5, "missing.parquet": 3.0}
    assert problems == []
    for bad in ("a.parquet:0", "a.parquet:-1", "a.parquet:abc", "a.parquet:", "a.parquet:inf", "missing.parquet:1e"):
        paths, weights, problems = parse_manifest_arguments([bad])
        assert len(problems) == 1 and repr(bad) in problems[0] and "PATH:WEIGHT" in problems[0], (bad, problems)


def test_weight_suffix_and_colon_paths_through_the_command(tmp_path, sample_manifest):
    import shutil

    odd = tmp_path / "x:y"
    shutil.copytree(sample_manifest.parent, odd)
    config = tmp_path / "c.yaml"
    config.write_text("dataset_weights:\n  edited: 3\ndataset_repeats: {edited: 1}\n")
    result = CliRunner().invoke(app, ["train", f"{odd / 'manifest.parquet'}:2", "--config", str(config),
                                      "--validation-prompts", "p.jsonl", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    from kontext_trainer.config import TrainConfig

    assert TrainConfig(manifest=printed["manifest"]).manifest_paths == [str(odd / "manifest.parquet")]
    assert printed["dataset_weights"] == [[str(odd / "manifest.parquet"), 2.0], ["edited", 3.0]]
    assert printed["dataset_repeats"] == [["edited", 1]] and printed["validation_prompts"] == "p.jsonl"
    bad = CliRunner().invoke(app, ["train", f"{sample_manifest}:zero", "--set", "dataset_repeats=edited=-2"])
    assert bad.exit_code == 2
    assert f"{sample_manifest}:zero" in bad.output and "dataset_repeats" in bad.output


def test_the_end_line_names_where_time_and_memory_went():
    from kontext_trainer.cli import timings_line

    t = {"total_s": 141.2, "steady_s_per_step": 0.935, "text cache_s": 7.4, "latent cache_s": 25.1,
         "model load_s": 3.7, "validation_s": 28.1,
         "peak_gpu_gib_by_phase": {"training": 21.05, "validation": 14.1, "latent cache": 12.2}}
    line = timings_line(t)
    assert line.startswith("time: 141.2s in all, steady 0.935 s/step; caching 32.5s")
    assert line.endswith("peak GPU memory 21.1 GiB in training")
    t["peak_gpu_gib_by_phase"]["validation"] = 23.0  # a validation that needs more than the steps: said with both
    assert timings_line(t).endswith("peak GPU memory 23.0 GiB in validation (training 21.1)")
    del t["peak_gpu_gib_by_phase"]  # the CPU: no memory figures
    assert "GPU" not in timings_line(t)


def test_ctrl_c_during_the_final_validation_images_keeps_the_adapter_and_says_so(tiny_model, sample_manifest,
                                                                                 tmp_path):
    """The final images come after the adapter is written: Ctrl-C while they render (here a 4000-step rendering,
    interrupted as soon as the adapter is reported saved) exits as interrupted, names the saved adapter, and the
    file is whole."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kontext_data.clikit import EXIT_INTERRUPTED

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kontext_trainer", "train", str(sample_manifest), "--model", str(tiny_model),
           "--output-dir", str(out), "--device", "cpu", "--precision", "fp32", "--max-train-steps", "2",
           "--lora-rank", "4", "--set", "report_to=none", "--set", "validation_loss=false", "--set",
           "validation_samples=1", "--set", "validation_num_inference_steps=4000", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line)["event"] == "saved":
                proc.send_signal(signal.SIGINT)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lora = out / "pytorch_lora_weights.safetensors"
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert f"the trained adapter is saved ({lora}); only the final validation images are missing" in \
        " ".join(stderr.split())
    assert load_file(lora)
