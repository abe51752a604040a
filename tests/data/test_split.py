"""kontext_data.split: composite images -> per-role panel folders (layouts, roles, shards, resume, CLI)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from kontext_data import cli_split
from kontext_data.split import SplitError, parse_layout, parse_roles, split_composites
from splitkit import (CAPTIONS, PANEL, composite, config, panel, parquet_files, read, saved_dataset,  # noqa: F401
                      tree)


@pytest.mark.parametrize(
    "layout, n, cols, rows",
    [("horizontal", 3, 3, 1), ("vertical", 2, 1, 2), ("grid 2x2", None, 2, 2)],
)
def test_each_layout_cuts_panels_back_out_exactly(tmp_path, layout, n, cols, rows):
    panels = [panel(10 + i) for i in range(cols * rows)]
    src = tmp_path / "composites"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), composite(panels, cols, rows))
    assert parse_layout(layout, n) == (cols, rows)
    roles = tuple((("edit" if i == 0 else f"ref{i}"), i) for i in range(cols * rows))
    result = split_composites(config(src, tmp_path / "out", cols=cols, rows=rows, roles=roles))
    assert result.ok and result.written == 1
    for role, index in roles:
        np.testing.assert_array_equal(read(tmp_path / "out" / role / "a.png"), panels[index])


def test_grid_panel_numbering_is_row_major_and_roles_pick_panels(tmp_path):
    panels = [panel(20 + i) for i in range(6)]  # 2 rows x 3 columns
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "g.png"), composite(panels, 3, 2, gutter=4))
    result = split_composites(config(src, tmp_path / "o", cols=3, rows=2,
                                     roles=(("edit", 5), ("reference", 1), ("reference_2", 3))))
    assert result.ok and result.gutters == {"x:4": 1, "y:4": 1}
    np.testing.assert_array_equal(read(tmp_path / "o/edit/g.png"), panels[5])
    np.testing.assert_array_equal(read(tmp_path / "o/reference/g.png"), panels[1])
    np.testing.assert_array_equal(read(tmp_path / "o/reference_2/g.png"), panels[3])


def test_shards_union_equals_one_run_with_worker_pool(tmp_path, parquet_files):
    root, _ = parquet_files
    whole = split_composites(config(root, tmp_path / "whole", caption_columns=CAPTIONS, workers=2))
    assert whole.ok
    seen = []
    for k in (0, 1, 2):
        part = split_composites(config(root, tmp_path / "shards", caption_columns=CAPTIONS, shard=(k, 3)))
        assert part.ok
        seen.append(part.written)
    assert seen == [3, 3, 3]
    assert tree(tmp_path / "whole") == tree(tmp_path / "shards")  # same names, same bytes


def test_resume_skips_done_rows_and_redoes_partial_ones(tmp_path, parquet_files):
    root, _ = parquet_files
    out = tmp_path / "o"
    first = split_composites(config(root, out, caption_columns=CAPTIONS))
    assert first.written == 9
    before = tree(out)
    kept = out / "edit/00000001.png"
    mtime = kept.stat().st_mtime_ns
    (out / "reference/00000004.png").unlink()  # an interrupted row: one panel missing
    second = split_composites(config(root, out, caption_columns=CAPTIONS))
    assert (second.written, second.skipped_done, second.failed) == (1, 8, 0)
    assert kept.stat().st_mtime_ns == mtime
    assert tree(out) == before
    assert not [p for p in out.rglob("*.tmp")]


def test_id_collisions_in_a_folder_are_problems_not_overwrites(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), composite([panel(1), panel(2)], 2, 1))
    cv2.imwrite(str(src / "x.jpg"), composite([panel(3), panel(4)], 2, 1))
    result = split_composites(config(src, tmp_path / "o"))
    assert result.failed == 2 and all("x" in p.message and "rename" in p.message for p in result.problems)


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    cli_split.register(app)

    @app.command("version")
    def _version() -> None:  # a second command keeps `split` a sub-command, as in kontext-data
        pass

    return app


def test_cli_json_exit_codes_and_problem_rows(tmp_path, cli):
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), composite([panel(1), panel(2)], 2, 1, gutter=4))
    wide = np.full((PANEL, 2 * PANEL + 24, 3), 255, np.uint8)
    wide[:, :PANEL], wide[:, PANEL + 4:] = panel(3), panel(4, w=PANEL + 20)
    cv2.imwrite(str(src / "b.png"), wide)
    runner = CliRunner()
    res = runner.invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "-j", "1", "--json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.output)
    assert report["written"] == 1 and report["problems"][0]["row"] == 1
    res = runner.invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "-j", "1", "--format", "jpeg",
                              "--quality", "90", "--roles", "edit=0,reference=1", "--overwrite"])
    assert res.exit_code == 1
    assert "row 1 (b)" in res.output and (tmp_path / "o/edit/a.jpg").is_file()
    res = runner.invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "--roles", "edit=0,reference=7"])
    assert res.exit_code == 2 and "panel index 7" in res.output
    res = runner.invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "--shard", "3/3", "--json"])
    assert res.exit_code == 2 and "--shard '3/3'" in json.loads(res.output)["errors"][0]
    res = runner.invoke(cli, ["split", "--help"])
    assert res.exit_code == 0 and "Example" in res.output


def test_cli_manifest_pairs_the_role_folders(tmp_path, cli, parquet_files):
    root, _ = parquet_files
    manifest = tmp_path / "m.parquet"
    res = CliRunner().invoke(cli, ["split", str(root), "--out", str(tmp_path / "o"), "-j", "1", "--json",
                                   "-c", "description.description_0", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["manifest"]["samples"] == 9
    rows = pq.read_table(manifest).to_pylist()
    first = min(rows, key=lambda r: r["target_path"])
    assert first["target_path"] == "o/edit/00000000.png"  # relative to the manifest's folder
    assert first["reference_paths"] == ["o/reference/00000000.png"]
    assert first["caption"] == "a cup on a table 0"


def test_parse_roles_rejects_bad_specs():
    assert parse_roles("edit=0, reference=1,ref_b=2") == (("edit", 0), ("reference", 1), ("ref_b", 2))
    with pytest.raises(SplitError) as err:
        parse_roles("edit=0,edit=1,../x=2,ref")
    assert len(err.value.problems) == 3


def test_mask_role_is_split_like_a_panel_and_paired_as_masks(tmp_path, cli):
    """[edit | reference | mask] composites: --mask-role writes the mask panel to its own folder, and --manifest
    pairs it as `pair --masks` does (a mask per sample, one reference)."""
    src = tmp_path / "c"
    src.mkdir()
    mask = np.zeros((PANEL, PANEL, 3), np.uint8)
    mask[:, : PANEL // 2] = 255
    for i in range(2):
        cv2.imwrite(str(src / f"r{i}.png"), composite([panel(40 + i), panel(50 + i), mask], 3, 1))
        (src / f"r{i}.txt").write_text(f"edit {i}\n")
    manifest = tmp_path / "m.parquet"
    res = CliRunner().invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "-j", "1", "--json",
                                   "--panels", "3", "--roles", "edit=0,reference=1,mask=2", "--mask-role", "mask",
                                   "--gutter", "0", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read(tmp_path / "o/mask/r0.png"), mask)
    rows = sorted(pq.read_table(manifest).to_pylist(), key=lambda r: r["target_path"])
    assert [r["mask_path"] for r in rows] == ["o/mask/r0.png", "o/mask/r1.png"]
    assert [r["reference_paths"] for r in rows] == [["o/reference/r0.png"], ["o/reference/r1.png"]]
    with pytest.raises(SplitError) as err:
        split_composites(config(src, tmp_path / "x", cols=3, roles=(("edit", 0), ("reference", 1)),
                                mask_role="mask"))
    assert "--mask-role 'mask' is not among --roles" in str(err.value)
    with pytest.raises(SplitError) as err:
        split_composites(config(src, tmp_path / "x", cols=3, roles=(("edit", 0), ("mask", 2)), mask_role="mask",
                                caption_columns=(("mask", "caption"),)))
    assert "a mask takes no caption" in str(err.value)


def test_cli_dataset_split_and_its_old_hidden_spelling(tmp_path, cli, saved_dataset):
    """`--dataset-split` picks a datasets split (not pair's train/eval); the old `--split` still works, unlisted."""
    path, _ = saved_dataset
    runner = CliRunner()
    for flag in ("--dataset-split", "--split"):
        res = runner.invoke(cli, ["split", str(path), "--out", str(tmp_path / "o"), flag, "test", "--json"])
        assert res.exit_code == 2 and "no split 'test'" in json.loads(res.stdout)["errors"][0], res.output
        res = runner.invoke(cli, ["split", str(path), "--out", str(tmp_path / flag), flag, "train", "-j", "1",
                                  "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["written"] == 4, res.output
    both = runner.invoke(cli, ["split", str(path), "--out", str(tmp_path / "o"), "--split", "test",
                               "--dataset-split", "validation", "--json"])
    assert both.exit_code == 2 and "give one" in json.loads(both.stdout)["errors"][0]
    help_text = runner.invoke(cli, ["split", "--help"], env={"COLUMNS": "300"}).output
    assert "--dataset-split" in help_text and "--split " not in help_text
