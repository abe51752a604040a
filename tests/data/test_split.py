"""kontext_data.split: composite images -> per-role panel folders (layouts, gutters, sources, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from kontext_data import cli_split
from kontext_data.split import (
    SplitConfig,
    SplitError,
    get_path,
    parse_layout,
    parse_roles,
    split_composites,
)

PANEL = 128  # small panels keep the suite fast (auto gutters may be up to 1/8 of a panel)


def _panel(seed: int, h: int = PANEL, w: int = PANEL) -> np.ndarray:
    """Busy content (never uniform along a whole line) unique per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 236, (h, w, 3), dtype=np.uint8)


def _composite(panels: list[np.ndarray], cols: int, rows: int, gutter: int = 0, margin: int = 0,
               extra_x: int = 0, extra_y: int = 0, color=(255, 255, 255)) -> np.ndarray:
    h, w = panels[0].shape[:2]
    width = 2 * margin + cols * w + (cols - 1) * gutter + extra_x
    height = 2 * margin + rows * h + (rows - 1) * gutter + extra_y
    image = np.empty((height, width, 3), np.uint8)
    image[:] = color
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        y, x = margin + r * (h + gutter), margin + c * (w + gutter)
        image[y:y + h, x:x + w] = p
    return image


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _config(src, out, **kw) -> SplitConfig:
    kw.setdefault("workers", 1)
    return SplitConfig(sources=tuple(str(s) for s in ([src] if not isinstance(src, list) else src)),
                       out=Path(out), **kw)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "layout, n, cols, rows",
    [("horizontal", 3, 3, 1), ("vertical", 2, 1, 2), ("grid 2x2", None, 2, 2)],
)
def test_each_layout_cuts_panels_back_out_exactly(tmp_path, layout, n, cols, rows):
    panels = [_panel(10 + i) for i in range(cols * rows)]
    src = tmp_path / "composites"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), _composite(panels, cols, rows))
    assert parse_layout(layout, n) == (cols, rows)
    roles = tuple((("edit" if i == 0 else f"ref{i}"), i) for i in range(cols * rows))
    result = split_composites(_config(src, tmp_path / "out", cols=cols, rows=rows, roles=roles))
    assert result.ok and result.written == 1
    for role, index in roles:
        np.testing.assert_array_equal(_read(tmp_path / "out" / role / "a.png"), panels[index])


def test_grid_panel_numbering_is_row_major_and_roles_pick_panels(tmp_path):
    panels = [_panel(20 + i) for i in range(6)]  # 2 rows x 3 columns
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "g.png"), _composite(panels, 3, 2, gutter=4))
    result = split_composites(_config(src, tmp_path / "o", cols=3, rows=2,
                                      roles=(("edit", 5), ("reference", 1), ("reference_2", 3))))
    assert result.ok and result.gutters == {"x:4": 1, "y:4": 1}
    np.testing.assert_array_equal(_read(tmp_path / "o/edit/g.png"), panels[5])
    np.testing.assert_array_equal(_read(tmp_path / "o/reference/g.png"), panels[1])
    np.testing.assert_array_equal(_read(tmp_path / "o/reference_2/g.png"), panels[3])


# ------------------------------------------------------------------------------- gutters & remainders


def test_subjects200k_style_gutter_is_detected_and_removed(tmp_path):
    # 8 px white frame around each panel: 16 px gutter between them, 8 px outer margin (kept)
    left, right = _panel(1), _panel(2)
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "s.png"), _composite([left, right], 2, 1, gutter=16, margin=8))
    result = split_composites(_config(src, tmp_path / "o"))
    assert result.ok
    assert result.gutters == {"x:16": 1}
    assert result.panel_sizes == {f"{PANEL + 8}x{PANEL + 16}": 1}
    edit, ref = _read(tmp_path / "o/edit/s.png"), _read(tmp_path / "o/reference/s.png")
    np.testing.assert_array_equal(edit[8:-8, 8:], left)  # the right edge of the left panel is content
    np.testing.assert_array_equal(ref[8:-8, :-8], right)


def _photo(seed: int) -> np.ndarray:
    """Photo-like panel (smooth shapes + sensor noise): what JPEG composites really hold."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = cv2.resize(low, (PANEL, PANEL), interpolation=cv2.INTER_CUBIC)
    return cv2.add(smooth, rng.integers(0, 12, smooth.shape, dtype=np.uint8))


def test_gutter_found_in_jpeg_composites_despite_ringing(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    panels = {}
    for i in range(3):
        panels[i] = (_photo(30 + i), _photo(40 + i))
        image = _composite(list(panels[i]), 2, 1, gutter=16, margin=8)
        cv2.imwrite(str(src / f"j{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    auto = split_composites(_config(src, tmp_path / "auto"))  # JPEG: separator tolerance raised to 32
    assert auto.ok and auto.lossy_sources == 3
    # ringing may eat a line or two at the band's edges, never content
    assert all(k.startswith("x:") and 12 <= int(k[2:]) <= 16 for k in auto.gutters), auto.gutters
    pinned = split_composites(_config(src, tmp_path / "pinned", gutter=16))
    assert pinned.ok and pinned.gutters == {"x:16": 3}
    edit = _read(tmp_path / "pinned/edit/j1.png").astype(int)
    assert edit.shape == (PANEL + 16, PANEL + 8, 3)
    assert np.abs(edit[8:-8, 8:] - panels[1][0]).mean() < 6  # the left view, not shifted
    assert (tmp_path / "pinned/edit/j1.png").is_file()  # PNG by default: no second lossy pass


def test_remainder_pixels_are_dropped_and_reported(tmp_path):
    panels = [_panel(5), _panel(6)]
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "r.png"), _composite(panels, 2, 1, extra_x=1, color=(0, 0, 0)))
    result = split_composites(_config(src, tmp_path / "o", gutter=0))
    assert result.ok
    assert result.remainders == {"x:1 at end": 1}
    np.testing.assert_array_equal(_read(tmp_path / "o/edit/r.png"), panels[0])
    np.testing.assert_array_equal(_read(tmp_path / "o/reference/r.png"), panels[1])


def test_explicit_gutter_that_holds_content_is_a_problem(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), _composite([_panel(7), _panel(8)], 2, 1))
    result = split_composites(_config(src, tmp_path / "o", gutter=10))
    assert not result.ok and result.failed == 1
    assert "gutter" in result.problems[0].message and result.problems[0].row == 0
    assert not (tmp_path / "o/edit/x.png").exists()


def test_unequal_panels_are_reported_with_row_numbers_never_cut(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    good = _composite([_panel(9), _panel(10)], 2, 1, gutter=4)
    wide = np.full((PANEL, PANEL + 4 + PANEL + 20, 3), 255, np.uint8)  # 48 | gutter 4 | 68
    wide[:, :PANEL] = _panel(11)
    wide[:, PANEL + 4:] = _panel(12, w=PANEL + 20)
    cv2.imwrite(str(src / "0good.png"), good)
    cv2.imwrite(str(src / "1wide.png"), wide)
    result = split_composites(_config(src, tmp_path / "o"))
    assert result.written == 1 and result.failed == 1
    (problem,) = result.problems
    assert problem.row == 1 and problem.name == "1wide"
    assert "unequal" in problem.message
    assert sorted(p.name for p in (tmp_path / "o/edit").iterdir()) == ["0good.png"]


# ------------------------------------------------------------------------------- Parquet & captions


def _subjects_table(n: int, start: int = 0, json_descriptions: bool = False) -> tuple[pa.Table, list]:
    panels = [(_panel(100 + 2 * i), _panel(101 + 2 * i)) for i in range(start, start + n)]
    images = [{"bytes": _png(_composite(list(p), 2, 1, gutter=16, margin=8)), "path": f"img{i}.png"}
              for i, p in zip(range(start, start + n), panels)]
    desc = [{"item": f"cup {i}", "description_0": f"a cup on a table {i}", "description_1": f"a cup in snow {i}"}
            for i in range(start, start + n)]
    if json_descriptions:
        desc_col = pa.array([json.dumps(d) for d in desc])
    else:
        desc_col = pa.array(desc)
    table = pa.table({
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "description": desc_col,
        "uid": pa.array([f"s/{i:03d}" for i in range(start, start + n)]),
    })
    return table, panels


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    t1, p1 = _subjects_table(5)
    t2, p2 = _subjects_table(4, start=5)
    pq.write_table(t1, root / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(t2, root / "train-00001-of-00002.parquet", row_group_size=3)
    return root, p1 + p2


CAPTIONS = (("edit", "description.description_0"), ("reference", "description.description_1"))


def test_parquet_nested_caption_columns_and_image_struct(tmp_path, parquet_files):
    root, panels = parquet_files
    out = tmp_path / "o"
    result = split_composites(_config(root, out, caption_columns=CAPTIONS))
    assert result.ok and result.written == 9 and result.gutters == {"x:16": 9}
    names = sorted(p.name for p in (out / "edit").glob("*.png"))
    assert names == [f"{i:08d}.png" for i in range(9)]  # row index across both files, in order
    assert names == sorted(p.name for p in (out / "reference").glob("*.png"))
    assert (out / "edit/00000006.txt").read_text(encoding="utf-8") == "a cup on a table 6\n"
    assert (out / "reference/00000006.txt").read_text(encoding="utf-8") == "a cup in snow 6\n"
    np.testing.assert_array_equal(_read(out / "edit/00000006.png")[8:-8, 8:], panels[6][0])


def test_caption_only_for_edit_role_by_default_and_id_column_names_files(tmp_path, parquet_files):
    root, _ = parquet_files
    out = tmp_path / "o"
    result = split_composites(_config(root, out, caption_columns=(("edit", "description.item"),),
                                      id_column="uid"))
    assert result.ok
    assert (out / "edit/s_004.txt").read_text(encoding="utf-8") == "cup 4\n"
    assert sorted(p.name for p in (out / "reference").iterdir())[:2] == ["s_000.png", "s_001.png"]


def test_json_string_descriptions_and_missing_nested_key_reported(tmp_path):
    table, _ = _subjects_table(3, json_descriptions=True)
    path = tmp_path / "j.parquet"
    pq.write_table(table, path)
    ok = split_composites(_config(path, tmp_path / "a", caption_columns=CAPTIONS))
    assert ok.ok and (tmp_path / "a/reference/00000002.txt").read_text(encoding="utf-8") == "a cup in snow 2\n"
    bad = split_composites(_config(path, tmp_path / "b", caption_columns=(("edit", "description.nope"),)))
    assert bad.failed == 3 and [p.row for p in bad.problems] == [0, 1, 2]
    assert "'nope'" in bad.problems[0].message and "description_0" in bad.problems[0].message


def test_image_column_as_raw_bytes_or_relative_paths(tmp_path):
    panels = [(_panel(60 + i), _panel(70 + i)) for i in range(2)]
    composites = [_png(_composite(list(p), 2, 1)) for p in panels]
    (tmp_path / "imgs").mkdir()
    for i, data in enumerate(composites):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
    pq.write_table(pa.table({"img": pa.array(composites, pa.binary())}), tmp_path / "raw.parquet")
    pq.write_table(pa.table({"img": ["imgs/0.png", "imgs/1.png", "imgs/missing.png"]}), tmp_path / "paths.parquet")
    raw = split_composites(_config(tmp_path / "raw.parquet", tmp_path / "a", image_column="img", gutter=0))
    paths = split_composites(_config(tmp_path / "paths.parquet", tmp_path / "b", image_column="img", gutter=0))
    assert raw.ok and paths.written == 2
    assert [(p.row, "missing.png" in p.message) for p in paths.problems] == [(2, True)]
    for out in ("a", "b"):
        np.testing.assert_array_equal(_read(tmp_path / out / "reference/00000001.png"), panels[1][1])


def test_missing_columns_are_all_reported_up_front(tmp_path, parquet_files):
    root, _ = parquet_files
    with pytest.raises(SplitError) as err:
        split_composites(_config(root, tmp_path / "o", image_column="img",
                                 caption_columns=(("edit", "desc.x"), ("reference", "description.nope"))))
    text = str(err.value)
    assert "'img'" in text and "'desc'" in text and "columns of" in text and "image, description, uid" in text


def test_get_path_prefers_literal_dotted_keys_and_indexes_lists():
    row = {"a.b": 1, "a": {"b": 2, "c": [{"d": "x"}]}}
    assert get_path(row, "a.b") == 1
    assert get_path(row, "a.c.0.d") == "x"
    with pytest.raises(KeyError):
        get_path(row, "a.z")


def test_shards_union_equals_one_run_with_worker_pool(tmp_path, parquet_files):
    root, _ = parquet_files
    whole = split_composites(_config(root, tmp_path / "whole", caption_columns=CAPTIONS, workers=2))
    assert whole.ok
    seen = []
    for k in (0, 1, 2):
        part = split_composites(_config(root, tmp_path / "shards", caption_columns=CAPTIONS, shard=(k, 3)))
        assert part.ok
        seen.append(part.written)
    assert seen == [3, 3, 3]
    assert _tree(tmp_path / "whole") == _tree(tmp_path / "shards")  # same names, same bytes


# ------------------------------------------------------------------------------------ datasets


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("ds")
    table, panels = _subjects_table(4)
    files = []
    for i, img in enumerate(table.column("image").to_pylist()):
        f = root / f"src{i}.png"
        f.write_bytes(img["bytes"])
        files.append(str(f))
    ds = datasets.Dataset.from_dict(
        {"image": files, "description": table.column("description").to_pylist()},
        features=datasets.Features({
            "image": datasets.Image(),
            # a nested struct, as datasets stores Subjects200K's `description`
            "description": {"item": datasets.Value("string"), "description_0": datasets.Value("string"),
                            "description_1": datasets.Value("string")},
        }),
    )
    ds = ds.cast_column("image", datasets.Image())  # embeds bytes on save
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(root / "saved"))
    return root / "saved", panels


def test_local_datasets_folder_source(tmp_path, saved_dataset):
    path, panels = saved_dataset
    result = split_composites(_config(path, tmp_path / "o", caption_columns=CAPTIONS))
    assert result.ok and result.written == 4
    assert (tmp_path / "o/edit/00000003.txt").read_text(encoding="utf-8") == "a cup on a table 3\n"
    np.testing.assert_array_equal(_read(tmp_path / "o/reference/00000002.png")[8:-8, :-8], panels[2][1])
    with pytest.raises(SplitError, match="no split 'test'"):
        split_composites(_config(path, tmp_path / "x", split="test"))


def test_offline_hub_dataset_fails_fast_with_download_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(SplitError) as err:  # offline is decided up front: no retry loop, no hang
        split_composites(_config("kontext-tests/not-downloaded-anywhere", tmp_path / "o"))
    text = str(err.value)
    assert "'kontext-tests/not-downloaded-anywhere'" in text
    assert "HF_HUB_OFFLINE=1" in text and "hf download kontext-tests/not-downloaded-anywhere" in text
    with pytest.raises(SplitError, match="Streaming needs the network"):
        split_composites(_config("kontext-tests/not-downloaded-anywhere", tmp_path / "o", streaming=True))


# ------------------------------------------------------------------------------------ resume


def test_resume_skips_done_rows_and_redoes_partial_ones(tmp_path, parquet_files):
    root, _ = parquet_files
    out = tmp_path / "o"
    first = split_composites(_config(root, out, caption_columns=CAPTIONS))
    assert first.written == 9
    before = _tree(out)
    kept = out / "edit/00000001.png"
    mtime = kept.stat().st_mtime_ns
    (out / "reference/00000004.png").unlink()  # an interrupted row: one panel missing
    second = split_composites(_config(root, out, caption_columns=CAPTIONS))
    assert (second.written, second.skipped_done, second.failed) == (1, 8, 0)
    assert kept.stat().st_mtime_ns == mtime
    assert _tree(out) == before
    assert not [p for p in out.rglob("*.tmp")]


def test_id_collisions_in_a_folder_are_problems_not_overwrites(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), _composite([_panel(1), _panel(2)], 2, 1))
    cv2.imwrite(str(src / "x.jpg"), _composite([_panel(3), _panel(4)], 2, 1))
    result = split_composites(_config(src, tmp_path / "o"))
    assert result.failed == 2 and all("x" in p.message and "rename" in p.message for p in result.problems)


# ------------------------------------------------------------------------------------ CLI


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
    cv2.imwrite(str(src / "a.png"), _composite([_panel(1), _panel(2)], 2, 1, gutter=4))
    wide = np.full((PANEL, 2 * PANEL + 24, 3), 255, np.uint8)
    wide[:, :PANEL], wide[:, PANEL + 4:] = _panel(3), _panel(4, w=PANEL + 20)
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
    res = runner.invoke(cli, ["split", "--help"])
    assert res.exit_code == 0 and "Example" in res.output


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
        cv2.imwrite(str(src / f"r{i}.png"), _composite([_panel(40 + i), _panel(50 + i), mask], 3, 1))
        (src / f"r{i}.txt").write_text(f"edit {i}\n")
    manifest = tmp_path / "m.parquet"
    res = CliRunner().invoke(cli, ["split", str(src), "--out", str(tmp_path / "o"), "-j", "1", "--json",
                                   "--panels", "3", "--roles", "edit=0,reference=1,mask=2", "--mask-role", "mask",
                                   "--gutter", "0", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(_read(tmp_path / "o/mask/r0.png"), mask)
    rows = sorted(pq.read_table(manifest).to_pylist(), key=lambda r: r["target_path"])
    assert [r["mask_path"] for r in rows] == ["o/mask/r0.png", "o/mask/r1.png"]
    assert [r["reference_paths"] for r in rows] == [["o/reference/r0.png"], ["o/reference/r1.png"]]
    with pytest.raises(SplitError) as err:
        split_composites(_config(src, tmp_path / "x", cols=3, roles=(("edit", 0), ("reference", 1)),
                                 mask_role="mask"))
    assert "--mask-role 'mask' is not among --roles" in str(err.value)
    with pytest.raises(SplitError) as err:
        split_composites(_config(src, tmp_path / "x", cols=3, roles=(("edit", 0), ("mask", 2)), mask_role="mask",
                                 caption_columns=(("mask", "caption"),)))
    assert "a mask takes no caption" in str(err.value)
