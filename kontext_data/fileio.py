"""The one way this project writes a file: into a temp file beside it, then `os.replace` onto the final name.

A reader (or a crash) never sees a half-written manifest, report, cache entry or adapter: the old file stays until
the new one is complete. Used by both packages; torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, make_parents: bool = True,
                tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a fresh temp path beside `path` (same folder, so the rename is atomic); write it, and on leaving the
    block it replaces `path`. On an exception the temp file is removed and `path` is left as it was.

    The temp name keeps `path`'s suffix (``.name.XXXX.tmp.parquet``): writers that pick a format by extension still do.
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
