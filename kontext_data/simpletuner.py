"""`import-simpletuner`: a SimpleTuner dataloader config (multidatabackend.json) becomes our manifest(s).

In: the dataloader JSON (comments and trailing commas allowed), optionally SimpleTuner's config.json (for
`eval_dataset_id`), and path substitutions for the folders/dataset names it mentions. Out: an `ImportPlan` (one
job per edit dataset: pair, degrade + pair, or split + pair, with every problem and every unsupported key listed
together), and, when run, one manifest per edit dataset plus their union in OUT/manifest.parquet. Each edit
dataset's `repeats` goes into the union's options as `dataset_repeats` {dataset id: repeats}, which kontext-train
applies (seen repeats + 1 times per epoch, SimpleTuner's meaning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kontext_data import jsonc
from kontext_data.geometry import GeometryOptions
from kontext_data.pairing import PairConfig, PairResult, pair_folders

# Keys that only steer SimpleTuner's own caches or scanners: kontext-data/kontext-train have their own.
NOT_NEEDED = {
    "cache_dir_vae": "kontext-train keeps its own latent cache, keyed by content",
    "vae_cache_clear_each_epoch": "kontext-train's latent cache never goes stale (content keys)",
    "cache_dir": "kontext-train keeps its own text-embedding cache",
    "skip_file_discovery": "pair keeps an incremental cache instead",
    "preserve_data_backend_cache": "pair keeps an incremental cache instead",
    "metadata_backend": "the manifest is the metadata",
    "default": "text-embedding datasets are not needed",
    "write_batch_size": "no batched metadata writes here",
}
# Keys read for each dataset entry.
USED = {
    "id", "type", "disabled", "dataset_type", "instance_data_dir", "conditioning_data", "conditioning_type",
    "source_dataset_id", "caption_strategy", "instance_prompt", "resolution", "resolution_type",
    "minimum_image_size", "maximum_image_size", "target_downsample_size", "crop", "crop_style", "crop_aspect",
    "conditioning", "dataset_name", "huggingface", "caption_column", "image_column", "split", "repeats",
}
HF_USED = {"caption_column", "image_column", "composite_image_config"}
COMPOSITE_USED = {"enabled", "image_count", "select_index"}
CAPTION_STRATEGIES = {"textfile": "textfile", "filename": "filename", "instanceprompt": "instanceprompt",
                      None: "none", "huggingface": "textfile"}


@dataclass(frozen=True)
class ImportConfig:
    """Options of `kontext-data import-simpletuner`."""

    backend: Path
    """SimpleTuner's dataloader config (multidatabackend.json)."""
    out: Path
    """Folder for the manifests, and for split panels / generated references."""
    config: Path | None = None
    """SimpleTuner's config.json: `eval_dataset_id` marks that dataset's rows as eval."""
    path_map: tuple[tuple[str, str], ...] = ()
    """(prefix, replacement) pairs applied to folders and dataset names, e.g. ("/datasets", "/mnt/data")."""
    alignment: int = 16
    """Bucket alignment (64 reproduces SimpleTuner's Flux buckets exactly; 16 is Kontext's native multiple)."""
    seed: int = 0
    workers: int = 0
    cache_dir: Path | None = None


@dataclass
class Job:
    """One edit dataset: optional split or degrade steps, then a pair run writing OUT/<id>.parquet."""

    dataset_id: str
    pair: PairConfig
    split: Any = None  # kontext_data.split.SplitConfig
    degrade: list = field(default_factory=list)  # kontext_data.degrade.DegradeConfig, one per generator
    repeats: int = 0
    """SimpleTuner's `repeats` of the edit dataset: kontext-train sees its samples repeats + 1 times per epoch."""


@dataclass
class ImportPlan:
    jobs: list[Job] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    plan: ImportPlan
    pair_results: dict[str, PairResult] = field(default_factory=dict)
    stage_problems: list[str] = field(default_factory=list)
    manifest: Path | None = None
    samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.stage_problems and all(r.ok for r in self.pair_results.values())


def _map_path(text: str, path_map: tuple[tuple[str, str], ...]) -> str:
    for old, new in path_map:
        if text == old or text.startswith(old.rstrip("/") + "/"):
            return new + text[len(old):]
    return text


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Planner:
    def __init__(self, cfg: ImportConfig, entries: list, eval_id: str | None):
        self.cfg = cfg
        self.plan = ImportPlan()
        self.entries = [e for e in entries if isinstance(e, dict)]
        self.by_id = {e.get("id"): e for e in self.entries if e.get("id")}
        self.eval_id = eval_id
        self.unsupported: dict[str, set[str]] = {}
        self.not_needed: dict[str, set[str]] = {}

    def problem(self, msg: str) -> None:
        self.plan.problems.append(msg)

    def check_keys(self, entry: dict) -> None:
        did = entry.get("id", "?")
        for key, value in entry.items():
            if key in NOT_NEEDED:
                self.not_needed.setdefault(key, set()).add(did)
            elif key == "huggingface" and isinstance(value, dict):
                for k, v in value.items():
                    if k == "composite_image_config" and isinstance(v, dict):
                        for ck in set(v) - COMPOSITE_USED:
                            self.unsupported.setdefault(f"huggingface.composite_image_config.{ck}", set()).add(did)
                    elif k not in HF_USED:
                        self.unsupported.setdefault(f"huggingface.{k}", set()).add(did)
            elif key not in USED:
                self.unsupported.setdefault(key, set()).add(did)

    def geometry(self, entry: dict) -> tuple[GeometryOptions, int]:
        did = entry.get("id")
        rtype = entry.get("resolution_type", "pixel_area")
        res = entry.get("resolution", 1024)
        kw: dict[str, Any] = dict(resolution=res, resolution_type=rtype, alignment=self.cfg.alignment)
        for key, ours in (("crop", "crop"), ("crop_style", "crop_style"), ("crop_aspect", "crop_aspect")):
            if key in entry:
                kw[ours] = entry[key]

        def edge(value):  # SimpleTuner gives sizes in megapixels for resolution_type 'area'
            if value is None:
                return None
            return int(round(math.sqrt(float(value) * 1e6))) if rtype == "area" else int(value)

        if entry.get("maximum_image_size") is not None or entry.get("target_downsample_size") is not None:
            kw["max_size"] = edge(entry.get("maximum_image_size"))
            kw["target_downsample_size"] = edge(entry.get("target_downsample_size"))
        g = GeometryOptions(**kw)
        for p in g.problems():
            self.problem(f"dataset {did!r}: {p.replace('--', '').replace('-', '_')}")
        return g, edge(entry.get("minimum_image_size")) or 0

    def repeats(self, entry: dict) -> int:
        """The dataset's `repeats` (0 = seen once per epoch), or a problem."""
        value = entry.get("repeats", 0)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problem(f"dataset {entry.get('id')!r}: repeats {value!r} is not a whole number >= 0 (0 = each "
                         f"sample once per epoch, as in SimpleTuner)")
            return 0
        if value and entry.get("id") == self.eval_id:
            self.plan.notes.append(f"dataset {entry.get('id')!r}: repeats {value} does nothing on the eval dataset "
                                   "(eval rows are not trained)")
            return 0
        return value

    def folder(self, entry: dict) -> Path | None:
        did = entry.get("id")
        raw = entry.get("instance_data_dir")
        if not raw:
            self.problem(f"dataset {did!r}: no instance_data_dir")
            return None
        mapped = _map_path(str(raw), self.cfg.path_map)
        if not Path(mapped).is_dir():
            self.problem(f"dataset {did!r}: folder {mapped} does not exist"
                         + ("" if mapped != raw else f" (map it with --path-map {raw}=/where/it/is)"))
            return None
        return Path(mapped)

    def pair_config(self, entry: dict, edited: Path, refs: list[Path], conditioning: str, **kw) -> PairConfig:
        did = entry["id"]
        geometry, min_size = self.geometry(entry)
        strategy = entry.get("caption_strategy", "textfile")
        if strategy not in CAPTION_STRATEGIES:
            self.problem(f"dataset {did!r}: caption_strategy {strategy!r} is not one of "
                         f"{[k for k in CAPTION_STRATEGIES if k]} or null")
            strategy = "textfile"
        return PairConfig(
            edited=edited, references=tuple(refs), out=Path(self.cfg.out) / f"{did}.parquet",
            captions=CAPTION_STRATEGIES[strategy], instance_prompt=entry.get("instance_prompt"),
            geometry=geometry, min_size=min_size, conditioning=conditioning, seed=self.cfg.seed,
            split="eval" if did == self.eval_id else "train", dataset_id=did, workers=self.cfg.workers,
            cache_dir=self.cfg.cache_dir, **kw)

    def run(self) -> ImportPlan:
        for entry in self.entries:  # keys of skipped datasets (disabled, text_embeds) do not matter
            if not entry.get("disabled") and entry.get("dataset_type") != "text_embeds":
                self.check_keys(entry)
        referenced = {r for e in self.entries for r in _as_list(e.get("conditioning_data"))}
        sources = {e.get("source_dataset_id") for e in self.entries if e.get("source_dataset_id")}
        for entry in self.entries:
            did = entry.get("id")
            if not did:
                self.problem(f"a dataset entry has no 'id': {sorted(entry)}")
                continue
            if entry.get("disabled"):
                self.plan.notes.append(f"dataset {did!r} is disabled: skipped")
                continue
            dtype = entry.get("dataset_type", "image")
            if dtype == "text_embeds":
                self.plan.notes.append(f"dataset {did!r} (text_embeds) ignored: kontext-train caches text "
                                       f"embeddings itself")
                continue
            if dtype not in ("image", "conditioning"):
                self.problem(f"dataset {did!r}: dataset_type {dtype!r} is not supported (image, conditioning, "
                             f"text_embeds)")
                continue
            if dtype == "conditioning" or did in referenced:
                if entry.get("repeats"):
                    users = sorted(e.get("id") for e in self.entries if did in _as_list(e.get("conditioning_data"))
                                   or e.get("id") == entry.get("source_dataset_id"))
                    self.plan.notes.append(f"dataset {did!r}: repeats on a reference dataset is ignored: samples are "
                                           f"counted by their edit dataset ({', '.join(map(str, users)) or '?'}); "
                                           "put repeats there")
                continue  # a reference set: planned with its edit dataset
            kind = entry.get("type", "local")
            if kind == "huggingface":
                self.plan_huggingface(entry, sources)
            elif kind == "local":
                self.plan_local(entry)
            else:
                self.problem(f"dataset {did!r}: type {kind!r} is not supported (local, huggingface)")
        if self.eval_id and self.eval_id not in self.by_id:
            self.problem(f"config.json eval_dataset_id {self.eval_id!r} names no dataset of the dataloader config")
        if self.not_needed:
            self.plan.notes.append("not needed here: " + "; ".join(
                f"{k} ({NOT_NEEDED[k]}; in {', '.join(sorted(ids))})" for k, ids in sorted(self.not_needed.items())))
        self.plan.unsupported = [f"{k} (in {', '.join(sorted(ids))})" for k, ids in sorted(self.unsupported.items())]
        return self.plan

    def plan_local(self, entry: dict) -> None:
        did = entry["id"]
        edited = self.folder(entry)
        ref_ids = _as_list(entry.get("conditioning_data"))
        generators = _as_list(entry.get("conditioning"))
        if not ref_ids and not generators:
            self.plan.notes.append(f"dataset {did!r} has no conditioning_data: its images train as reference-free "
                                   f"samples, which the manifest cannot hold yet: skipped")
            return
        refs, conditioning, masks, mask_folder = [], None, [], None
        for rid in ref_ids:
            ref = self.by_id.get(rid)
            if ref is None:
                self.problem(f"dataset {did!r}: conditioning_data names {rid!r}, which is not defined")
                continue
            ctype = ref.get("conditioning_type", "reference_strict")
            if ctype == "mask":  # SimpleTuner's loss-mask conditioning: our pair --masks
                masks.append(rid)
                folder = self.folder(ref)
                if len(masks) > 1:
                    self.problem(f"dataset {did!r}: more than one mask dataset ({', '.join(masks)}); keep one")
                else:
                    mask_folder = folder
                continue
            if ctype not in ("reference_strict", "reference_loose"):
                self.problem(f"dataset {rid!r}: conditioning_type {ctype!r} is not one of reference_strict, "
                             f"reference_loose, mask")
            elif conditioning and ctype != conditioning:
                self.problem(f"dataset {did!r}: its references mix reference_strict and reference_loose")
            conditioning = conditioning or ctype
            folder = self.folder(ref)
            if folder is not None:
                refs.append(folder)
        degrade_jobs = []
        for k, gen in enumerate(generators):
            job = self.degrade_job(did, k, gen, edited)
            if job is not None:
                degrade_jobs.append(job)
                refs.append(job.out)
        if edited is None or len(refs) != len(ref_ids) - len(masks) + len(generators):
            return
        if masks and not refs:
            self.problem(f"dataset {did!r}: a mask dataset ({masks[0]}) but no reference: add conditioning_data "
                         "with reference_strict or reference_loose images")
            return
        # generated references may change the extension (a blurred x.jpg is stored as x.png)
        match = "stem" if degrade_jobs else "exact"
        self.plan.jobs.append(Job(did, self.pair_config(entry, edited, refs, conditioning or "reference_strict",
                                                        match=match, masks=mask_folder), degrade=degrade_jobs,
                                  repeats=self.repeats(entry)))

    def degrade_job(self, did: str, k: int, gen: Any, src: Path | None):
        from kontext_data import degrade as dg

        where = f"dataset {did!r} conditioning[{k}]"
        if not isinstance(gen, dict):
            self.problem(f"{where}: expected an object")
            return None
        problems: list[str] = []
        steps, captions = dg.steps_from_entry(gen, where, problems)
        try:
            chain = dg.build_chain([], None, steps)
        except dg.DegradeError as exc:
            problems.extend(exc.problems)
            chain = []
        for p in problems:
            self.problem(p if p.startswith(where) else f"{where}: {p}")
        if problems or src is None:
            return None
        name = "-".join(s.type for s in chain)
        out = Path(self.cfg.out) / "generated" / f"{did}-{k}-{name}"
        return dg.DegradeConfig(src=src, out=out, chain=tuple(chain), captions=tuple(captions), seed=self.cfg.seed,
                                workers=self.cfg.workers or None)

    def plan_huggingface(self, entry: dict, sources: set) -> None:
        from kontext_data.split import SplitConfig

        did = entry["id"]
        hf = entry.get("huggingface") or {}
        comp = hf.get("composite_image_config") or {}
        partners = [e for e in self.entries if e.get("source_dataset_id") == did and not e.get("disabled")]
        partners += [self.by_id[r] for r in _as_list(entry.get("conditioning_data"))
                     if r in self.by_id and self.by_id[r] not in partners]
        if not comp.get("enabled"):
            self.problem(f"dataset {did!r}: a huggingface dataset without composite_image_config is not supported "
                         f"yet; export its images to folders and pair them")
            return
        if not partners:
            self.problem(f"dataset {did!r}: no reference dataset (conditioning_data / source_dataset_id) found")
            return
        name = entry.get("dataset_name")
        if not name:
            self.problem(f"dataset {did!r}: no dataset_name")
            return
        source = _map_path(str(name), self.cfg.path_map)
        count = int(comp.get("image_count", 2))
        roles = [(did, int(comp.get("select_index", 0)))]
        captions = []
        if hf.get("caption_column") and entry.get("caption_strategy", "huggingface") == "huggingface":
            captions.append((did, hf["caption_column"]))
        conditioning = None
        for ref in partners:
            rhf = ref.get("huggingface") or {}
            rcomp = rhf.get("composite_image_config") or {}
            if ref.get("dataset_name", name) != name:
                self.problem(f"dataset {ref.get('id')!r}: reference from another dataset ({ref.get('dataset_name')}) "
                             f"than its edit dataset ({name}) is not supported")
                return
            roles.append((ref["id"], int(rcomp.get("select_index", 1))))
            if rhf.get("caption_column") and ref.get("caption_strategy", "huggingface") == "huggingface":
                captions.append((ref["id"], rhf["caption_column"]))
            conditioning = conditioning or ref.get("conditioning_type", "reference_strict")
        split_out = Path(self.cfg.out) / "split" / did
        split_cfg = SplitConfig(sources=(source,), out=split_out, cols=count, rows=1, roles=tuple(roles),
                                edit_role=did, image_column=hf.get("image_column", "image"),
                                caption_columns=tuple(captions), workers=self.cfg.workers)
        edited = split_out / did
        refs = [split_out / r for r, _ in roles[1:]]
        pair_cfg = self.pair_config(entry, edited, refs, conditioning or "reference_strict")
        # panels carry reference captions only when a reference caption column was given: keep SimpleTuner's rule
        self.plan.jobs.append(Job(did, pair_cfg, split=split_cfg, repeats=self.repeats(entry)))


def plan_import(cfg: ImportConfig) -> ImportPlan:
    """Read the configs and plan the jobs; nothing is written. Problems and unsupported keys are collected."""
    plan = ImportPlan()
    try:
        entries = jsonc.load(cfg.backend)
    except jsonc.JsoncError as exc:
        plan.problems.append(str(exc))
        return plan
    eval_id = None
    if cfg.config is not None:
        try:
            training = jsonc.load(cfg.config)
        except jsonc.JsoncError as exc:
            plan.problems.append(str(exc))
            return plan
        if isinstance(training, dict):
            eval_id = training.get("eval_dataset_id")
            others = sorted(k for k in training if k != "eval_dataset_id")
            if others:
                plan.notes.append(f"{cfg.config}: training keys ({', '.join(others)}) are for kontext-train: "
                                  f"pass the file with `kontext-train --config {cfg.config}`")
    if not isinstance(entries, list):
        plan.problems.append(f"{cfg.backend}: expected a list of dataset entries")
        return plan
    planned = _Planner(cfg, entries, eval_id).run()
    planned.notes[:0] = plan.notes
    return planned


def run_import(cfg: ImportConfig, plan: ImportPlan,
               on_stage: Callable[[str], None] | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Run the planned jobs (split/degrade, then pair), then write the union of all rows to OUT/manifest.parquet."""
    from kontext_data.manifest import read_manifest, write_manifest

    result = ImportResult(plan)
    for job in plan.jobs:
        if job.split is not None:
            from kontext_data.split import SplitError, split_composites

            if on_stage:
                on_stage(f"{job.dataset_id}: splitting composites")
            try:
                sres = split_composites(job.split, on_progress)
            except SplitError as exc:
                result.stage_problems.append(f"dataset {job.dataset_id!r}: {exc}")
                continue
            result.stage_problems.extend(f"dataset {job.dataset_id!r}: row {p.row}: {p.message}"
                                         for p in sres.problems)
        for dcfg in job.degrade:
            from kontext_data.degrade import run_degrade

            if on_stage:
                on_stage(f"{job.dataset_id}: generating references in {dcfg.out}")
            dres = run_degrade(dcfg)
            result.stage_problems.extend(f"dataset {job.dataset_id!r}: {f.path}: {f.message}" for f in dres.failures)
        if on_stage:
            on_stage(f"{job.dataset_id}: pairing")
        result.pair_results[job.dataset_id] = pair_folders(job.pair, on_progress)
    if result.ok and result.pair_results:
        # the per-dataset manifests lie in OUT like the union: their stored (relative) paths stay valid
        rows = [row for pres in result.pair_results.values() for row in read_manifest(pres.manifest).rows()]
        result.samples = len(rows)
        options: dict[str, Any] = {"imported_from": str(Path(cfg.backend).resolve()),
                                   "datasets": list(result.pair_results)}
        repeats = {job.dataset_id: job.repeats for job in plan.jobs
                   if job.repeats and job.dataset_id in result.pair_results}
        if repeats:  # read by kontext-train (kontext_trainer.weighting); only the union carries it
            options["dataset_repeats"] = repeats
        result.manifest = write_manifest(rows, Path(cfg.out) / "manifest.parquet", options,
                                         created_by="kontext-data import-simpletuner")
    return result

