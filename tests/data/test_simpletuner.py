"""import-simpletuner: every config example of the Spanish guide imports, with local folders standing in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kontext_data import jsonc
from kontext_data.manifest import read_manifest
from kontext_data.simpletuner import ImportConfig, plan_import, run_import
from pairkit import caption, image, pair, save

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "simpletuner"


def smooth(size, seed):
    """A smooth image (small as JPEG/PNG, unlike noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c = rng.uniform(0, 255, size=(1, 1, 3))
    arr = np.clip(c * x + (255 - c) * y, 0, 255).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).copy())


def test_jsonc_reads_every_guide_example():
    for f in sorted(FIX.glob("*.json*")):
        assert jsonc.load(f), f


def test_edited_reference_folders_example(tmp_path):
    for i in range(3):
        pair(tmp_path, f"p{i}.png", seed=i)
    cfg = ImportConfig(backend=FIX / "multidatabackend_pairs.jsonc", config=FIX / "config.jsonc", out=tmp_path / "out",
                       path_map=(("/datasets/edited-images", str(tmp_path / "edited")),
                                 ("/datasets/reference-images", str(tmp_path / "reference"))), workers=1)
    plan = plan_import(cfg)
    assert plan.problems == [] and plan.unsupported == []
    notes = " ".join(plan.notes)
    assert "cache_dir_vae" in notes and "kontext-train --config" in notes and "optimizer" in notes
    (job,) = plan.jobs
    assert job.pair.references == (tmp_path / "reference",) and job.pair.conditioning == "reference_strict"
    result = run_import(cfg, plan)
    assert result.ok and result.samples == 3
    rows = read_manifest(result.manifest).records()
    assert {r["dataset_id"] for r in rows} == {"my-edited-images"}
    assert all(Path(r["reference_paths"][0]).is_file() for r in rows)


def test_unmapped_paths_and_unknown_keys_are_reported_together(tmp_path):
    backend = tmp_path / "backend.json"
    backend.write_text(json.dumps([
        {"id": "e", "type": "local", "instance_data_dir": "/nowhere/e", "conditioning_data": ["r", "ghost"],
         "repeats": 3, "crop_aspect_buckets": [1.0]},
        {"id": "r", "type": "local", "instance_data_dir": "/nowhere/r", "conditioning_type": "reference_loose",
         "probability": 0.5},
        {"id": "x", "type": "aws", "instance_data_dir": "s3://b"},
    ]))
    plan = plan_import(ImportConfig(backend=backend, out=tmp_path / "o"))
    text = " | ".join(plan.problems)
    assert "/nowhere/e does not exist" in text and "--path-map" in text and "'ghost'" in text and "'aws'" in text
    assert not any(u.startswith("repeats") for u in plan.unsupported)  # imported (see the test below)
    assert any(u.startswith("probability") for u in plan.unsupported)
    assert any(u.startswith("crop_aspect_buckets") for u in plan.unsupported)


def test_repeats_go_into_the_union_manifest_for_kontext_train(tmp_path):
    """SimpleTuner's repeats (0 = seen once) per edit dataset: kept in OUT/manifest.parquet's options as
    dataset_repeats, which kontext-train applies; on a reference dataset it is noted as doing nothing, and a bad value
    is a config problem."""
    for root, seed in (("a", 0), ("b", 10)):
        for i in range(2):
            pair(tmp_path / root, f"p{i}.png", seed=seed + i)
    entries = [
        {"id": "faces", "type": "local", "instance_data_dir": str(tmp_path / "a" / "edited"),
         "conditioning_data": ["faces-ref"], "repeats": 3},
        {"id": "faces-ref", "type": "local", "instance_data_dir": str(tmp_path / "a" / "reference"), "repeats": 5},
        {"id": "scenes", "type": "local", "instance_data_dir": str(tmp_path / "b" / "edited"),
         "conditioning_data": ["scenes-ref"], "repeats": 0},
        {"id": "scenes-ref", "type": "local", "instance_data_dir": str(tmp_path / "b" / "reference")},
    ]
    backend = tmp_path / "backend.json"
    backend.write_text(json.dumps(entries))
    cfg = ImportConfig(backend=backend, out=tmp_path / "out", workers=1)
    plan = plan_import(cfg)
    assert plan.problems == [] and plan.unsupported == []
    assert {j.dataset_id: j.repeats for j in plan.jobs} == {"faces": 3, "scenes": 0}
    assert any("'faces-ref': repeats on a reference dataset is ignored" in n and "(faces)" in n for n in plan.notes)
    result = run_import(cfg, plan)
    assert result.ok
    assert read_manifest(result.manifest).options["dataset_repeats"] == {"faces": 3}
    assert "dataset_repeats" not in read_manifest(tmp_path / "out" / "faces.parquet").options  # the union only

    entries[0]["repeats"] = -1
    entries[2]["repeats"] = "two"
    backend.write_text(json.dumps(entries))
    problems = plan_import(cfg).problems
    assert any("'faces': repeats -1 is not a whole number >= 0" in p for p in problems)
    assert any("'scenes': repeats 'two'" in p for p in problems)


def _subjects_parquet(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    images, descriptions = [], []
    for i in range(n):
        left, right = smooth((256, 256), i), smooth((256, 256), 100 + i)
        comp = Image.new("RGB", (512, 256))
        comp.paste(left, (0, 0))
        comp.paste(right, (256, 0))
        buf = io.BytesIO()
        comp.save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        descriptions.append({"description_0": f"subject {i} on a table", "description_1": f"subject {i} outdoors"})
    pq.write_table(pa.table({"image": images, "description": descriptions}), folder / "train-00000.parquet")
    return folder


def test_eval_split_and_subjects200k_composites_example(tmp_path):
    e, r = tmp_path / "edit" / "edited-images", tmp_path / "edit" / "reference-images"
    for i in range(2):
        save(e / f"v{i}.jpg", smooth((1200, 1100), i), quality=90)
        save(r / f"v{i}.jpg", smooth((1200, 1100), 50 + i), quality=90)
        caption(e / f"v{i}.txt", "make it blue")
    hf = _subjects_parquet(tmp_path / "subjects")
    cfg = ImportConfig(backend=FIX / "multidatabackend_eval.json", config=FIX / "config_eval.json",
                       out=tmp_path / "out", workers=1,
                       path_map=(("/datasets/edit", str(tmp_path / "edit")), ("Yuanshi/Subjects200K", str(hf))))
    plan = plan_import(cfg)
    assert plan.problems == []
    assert [j.dataset_id for j in plan.jobs] == ["edited-images", "subjects200k-left"]
    assert any("text-embed-cache" in n for n in plan.notes)
    result = run_import(cfg, plan)
    assert result.ok, (result.stage_problems, {k: v.problems for k, v in result.pair_results.items()})
    rows = read_manifest(result.manifest).records()
    by_ds = {}
    for row in rows:
        by_ds.setdefault(row["dataset_id"], []).append(row)
    assert {r["split"] for r in by_ds["edited-images"]} == {"eval"}  # eval_dataset_id
    assert {r["split"] for r in by_ds["subjects200k-left"]} == {"train"}
    assert len(by_ds["subjects200k-left"]) == 4
    sub = sorted(by_ds["subjects200k-left"], key=lambda r: r["sample_id"])[1]
    assert sub["caption"] == "subject 1 outdoors"  # the reference's caption column wins (SimpleTuner's rule)
    target = np.asarray(Image.open(sub["target_path"]))
    assert target.shape == (256, 256, 3)
    assert np.array_equal(target, np.asarray(smooth((256, 256), 1)))  # panel 0 is the edit (select_index 0)
    assert sub["bucket_width"] * sub["bucket_height"] <= 512 * 512  # resolution 512 pixel_area
    ev = by_ds["edited-images"][0]
    assert 0.9 < ev["bucket_width"] * ev["bucket_height"] / 1024**2 < 1.05  # resolution 1024 pixel_area


@pytest.mark.parametrize("fixture,root,kind", [
    ("multidatabackend_deblur.jsonc", "/path/to/sharp-images", "blur"),
    ("multidatabackend_jpeg.jsonc", "/path/to/pristine-images", "jpeg"),
])
def test_generator_examples_degrade_then_pair(tmp_path, fixture, root, kind):
    src = tmp_path / "clean"
    for i in range(3):
        save(src / f"c{i}.jpg", smooth((96, 64), i), quality=95)
        caption(src / f"c{i}.txt", "a description of the photo")
    cfg = ImportConfig(backend=FIX / fixture, out=tmp_path / "out", path_map=((root, str(src)),), workers=1)
    plan = plan_import(cfg)
    assert plan.problems == [], plan.problems
    (job,) = plan.jobs
    assert len(job.degrade) == 1 and job.degrade[0].chain[0].type == kind
    result = run_import(cfg, plan)
    assert result.ok, (result.stage_problems, [p.message for r in result.pair_results.values() for p in r.problems])
    rows = read_manifest(result.manifest).records()
    assert len(rows) == 3
    block = jsonc.load(FIX / fixture)[0]["conditioning"][0]
    for row in rows:
        assert row["caption"] in block["captions"]  # the generator's captions replace the description
        assert Path(row["reference_paths"][0]).is_file()
        assert Path(row["reference_paths"][0]).parent == job.degrade[0].out


def test_a_mask_conditioning_dataset_becomes_the_loss_masks(tmp_path):
    """SimpleTuner's `conditioning_type: mask` dataset among an edit dataset's conditioning_data: paired as
    `--masks` (the manifest's mask_path), not as a reference."""
    for i in range(2):
        pair(tmp_path, f"p{i}.png", seed=i)
        save(tmp_path / "masks" / f"p{i}.png", Image.new("L", (64, 48), 255))
    entries = [
        {"id": "edits", "type": "local", "instance_data_dir": str(tmp_path / "edited"),
         "conditioning_data": ["edits-ref", "edits-mask"]},
        {"id": "edits-ref", "type": "local", "instance_data_dir": str(tmp_path / "reference")},
        {"id": "edits-mask", "type": "local", "instance_data_dir": str(tmp_path / "masks"),
         "conditioning_type": "mask"},
    ]
    backend = tmp_path / "backend.json"
    backend.write_text(json.dumps(entries))
    cfg = ImportConfig(backend=backend, out=tmp_path / "out", workers=1)
    plan = plan_import(cfg)
    assert plan.problems == [] and plan.unsupported == []
    (job,) = plan.jobs
    assert job.pair.references == (tmp_path / "reference",) and job.pair.masks == tmp_path / "masks"
    result = run_import(cfg, plan)
    assert result.ok
    rows = read_manifest(result.manifest).records()
    assert all(Path(r["mask_path"]).name == Path(r["target_path"]).name for r in rows)
    assert all(len(r["reference_paths"]) == 1 for r in rows)
