"""kontext_data.sources: folder, Parquet (nested caption columns, image structs, bytes, paths), save_to_disk
and hub sources; row values."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kontext_data.sources import SourceError, detect_source_kind, get_path, open_source
from kontext_data.split import SplitError, split_composites
from splitkit import (CAPTIONS, composite, config, panel, parquet_files, png, read, saved_dataset,  # noqa: F401
                      subjects_table)


def test_parquet_nested_caption_columns_and_image_struct(tmp_path, parquet_files):
    root, panels = parquet_files
    out = tmp_path / "o"
    result = split_composites(config(root, out, caption_columns=CAPTIONS))
    assert result.ok and result.written == 9 and result.gutters == {"x:16": 9}
    names = sorted(p.name for p in (out / "edit").glob("*.png"))
    assert names == [f"{i:08d}.png" for i in range(9)]  # row index across both files, in order
    assert names == sorted(p.name for p in (out / "reference").glob("*.png"))
    assert (out / "edit/00000006.txt").read_text(encoding="utf-8") == "a cup on a table 6\n"
    assert (out / "reference/00000006.txt").read_text(encoding="utf-8") == "a cup in snow 6\n"
    np.testing.assert_array_equal(read(out / "edit/00000006.png")[8:-8, 8:], panels[6][0])


def test_caption_only_for_edit_role_by_default_and_id_column_names_files(tmp_path, parquet_files):
    root, _ = parquet_files
    out = tmp_path / "o"
    result = split_composites(config(root, out, caption_columns=(("edit", "description.item"),),
                                     id_column="uid"))
    assert result.ok
    assert (out / "edit/s_004.txt").read_text(encoding="utf-8") == "cup 4\n"
    assert sorted(p.name for p in (out / "reference").iterdir())[:2] == ["s_000.png", "s_001.png"]


def test_json_string_descriptions_and_missing_nested_key_reported(tmp_path):
    table, _ = subjects_table(3, json_descriptions=True)
    path = tmp_path / "j.parquet"
    pq.write_table(table, path)
    ok = split_composites(config(path, tmp_path / "a", caption_columns=CAPTIONS))
    assert ok.ok and (tmp_path / "a/reference/00000002.txt").read_text(encoding="utf-8") == "a cup in snow 2\n"
    bad = split_composites(config(path, tmp_path / "b", caption_columns=(("edit", "description.nope"),)))
    assert bad.failed == 3 and [p.row for p in bad.problems] == [0, 1, 2]
    assert "'nope'" in bad.problems[0].message and "description_0" in bad.problems[0].message


def test_image_column_as_raw_bytes_or_relative_paths(tmp_path):
    panels = [(panel(60 + i), panel(70 + i)) for i in range(2)]
    composites = [png(composite(list(p), 2, 1)) for p in panels]
    (tmp_path / "imgs").mkdir()
    for i, data in enumerate(composites):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
    pq.write_table(pa.table({"img": pa.array(composites, pa.binary())}), tmp_path / "raw.parquet")
    pq.write_table(pa.table({"img": ["imgs/0.png", "imgs/1.png", "imgs/missing.png"]}), tmp_path / "paths.parquet")
    raw = split_composites(config(tmp_path / "raw.parquet", tmp_path / "a", image_column="img", gutter=0))
    paths = split_composites(config(tmp_path / "paths.parquet", tmp_path / "b", image_column="img", gutter=0))
    assert raw.ok and paths.written == 2
    assert [(p.row, "missing.png" in p.message) for p in paths.problems] == [(2, True)]
    for out in ("a", "b"):
        np.testing.assert_array_equal(read(tmp_path / out / "reference/00000001.png"), panels[1][1])


def test_missing_columns_are_all_reported_up_front(tmp_path, parquet_files):
    root, _ = parquet_files
    with pytest.raises(SplitError) as err:
        split_composites(config(root, tmp_path / "o", image_column="img",
                                caption_columns=(("edit", "desc.x"), ("reference", "description.nope"))))
    text = str(err.value)
    assert "'img'" in text and "'desc'" in text and "columns of" in text and "image, description, uid" in text


def test_get_path_prefers_literal_dotted_keys_and_indexes_lists():
    row = {"a.b": 1, "a": {"b": 2, "c": [{"d": "x"}]}}
    assert get_path(row, "a.b") == 1
    assert get_path(row, "a.c.0.d") == "x"
    with pytest.raises(KeyError):
        get_path(row, "a.z")


def test_local_datasets_folder_source(tmp_path, saved_dataset):
    path, panels = saved_dataset
    result = split_composites(config(path, tmp_path / "o", caption_columns=CAPTIONS))
    assert result.ok and result.written == 4
    assert (tmp_path / "o/edit/00000003.txt").read_text(encoding="utf-8") == "a cup on a table 3\n"
    np.testing.assert_array_equal(read(tmp_path / "o/reference/00000002.png")[8:-8, :-8], panels[2][1])
    with pytest.raises(SplitError, match="no split 'test'"):
        split_composites(config(path, tmp_path / "x", split="test"))


def test_offline_hub_dataset_fails_fast_with_download_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(SplitError) as err:  # offline is decided up front: no retry loop, no hang
        split_composites(config("kontext-tests/not-downloaded-anywhere", tmp_path / "o"))
    text = str(err.value)
    assert "'kontext-tests/not-downloaded-anywhere'" in text
    assert "HF_HUB_OFFLINE=1" in text and "hf download kontext-tests/not-downloaded-anywhere" in text
    with pytest.raises(SplitError, match="Streaming needs the network"):
        split_composites(config("kontext-tests/not-downloaded-anywhere", tmp_path / "o", streaming=True))


def test_folder_source_reads_composites_and_captions_but_not_gif(tmp_path):
    from PIL import Image

    src = tmp_path / "c"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "sub" / "a.png"), composite([panel(1), panel(2)], 2, 1))
    (src / "sub" / "a.txt").write_text("make it blue\n", encoding="utf-8")
    Image.fromarray(composite([panel(3), panel(4)], 2, 1)).save(src / "b.gif")  # left out (see COMPOSITE_EXTENSIONS)
    source = open_source(config(src, tmp_path / "o"))
    assert detect_source_kind(config(src, tmp_path / "o")) == "folder"
    assert source.total == 1 and source.folder_names == ["sub/a"]
    (row, values, base, error), = list(source.rows)
    assert (row, values["caption"], base, error) == (0, "make it blue\n", str(src), None)
    only_gif = tmp_path / "g"
    only_gif.mkdir()
    (src / "b.gif").rename(only_gif / "b.gif")
    with pytest.raises(SourceError, match="no images"):
        open_source(config(only_gif, tmp_path / "o"))
    with pytest.raises(SourceError, match="not a hub dataset id"):
        open_source(config(tmp_path / "nowhere" / "x", tmp_path / "o"))
