"""Behaviour of `pair_folders`: every problem kind in one pass, odd-but-valid images, captions, geometry, splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xxhash
from PIL import Image

from kontext_data.geometry import GeometryOptions
from kontext_data.manifest import load_image, read_manifest
from kontext_data.pairing import PROBLEM_KINDS, PairConfig, pair_folders
from pairkit import caption, image, jpeg_bytes, pair, save


def run(root: Path, **kw):
    refs = kw.pop("references", (root / "reference",))
    cfg = PairConfig(edited=root / "edited", references=tuple(refs), out=root / kw.pop("out_name", "manifest.parquet"),
                     cache_dir=kw.pop("cache_dir", None), workers=1, **kw)
    return pair_folders(cfg)


def kinds_by_file(result) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in result.problems:
        for f in p.files:
            out.setdefault(Path(f).name, set()).add(p.kind)
    return out


def test_clean_folders_write_manifest_with_hashes_and_relative_paths(tmp_path):
    for i in range(3):
        pair(tmp_path, f"img_{i}.png", text=f"edit {i}", seed=i)
    pair(tmp_path, "sub/deep/img_9.png", text="nested", seed=9)
    (tmp_path / "edited" / "notes.md").write_text("not an image")
    save(tmp_path / "edited" / ".hidden.png", image())  # hidden: ignored, not an orphan
    res = run(tmp_path)
    assert res.ok, res.problems
    m = read_manifest(tmp_path / "manifest.parquet")
    rows = {r["sample_id"]: r for r in m.records()}
    assert sorted(rows) == ["edited:img_0.png", "edited:img_1.png", "edited:img_2.png", "edited:sub/deep/img_9.png"]
    row = rows["edited:sub/deep/img_9.png"]
    assert row["caption"] == "nested" and row["captions"] == ["nested"] and row["caption_source"] == "textfile"
    assert m.table.column("target_path").to_pylist()[0].startswith("edited/")  # stored relative
    target = Path(row["target_path"])
    assert target == tmp_path / "edited" / "sub/deep/img_9.png"
    assert row["target_hash"] == xxhash.xxh3_128_hexdigest(target.read_bytes())
    assert row["reference_hashes"] == [xxhash.xxh3_128_hexdigest(Path(row["reference_paths"][0]).read_bytes())]
    assert m.metadata["schema_version"] == "1.1"
    assert m.options["references"] == [str(tmp_path / "reference")]


def test_every_problem_kind_is_reported_in_one_pass(tmp_path):
    e, r = tmp_path / "edited", tmp_path / "reference"
    pair(tmp_path, "good.png")
    save(e / "no_ref.png"); caption(e / "no_ref.txt", "x")
    save(r / "no_edit.png")
    save(e / "ext.png"); caption(e / "ext.txt", "x"); save(r / "ext.jpg", image())
    save(e / "Case.png"); caption(e / "Case.txt", "x"); save(r / "case.png")
    pair(tmp_path, "dup.png"); save(e / "Dup.png"); save(r / "Dup.png")
    pair(tmp_path, "amb.png"); save(e / "amb.jpg", image()); save(r / "amb.jpg", image())
    pair(tmp_path, "empty.png"); (e / "empty.png").write_bytes(b"")
    pair(tmp_path, "text.png"); (e / "text.png").write_text("this is not a png")
    pair(tmp_path, "broken.png"); (e / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    pair(tmp_path, "cut.jpg"); data = jpeg_bytes(image((64, 64))); (e / "cut.jpg").write_bytes(data[: len(data) // 2])
    pair(tmp_path, "cutpng.png"); data = (e / "cutpng.png").read_bytes(); (e / "cutpng.png").write_bytes(data[:-20])
    pair(tmp_path, "huge.png", size=(200, 200))
    pair(tmp_path, "tiny.png", size=(12, 12))
    pair(tmp_path, "nocap.png", text=None)
    pair(tmp_path, "emptycap.png", text="  \n\n")
    pair(tmp_path, "latin.png"); caption(e / "latin.txt", "caf\xe9 au lait".encode("latin-1"))

    res = run(tmp_path, max_pixels=30_000, min_size=16)
    k = kinds_by_file(res)
    assert k["no_ref.png"] == {"missing_reference"}
    assert k["no_edit.png"] == {"missing_edit"}
    assert k["ext.png"] == {"extension_mismatch"} and "ext.jpg" in k
    assert k["Case.png"] == {"case_mismatch"} and "case.png" in k
    assert "case_collision" in k["Dup.png"] and "case_collision" in k["dup.png"]
    assert "ambiguous_stem" in k["amb.png"] and "ambiguous_stem" in k["amb.jpg"]
    assert k["empty.png"] == {"empty_file"}
    assert k["text.png"] == {"unreadable_image"}
    assert k["broken.png"] == {"corrupt_image"}
    assert k["cut.jpg"] == {"truncated_image"}
    assert k["cutpng.png"] == {"truncated_image"}
    assert "too_many_pixels" in k["huge.png"]
    assert "too_small" in k["tiny.png"]
    assert k["nocap.txt"] == {"missing_caption"}
    assert k["emptycap.txt"] == {"missing_caption"}
    assert k["latin.txt"] == {"caption_not_utf8"}
    assert "good.png" not in k
    reported = {p.kind for p in res.problems}
    # the mask kinds need --masks: test_mask_problems_are_reported_together_with_the_files
    assert reported == set(PROBLEM_KINDS) - {"no_images", "on_demand_source_missing", "missing_mask",
                                             "mask_size_mismatch", "mask_without_edit"}
    for p in res.problems:  # every message names its files and says how to fix
        assert p.files and all(f in p.message for f in p.files) and "Fix:" in p.message
    assert res.manifest is None and not (tmp_path / "manifest.parquet").exists()
    # --allow-partial writes the good sample only and lists the dropped ones
    part = run(tmp_path, max_pixels=30_000, min_size=16, allow_partial=True)
    ids = [r["sample_id"] for r in read_manifest(part.manifest).records()]
    assert ids == ["edited:good.png"]
    assert "edited:cut.jpg" in part.dropped and "edited:nocap.png" in part.dropped


def test_existing_manifest_survives_a_failed_run(tmp_path):
    pair(tmp_path, "a.png")
    assert run(tmp_path).ok
    before = (tmp_path / "manifest.parquet").read_bytes()
    save(tmp_path / "edited" / "orphan.png")
    assert not run(tmp_path).ok
    assert (tmp_path / "manifest.parquet").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_odd_but_valid_images_are_not_problems(tmp_path):
    e, r = tmp_path / "edited", tmp_path / "reference"
    base = image((80, 40), 3)
    variants = {
        "cmyk.jpg": dict(img=base.convert("CMYK"), fmt="JPEG"),
        "gray.png": dict(img=base.convert("L")),
        "palette.png": dict(img=base.convert("P"), transparency=0),
        "deep.png": dict(img=Image.fromarray((np.arange(80 * 40, dtype=np.uint16).reshape(40, 80) * 16)).convert("I;16")),
        "rgba.webp": dict(img=base.convert("RGBA"), lossless=True),
    }
    for name, kw in variants.items():
        save(e / name, **kw)
        save(r / name, **kw)
        caption((e / name).with_suffix(".txt"), "edit")
    # EXIF orientation 6: stored 80x40, displayed 40x80
    exif = Image.Exif()
    exif[0x0112] = 6
    save(e / "rotated.jpg", base, exif=exif.tobytes())
    save(r / "rotated.jpg", base, exif=exif.tobytes())
    caption(e / "rotated.txt", "edit")
    res = run(tmp_path, geometry=GeometryOptions(resolution=32))
    assert res.ok, [p.message for p in res.problems]
    rows = {Path(r_["target_path"]).name: r_ for r_ in read_manifest(res.manifest).records()}
    assert (rows["rotated.jpg"]["target_width"], rows["rotated.jpg"]["target_height"]) == (40, 80)
    for name, row in rows.items():
        img = load_image(row["target_path"], row)
        assert img.mode == "RGB" and img.size == (row["bucket_width"], row["bucket_height"]), name
    assert rows["rotated.jpg"]["bucket_height"] > rows["rotated.jpg"]["bucket_width"]


def test_match_stem_pairs_across_extensions(tmp_path):
    save(tmp_path / "edited" / "a.png"); caption(tmp_path / "edited" / "a.txt", "x")
    save(tmp_path / "reference" / "a.jpg", image())
    assert {p.kind for p in run(tmp_path).problems} == {"extension_mismatch"}
    res = run(tmp_path, match="stem")
    assert res.ok
    assert read_manifest(res.manifest).records()[0]["reference_paths"][0].endswith("reference/a.jpg")


def test_captions_bom_crlf_alternatives_and_reference_override(tmp_path):
    pair(tmp_path, "a.png", text=None)
    caption(tmp_path / "edited" / "a.txt", "\ufeffmake it red\r\nturn it crimson\r\n\r\n".encode("utf-8"))
    pair(tmp_path, "b.png", text="edit caption")
    caption(tmp_path / "reference" / "b.txt", "reference caption wins")
    rows = {r["sample_id"]: r for r in read_manifest(run(tmp_path).manifest).records()}
    assert rows["edited:a.png"]["captions"] == ["make it red", "turn it crimson"]
    assert rows["edited:a.png"]["caption"] == "make it red"
    assert rows["edited:b.png"]["caption"] == "reference caption wins"
    assert rows["edited:b.png"]["caption_source"] == "reference_textfile"
    rows = {r["sample_id"]: r for r in read_manifest(run(tmp_path, reference_captions=False).manifest).records()}
    assert rows["edited:b.png"]["caption"] == "edit caption"
    # a reference caption also stands in for a missing edit caption
    pair(tmp_path, "c_only_ref.png", text=None)
    caption(tmp_path / "reference" / "c_only_ref.txt", "from reference")
    assert run(tmp_path).ok


def test_caption_modes_filename_and_none(tmp_path):
    pair(tmp_path, "make_it-blue.png", text=None)
    row = read_manifest(run(tmp_path, captions="filename").manifest).records()[0]
    assert row["caption"] == "make it blue" and row["caption_source"] == "filename"
    row = read_manifest(run(tmp_path, captions="instanceprompt", instance_prompt=" a photo ").manifest).records()[0]
    assert row["caption"] == "a photo" and row["caption_source"] == "instanceprompt"
    assert "instance-prompt" in " ".join(PairConfig(edited=tmp_path / "edited", references=(tmp_path / "reference",),
                                                    captions="instanceprompt").problems())
    row = read_manifest(run(tmp_path, captions="none").manifest).records()[0]
    assert row["caption"] is None and row["captions"] == []


def test_several_reference_folders_all_required(tmp_path):
    pair(tmp_path, "a.png")
    pair(tmp_path, "b.png")
    save(tmp_path / "reference2" / "a.png")
    res = run(tmp_path, references=(tmp_path / "reference", tmp_path / "reference2"))
    assert [(p.kind, Path(p.files[0]).name) for p in res.problems] == [("missing_reference", "b.png")]
    save(tmp_path / "reference2" / "b.png")
    res = run(tmp_path, references=(tmp_path / "reference", tmp_path / "reference2"))
    rows = read_manifest(res.manifest).records()
    assert all(len(r["reference_paths"]) == 2 and len(r["reference_geometry"]) == 2 for r in rows)
    assert rows[0]["reference_paths"][1].endswith("reference2/a.png")


def test_strict_reference_shares_the_random_crop_loose_does_not(tmp_path):
    for i in range(6):
        pair(tmp_path, f"s{i}.png", size=(96, 64), seed=i, ref_size=(120, 64))
    g = GeometryOptions(resolution=32, crop_style="random", crop_aspect="square")
    strict = run(tmp_path, geometry=g, seed=7)
    assert strict.ok
    assert {w.kind for w in strict.warnings} == {"aspect_mismatch"}  # 96x64 vs 120x64
    for row in strict.rows:
        (ref,) = row["reference_geometry"]
        for key in ("intermediary_width", "intermediary_height", "crop_left", "crop_top", "bucket_width", "bucket_height"):
            assert ref[key] == row[key]
        assert (ref["width"], ref["height"]) == (120, 64)
    assert len({row["crop_left"] for row in strict.rows}) > 1  # really random across samples
    again = run(tmp_path, geometry=g, seed=7)
    assert [r["crop_left"] for r in again.rows] == [r["crop_left"] for r in strict.rows]  # recorded, reproducible
    other = run(tmp_path, geometry=g, seed=8)
    assert [r["crop_left"] for r in other.rows] != [r["crop_left"] for r in strict.rows]
    loose = run(tmp_path, geometry=g, seed=7, conditioning="reference_loose")
    assert not loose.warnings
    for row in loose.rows:
        (ref,) = row["reference_geometry"]
        assert ref["intermediary_width"] == 60 and row["intermediary_width"] == 48  # 120x64 and 96x64 cover 32x32
    assert any(r["reference_geometry"][0]["crop_left"] != r["crop_left"] for r in loose.rows)


def test_strict_crop_lands_on_the_same_content(tmp_path):
    """A reference that is the target at another size gives the same pixels after the recorded crop."""
    big = image((160, 96), 5).resize((160, 96))
    save(tmp_path / "edited" / "a.png", big)
    save(tmp_path / "reference" / "a.png", big.resize((80, 48), Image.Resampling.LANCZOS))
    caption(tmp_path / "edited" / "a.txt", "x")
    res = run(tmp_path, geometry=GeometryOptions(resolution=48, crop_style="random", crop_aspect="square"))
    row = read_manifest(res.manifest).records()[0]
    t = np.asarray(load_image(row["target_path"], row), dtype=float)
    r = np.asarray(load_image(row["reference_paths"][0], row["reference_geometry"][0]), dtype=float)
    assert t.shape == r.shape == (48, 48, 3)
    shifted = np.asarray(load_image(row["reference_paths"][0], {**row["reference_geometry"][0],
                                                                  "crop_left": row["crop_left"] + 8}), dtype=float)
    assert np.abs(t - r).mean() < np.abs(t - shifted).mean() / 2


def test_eval_split_whole_and_fraction(tmp_path):
    for i in range(20):
        pair(tmp_path, f"x{i:02d}.png", seed=i)
    assert {r["split"] for r in run(tmp_path, split="eval").rows} == {"eval"}
    a = run(tmp_path, eval_fraction=0.25, seed=1)
    evals = sorted(r["sample_id"] for r in a.rows if r["split"] == "eval")
    assert len(evals) == 5
    assert evals == sorted(r["sample_id"] for r in run(tmp_path, eval_fraction=0.25, seed=1).rows if r["split"] == "eval")
    assert a.report()["splits"] == {"train": 15, "eval": 5}


def test_probe_cache_skips_unchanged_files_and_rereads_changed_ones(tmp_path):
    for i in range(4):
        pair(tmp_path, f"c{i}.png", seed=i)
    cache = tmp_path / "cache"
    first = run(tmp_path, cache_dir=cache)
    assert first.stats["probed"] == 8 and first.stats["cached"] == 0 and not first.reused
    assert not any((tmp_path / "edited").rglob("*.parquet"))  # the cache stays out of the dataset
    manifest_bytes = first.manifest.read_bytes()
    # nothing changed: the whole previous result is reused and the manifest is not rewritten
    second = run(tmp_path, cache_dir=cache)
    assert second.reused and second.stats["probed"] == 0 and second.stats["cached"] == 8
    assert second.report()["problems"] == first.report()["problems"] and second.samples == 4
    assert second.manifest == first.manifest and first.manifest.read_bytes() == manifest_bytes
    # other options: not reused, but every image comes from the per-file cache
    other = run(tmp_path, cache_dir=cache, geometry=GeometryOptions(resolution=32))
    assert not other.reused and other.stats["probed"] == 0 and other.stats["cached"] == 8
    # a changed caption invalidates the reuse
    caption(tmp_path / "edited" / "c0.txt", "a new instruction")
    fourth = run(tmp_path, cache_dir=cache)
    assert not fourth.reused
    assert next(r for r in fourth.rows if r["sample_id"] == "edited:c0.png")["caption"] == "a new instruction"
    # a changed image is re-read, alone
    target = tmp_path / "edited" / "c1.png"
    save(target, image((64, 48), 99))
    os.utime(target, ns=(1, 1))
    fifth = run(tmp_path, cache_dir=cache)
    assert fifth.stats["probed"] == 1 and not fifth.reused
    changed = next(r for r in fifth.rows if r["sample_id"] == "edited:c1.png")
    assert changed["target_hash"] == xxhash.xxh3_128_hexdigest(target.read_bytes())
    # a manifest touched by someone else is rewritten, not trusted
    fifth.manifest.write_bytes(b"overwritten")
    sixth = run(tmp_path, cache_dir=cache)
    assert not sixth.reused and len(read_manifest(sixth.manifest)) == 4
    # problems are reused too: same report, still no manifest
    save(tmp_path / "edited" / "orphan.png")
    bad = run(tmp_path, cache_dir=cache, out_name="other.parquet")
    again = run(tmp_path, cache_dir=cache, out_name="other.parquet")
    assert again.reused and not again.ok and again.report()["problems"] == bad.report()["problems"]


def test_empty_edited_folder_is_a_problem(tmp_path):
    (tmp_path / "edited").mkdir()
    (tmp_path / "reference").mkdir()
    res = run(tmp_path)
    assert [p.kind for p in res.problems] == ["no_images"]


def test_bad_options_are_rejected_together(tmp_path):
    cfg = PairConfig(edited=tmp_path / "nope", references=(tmp_path / "nope",), match="fuzzy",
                     geometry=GeometryOptions(crop_style="diagonal"))
    problems = cfg.problems()
    text = " | ".join(problems)
    assert "fuzzy" in text and "diagonal" in text and "no such folder" in text and "different folders" in text
    with pytest.raises(ValueError):
        pair_folders(cfg)


def test_parallel_probe_matches_serial(tmp_path):
    for i in range(140):
        pair(tmp_path, f"p{i:03d}.png", size=(16, 16), seed=i)
    cfg = dict(edited=tmp_path / "edited", references=(tmp_path / "reference",), out=tmp_path / "m.parquet")
    serial = pair_folders(PairConfig(**cfg, workers=1))
    parallel = pair_folders(PairConfig(**cfg, workers=2))
    assert parallel.stats["probed"] == 280
    assert parallel.rows == serial.rows


def test_degrade_provenance_is_carried_and_on_demand_references_are_virtual(tmp_path):
    import json

    from kontext_data.degrade import DegradeConfig, build_chain, run_degrade, synthesize_reference

    src = tmp_path / "edited"
    for i in range(3):
        save(src / f"d{i}.png", image((64, 48), i))
        caption(src / f"d{i}.txt", "a description")
    chain = tuple(build_chain(["blur"], {"blur_radius": 2.0}))
    run_degrade(DegradeConfig(src=src, out=tmp_path / "disk", chain=chain, captions=("deblur",), workers=1))
    run_degrade(DegradeConfig(src=src, out=tmp_path / "lazy", chain=chain, captions=("deblur",), workers=1,
                              on_demand=True))
    assert not list((tmp_path / "lazy").glob("*.png"))  # on demand: no pixels on disk
    disk = pair_folders(PairConfig(edited=src, references=(tmp_path / "disk",), out=tmp_path / "a.parquet", workers=1))
    lazy = pair_folders(PairConfig(edited=src, references=(tmp_path / "lazy",), out=tmp_path / "b.parquet", workers=1))
    assert disk.ok and lazy.ok, (disk.problems, lazy.problems)
    d_rows = {r["sample_id"]: r for r in read_manifest(disk.manifest).records()}
    l_rows = {r["sample_id"]: r for r in read_manifest(lazy.manifest).records()}
    assert d_rows.keys() == l_rows.keys()
    for sid, d in d_rows.items():
        lz = l_rows[sid]
        d_rec, l_rec = json.loads(d["reference_degradations"][0]), json.loads(lz["reference_degradations"][0])
        assert d_rec["on_demand"] is False and l_rec["on_demand"] is True
        assert d_rec["params_hash"] == l_rec["params_hash"] and d_rec["seed"] == l_rec["seed"]
        assert d["caption"] == lz["caption"] == "deblur"  # the generator's caption beside the reference wins
        assert lz["reference_paths"][0] == lz["target_path"]  # synthesized from the target at load time
        on_disk = np.asarray(Image.open(d["reference_paths"][0]).convert("RGB"))
        assert np.array_equal(np.asarray(synthesize_reference(lz["reference_paths"][0], l_rec)), on_disk)
    # an on-demand record whose source is gone is reported
    (src / "d1.png").unlink()
    (src / "d1.txt").unlink()
    gone = pair_folders(PairConfig(edited=src, references=(tmp_path / "lazy",), out=tmp_path / "c.parquet", workers=1))
    assert [p.kind for p in gone.problems] == ["on_demand_source_missing"]


# -- loss masks (--masks) ------------------------------------------------------------------------------------------


def mask_image(size=(64, 48), left=0.5) -> Image.Image:
    """White on the left `left` share of the width, black elsewhere."""
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[:, : int(size[0] * left)] = 255
    return Image.fromarray(arr, "L")


def test_masks_fill_the_mask_columns_by_stem_and_oriented_size(tmp_path):
    e, mdir = tmp_path / "edited", tmp_path / "masks"
    pair(tmp_path, "a.png", seed=1)
    pair(tmp_path, "sub/b.jpg", seed=2)
    pair(tmp_path, "rot.png", size=(64, 48), seed=3)
    save(mdir / "a.png", mask_image())
    save(mdir / "sub/b.png", mask_image(left=0.25))  # any extension: masks pair by relative path and stem
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x64, shown 64x48: the size after EXIF orientation is what counts
    save(mdir / "rot.jpg", mask_image((48, 64)), exif=exif.tobytes())
    (mdir / "notes.txt").write_text("text files beside masks are ignored")
    res = run(tmp_path, masks=mdir, geometry=GeometryOptions(resolution=64))
    assert res.ok, res.problems
    assert res.stats["mask_images"] == 3
    m = read_manifest(res.manifest)
    assert m.metadata["schema_version"] == "1.1" and m.options["masks"] == str(mdir)
    rows = {r["sample_id"]: r for r in m.records()}
    assert Path(rows["edited:sub/b.jpg"]["mask_path"]) == mdir / "sub/b.png"
    assert m.table.column("mask_path").to_pylist()[0].startswith("masks/")  # stored like target_path
    for row in rows.values():
        assert row["mask_hash"] == xxhash.xxh3_128_hexdigest(Path(row["mask_path"]).read_bytes())
    # the mask as the trainer reads it: at the bucket's size, values in [0, 1] (the 64x48 edit is its own bucket)
    from kontext_data.manifest import load_mask

    row = rows["edited:a.png"]
    px = load_mask(row["mask_path"], row)
    assert px.shape == (48, 64) == (row["bucket_height"], row["bucket_width"]) and px.dtype == np.float32
    assert px[:, :32].min() == 1.0 and px[:, 32:].max() == 0.0
    # without --masks the columns are null
    plain = run(tmp_path, out_name="plain.parquet")
    assert all(r["mask_path"] is None and r["mask_hash"] is None for r in read_manifest(plain.manifest).records())


def test_mask_problems_are_reported_together_with_the_files(tmp_path):
    e, mdir = tmp_path / "edited", tmp_path / "masks"
    for name in ("good", "nomask", "small", "broken", "empty", "case", "twice"):
        pair(tmp_path, f"{name}.png")
    save(mdir / "good.png", mask_image())
    save(mdir / "small.png", mask_image((32, 24)))
    (mdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (mdir / "empty.png").write_bytes(b"")
    save(mdir / "Case.png", mask_image())
    save(mdir / "twice.png", mask_image())
    save(mdir / "twice.jpg", mask_image())
    save(mdir / "stray.png", mask_image())
    res = run(tmp_path, masks=mdir)
    k = kinds_by_file(res)
    assert k["nomask.png"] == {"missing_mask"}
    assert k["small.png"] == {"mask_size_mismatch"}  # both the mask and its edit are named
    assert k["broken.png"] == {"corrupt_image"} and k["empty.png"] == {"empty_file"}
    assert k["case.png"] == {"missing_mask"} and "Case.png" not in k  # the near miss is named in the message
    assert k["twice.png"] == k["twice.jpg"] == {"ambiguous_stem"}
    assert k["stray.png"] == {"mask_without_edit"}
    assert "good.png" not in k
    small = next(p for p in res.problems if p.kind == "mask_size_mismatch")
    assert set(small.files) == {str(mdir / "small.png"), str(e / "small.png")}
    assert "32x24" in small.message and "64x48" in small.message
    assert "differs only in letter case" in next(p.message for p in res.problems if "case.png" in p.message)
    for p in res.problems:  # every message names its files and says how to fix
        assert p.files and all(f in p.message for f in p.files) and "Fix:" in p.message
    assert res.manifest is None and not (tmp_path / "manifest.parquet").exists()
    # --allow-partial keeps the sample with a good mask only
    part = run(tmp_path, masks=mdir, allow_partial=True)
    assert [r["sample_id"] for r in read_manifest(part.manifest).records()] == ["edited:good.png"]
    assert sorted(part.dropped) == [f"edited:{n}.png" for n in ("broken", "case", "empty", "nomask", "small",
                                                                 "twice")]


def test_mask_folder_options_are_checked(tmp_path):
    pair(tmp_path, "a.png")
    inside = tmp_path / "edited" / "masks"
    inside.mkdir()
    problems = " | ".join(PairConfig(edited=tmp_path / "edited", references=(tmp_path / "reference",),
                                     masks=inside).problems())
    assert "one lies inside the other" in problems and "Fix:" in problems
    same = PairConfig(edited=tmp_path / "edited", references=(tmp_path / "reference",), masks=tmp_path / "reference")
    assert any("different folders" in p for p in same.problems())
    assert any("no such folder" in p for p in PairConfig(edited=tmp_path / "edited", references=(),
                                                         masks=tmp_path / "nope").problems())


def test_a_changed_mask_is_noticed_by_the_incremental_cache(tmp_path):
    mdir = tmp_path / "masks"
    for i in range(3):
        pair(tmp_path, f"c{i}.png", seed=i)
        save(mdir / f"c{i}.png", mask_image())
    cache = tmp_path / "cache"
    first = run(tmp_path, masks=mdir, cache_dir=cache)
    assert first.ok and first.stats["probed"] == 9
    assert run(tmp_path, masks=mdir, cache_dir=cache).reused
    target = mdir / "c1.png"
    save(target, mask_image(left=0.75))
    os.utime(target, ns=(1, 1))
    third = run(tmp_path, masks=mdir, cache_dir=cache)
    assert not third.reused and third.stats["probed"] == 1
    row = next(r for r in read_manifest(third.manifest).records() if r["sample_id"] == "edited:c1.png")
    assert row["mask_hash"] == xxhash.xxh3_128_hexdigest(target.read_bytes()) != first.rows[1]["mask_hash"]
    # a mask that stops fitting its edit is reported on the next run, not taken from the cache
    save(target, mask_image((32, 24)))
    os.utime(target, ns=(2, 2))
    fourth = run(tmp_path, masks=mdir, cache_dir=cache)
    assert [p.kind for p in fourth.problems] == ["mask_size_mismatch"]
