"""Shared fixtures of the trainer tests: a tiny random Kontext model and a small sample manifest, built once.

Everything is offline: the model is built with the real diffusers/transformers classes and saved in the
diffusers layout; the images come from examples/make_sample.py and the manifest from `kontext-data pair`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to a busy machine


def _quiet_libraries() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


_quiet_libraries()


def load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kontext_data_cli() -> list[str]:
    exe = Path(sys.executable).parent / "kontext-data"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from kontext_data.cli import main; main()"]


def make_manifest(folder: Path, n: int = 8, size: int = 64, seed: int = 0, extra: list[str] = ()) -> Path:
    """Sample pairs under folder/data and a manifest folder/manifest.parquet made by `kontext-data pair`."""
    load_make_sample().make_sample(folder / "data", n=n, size=size, seed=seed)
    out = folder / "manifest.parquet"
    cmd = kontext_data_cli() + ["pair", str(folder / "data" / "edited"), str(folder / "data" / "reference"),
                                "--out", str(out), "--resolution", str(size), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from kontext_trainer.model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-kontext")


def write_sample_manifest(folder: Path, n: int = 8, size: int = 64, seed: int = 0, eval_ids: int = 0,
                          target_from_reference=None) -> Path:
    """Sample pairs under folder/data and a manifest written with kontext_data.manifest.write_manifest directly
    (geometry: no resize, center crop to multiples of 16), independent of the pairing stage.
    `target_from_reference(PIL image) -> PIL image`: every target is rewritten as that function of its reference
    (a task the tiny model learns quickly, e.g. PIL.ImageOps.invert)."""
    import xxhash
    from PIL import Image

    from kontext_data.manifest import store_path, write_manifest

    load_make_sample().make_sample(folder / "data", n=n, size=size, seed=seed)
    rows = []
    edited = folder / "data" / "edited"
    for i, target in enumerate(sorted(p for p in edited.rglob("*.png"))):
        rel = target.relative_to(edited)
        ref = folder / "data" / "reference" / rel
        caption = target.with_suffix(".txt").read_text().strip()
        if target_from_reference is not None:
            with Image.open(ref) as im:
                target_from_reference(im.convert("RGB")).save(target)
        with Image.open(target) as im:
            w, h = im.size
        geo = dict(intermediary_width=w, intermediary_height=h, bucket_width=w // 16 * 16,
                   bucket_height=h // 16 * 16, crop_left=(w % 16) // 2, crop_top=(h % 16) // 2)
        rows.append(dict(
            sample_id=f"edited:{rel.as_posix()}", dataset_id="edited", split="eval" if i < eval_ids else "train",
            target_path=store_path(target, folder), reference_paths=[store_path(ref, folder)], caption=caption, captions=[caption],
            caption_source="textfile", target_width=w, target_height=h, **geo,
            reference_geometry=[dict(width=w, height=h, **geo)], conditioning_type="reference_strict",
            target_hash=xxhash.xxh3_128_hexdigest(target.read_bytes()),
            reference_hashes=[xxhash.xxh3_128_hexdigest(ref.read_bytes())], seed=1000 + i,
            reference_degradations=[None]))
    return write_manifest(rows, folder / "manifest.parquet", options={"geometry": {"resolution": size}})


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    """8 pairs at 64 px (square and non-square buckets), built once; copy it before changing anything."""
    return write_sample_manifest(tmp_path_factory.mktemp("sample"))


@pytest.fixture()
def manifest_copy(sample_manifest, tmp_path) -> Path:
    """A private copy of the sample folder (images + manifest) that a test may modify."""
    dst = tmp_path / "sample"
    shutil.copytree(sample_manifest.parent, dst)
    return dst / "manifest.parquet"


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward_backward(model, call_args: dict, params: list) -> tuple:
    """One forward of `model(**call_args)` and the backward of its mean square: (output in float32, the gradients of
    `params` flattened into one tensor). For comparing two ways of computing the same layers."""
    model.zero_grad()
    out = model(**call_args)[0]
    out.float().square().mean().backward()
    return out.float().detach(), torch.cat([p.grad.flatten() for p in params])


def tiny_batch(g: torch.Generator):
    """A one-sample KontextBatch for the tiny model: an 8x8 latent target, one reference of the same size, 8 text
    tokens."""
    from kontext_trainer.flow import KontextBatch

    return KontextBatch(target=torch.randn(1, 4, 8, 8, generator=g), references=[torch.randn(1, 4, 8, 8, generator=g)],
                        prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled=torch.randn(1, 32, generator=g))


def tiny_cpu_config(manifest, model, out, **kw):
    """A TrainConfig for a short fp32 run of the tiny model on the CPU (no TensorBoard, no final strips); `kw`
    overrides any key."""
    from kontext_trainer.config import TrainConfig

    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=4, lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True,
                device="cpu", train_batch_size=2, validation_num_inference_steps=2)
    base.update(kw)
    return TrainConfig(**base)
