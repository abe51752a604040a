"""The manifest contract: readable by pandas, DuckDB and `datasets`; versioned; paths survive a move."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kontext_data.manifest import (CHECK_COLUMNS, COLUMNS, META_CHECK, META_CREATED_BY, META_OPTIONS, SCHEMA_VERSION,
                                   SIMILARITY_COLUMN, ManifestError, crop_box, decode_metadata, encode_metadata,
                                   load_image, on_demand_record, read_manifest, view_image, view_original,
                                   write_manifest, write_similarity)
from kontext_data.pairing import PairConfig, pair_folders
from pairkit import pair


@pytest.fixture()
def manifest(tmp_path):
    root = tmp_path / "project"
    for i in range(5):
        pair(root, f"im{i}.png", text=f"caption {i}\nalternative {i}", seed=i)
    res = pair_folders(PairConfig(edited=root / "edited", references=(root / "reference",),
                                  out=root / "manifest.parquet", workers=1, eval_fraction=0.4))
    assert res.ok
    return res.manifest


def test_round_trip_pandas_and_duckdb(manifest):
    import duckdb
    import pandas as pd

    df = pd.read_parquet(manifest)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 5 and df["sample_id"].is_unique
    assert list(df.loc[df.sample_id == "edited:im3.png", "captions"].iloc[0]) == ["caption 3", "alternative 3"]
    con = duckdb.connect()
    n_eval, = con.execute(f"select count(*) from read_parquet('{manifest}') where split = 'eval'").fetchone()
    assert n_eval == 2
    widths = con.execute(f"select reference_geometry[1].bucket_width from read_parquet('{manifest}')").fetchall()
    assert {w for (w,) in widths} == {int(df.bucket_width.iloc[0])}


def test_round_trip_datasets(manifest, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(manifest), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 5
    row = ds[0]
    assert set(row) == set(COLUMNS)
    assert isinstance(row["reference_geometry"], list) and "crop_left" in row["reference_geometry"][0]


def test_metadata_records_version_and_options(manifest):
    meta = pq.ParquetFile(manifest).schema_arrow.metadata
    assert meta[b"kontext.schema_version"].decode() == SCHEMA_VERSION
    options = json.loads(meta[b"kontext.options"])
    assert options["eval_fraction"] == 0.4 and options["geometry"]["resolution"] == 1024
    m = read_manifest(manifest)
    assert m.metadata["hash_algorithm"] == "xxh3_128" and m.metadata["created_by"] == "kontext-data pair"


def test_moved_folder_still_resolves(manifest, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(manifest.parent), moved)
    m = read_manifest(moved / "manifest.parquet")
    for row in m.records():
        assert row["target_path"].startswith(str(moved))
        assert all(p.startswith(str(moved)) for p in row["reference_paths"])
    from pathlib import Path

    assert all(Path(r["target_path"]).is_file() for r in m.records())


def test_data_outside_the_manifest_folder_is_stored_absolute(tmp_path):
    pair(tmp_path / "data", "a.png")
    out = tmp_path / "manifests" / "m.parquet"
    res = pair_folders(PairConfig(edited=tmp_path / "data" / "edited", references=(tmp_path / "data" / "reference",),
                                  out=out, workers=1))
    stored = pq.read_table(res.manifest).column("target_path").to_pylist()[0]
    assert stored == str(tmp_path / "data" / "edited" / "a.png")


def _rewrite_meta(path, **changes):
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta.update({k.encode(): v.encode() for k, v in changes.items()})
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_newer_major_version_is_refused_with_upgrade_hint(manifest):
    _rewrite_meta(manifest, **{"kontext.schema_version": "2.0"})
    with pytest.raises(ManifestError) as exc:
        read_manifest(manifest)
    assert "newer" in str(exc.value) and "upgrade" in str(exc.value)
    _rewrite_meta(manifest, **{"kontext.schema_version": "1.7"})  # a newer minor of a known major reads
    assert len(read_manifest(manifest)) == 5


def test_foreign_or_broken_files_are_refused(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(ManifestError) as exc:
        read_manifest(plain)
    assert "not a kontext manifest" in str(exc.value)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(ManifestError):
        read_manifest(junk)
    with pytest.raises(ManifestError) as exc:
        read_manifest(tmp_path / "missing.parquet")
    assert "kontext-data pair" in str(exc.value)


def test_value_checks_list_every_problem(manifest, tmp_path):
    rows = read_manifest(manifest).rows()
    rows[1]["sample_id"] = rows[0]["sample_id"]
    rows[2]["split"] = "validation"
    rows[3]["reference_hashes"] = []
    bad = write_manifest(rows, tmp_path / "bad.parquet")
    with pytest.raises(ManifestError) as exc:
        read_manifest(bad)
    assert len(exc.value.problems) == 3


def test_schema_1_0_manifest_without_mask_columns_reads_as_no_masks(manifest, tmp_path):
    """Schema 1.1 added mask_path and mask_hash; a 1.0 manifest (no such columns) still reads, every row without a
    mask, and is written back with the columns (null)."""
    assert SCHEMA_VERSION == "1.1"
    table = pq.read_table(manifest)
    old = table.drop_columns(["mask_path", "mask_hash"])
    meta = dict(old.schema.metadata)
    meta[b"kontext.schema_version"] = b"1.0"
    pq.write_table(old.replace_schema_metadata(meta), manifest)
    assert "mask_path" not in pq.read_table(manifest).column_names
    m = read_manifest(manifest)
    assert m.metadata["schema_version"] == "1.0" and len(m) == 5
    assert m.table.column_names == list(COLUMNS)
    assert all(r["mask_path"] is None and r["mask_hash"] is None for r in m.records())
    rewritten = write_manifest(m.table.drop_columns(["mask_path", "mask_hash"]).to_pylist(), tmp_path / "new.parquet")
    assert pq.read_table(rewritten).column("mask_path").null_count == 5


def test_mask_path_and_hash_go_together(manifest, tmp_path):
    rows = read_manifest(manifest).rows()
    rows[0]["mask_path"] = "masks/im0.png"
    with pytest.raises(ManifestError) as exc:
        read_manifest(write_manifest(rows, tmp_path / "bad.parquet"))
    assert "mask_path and mask_hash" in str(exc.value) and "row(s) [0]" in str(exc.value)


def test_pair_similarity_is_read_with_the_check_record_and_validated(manifest, tmp_path):
    """The content check's column and `kontext.check` record: absent = unchecked; written by write_similarity
    (everything else kept, the column replaced, atomic); out-of-range values are refused like any other problem."""
    m = read_manifest(manifest)
    assert m.similarities() is None and m.check is None
    ids = [r["sample_id"] for r in m.records()]
    out = write_similarity(manifest, tmp_path / "checked.parquet", {i: 0.5 for i in ids[:-1]} | {ids[-1]: None},
                           {"flag_counts": {"unrelated": 0}})
    checked = read_manifest(out)
    assert checked.similarities() == [0.5] * 4 + [None] and checked.check == {"flag_counts": {"unrelated": 0}}
    assert checked.table.column_names == list(COLUMNS) + list(CHECK_COLUMNS)
    assert checked.records()[0][SIMILARITY_COLUMN] == 0.5
    assert {**checked.metadata, "check": None} == m.metadata
    write_similarity(out, out, dict.fromkeys(ids, 0.25), {})  # in place: replaced, not added
    assert read_manifest(out).similarities() == [0.25] * 5 and read_manifest(out).check == {}
    with pytest.raises(ValueError, match="changed since it was checked"):
        write_similarity(out, out, dict.fromkeys(ids[:3], 0.25), {})
    assert read_manifest(out).check_problems == []
    # a faulty column never stops a manifest from being used (the check must be able to rewrite it): it reads as
    # unchecked, and the problem is told
    write_similarity(out, out, dict.fromkeys(ids, 1.5), {})
    faulty = read_manifest(out)
    assert faulty.similarities() is None and len(faulty) == 5
    assert len(faulty.check_problems) == 1 and "value(s) outside [0, 1]" in faulty.check_problems[0]
    assert "check MANIFEST --in-place" in faulty.check_problems[0]
    write_similarity(out, out, dict.fromkeys(ids, 0.75), {})
    assert read_manifest(out).similarities() == [0.75] * 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_metadata_keys_round_trip_and_bad_json_is_a_problem(manifest):
    raw = encode_metadata({"created_by": "me", "options": {"b": 1, "a": [2]}, "check": None})
    assert raw == {META_CREATED_BY.encode(): b"me", META_OPTIONS.encode(): b'{"a": [2], "b": 1}',
                   META_CHECK.encode(): b"{}"}
    values, problems = decode_metadata(raw)
    assert values["options"] == {"a": [2], "b": 1} and values["created_by"] == "me" and problems == {}
    assert decode_metadata({})[0] == {"schema_version": None, "tool_version": None, "created_by": None,
                                      "hash_algorithm": None, "options": {}, "check": None}
    _rewrite_meta(manifest, **{META_CHECK: "[1]"})  # the check's record: told, read as none
    m = read_manifest(manifest)
    assert m.check is None and len(m.check_problems) == 1 and "'kontext.check' is not a JSON object" in m.check_problems[0]
    _rewrite_meta(manifest, **{META_OPTIONS: "{not json"})  # the manifest's own metadata: refused
    with pytest.raises(ManifestError) as exc:
        read_manifest(manifest)
    assert len(exc.value.problems) == 1 and "'kontext.options' is not valid JSON" in str(exc.value)


def test_on_demand_record_raises_or_reads_as_a_file():
    rec = {"on_demand": True, "seed": 1, "chain": []}
    assert on_demand_record(json.dumps(rec)) == rec == on_demand_record(json.dumps(rec), strict=True)
    for text in (None, "", json.dumps({"type": "blur", "on_demand": False})):  # a file on disk
        assert on_demand_record(text) is None and on_demand_record(text, strict=True) is None
    for text in ("{broken", "[1, 2]"):
        assert on_demand_record(text) is None  # readers that only look: the file in reference_paths is shown
        with pytest.raises(ValueError):
            on_demand_record(text, strict=True)  # the trainer lists it before loading a model


@pytest.mark.parametrize("size", [(640, 480), (2000, 1500)])  # the second is decoded at a reduced DCT scale
def test_view_image_thumbnail_matches_the_trainers_pixels(tmp_path, size):
    import numpy as np
    from PIL import Image

    from kontext_data.geometry import GeometryOptions

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    (tmp_path / "edited").mkdir()
    (tmp_path / "reference").mkdir()
    img.save(tmp_path / "edited" / "a.jpg", quality=92)
    img.save(tmp_path / "reference" / "a.jpg", quality=80)
    res = pair_folders(PairConfig(edited=tmp_path / "edited", references=(tmp_path / "reference",),
                                  out=tmp_path / "m.parquet", workers=1, cache_dir=None, seed=3, captions="none",
                                  geometry=GeometryOptions(resolution=256, crop_aspect="square", crop_style="random")))
    rec = read_manifest(res.manifest).records()[0]
    assert (rec["crop_left"], rec["crop_top"]) != (0, 0)
    exact = np.asarray(load_image(rec["target_path"], rec).resize((64, 64), Image.Resampling.BOX), float)
    fast = np.asarray(view_image(rec["target_path"], rec, None, (64, 64)), float)
    assert np.abs(exact - fast).mean() < 3.0
    assert np.array_equal(np.asarray(view_image(rec["target_path"], rec)), np.asarray(load_image(rec["target_path"], rec)))
    # the original with the crop box mapped onto it: the box holds the trainer's pixels
    orig = view_original(rec["target_path"], 200)
    assert max(orig.size) == 200
    box = crop_box(orig.size, rec)
    inside = np.asarray(orig.resize((64, 64), Image.Resampling.BOX, box=box), float)
    assert np.abs(inside - exact).mean() < 6.0
