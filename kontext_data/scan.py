"""Folder scanning with an incremental probe cache and the shared process pool.

In: dataset folders. Out: for each folder, `{relative posix path: FileEntry}` for images and the set of caption
files; for each image an `ImageInfo` (hash, oriented size, problem), computed in parallel on a cold run (chunks of
files through :func:`kontext_data.workers.map_chunks`) and read from the cache (keyed by absolute folder, relative
path, size and mtime) on a warm one.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import xxhash

from kontext_data.fileio import atomic_path
from kontext_data.imageio import CAPTION_EXTENSION, IMAGE_EXTENSIONS, ImageInfo, ProbeWorker
from kontext_data.workers import chunked, map_chunks, resolve_workers

CACHE_FORMAT = 2
# below this many files the pool's start-up costs more than it saves
POOL_MIN_FILES = 256
CHUNK = 64


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mtime_ns: int


# `kontext-data degrade` keeps its per-output records in this hidden folder of REFDIR (= degrade.SIDECAR_DIR;
# named here so that pairing a plain folder never imports the degrade stage).
DEGRADE_SIDECAR = ".kontext-degrade"


@dataclass
class FolderListing:
    root: Path
    images: dict[str, FileEntry]
    captions: dict[str, tuple[int, int]]
    """caption .txt files: relative path -> (size, mtime_ns)"""
    sidecar_dirs: list[tuple[str, int]] = field(default_factory=list)
    """(relative path, mtime_ns) of every folder of a degrade sidecar: records are renamed into place, so any
    change to them changes a folder's mtime."""

    @property
    def has_sidecar(self) -> bool:
        return bool(self.sidecar_dirs)


def default_cache_dir() -> Path:
    """$KONTEXT_CACHE_DIR, else $XDG_CACHE_HOME/kontext-data, else ~/.cache/kontext-data (never the dataset)."""
    env = os.environ.get("KONTEXT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kontext-data"


def list_folder(root: Path) -> FolderListing:
    """Every image and caption file under root (recursive), skipping hidden files and folders."""
    root = Path(os.path.abspath(root))
    images: dict[str, FileEntry] = {}
    captions: dict[str, tuple[int, int]] = {}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append((entry.path, f"{prefix}{name}/"))
                    continue
                suffix = os.path.splitext(name)[1].lower()
                if suffix in IMAGE_EXTENSIONS:
                    st = entry.stat(follow_symlinks=True)
                    images[prefix + name] = FileEntry(entry.path, st.st_size, st.st_mtime_ns)
                elif suffix == CAPTION_EXTENSION:
                    st = entry.stat(follow_symlinks=True)
                    captions[prefix + name] = (st.st_size, st.st_mtime_ns)
    sidecar_dirs = []
    side = root / DEGRADE_SIDECAR
    if side.is_dir():
        for dirpath, _dirs, _files in os.walk(side):
            sidecar_dirs.append((os.path.relpath(dirpath, root), os.stat(dirpath).st_mtime_ns))
    return FolderListing(root, images, captions, sorted(sidecar_dirs))


class ProbeCache:
    """Probe results of one folder, a pickle of plain tuples under the cache dir (private to this tool; a
    damaged or foreign file only makes the run slower)."""

    def __init__(self, cache_dir: Path | None, root: Path):
        self.file = None
        if cache_dir is not None:
            key = xxhash.xxh3_64_hexdigest(f"{CACHE_FORMAT}:{os.path.abspath(root)}".encode())
            self.file = Path(cache_dir) / "pair" / f"{key}.pickle"
        self.entries: dict[str, ImageInfo] = {}
        self.dirty = False

    def load(self) -> None:
        if self.file is None:
            return
        try:
            with open(self.file, "rb") as fh:
                version, rows = pickle.load(fh)
            if version != CACHE_FORMAT:
                return
            self.entries = {rel: ImageInfo(*rest) for rel, *rest in rows}
        except Exception:  # missing or damaged: only a slower run
            self.entries = {}

    def get(self, rel: str, entry: FileEntry, verify_decode: bool) -> ImageInfo | None:
        info = self.entries.get(rel)
        if info is None or info.size != entry.size or info.mtime_ns != entry.mtime_ns:
            return None
        if verify_decode and not info.decoded and info.problem is None:
            return None
        return info

    def put(self, rel: str, info: ImageInfo) -> None:
        self.entries[rel] = info
        self.dirty = True

    def prune(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        stale = [rel for rel in self.entries if rel not in keep]
        for rel in stale:
            del self.entries[rel]
        self.dirty = self.dirty or bool(stale)

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        rows = [(rel, *astuple_fast(info)) for rel, info in self.entries.items()]
        try:
            with atomic_path(self.file) as tmp, open(tmp, "wb") as fh:
                pickle.dump((CACHE_FORMAT, rows), fh, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError:
            pass  # an unwritable cache must not fail the command


_INFO_FIELDS = tuple(f.name for f in fields(ImageInfo))


def astuple_fast(info: ImageInfo) -> tuple:
    """dataclasses.astuple without its deep copy (ImageInfo holds only scalars)."""
    return tuple(getattr(info, name) for name in _INFO_FIELDS)


def probe_all(
    listings: list[FolderListing],
    cache_dir: Path | None,
    workers: int,
    verify_decode: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, ImageInfo]], dict[str, int]]:
    """Probe every image of every listing, using and refreshing the cache. Returns infos per folder and counts.

    ``workers``: processes (0: one per available CPU); runs below POOL_MIN_FILES files to probe stay in this
    process."""
    caches = [ProbeCache(cache_dir, lst.root) for lst in listings]
    results: list[dict[str, ImageInfo]] = [{} for _ in listings]
    todo: list[tuple[int, str, str]] = []
    for i, (lst, cache) in enumerate(zip(listings, caches)):
        cache.load()
        for rel, entry in lst.images.items():
            info = cache.get(rel, entry, verify_decode)
            if info is None:
                todo.append((i, rel, entry.path))
            else:
                results[i][rel] = info
    total = sum(len(lst.images) for lst in listings)
    done = total - len(todo)
    if on_progress:
        on_progress(done, total)
    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total)

    workers = resolve_workers(workers, len(todo), pool_min_items=POOL_MIN_FILES)
    for folder, rel, info in map_chunks(ProbeWorker(verify_decode), chunked(todo, CHUNK), workers, tick):
        results[folder][rel] = info
        if info.mtime_ns:  # an unreadable file has no identity to cache
            caches[folder].put(rel, info)
    for lst, cache in zip(listings, caches):
        cache.prune(lst.images)
        cache.save()
    return results, {"files": total, "probed": len(todo), "cached": total - len(todo)}


def listing_fingerprint(listings: list[FolderListing], extra: str) -> str:
    """A digest of every image and caption file's path, size and mtime, plus `extra` (the options)."""
    h = xxhash.xxh3_128(extra.encode())
    for lst in listings:
        h.update(f"\0{lst.root}\0".encode())
        for rel in sorted(lst.images):
            e = lst.images[rel]
            h.update(f"i{rel}\0{e.size}\0{e.mtime_ns}\n".encode())
        for rel in sorted(lst.captions):
            size, mtime = lst.captions[rel]
            h.update(f"c{rel}\0{size}\0{mtime}\n".encode())
        for rel, mtime in lst.sidecar_dirs:
            h.update(f"s{rel}\0{mtime}\n".encode())
    return h.hexdigest()
