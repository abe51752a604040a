"""kontext_data.fileio: a write either completes or leaves the old file (or folder) as it was, never half of it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from kontext_data.fileio import atomic_dir, atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_path_replaces_on_success_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "sub" / "m.parquet"  # the parent is made
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".parquet") and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"new" and leftovers(target.parent) == []


def test_atomic_path_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_new_files_are_not_private_and_replaced_files_keep_their_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.txt"
        write_text_atomic(fresh, "x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # what open() gives, not the temp file's 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        write_text_atomic(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(mask)


def test_write_helpers(tmp_path):
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_text_atomic(tmp_path / "t.txt", "gr\u00fc\u00dfe")
    assert (tmp_path / "t.txt").read_bytes() == "gr\u00fc\u00dfe".encode()
    write_json_atomic(tmp_path / "d.json", {"b": "\u00e9", "a": 1}, sort_keys=True)
    text = (tmp_path / "d.json").read_text(encoding="utf-8")
    assert text == '{\n  "a": 1,\n  "b": "\u00e9"\n}\n' and json.loads(text) == {"a": 1, "b": "\u00e9"}


def test_atomic_dir_swaps_the_whole_folder(tmp_path):
    folder = tmp_path / "site" / "thumbs"
    folder.mkdir(parents=True)
    (folder / "keep.jpg").write_bytes(b"old keep")
    (folder / "gone.jpg").write_bytes(b"stale")
    with atomic_dir(folder) as tmp:
        assert tmp.parent == folder.parent and tmp.is_dir() and not list(tmp.iterdir())
        assert (folder / "keep.jpg").read_bytes() == b"old keep"  # the old folder is still there to reuse
        (tmp / "keep.jpg").write_bytes((folder / "keep.jpg").read_bytes())
        (tmp / "new.jpg").write_bytes(b"new")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.jpg", "new.jpg"]
    assert leftovers(folder.parent) == []
    assert stat.S_IMODE(folder.stat().st_mode) & 0o055  # readable by others, not mkdtemp's 0700


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path):
    folder = tmp_path / "thumbs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(folder) as tmp:
            (tmp / "b.jpg").write_bytes(b"b")
            raise KeyboardInterrupt
    assert [p.name for p in folder.iterdir()] == ["a.jpg"] and leftovers(tmp_path) == []
    with atomic_dir(tmp_path / "new") as tmp:  # a folder that did not exist yet
        (tmp / "x").write_text("x")
    assert (tmp_path / "new" / "x").read_text() == "x" and leftovers(tmp_path) == []
