"""`kontext-data pair` end to end through the installed console script: exit codes, report, summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kontext_data.manifest import read_manifest
from pairkit import pair, save

EXE = shutil.which("kontext-data", path=os.path.dirname(sys.executable)) or shutil.which("kontext-data")


def cli(*args, cwd=None):
    assert EXE, "the kontext-data console script is not installed (pip install -e .)"
    env = {**os.environ, "KONTEXT_CACHE_DIR": str(Path(cwd or ".") / ".kcache"), "COLUMNS": "200"}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_help_has_an_example_and_is_fast():
    r = cli("pair", "--help")
    assert r.returncode == 0 and "Example" in r.stdout and "kontext-data pair ./edited ./reference" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "pair" in r.stdout


def test_default_out_in_current_folder_and_exit_0(tmp_path):
    for i in range(3):
        pair(tmp_path, f"a{i}.png", seed=i)
    r = cli("pair", "./edited", "./reference", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Wrote" in r.stdout and "3 samples" in r.stdout
    assert len(read_manifest(tmp_path / "manifest.parquet")) == 3
    again = cli("pair", "./edited", "./reference", cwd=tmp_path)
    assert "6 from cache" in again.stdout


def test_problems_exit_1_with_report_and_no_manifest(tmp_path):
    pair(tmp_path, "ok.png")
    save(tmp_path / "edited" / "lonely.png")
    (tmp_path / "edited" / "lonely.txt").write_text("x")
    r = cli("pair", "edited", "reference", "--report", "report.json", cwd=tmp_path)
    assert r.returncode == 1
    assert "missing_reference" in r.stdout and "lonely.png" in r.stdout and "--allow-partial" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["manifest"] is None
    assert report["problem_counts"] == {"missing_reference": 1}
    (problem,) = report["problems"]
    assert set(problem) == {"kind", "files", "message"}
    assert problem["files"] == [str(tmp_path / "edited" / "lonely.png")]
    assert not (tmp_path / "manifest.parquet").exists()
    r = cli("pair", "edited", "reference", "--allow-partial", "--json", cwd=tmp_path)
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["samples"] == 1 and data["manifest"].endswith("manifest.parquet")


@pytest.mark.parametrize("args", [
    ["pair", "nowhere", "reference"],
    ["pair", "edited", "reference", "--match", "fuzzy"],
    ["pair", "edited", "reference", "--resolution", "big"],
    ["pair", "edited", "edited"],
    ["pair"],
])
def test_usage_errors_exit_2(tmp_path, args):
    pair(tmp_path, "ok.png")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip()


def test_reference_free_manifest(tmp_path):
    pair(tmp_path, "a.png")
    r = cli("pair", "edited", "--out", "free.parquet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = read_manifest(tmp_path / "free.parquet").records()
    assert row["reference_paths"] == [] and row["reference_geometry"] == [] and row["caption"] == "make it red"


def test_check_content_adds_similarity_and_flags_an_identical_pair(tmp_path):
    import pyarrow.parquet as pq

    for i in range(4):
        pair(tmp_path, f"a{i}.png", seed=i)
    same = tmp_path / "edited" / "a0.png"
    (tmp_path / "reference" / "a0.png").write_bytes(same.read_bytes())  # no edit at all
    r = cli("pair", "edited", "reference", "--check-content", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    flagged = {f["sample_id"]: f["flags"] for f in data["content_check"]["flagged"]}
    assert "identical" in flagged["edited:a0.png"]
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert "pair_similarity" in table.column_names and len(read_manifest(tmp_path / "manifest.parquet")) == 4


def test_masks_option(tmp_path):
    from PIL import Image

    for i in range(2):
        pair(tmp_path, f"a{i}.png", seed=i)
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 48), 255).save(tmp_path / "masks" / "a0.png")
    r = cli("pair", "edited", "reference", "--masks", "masks", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "missing_mask" in r.stdout and "a1.png" in r.stdout and not (tmp_path / "manifest.parquet").exists()
    Image.new("L", (64, 48), 0).save(tmp_path / "masks" / "a1.jpg")
    r = cli("pair", "edited", "reference", "--masks", "masks", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 mask" in r.stdout
    rows = read_manifest(tmp_path / "manifest.parquet").records()
    assert [Path(r["mask_path"]).name for r in rows] == ["a0.png", "a1.jpg"]
    r = cli("pair", "edited", "reference", "--masks", "edited", cwd=tmp_path)
    assert r.returncode == 2 and "different folders" in r.stderr
