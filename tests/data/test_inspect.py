"""kontext_data.inspect and `kontext-data inspect`: counts, buckets, captions, duplicates, files gone, plots."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from kontext_data.check import check_manifest, write_manifest_with_similarity
from kontext_data.inspect import InspectConfig, inspect_manifest, write_plots
from kontext_data.manifest import read_manifest
from test_check import make_sample_module, pair_dir, run_cli, sample_manifest


def test_counts_buckets_and_captions_of_the_sample_data(tmp_path):
    manifest = sample_manifest(tmp_path, n=32)
    res = inspect_manifest(manifest)
    s = res.report()
    rows = read_manifest(manifest).records()
    assert s["samples"] == 32 and s["references_per_sample"] == {"1": 32}
    assert s["splits"] == {"train": 32} and s["datasets"] == {"edited": 32}
    assert s["conditioning_types"] == {"reference_strict": 32} and s["caption_sources"] == {"textfile": 32}
    # the bucket histogram accounts for every sample, most frequent first, and matches the rows
    assert sum(b["count"] for b in s["buckets"]) == 32
    assert [b["count"] for b in s["buckets"]] == sorted((b["count"] for b in s["buckets"]), reverse=True)
    top = s["buckets"][0]
    assert top["count"] == sum(1 for r in rows if (r["bucket_width"], r["bucket_height"]) == (top["width"], top["height"]))
    caps = [r["caption"] for r in rows]
    assert s["captions"]["words"]["max"] == max(len(c.split()) for c in caps)
    assert s["captions"]["characters"]["min"] == min(len(c) for c in caps)
    assert s["captions"]["distinct"] == len(set(caps))
    first = s["captions"]["most_frequent"][0]
    assert first["count"] == max(caps.count(c) for c in caps) and caps.count(first["caption"]) == first["count"]
    assert s["files_gone"] == {"targets": 0, "references": 0, "examples": []}
    assert res.ok and s["duplicates"]["duplicate_target_groups"] == 0


def test_duplicates_shared_references_and_files_gone_are_problems(tmp_path):
    ms = make_sample_module()
    ms.make_sample(tmp_path, n=12, seed=1)
    e, r = tmp_path / "edited", tmp_path / "reference"
    shutil.copyfile(e / "scene_000.png", e / "copy_of_0.png")       # the same edited file twice
    shutil.copyfile(r / "scene_000.png", r / "copy_of_0.png")
    (e / "copy_of_0.txt").write_text("a copy")
    for i in (1, 2):                                                # one reference file behind three targets
        shutil.copyfile(r / "scene_003.png", r / f"scene_00{i}.png")
    manifest = pair_dir(tmp_path)
    (e / "scene_004.png").unlink()                                  # gone since the manifest was made
    (r / "scene_005.png").unlink()
    res = inspect_manifest(manifest, InspectConfig(shared_reference_min=3))
    dup = res.stats["duplicates"]
    assert dup["duplicate_target_groups"] == 1
    assert sorted(dup["duplicate_targets"][0]["sample_ids"]) == ["edited:copy_of_0.png", "edited:scene_000.png"]
    assert dup["shared_reference_groups"] == 1 and dup["shared_references"][0]["count"] == 3
    assert res.stats["files_gone"]["targets"] == 1 and res.stats["files_gone"]["references"] == 1
    assert any(str(e / "scene_004.png") == x for x in res.stats["files_gone"]["examples"])
    assert not res.ok and len(res.problems) == 3
    assert any("restore them" in p for p in res.problems)
    # through the command: exit 1, JSON on stdout for scripts, the same numbers
    out = run_cli("inspect", manifest, "--json")
    assert out.exit_code == 1
    data = json.loads(out.output[out.output.index("{"):])
    assert data["files_gone"]["targets"] == 1 and data["duplicates"]["duplicate_target_groups"] == 1
    assert run_cli("inspect", manifest, "--no-files", "--json").exit_code == 1  # duplicates remain
    assert run_cli("inspect", tmp_path / "missing.parquet").exit_code == 2
    assert run_cli("inspect", manifest, "--top", "0").exit_code == 2


def test_plots_are_png_and_similarity_is_reported_after_check(tmp_path):
    manifest = sample_manifest(tmp_path, n=16)
    result = check_manifest(manifest)
    write_manifest_with_similarity(manifest, result, manifest)
    res = inspect_manifest(manifest)
    sim = res.stats["pair_similarity"]
    assert sim["count"] == 16 and sim["flag_counts"]["unrelated"] == 0
    assert sim["worst"][0]["similarity"] == min(round(s.similarity, 4) for s in result.samples)
    paths = write_plots(res, tmp_path / "plots")
    assert [p.name for p in paths] == ["buckets.png", "aspect_ratios.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 100
            # something was drawn in colour (the bars / dots), not only text on white
            assert any(c[1][2] > c[1][0] + 80 for c in im.convert("RGB").getcolors(1 << 16) or [])
    r = run_cli("inspect", manifest, "--plots", tmp_path / "p2", "--report", tmp_path / "i.json")
    assert r.exit_code == 0, r.output
    assert "128x128" in r.output and "Pair similarity" in r.output
    assert (tmp_path / "p2" / "buckets.png").is_file()
    assert json.loads((tmp_path / "i.json").read_text())["samples"] == 16


def test_a_faulty_similarity_column_is_reported_not_fatal(tmp_path):
    from kontext_data.manifest import write_similarity

    manifest = sample_manifest(tmp_path, n=4)
    ids = [r["sample_id"] for r in read_manifest(manifest).records()]
    write_similarity(manifest, manifest, dict.fromkeys(ids, 7.0), {"flag_counts": {}})
    res = inspect_manifest(manifest, InspectConfig(check_files=False))
    assert "pair_similarity" not in res.stats and not res.ok
    assert "outside [0, 1]" in res.problems[-1] and "--in-place" in res.problems[-1]
    assert run_cli("check", manifest, "--in-place", "-q").exit_code == 0  # the fix it names works
    assert inspect_manifest(manifest, InspectConfig(check_files=False)).ok
