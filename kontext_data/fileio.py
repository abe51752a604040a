"""The one way this project writes a file: into a temp file beside it, then `os.replace` onto the final name.

A reader (or a crash) never sees a half-written manifest, report, cache entry or adapter: the old file stays until
the new one is complete. The new file gets the permissions of the one it replaces (or those a plain `open()` would
give), not the private 0600 of a temp file. `atomic_dir` does the same for a folder written as a whole (the HTML
preview's thumbnails). Used by both packages; torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _final_mode(path: Path, folder: bool) -> int:
    """The mode `path` has now, or else the one a plain open() / mkdir() gives under the current umask."""
    try:
        return path.stat().st_mode & (0o7777 if folder else 0o777)  # a folder keeps its setgid (shared groups)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return (0o777 if folder else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = True,
                tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a fresh temp path beside `path` (same folder, so the rename is atomic); write it, and on leaving the
    block it replaces `path`. On an exception the temp file is removed and `path` is left as it was.

    The temp name keeps `path`'s suffix (``.name.XXXX.tmp.parquet``): writers that pick a format by extension still do.
    The new file takes the mode of the file it replaces, or the umask's default for a new one.
    `tmp_dir`: make the temp file in that folder instead (on the same filesystem as `path`), e.g. a hidden work
    folder, so that a writer killed mid-write leaves nothing beside its outputs.
    """
    path = Path(path)
    folder = path.parent if tmp_dir is None else Path(tmp_dir)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path, folder=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a fresh empty temp folder beside `path`; fill it, and on leaving the block it replaces the folder `path`
    (and everything in it). On an exception the temp folder is removed and `path` is left as it was.

    POSIX cannot swap two folders in one step, so this takes two renames: the old folder is moved aside, the new one
    moved in, then the old one deleted. A reader sees the old folder or the complete new one (for an instant
    between the renames, none), never a half-written one. Inside the block `path` is still the old folder, so its
    files can be reused. The folder takes the mode of the one it replaces, or the umask's default.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path, folder=True))
        old = None
        if path.exists():
            # renaming onto an empty folder is allowed: a fresh one gives the old folder a name no one else uses
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            try:
                os.replace(path, old)
            except BaseException:
                old.rmdir()
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write `data` as JSON (UTF-8, non-ASCII kept, trailing newline) to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n")
