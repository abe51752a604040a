"""`pair`: validate that edited and reference folders pair 1-to-1 and build the manifest rows.

In: a `PairConfig` (folders, matching, caption, geometry and split options, an optional folder of loss masks). Out:
a `PairResult` with every problem found in one pass (each naming the files and the fix), warnings, the rows, and
the manifest path when one was written. Never prints, never exits: the CLI does.

Loss masks (`--masks`) pair with edited images by relative path and stem (any image extension), must have the
edited image's size after EXIF orientation, and are read (hash + header) with the other images; the mask folder
is listed last, after the reference folders.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import xxhash

from kontext_data.fileio import write_text_atomic
from kontext_data.geometry import GeometryOptions, compute_geometry
from kontext_data.imageio import IMAGE_EXTENSIONS, ImageInfo
from kontext_data.manifest import CONDITIONING_TYPES, SPLITS, store_path, write_manifest
from kontext_data import __version__
from kontext_data.scan import FolderListing, list_folder, listing_fingerprint, probe_all

MATCH_MODES = ("exact", "stem")
CAPTION_MODES = ("textfile", "filename", "instanceprompt", "none")

PROBLEM_KINDS = {
    "missing_reference": "an edited image has no reference with the same name",
    "missing_edit": "a reference has no edited image with the same name",
    "extension_mismatch": "edited and reference differ only in the file extension",
    "case_mismatch": "edited and reference names differ only in letter case",
    "case_collision": "two files in one folder differ only in letter case",
    "ambiguous_stem": "one name with two extensions in a folder (which caption/pair is meant?)",
    "empty_file": "a zero-byte image file",
    "unreadable_image": "a file with an image extension that cannot be opened as an image",
    "corrupt_image": "an image whose header or data is broken",
    "truncated_image": "an image that ends before its end marker",
    "too_many_pixels": "an image over --max-pixels (decompression-bomb guard)",
    "too_small": "an image whose shorter edge is under --min-size",
    "missing_caption": "no caption text file, or an empty one (--captions textfile)",
    "caption_not_utf8": "a caption file that is not UTF-8 text",
    "no_images": "the edited folder holds no image files",
    "on_demand_source_missing": "an on-demand reference (kontext-data degrade --on-demand) whose source image is "
                                "not in the edited folder",
    "missing_mask": "--masks: an edited image has no mask with the same relative name (any image extension)",
    "mask_size_mismatch": "--masks: a mask whose size differs from its edited image's (after EXIF orientation)",
    "mask_without_edit": "--masks: a mask with no edited image of the same relative name",
}


@dataclass(frozen=True)
class PairConfig:
    """Options of `kontext-data pair` (SimpleTuner dataset keys in brackets)."""

    edited: Path
    """Folder of edited images (the loss targets) [instance_data_dir of the edit dataset]."""
    references: tuple[Path, ...]
    """One folder per reference set, in order [conditioning_data]. None: reference-free (text-to-image) samples."""
    masks: Path | None = None
    """Folder of loss masks: one per edited image, same relative path and stem, any image extension (`x.jpg` ->
    `x.png`), same size; white = the region the edit changes. None: no masks."""
    out: Path = Path("manifest.parquet")
    match: str = "exact"
    """exact: same relative path including extension (SimpleTuner's rule); stem: extension may differ."""
    captions: str = "textfile"
    """[caption_strategy] textfile (<stem>.txt beside the image) | filename | instanceprompt | none."""
    instance_prompt: str | None = None
    """[instance_prompt] the caption of every sample with captions='instanceprompt'."""
    reference_captions: bool = True
    """A caption beside the reference replaces the edit caption (SimpleTuner's rule)."""
    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    min_size: int = 0
    """[minimum_image_size] images whose shorter edge is under this are problems."""
    max_pixels: int = 100_000_000
    """Images with more pixels are problems (decompression-bomb guard)."""
    conditioning: str = "reference_strict"
    """[conditioning_type] reference_strict: the reference gets the target's resize+crop; loose: its own."""
    seed: int = 0
    split: str = "train"
    """train | eval: the split of every row (eval = a dedicated validation set, like eval_dataset_id)."""
    eval_fraction: float = 0.0
    """Carve this fraction of samples into a deterministic eval split instead."""
    dataset_id: str | None = None
    """Defaults to the edited folder's name."""
    allow_partial: bool = False
    """With problems, still write the valid samples (the dropped ones are listed)."""
    verify_decode: bool = False
    """Decode every image fully instead of trusting headers and end markers."""
    workers: int = 0
    """Processes for probing; 0 = one per CPU this process may use."""
    cache_dir: Path | None = None
    """Probe cache location; None disables the cache."""

    def problems(self) -> list[str]:
        out = list(self.geometry.problems())
        if self.match not in MATCH_MODES:
            out.append(f"--match {self.match!r} is not one of {list(MATCH_MODES)}")
        if self.captions not in CAPTION_MODES:
            out.append(f"--captions {self.captions!r} is not one of {list(CAPTION_MODES)}")
        if self.conditioning not in CONDITIONING_TYPES:
            out.append(f"--conditioning {self.conditioning!r} is not one of {list(CONDITIONING_TYPES)}")
        if self.captions == "instanceprompt" and not (self.instance_prompt or "").strip():
            out.append("--captions instanceprompt needs --instance-prompt TEXT")
        if self.split not in SPLITS:
            out.append(f"--split {self.split!r} is not one of {list(SPLITS)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            out.append(f"--eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.eval_fraction and self.split == "eval":
            out.append("--split eval and --eval-fraction exclude each other (everything is already eval)")
        folders = [self.edited, *self.references] + ([self.masks] if self.masks is not None else [])
        for folder in folders:
            if not Path(folder).is_dir():
                out.append(f"{folder}: no such folder")
        resolved = [os.path.realpath(f) for f in folders]
        if len(set(resolved)) != len(resolved):
            out.append("the edited, reference and mask folders must all be different folders")
        elif self.masks is not None:
            masks, edited = resolved[-1], resolved[0]
            for inner, outer, what in ((masks, edited, "its masks would be read as edited images"),
                                       (edited, masks, "the edited images would be read as masks")):
                rel = os.path.relpath(inner, outer)
                if not rel.startswith("..") and not any(part.startswith(".") for part in Path(rel).parts):
                    out.append(f"--masks {self.masks} and EDITED {self.edited}: one lies inside the other, so {what}. "
                               f"Fix: keep the masks in a folder beside the edited one (e.g. ./masks next to "
                               f"./edited)")
        return out


@dataclass(frozen=True)
class Problem:
    kind: str
    files: tuple[str, ...]
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": list(self.files), "message": self.message}


@dataclass
class PairResult:
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The manifest rows; empty when the run was `reused` (then read them from `manifest`)."""
    manifest: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    """True when nothing changed since the last run with the same options: its result was reused whole."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> dict[str, Any]:
        """The `--report` JSON (schema documented in docs/pair.md)."""
        return {
            "report_version": 1,
            "ok": self.ok,
            "manifest": str(self.manifest) if self.manifest else None,
            "samples": self.samples,
            "splits": self.splits,
            "dropped": self.dropped,
            "problem_counts": _counts(self.problems),
            "problems": [p.as_dict() for p in self.problems],
            "warnings": [w.as_dict() for w in self.warnings],
            "stats": self.stats,
        }


def _counts(problems: list[Problem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


def derive_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed from the run seed and names (sample id, role): same input -> same seed."""
    return xxhash.xxh3_64_intdigest(":".join([str(seed), *parts]).encode()) & (2**63 - 1)


def _stem_key(rel: str) -> str:
    """The relative path without its extension ("a.b/c.png" -> "a.b/c"); a hot path, hence no pathlib."""
    dot = rel.rfind(".")
    return rel[:dot] if dot > rel.rfind("/") + 1 else rel


class _Pairing:
    """One pass over the listings: matches names, reads captions, computes geometry, collects problems."""

    def __init__(self, config: PairConfig, listings: list[FolderListing], infos: list[dict[str, ImageInfo]]):
        self.c = config
        self.listings = listings
        self.infos = infos
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.bad: set[tuple[int, str]] = set()  # (folder index, rel) of files that cannot be used
        self.broken_captions: set[tuple[int, str]] = set()  # (folder index, caption rel) reported as broken
        self.prefetched: dict[tuple[int, str], bytes] = {}  # caption bytes read while the pool probes images
        # degrade provenance per reference folder (output rel -> record), and on-demand outputs -> source rel
        self.provenance: list[dict[str, dict]] = [{} for _ in listings]
        self.virtual: list[dict[str, str]] = [{} for _ in listings]
        self.roots = [str(lst.root) for lst in listings]
        # with --masks, the mask folder is the last listing (after the references)
        self.mask_folder: int | None = len(listings) - 1 if config.masks is not None else None
        self.n_refs = len(config.references)
        self.masks: dict[str, str] = {}  # edited rel -> mask rel

    def add(self, kind: str, files: list, message: str, bad: list[tuple[int, str]] = ()) -> None:
        self.problems.append(Problem(kind, tuple(str(f) for f in files), message))
        self.bad.update(bad)

    def path(self, folder: int, rel: str) -> str:
        return os.path.join(self.roots[folder], rel)

    def prefetch(self) -> None:
        """Read every caption file (and import pyarrow for the manifest) while the process pool reads images:
        the main process would only wait otherwise. Unreadable files are left for _read_caption to report."""
        for folder, lst in enumerate(self.listings):
            if folder == self.mask_folder:
                continue  # text files beside masks are no captions
            for rel in lst.captions:
                try:
                    with open(self.path(folder, rel), "rb") as fh:
                        self.prefetched[(folder, rel)] = fh.read()
                except OSError:
                    pass
        import pyarrow.parquet  # noqa: F401

        try:  # pyarrow's list-to-array conversion imports pandas when installed (~0.2 s): pay for it here
            import pandas  # noqa: F401
        except ImportError:
            pass

    # -- degrade provenance ------------------------------------------------------------------------------
    def attach_provenance(self) -> None:
        """Read degrade records of reference folders; on-demand outputs become virtual files (their source)."""
        edited = self.listings[0]
        for i, lst in enumerate(self.listings[1:1 + self.n_refs], start=1):
            if not lst.has_sidecar:
                continue
            from kontext_data.degrade import read_provenance

            records = read_provenance(lst.root)
            for out_rel, rec in records.items():
                if not rec.get("on_demand"):
                    if out_rel in lst.images:
                        self.provenance[i][out_rel] = rec
                    continue
                source = rec.get("source", "")
                entry = edited.images.get(source)
                if entry is None:
                    self.add("on_demand_source_missing", [self.path(i, out_rel)],
                             f"{self.path(i, out_rel)} is an on-demand reference made from {source}, which is not "
                             f"in {edited.root}. Fix: pair the folder that `kontext-data degrade --on-demand` read, "
                             f"or re-run degrade on this one.")
                    continue
                lst.images[out_rel] = entry
                self.virtual[i][out_rel] = source
                self.provenance[i][out_rel] = rec

    # -- per-file checks -------------------------------------------------------------------------------
    def check_files(self) -> None:
        fixes = {
            "empty_file": "re-copy or re-export it, or delete it together with its pair",
            "unreadable_image": "re-export it as PNG/JPEG, or move it out of the dataset",
            "corrupt_image": "re-export it, or move it out of the dataset",
            "truncated_image": "re-copy it from the original, or move it out of the dataset",
        }
        for folder, infos in enumerate(self.infos):
            for rel, info in sorted(infos.items()):
                if rel in self.virtual[folder]:
                    continue  # an on-demand reference: its source is checked as an edited image
                p = self.path(folder, rel)
                if info.problem:
                    self.add(info.problem, [p], f"{p}: {info.detail}. Fix: {fixes[info.problem]}.", [(folder, rel)])
                    continue
                if folder == self.mask_folder:
                    continue  # a mask's size is checked against its edited image's (match_masks)
                if info.width * info.height > self.c.max_pixels:
                    self.add("too_many_pixels", [p],
                             f"{p}: {info.width}x{info.height} = {info.width * info.height:,} pixels is over "
                             f"--max-pixels {self.c.max_pixels:,}. Fix: downscale it, or raise --max-pixels if "
                             f"you trust the file.", [(folder, rel)])
                elif min(info.width, info.height) < self.c.min_size:
                    self.add("too_small", [p],
                             f"{p}: {info.width}x{info.height}, shorter edge under --min-size {self.c.min_size}. "
                             f"Fix: remove the pair, or lower --min-size.", [(folder, rel)])

    def check_collisions(self) -> None:
        for folder, lst in enumerate(self.listings):
            by_lower: dict[str, list[str]] = {}
            by_stem: dict[str, list[str]] = {}
            for rel in lst.images:
                by_lower.setdefault(rel.lower(), []).append(rel)
                by_stem.setdefault(_stem_key(rel), []).append(rel)
            for rels in by_lower.values():
                if len(rels) > 1:
                    rels.sort()
                    files = [self.path(folder, r) for r in rels]
                    self.add("case_collision", files,
                             f"{', '.join(map(str, files))} differ only in letter case: they collide on macOS and "
                             f"Windows. Fix: rename one of them.", [(folder, r) for r in rels])
            if self.c.match == "stem" or self.c.captions == "textfile" or folder == self.mask_folder:
                for stem, rels in by_stem.items():
                    if len(rels) > 1:
                        rels.sort()
                        files = [self.path(folder, r) for r in rels]
                        what = "both would pair with the same reference" if self.c.match == "stem" else \
                            f"both would use the caption {stem}.txt"
                        if folder == self.mask_folder:
                            what = "masks pair by name without the extension, so both would be the mask of one " \
                                   "edited image"
                        self.add("ambiguous_stem", files,
                                 f"{', '.join(map(str, files))}: one name with {len(rels)} extensions; {what}. "
                                 f"Fix: rename or remove all but one.", [(folder, r) for r in rels])

    # -- matching --------------------------------------------------------------------------------------
    def match(self) -> list[tuple[str, list[str]]]:
        """(edited rel, [reference rel per folder]) for every complete pair; problems for the rest."""
        key = _stem_key if self.c.match == "stem" else (lambda r: r)
        edited = self.listings[0].images
        ref_maps = []
        for lst in self.listings[1:1 + self.n_refs]:
            m: dict[str, str] = {}
            for rel in lst.images:
                m.setdefault(key(rel), rel)
            ref_maps.append(m)
        ref_lower = [{k.lower(): v for k, v in m.items()} for m in ref_maps]
        ref_stem = [{_stem_key(v): v for v in m.values()} for m in ref_maps]
        used = [set() for _ in ref_maps]
        pairs = []
        for rel in sorted(edited):
            k = key(rel)
            refs: list[str] = []
            for i, m in enumerate(ref_maps, start=1):
                ref = m.get(k)
                if ref is not None:
                    refs.append(ref)
                    used[i - 1].add(ref)
                    continue
                e, rdir = self.path(0, rel), self.roots[i]
                near = ref_lower[i - 1].get(k.lower())
                if near is not None:
                    used[i - 1].add(near)
                    r = self.path(i, near)
                    self.add("case_mismatch", [e, r],
                             f"{e} and {r} differ only in letter case, so they do not pair on Linux. "
                             f"Fix: rename one so the names are identical.", [(0, rel)])
                    continue
                near = ref_stem[i - 1].get(_stem_key(rel))
                if near is not None:
                    used[i - 1].add(near)
                    r = self.path(i, near)
                    self.add("extension_mismatch", [e, r],
                             f"{e} and {r} differ only in the extension. Fix: rerun with --match stem "
                             f"(pairs them), or convert one so the extensions agree.", [(0, rel)])
                    continue
                self.add("missing_reference", [e],
                         f"{e} has no reference in {rdir} (expected {self.path(i, rel)}). Fix: add the reference, "
                         f"or move the edited image out of the dataset.", [(0, rel)])
            if len(refs) == len(ref_maps):
                pairs.append((rel, refs))
        for i, m in enumerate(ref_maps, start=1):
            for ref in sorted(set(m.values()) - used[i - 1]):
                r = self.path(i, ref)
                self.add("missing_edit", [r],
                         f"{r} has no edited image in {self.roots[0]} (expected "
                         f"{self.path(0, ref)}). Fix: add the edited image, or remove the reference.",
                         [(i, ref)])
        # a second file with the same key in one reference folder is reported by check_collisions
        return pairs

    def match_masks(self) -> None:
        """--masks: the mask of every edited image (same relative path without the extension), its size checked
        against the edited image's; problems for edited images without a mask and masks without an edited image.
        Every edited image is looked at (not only complete pairs), so all mask problems come in the same pass."""
        if self.mask_folder is None:
            return
        mf = self.mask_folder
        same_stem: dict[str, list[str]] = {}
        for rel in sorted(self.listings[mf].images):
            same_stem.setdefault(_stem_key(rel), []).append(rel)
        # two masks of one stem are reported by check_collisions (ambiguous_stem); the first stands for both
        by_stem = {stem: rels[0] for stem, rels in same_stem.items()}
        by_lower = {k.lower(): v for k, v in by_stem.items()}
        used: set[str] = set()
        mroot = self.roots[mf]
        for rel in sorted(self.listings[0].images):
            e, stem = self.path(0, rel), _stem_key(rel)
            mask = by_stem.get(stem)
            if mask is None:
                near = by_lower.get(stem.lower())
                hint = (f" ({self.path(mf, near)} differs only in letter case: rename it)" if near is not None
                        else "")
                if near is not None:
                    used.update(same_stem[_stem_key(near)])
                self.add("missing_mask", [e],
                         f"{e} has no mask in {mroot} (expected {os.path.join(mroot, stem)}.png, or any image "
                         f"extension){hint}. Fix: add the mask (white where the edit changes the image, black "
                         f"elsewhere, the edited image's size), or move the edited image out of the dataset.",
                         [(0, rel)])
                continue
            used.update(same_stem[stem])
            self.masks[rel] = mask
            t, m = self.infos[0].get(rel), self.infos[mf].get(mask)
            if t is None or m is None or t.problem or m.problem:
                continue  # an unreadable file is reported by check_files
            if (t.width, t.height) != (m.width, m.height):
                p = self.path(mf, mask)
                self.add("mask_size_mismatch", [p, e],
                         f"{p} is {m.width}x{m.height} but its edited image {e} is {t.width}x{t.height} (sizes "
                         f"after EXIF orientation). Fix: re-export the mask at the edited image's size (masks "
                         f"follow the edited image's resize and crop, pixel for pixel).", [(mf, mask)])
        for mask in sorted(set(self.listings[mf].images) - used):
            p = self.path(mf, mask)
            self.add("mask_without_edit", [p],
                     f"{p} has no edited image in {self.roots[0]} (expected "
                     f"{os.path.join(self.roots[0], _stem_key(mask))} with any image extension). Fix: rename it to "
                     f"its edited image's name, or remove it.", [(mf, mask)])

    # -- captions --------------------------------------------------------------------------------------
    def _read_caption(self, folder: int, rel: str) -> tuple[list[str] | None, str]:
        """Caption lines of <stem>.txt beside the image, and that caption file's relative path. None: no file,
        or a broken one (problem recorded)."""
        txt = _stem_key(rel) + ".txt"
        if txt not in self.listings[folder].captions:
            return None, txt
        raw = self.prefetched.pop((folder, txt), None)
        p = self.path(folder, txt)
        try:
            if raw is None:
                with open(p, "rb") as fh:
                    raw = fh.read()
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.broken_captions.add((folder, txt))
            self.add("caption_not_utf8", [p],
                     f"{p}: not UTF-8 text (byte {exc.start}). Fix: re-save it as UTF-8, e.g. "
                     f"`iconv -f latin1 -t utf-8`.", [(folder, rel)])
            return None, txt
        except OSError as exc:
            self.broken_captions.add((folder, txt))
            self.add("caption_not_utf8", [p], f"{p}: cannot be read ({exc}). Fix: check its permissions.",
                     [(folder, rel)])
            return None, txt
        return [line.strip() for line in text.splitlines() if line.strip()], txt

    def captions_for(self, rel: str, refs: list[str]) -> tuple[list[str], str]:
        if self.c.captions == "none":
            return [], "none"
        if self.c.captions == "instanceprompt":
            return [self.c.instance_prompt.strip()], "instanceprompt"
        if self.c.captions == "filename":
            stem = os.path.basename(_stem_key(rel))
            return [" ".join(stem.replace("_", " ").replace("-", " ").split())], "filename"
        if self.c.reference_captions:
            for i, ref in enumerate(refs, start=1):
                lines, _ = self._read_caption(i, ref)
                if lines:
                    return lines, "reference_textfile"
        lines, txt = self._read_caption(0, rel)
        if lines:
            return lines, "textfile"
        if (0, txt) not in self.broken_captions:  # a broken caption file was reported already
            e, p = self.path(0, rel), self.path(0, txt)
            what = "is empty" if lines is not None else "does not exist"
            self.add("missing_caption", [p],
                     f"{p} {what} (caption of {e}). Fix: write the edit instruction into it, or use "
                     f"--captions filename / --captions none.", [(0, rel)])
        return [], "textfile"

    def crop_rng(self, seed: int):
        """The per-sample generator random crops are drawn from (numpy is only imported when needed)."""
        if self.c.geometry.crop_style != "random":
            return None
        import numpy as np

        return np.random.default_rng(seed)

    # -- rows ------------------------------------------------------------------------------------------
    def rows(self, pairs: list[tuple[str, list[str]]], dataset_id: str, out_dir: Path) -> tuple[list, list]:
        rows, dropped = [], []
        # stored paths: one prefix per folder (relative to the manifest's folder when under it, else absolute)
        prefixes = [store_path(Path(root), out_dir) for root in self.roots]
        stored = [(lambda rel, pre=pre: rel if pre == "." else f"{pre}/{rel}") for pre in prefixes]
        g = self.c.geometry
        for rel, refs in pairs:
            captions, source = self.captions_for(rel, refs)
            sample_id = f"{dataset_id}:{rel}"
            files = [(0, rel)] + [(i, r) for i, r in enumerate(refs, start=1)]
            mask = self.masks.get(rel)
            if mask is not None:
                files.append((self.mask_folder, mask))
            if any(f in self.bad for f in files):
                dropped.append(sample_id)
                continue
            seed = derive_seed(self.c.seed, sample_id)
            t = self.infos[0][rel]
            tg = compute_geometry(t.width, t.height, g, self.crop_rng(seed))
            ref_geoms, ref_hashes, ref_paths, ref_degradations = [], [], [], []
            for i, r in enumerate(refs, start=1):
                info = self.infos[i][r]
                if self.c.conditioning == "reference_strict":
                    geom = tg
                    if abs(math.log((info.width / info.height) / (t.width / t.height))) > 0.01:
                        self.warnings.append(Problem(
                            "aspect_mismatch", (self.path(0, rel), self.path(i, r)),
                            f"{self.path(i, r)} is {info.width}x{info.height} but its edit is "
                            f"{t.width}x{t.height}: under reference_strict it is stretched to the edit's shape. "
                            f"Use --conditioning reference_loose if that is wrong."))
                else:
                    rng = self.crop_rng(derive_seed(self.c.seed, sample_id, f"reference{i}"))
                    geom = compute_geometry(info.width, info.height, g, rng)
                ref_geoms.append({"width": info.width, "height": info.height, **geom.as_dict()})
                ref_hashes.append(info.hash)
                ref_paths.append(stored[0](self.virtual[i][r]) if r in self.virtual[i] else stored[i](r))
                rec = self.provenance[i].get(r)
                ref_degradations.append(json.dumps(rec, sort_keys=True) if rec is not None else None)
            rows.append({
                "sample_id": sample_id,
                "dataset_id": dataset_id,
                "split": self.c.split,
                "target_path": stored[0](rel),
                "reference_paths": ref_paths,
                "caption": captions[0] if captions else None,
                "captions": captions,
                "caption_source": source,
                "target_width": t.width,
                "target_height": t.height,
                **tg.as_dict(),
                "reference_geometry": ref_geoms,
                "conditioning_type": self.c.conditioning,
                "target_hash": t.hash,
                "reference_hashes": ref_hashes,
                "seed": seed,
                "reference_degradations": ref_degradations,
                "mask_path": stored[self.mask_folder](mask) if mask is not None else None,
                "mask_hash": self.infos[self.mask_folder][mask].hash if mask is not None else None,
            })
        return rows, dropped


def assign_eval(rows: list[dict[str, Any]], fraction: float, seed: int) -> None:
    """Mark round(fraction * n) rows as eval, chosen by a seeded hash of the sample id (stable, order-free)."""
    n_eval = int(round(fraction * len(rows)))
    if not n_eval:
        return
    ranked = sorted(rows, key=lambda r: derive_seed(seed, "eval", r["sample_id"]))
    for row in ranked[:n_eval]:
        row["split"] = "eval"


def options_record(config: PairConfig) -> dict[str, Any]:
    out = asdict(config)
    out["edited"] = os.path.abspath(config.edited)
    out["references"] = [os.path.abspath(r) for r in config.references]
    out["masks"] = os.path.abspath(config.masks) if config.masks is not None else None
    out["out"] = os.path.abspath(config.out)
    out.pop("cache_dir", None)
    out.pop("workers", None)
    return out


class _RunMemo:
    """The whole result of the previous run for the same output and options, reused when no image or caption
    file changed (same paths, sizes and mtimes) and the manifest it wrote is untouched. Lives in the cache dir."""

    def __init__(self, config: PairConfig, listings: list[FolderListing]):
        out = os.path.abspath(config.out)
        self.file = Path(config.cache_dir) / "pair" / f"run-{xxhash.xxh3_64_hexdigest(out.encode())}.json"
        extra = json.dumps([__version__, options_record(config)], sort_keys=True, default=str)
        self.fingerprint = listing_fingerprint(listings, extra)

    @staticmethod
    def _stat(path: str | None) -> list[int] | None:
        try:
            st = os.stat(path) if path else None
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns] if st else None

    def load(self) -> PairResult | None:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        report = data.get("report") or {}
        if data.get("fingerprint") != self.fingerprint or data.get("manifest_stat") != self._stat(report.get("manifest")):
            return None
        problems = [Problem(p["kind"], tuple(p["files"]), p["message"]) for p in report["problems"]]
        warnings = [Problem(p["kind"], tuple(p["files"]), p["message"]) for p in report["warnings"]]
        stats = {**report["stats"], "probed": 0, "cached": report["stats"]["files"], "reused": True}
        return PairResult(samples=report["samples"], problems=problems, warnings=warnings, dropped=report["dropped"],
                          manifest=Path(report["manifest"]) if report["manifest"] else None, stats=stats,
                          splits=report["splits"], reused=True)

    def save(self, result: PairResult) -> None:
        report = result.report()
        data = {"fingerprint": self.fingerprint, "manifest_stat": self._stat(report["manifest"]), "report": report}
        try:
            write_text_atomic(self.file, json.dumps(data))
        except OSError:
            pass  # an unwritable cache only makes the next run slower


def pair_folders(config: PairConfig, on_progress: Callable[[int, int], None] | None = None) -> PairResult:
    """Validate the pairing of `config.edited` with `config.references` and write the manifest when clean."""
    bad_options = config.problems()
    if bad_options:
        raise ValueError("; ".join(bad_options))
    # the mask folder is listed (and fingerprinted, so a changed mask is noticed) like the others, last
    folders = (config.edited, *config.references) + ((config.masks,) if config.masks is not None else ())
    listings = [list_folder(Path(f)) for f in folders]
    memo = _RunMemo(config, listings) if config.cache_dir is not None else None
    reused = memo.load() if memo else None
    if reused is not None:
        if on_progress:
            on_progress(reused.stats["files"], reused.stats["files"])
        return reused
    p = _Pairing(config, listings, [])
    p.attach_provenance()
    real = [FolderListing(lst.root, {r: e for r, e in lst.images.items() if r not in v}, lst.captions)
            for lst, v in zip(listings, p.virtual)]
    prefetch = threading.Thread(target=p.prefetch, daemon=True)
    prefetch.start()
    infos, stats = probe_all(real, config.cache_dir, config.workers, config.verify_decode, on_progress)
    prefetch.join()
    for i, virtual in enumerate(p.virtual):  # on-demand references share their source's probe
        infos[i].update({out_rel: infos[0][source] for out_rel, source in virtual.items() if source in infos[0]})
    p.infos = infos
    if not listings[0].images:
        p.add("no_images", [listings[0].root],
              f"{listings[0].root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
              f"Fix: point EDITED at the folder of edited images.")
    p.check_files()
    p.check_collisions()
    pairs = p.match()
    p.match_masks()
    dataset_id = config.dataset_id or Path(os.path.abspath(config.edited)).name
    out = Path(config.out)
    rows, dropped = p.rows(pairs, dataset_id, Path(os.path.abspath(out)).parent)
    assign_eval(rows, config.eval_fraction, config.seed)
    splits: dict[str, int] = {}
    for row in rows:
        splits[row["split"]] = splits.get(row["split"], 0) + 1
    stats = {**stats, "edited_images": len(listings[0].images),
             "reference_images": [len(lst.images) for lst in listings[1:1 + len(config.references)]]}
    if config.masks is not None:
        stats["mask_images"] = len(listings[-1].images)
    result = PairResult(samples=len(rows), problems=p.problems, warnings=p.warnings, dropped=dropped, rows=rows,
                        stats=stats, splits=splits)
    if rows and (result.ok or config.allow_partial):
        result.manifest = write_manifest(rows, out, options_record(config), created_by="kontext-data pair")
    if memo:
        memo.save(result)
    return result
