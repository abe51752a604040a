"""The ``degrade`` stage: synthetic references from clean images, reproducible, resumable, parallel.

For every image under ``SRC`` it writes a degraded reference at the same relative path under ``REFDIR``
(see :func:`output_name` for the extension rule), an optional ``<stem>.txt`` caption beside it, and a provenance
record under the hidden folder ``REFDIR/.kontext-degrade/records/<output path>.json`` (one small file per output:
shards on a shared filesystem never write the same file). :func:`read_provenance` reads them back for ``pair``.

Guarantees:

- per-image seed = hash(``--seed``, source relative path): byte-identical outputs for any worker count or shard;
- nothing unrequested is lossy: lossless chains write PNG, JPEG chains write the exact bytes of the last round;
- every file is written under ``.kontext-degrade/tmp`` and renamed into place (output last, after its record),
  so a killed run leaves no partial visible file and a re-run completes the set; an output is skipped only when
  its record matches the chain hash, seed, caption, source hash and the output's own hash;
- ``on_demand``: records only (no pixels); :func:`synthesize_reference` gives the on-disk pixels at load time.

The library never prints or exits; :func:`run_degrade` returns a :class:`DegradeResult`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import xxhash

from . import degradations as D
from kontext_data.fileio import atomic_path
from kontext_data.imageio import IMAGE_EXTENSIONS
from kontext_data.problems import ProblemsError
from kontext_data.workers import Shard, WorkError, parse_shard, resolve_workers, run_items

__all__ = [
    "SIDECAR_DIR",
    "SOURCE_EXTENSIONS",
    "DegradeConfig",
    "DegradeError",
    "DegradeResult",
    "ItemResult",
    "build_chain",
    "load_params_file",
    "parse_shard",
    "output_name",
    "per_image_seed",
    "pick_caption",
    "in_shard",
    "run_degrade",
    "read_provenance",
    "synthesize_reference",
]

SOURCE_EXTENSIONS = IMAGE_EXTENSIONS - {".gif"}
"""Sources degrade reads. GIF is left out: OpenCV decodes it only in recent builds and Pillow otherwise, so its
pixels would depend on the installed versions, and the on-demand path must reproduce a reference bit for bit."""
SIDECAR_DIR = ".kontext-degrade"
_RECORDS = "records"
_TMP = "tmp"
_STALE_TMP_S = 6 * 3600


class DegradeError(ProblemsError, ValueError):
    """Usage problem (bad paths, bad parameters, bad params file): ``problems`` lists them all."""

    usage = True

    def __init__(self, problems: list[str]):
        super().__init__(problems, message="; ".join(problems))


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DegradeConfig:
    """Everything one ``degrade`` run needs (built by the CLI; see :func:`build_chain`)."""

    src: Path
    """Folder of clean images (the edit targets); scanned recursively, dot-names skipped."""
    out: Path
    """REFDIR: references are written at the same relative paths."""
    chain: tuple[D.Step, ...]
    """Resolved degradation steps, applied in order."""
    captions: tuple[str, ...] = ()
    """Edit instructions; one is picked per image (deterministically) and written as ``<stem>.txt``."""
    seed: int = 0
    """Root seed; the per-image seed is derived from it and the source's relative path."""
    workers: int | None = None
    """Processes (None or 0: one per CPU this process may use). 1 runs in this process."""
    shard: tuple[int, int] = (0, 1)
    """(K, N) (a :class:`~kontext_data.workers.Shard`, from ``parse_shard``): process only the sources whose path
    hash is K modulo N (0 <= K < N)."""
    on_demand: bool = False
    """Write only records and captions; the trainer synthesizes the pixels at load time."""
    overwrite: bool = False
    """Replace files in REFDIR that this stage did not write (default: report them and leave them)."""

    @property
    def params_hash(self) -> str:
        return D.chain_hash(list(self.chain))

    @property
    def codec(self) -> str:
        return D.chain_output_codec(list(self.chain))


def steps_from_entry(entry: dict, where: str, problems: list[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """(steps, captions) of one SimpleTuner `conditioning` entry or one of our chain objects; problems appended."""
    entry = dict(entry)
    captions = entry.pop("captions", None) or []
    if "chain" in entry:
        steps = []
        for i, s in enumerate(entry.pop("chain")):
            if not isinstance(s, dict) or "type" not in s:
                problems.append(f"{where}: chain[{i}] must be an object with a 'type'")
                continue
            s = dict(s)
            name = s.pop("type")
            params = s.pop("params", None)
            steps.append((name, dict(params) if isinstance(params, dict) else s))
        return steps, list(captions)
    if "type" in entry:
        name = entry.pop("type")
        return [(name, entry)], list(captions)
    if entry:
        problems.append(f"{where}: unknown keys {sorted(entry)}; expected 'type' (+ parameters), 'chain' or "
                        "'captions'")
    return [], list(captions)


def load_params_file(path: Path) -> tuple[list[tuple[str, dict]], list[str], int | None]:
    """Read ``--params``: returns (steps, captions, seed or None). Accepted shapes:

    - one SimpleTuner conditioning entry: ``{"type": "superresolution", "blur_radius": 3.0, "captions": [...]}``;
    - a SimpleTuner dataset entry with ``"conditioning": [entry]``, or the whole dataloader list (exactly one
      conditioning entry in it: in SimpleTuner each entry is a separate reference, so run degrade once per entry);
    - our chain: ``{"chain": [{"type": "blur", "params": {...}}, {"type": "jpeg", ...}], "captions": [...],
      "seed": 0}``.
    """
    problems: list[str] = []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DegradeError([f"--params {path}: file not found"]) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DegradeError([f"--params {path}: not valid JSON ({exc})"]) from None
    seed = None
    if isinstance(data, dict) and "seed" in data:
        seed = data.pop("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            problems.append(f"--params {path}: 'seed' must be an integer")
            seed = None
    entries: list[dict] = []
    if isinstance(data, list):
        for ds in data:
            if isinstance(ds, dict) and ds.get("conditioning"):
                cond = ds["conditioning"]
                entries.extend(cond if isinstance(cond, list) else [cond])
        if not entries:
            problems.append(f"--params {path}: the list holds no dataset with a 'conditioning' entry")
    elif isinstance(data, dict) and "conditioning" in data:
        cond = data["conditioning"]
        entries = list(cond) if isinstance(cond, list) else [cond]
    elif isinstance(data, dict):
        entries = [data]
    else:
        problems.append(f"--params {path}: expected a JSON object or list")
    if len(entries) > 1:
        problems.append(f"--params {path}: {len(entries)} conditioning entries; in SimpleTuner each one is a "
                        "separate reference: run degrade once per entry (each with its own --out), or chain "
                        "steps with {\"chain\": [...]}")
        entries = entries[:1]
    steps: list[tuple[str, dict]] = []
    captions: list[str] = []
    for e in entries:
        if not isinstance(e, dict):
            problems.append(f"--params {path}: a conditioning entry must be an object")
            continue
        steps, captions = steps_from_entry(e, f"--params {path}", problems)
    if any(not isinstance(c, str) or not c.strip() for c in captions):
        problems.append(f"--params {path}: 'captions' must be a list of non-empty strings")
    if problems:
        raise DegradeError(problems)
    return steps, captions, seed


def build_chain(types: list[str], options: dict[str, Any] | None = None,
                file_steps: list[tuple[str, dict]] | None = None) -> list[D.Step]:
    """Resolve the chain from ``--type`` names (or the params file's steps) and parameter options.

    ``options`` keys are parameter names (applied to every chained type that has that parameter) or
    ``"type.param"`` (one type only); None values are ignored (option not given). Every problem is reported at
    once in a :class:`DegradeError`.
    """
    problems: list[str] = []
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if types and file_steps:
        problems.append("give the chain either with --type or in the --params file, not both")
    steps = [(t, {}) for t in types] if types else [(n, dict(p)) for n, p in (file_steps or [])]
    canon = [D.canonical_type(n) for n, _ in steps]
    for key, value in options.items():
        if "." in key:
            tname, pname = key.split(".", 1)
            ct = D.canonical_type(tname)
            hits = [i for i, c in enumerate(canon) if c is not None and c == ct]
            if ct is None:
                problems.append(f"--param {key}: unknown degradation type {tname!r}; valid types: "
                                f"{D.valid_type_names()}")
                continue
            if not hits:
                problems.append(f"--param {key}: {ct!r} is not in the chain ({', '.join(n for n, _ in steps)})")
            for i in hits:
                steps[i][1][pname] = value
            continue
        hits = [i for i, c in enumerate(canon) if c is not None and key in D.PARAM_SPECS[c]]
        if not hits:
            owners = [t for t, specs in D.PARAM_SPECS.items() if key in specs]
            if owners:
                problems.append(f"parameter {key!r} belongs to {', '.join(owners)}, which is not in the chain "
                                f"({', '.join(n for n, _ in steps) or 'empty'})")
            else:
                valid = sorted({p for specs in D.PARAM_SPECS.values() for p in specs})
                problems.append(f"unknown parameter {key!r}; valid parameters: {', '.join(valid)}")
            continue
        for i in hits:
            steps[i][1][key] = value
    try:
        chain = D.resolve_chain(steps) if not problems or steps else []
    except D.ChainError as exc:
        problems.extend(exc.problems)
        chain = []
    if problems:
        raise DegradeError(problems)
    return chain


# --------------------------------------------------------------------------------------- planning


def per_image_seed(root_seed: int, source_rel: str) -> int:
    """63-bit seed from the root seed and the source's relative POSIX path (independent of order/workers)."""
    return xxhash.xxh3_64_intdigest(f"kontext-degrade:{int(root_seed)}:{source_rel}".encode()) >> 1


def pick_caption(captions: tuple[str, ...] | list[str], seed: int) -> str | None:
    """The caption of an image: one of ``captions`` drawn from a stream separate from the pixels' (adding
    captions never changes the pixels)."""
    if not captions:
        return None
    return captions[int(np.random.default_rng([int(seed), 0xCA7]).integers(len(captions)))]


def in_shard(source_rel: str, shard: tuple[int, int]) -> bool:
    """True when the source belongs to ``shard`` (K, N): by a hash of its relative path, so that every source
    keeps its shard however the folder grows."""
    return shard[1] == 1 or Shard(*shard).holds(xxhash.xxh3_64_intdigest(source_rel.encode()))


def output_name(source_rel: str, codec: str) -> str:
    """Output relative path. JPEG chains -> ``.jpg`` (``.jpeg``/``.JPG`` sources keep their extension); lossless
    chains -> ``.png`` (``.png`` sources keep theirs). When the extension changes (a blurred ``x.jpg`` becomes
    ``x.png``), ``pair --match stem`` pairs it."""
    p = PurePosixPath(source_rel)
    ext = p.suffix
    if codec == "jpeg":
        new = ext if ext.lower() in (".jpg", ".jpeg") else ".jpg"
    else:
        new = ext if ext.lower() == ".png" else ".png"
    return str(p.with_suffix(new))


def _scan(src: Path, exclude: Path | None) -> list[str]:
    out: list[str] = []
    exclude_s = str(exclude) if exclude is not None else None
    for root, dirs, files in os.walk(src):
        if exclude_s is not None:
            dirs[:] = [d for d in dirs if os.path.join(root, d) != exclude_s]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in SOURCE_EXTENSIONS:
                continue
            out.append(Path(os.path.relpath(os.path.join(root, f), src)).as_posix())
    out.sort()
    return out


# ----------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one source: status is written | skipped | recorded (on-demand) | failed."""

    source: str
    output: str
    status: str
    message: str | None = None


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read())
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _lib_versions() -> dict[str, str]:
    import cv2

    return {"opencv": cv2.__version__, "numpy": np.__version__}


class DegradeWorker:
    """Picklable per-image job (sent once to every spawned process). An exception it raises becomes a failed
    :class:`ItemResult` in :func:`run_degrade` (see :func:`failure_message`)."""

    def __init__(self, src: Path, out: Path, chain_json: list[dict], captions: tuple[str, ...],
                 on_demand: bool, overwrite: bool, root_seed: int):
        self.src = Path(src)
        self.out = Path(out)
        self.chain_json = chain_json
        self.captions = tuple(captions)
        self.on_demand = on_demand
        self.overwrite = overwrite
        self.root_seed = root_seed
        self._chain: list[D.Step] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_chain"] = None
        return state

    @property
    def chain(self) -> list[D.Step]:
        if self._chain is None:
            self._chain = D.chain_from_json(self.chain_json)
            self._hash = D.chain_hash(self._chain)
            self._versions = _lib_versions()
        return self._chain

    def __call__(self, task: tuple[str, str]) -> ItemResult:
        return self._run(*task)

    def failure_message(self, source_rel: str, error: WorkError) -> str:
        """What a failed source reports: the error text, prefixed with the source's path unless it names it."""
        msg = error.message or error.type
        return msg if msg.startswith(str(self.src)) else f"{self.src / source_rel}: {msg}"

    def _record_path(self, out_rel: str) -> Path:
        return self.out / SIDECAR_DIR / _RECORDS / (out_rel + ".json")

    def _remove_stale_siblings(self, source_rel: str, out_rel: str) -> None:
        """Outputs of the same source under another extension (the chain's codec changed): ours, remove them."""
        p = PurePosixPath(source_rel)
        for ext in {".png", ".jpg", ".jpeg", p.suffix}:
            other = str(p.with_suffix(ext))
            if other == out_rel:
                continue
            rpath = self._record_path(other)
            rec = _read_json(rpath) if rpath.exists() else None
            if rec is None or rec.get("source") != source_rel:
                continue
            (self.out / other).unlink(missing_ok=True)
            if rec.get("caption") is not None:
                (self.out / other).with_suffix(".txt").unlink(missing_ok=True)
            rpath.unlink(missing_ok=True)

    def _run(self, source_rel: str, out_rel: str) -> ItemResult:
        chain = self.chain
        src_path = self.src / source_rel
        out_path = self.out / out_rel
        txt_path = out_path.with_suffix(".txt")
        rec_path = self._record_path(out_rel)
        old = _read_json(rec_path) if rec_path.exists() else None
        if old is not None and old.get("source") != source_rel:
            old = None
        seed = per_image_seed(self.root_seed, source_rel)
        caption = pick_caption(self.captions, seed)

        if old is None and not self.overwrite:
            foreign = []
            if not self.on_demand and out_path.exists():
                foreign.append(out_path)
            if caption is not None and txt_path.exists():
                foreign.append(txt_path)
            if foreign:
                names = " and ".join(str(f) for f in foreign)
                return ItemResult(source_rel, out_rel, "failed",
                                  f"{names} already exist(s) and were not written by kontext-data degrade; "
                                  "move them away or pass --overwrite")

        data = np.fromfile(src_path, dtype=np.uint8)
        src_hash = xxhash.xxh3_64_hexdigest(data)
        if (old is not None and old.get("params_hash") == self._hash and old.get("seed") == seed
                and old.get("source_xxh3") == src_hash and old.get("caption") == caption
                and bool(old.get("on_demand")) == self.on_demand
                and self._outputs_intact(old, out_path, txt_path, caption)):
            return ItemResult(source_rel, out_rel, "skipped")

        img = D.decode_source(data, str(src_path))  # also validates on-demand sources
        self._remove_stale_siblings(source_rel, out_rel)
        record = self._record(source_rel, out_rel, chain, seed, caption, img.shape, src_hash)
        out_bytes = None
        if not self.on_demand:
            pixels, jpeg_bytes = D.apply_chain(img, chain, np.random.default_rng(seed), encode_last=True)
            out_bytes = jpeg_bytes if jpeg_bytes is not None else D.encode_png(pixels)
            record["output_xxh3"] = xxhash.xxh3_64_hexdigest(out_bytes)
            if pixels is not None:
                record["size"] = [int(pixels.shape[1]), int(pixels.shape[0])]
        stale_caption = old is not None and old.get("caption") is not None
        self._write(out_path, out_bytes, rec_path, record, txt_path, caption, stale_caption)
        if out_bytes is not None:
            return ItemResult(source_rel, out_rel, "written")
        if old is not None and not old.get("on_demand"):
            out_path.unlink(missing_ok=True)  # was written by an earlier on-disk run
        return ItemResult(source_rel, out_rel, "recorded")

    def _record(self, source_rel: str, out_rel: str, chain: list[D.Step], seed: int, caption: str | None,
                shape: tuple[int, ...], src_hash: str) -> dict:
        """The provenance record of one output (``output_xxh3`` and the output ``size`` are set once it exists)."""
        return {
            "schema": D.SCHEMA_VERSION,
            "source": source_rel,
            "output": out_rel,
            "chain": [s.to_json() for s in chain],
            "params_hash": self._hash,
            "seed": seed,
            "root_seed": self.root_seed,
            "caption": caption,
            "on_demand": self.on_demand,
            "codec": None if self.on_demand else D.chain_output_codec(chain),
            "size": [int(shape[1]), int(shape[0])],
            "source_xxh3": src_hash,
            "output_xxh3": None,
            "versions": self._versions,
        }

    def _write(self, out_path: Path, out_bytes: bytes | None, rec_path: Path, record: dict, txt_path: Path,
               caption: str | None, stale_caption: bool) -> None:
        """Write every file of one source atomically, their temp files in the sidecar's ``tmp`` folder (a killed
        run leaves nothing half-written in REFDIR). In this order: a caption we wrote for an earlier caption list
        goes first (before the record that no longer names it), then the record, the caption, the output last. So
        a caption or output file without a record is never ours, and a run killed between two renames leaves a
        record whose files do not match it yet: the next run writes them again (never a caption it would refuse as
        someone else's)."""
        tmp_dir = self.out / SIDECAR_DIR / _TMP
        if caption is None and stale_caption:
            txt_path.unlink(missing_ok=True)
        with contextlib.ExitStack() as renames:  # leaving it renames in reverse order of entering
            if out_bytes is not None:
                renames.enter_context(atomic_path(out_path, tmp_dir=tmp_dir)).write_bytes(out_bytes)
            if caption is not None:
                renames.enter_context(atomic_path(txt_path, tmp_dir=tmp_dir)).write_bytes(caption.encode("utf-8"))
            rec_tmp = renames.enter_context(atomic_path(rec_path, tmp_dir=tmp_dir))
            rec_tmp.write_bytes(json.dumps(record, sort_keys=True, indent=1).encode("utf-8"))

    def _outputs_intact(self, old: dict, out_path: Path, txt_path: Path, caption: str | None) -> bool:
        if caption is not None:
            try:
                if txt_path.read_text(encoding="utf-8") != caption:
                    return False
            except OSError:
                return False
        if self.on_demand:
            return True
        try:
            return xxhash.xxh3_64_hexdigest(np.fromfile(out_path, dtype=np.uint8)) == old.get("output_xxh3")
        except OSError:
            return False


# ------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Failure:
    """A source that produced nothing: its path and the message naming the problem (and the fix)."""

    path: str
    message: str


@dataclass
class DegradeResult:
    """Summary of one run (the CLI prints it or dumps it with --json)."""

    src: str
    out: str
    chain: list[dict]
    params_hash: str
    codec: str
    on_demand: bool
    shard: tuple[int, int]
    workers: int
    sources: int = 0
    """Images found under SRC (all shards)."""
    selected: int = 0
    """Images in this shard."""
    written: int = 0
    skipped: int = 0
    recorded: int = 0
    removed: int = 0
    """Outputs removed because their source is gone from SRC."""
    failures: list[Failure] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "src": self.src, "out": self.out, "chain": self.chain, "params_hash": self.params_hash,
            "codec": self.codec, "on_demand": self.on_demand, "shard": f"{self.shard[0]}/{self.shard[1]}",
            "workers": self.workers, "sources": self.sources, "selected": self.selected,
            "written": self.written, "skipped": self.skipped, "recorded": self.recorded, "removed": self.removed, "failed": self.failed,
            "failures": [{"path": f.path, "message": f.message} for f in self.failures],
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round((self.written + self.recorded) / self.elapsed_s, 2) if self.elapsed_s else None,
        }


def _clean_stale_tmp(out: Path) -> None:
    tmp_dir = out / SIDECAR_DIR / _TMP
    if not tmp_dir.is_dir():
        return
    now = time.time()
    for p in tmp_dir.iterdir():
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:  # other shards may be writing fresh ones right now
                p.unlink()
        except OSError:
            pass


def prune_orphans(out: Path, sources: list[str], shard: tuple[int, int]) -> int:
    """Remove what degrade wrote for sources that no longer exist under SRC (in this shard): their output,
    caption and record, so that ``pair`` does not find references without a target. Returns the count."""
    root = out / SIDECAR_DIR / _RECORDS
    if not root.is_dir():
        return 0
    present = set(sources)
    stems = {str(PurePosixPath(s).with_suffix("")) for s in sources}
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if not f.endswith(".json"):
                continue
            rpath = Path(dirpath) / f
            key = rpath.relative_to(root).as_posix()[: -len(".json")]
            if str(PurePosixPath(key).with_suffix("")) in stems:
                continue  # its source (some extension) is still there: the worker handles it
            rec = _read_json(rpath)
            if rec is None or not isinstance(rec.get("source"), str):
                continue
            src = rec["source"]
            if src in present or not in_shard(src, shard):
                continue
            if not rec.get("on_demand"):
                (out / key).unlink(missing_ok=True)
            if rec.get("caption") is not None:
                (out / key).with_suffix(".txt").unlink(missing_ok=True)
            rpath.unlink(missing_ok=True)
            removed += 1
    return removed


def plan(config: DegradeConfig) -> tuple[list[tuple[str, str]], list[Failure], list[str]]:
    """(tasks of this shard, name-collision failures, every source found). Raises DegradeError."""
    src, out = Path(config.src), Path(config.out)
    problems = []
    if not src.is_dir():
        problems.append(f"SRC {src} is not a folder")
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} exists and is not a folder")
    if src.is_dir() and out.exists() and src.resolve() == out.resolve():
        problems.append(f"--out {out} is SRC itself: the references would overwrite the sources; "
                        "choose another folder")
    if not config.chain:
        problems.append(f"no degradation type given; valid types: {D.valid_type_names()}")
    k, n = config.shard
    if n < 1 or not 0 <= k < n:
        problems.append(f"shard {k}/{n}: need 0 <= K < N")
    if problems:
        raise DegradeError(problems)
    out_abs = out.resolve()
    src_abs = src.resolve()
    exclude = out_abs if src_abs in out_abs.parents else None
    sources = _scan(src_abs, exclude)
    codec = config.codec
    by_out: dict[str, list[str]] = {}
    for s in sources:
        by_out.setdefault(output_name(s, codec).lower(), []).append(s)
    failures: list[Failure] = []
    tasks: list[tuple[str, str]] = []
    for s in sources:
        o = output_name(s, codec)
        group = by_out[o.lower()]
        if config.on_demand:
            o = s  # no file is written: the record is keyed by the source's own name, which pair finds as is
        if not in_shard(s, config.shard):
            continue
        if len(group) > 1:
            others = ", ".join(g for g in group if g != s)
            failures.append(Failure(str(src / s), f"{src / s}: would write {o}, as would {others}; rename one "
                                    "of them (pair --match stem could not tell them apart either)"))
            continue
        tasks.append((s, o))
    return tasks, failures, sources


def run_degrade(config: DegradeConfig, progress: Callable[[ItemResult], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> DegradeResult:
    """Run the stage. ``on_start(total)`` is called once the work is known, ``progress(item)`` per image."""
    t0 = time.perf_counter()
    tasks, failures, sources = plan(config)
    n_sources = len(sources)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    removed = prune_orphans(out, sources, config.shard)
    workers = resolve_workers(config.workers, len(tasks))
    chain = list(config.chain)
    result = DegradeResult(src=str(config.src), out=str(out), chain=[s.to_json() for s in chain],
                           params_hash=config.params_hash, codec=config.codec, on_demand=config.on_demand,
                           shard=config.shard, workers=workers, sources=n_sources,
                           selected=len(tasks) + len(failures), failures=list(failures), removed=removed)
    if on_start is not None:
        on_start(len(tasks))
    worker = DegradeWorker(Path(config.src).resolve(), out.resolve(), result.chain, config.captions,
                           config.on_demand, config.overwrite, int(config.seed))
    # this process is one of the workers: it starts at once while the spawned ones import their modules
    for done in run_items(worker, tasks, workers, parent_works=True, opencv=True):
        source_rel, out_rel = done.item
        item = done.value if done.ok else ItemResult(source_rel, out_rel, "failed",
                                                     worker.failure_message(source_rel, done.error))
        if item.status == "failed":
            result.failures.append(Failure(str(Path(config.src) / item.source), item.message or "failed"))
        elif item.status == "written":
            result.written += 1
        elif item.status == "skipped":
            result.skipped += 1
        else:
            result.recorded += 1
        if progress is not None:
            progress(item)
    result.failures.sort(key=lambda f: f.path)
    result.elapsed_s = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------- pair / trainer


def read_provenance(refdir: Path) -> dict[str, dict]:
    """Records of REFDIR: output relative POSIX path -> record (``source``, ``chain``, ``params_hash``, ``seed``,
    ``caption``, ``on_demand``, plus ``output``, ``codec``, ``size``, ``source_xxh3``, ``output_xxh3``,
    ``root_seed``, ``versions``, ``schema``). On-demand records are keyed by the source's own relative path
    (no file exists; the trainer synthesizes the reference from the source). Empty when REFDIR has no sidecar; unreadable record files are left out."""
    root = Path(refdir) / SIDECAR_DIR / _RECORDS
    out: dict[str, dict] = {}
    if not root.is_dir():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if not f.endswith(".json"):
                continue
            p = os.path.join(dirpath, f)
            rec = _read_json(Path(p))
            if rec is None or "source" not in rec:
                continue
            out[Path(os.path.relpath(p, root)).as_posix()[: -len(".json")]] = rec
    return dict(sorted(out.items()))


def synthesize_reference(source_path: str | os.PathLike, record: dict) -> np.ndarray:
    """The reference of ``record`` computed from the source image: an RGB uint8 numpy array (H, W, 3), equal to
    decoding the on-disk output that ``degrade`` writes for the same record (for a JPEG chain the JPEG bytes are
    really encoded and decoded). Same OpenCV/NumPy versions as recorded in ``record["versions"]`` are needed
    for bit-exactness."""
    chain = D.chain_from_json(record["chain"])
    img = D.load_rgb(source_path)
    pixels, jpeg_bytes = D.apply_chain(img, chain, np.random.default_rng(int(record["seed"])), encode_last=True)
    if jpeg_bytes is not None:
        return D.decode_image_bytes(jpeg_bytes)
    return pixels
