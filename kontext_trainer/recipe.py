"""The Kontext LoRA training recipe: setup / train / save_checkpoint, composed of the component modules.

In: a checked TrainConfig. Out, under output_dir: `pytorch_lora_weights.safetensors` (diffusers format; with
ema_decay also `pytorch_lora_weights_ema.safetensors`), `config.resolved.json`, `metrics.jsonl` (step lines and
validation-loss lines), `checkpoints/checkpoint-NNNNNN/` (resumable, newest K kept), `validation/step_NNNNNN/*.png`
strips and TensorBoard logs in `logs/`.

Order of work (memory): manifest checks (all problems together, before any model loads) -> text encoders load,
encode missing captions, freed -> VAE loads, encodes missing latents, is moved to the CPU (it comes back to the
device only for validation) -> the transformer loads with the adapter and trains.

The library never prints: everything a user should see goes through `on_event(kind, data)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kontext_trainer import adapters, fuse as fuse_mod, model as model_mod, optim as optim_mod, quantize as quantize_mod
from kontext_trainer import attention, memory
from kontext_trainer.cache import CacheError, FeatureCache, latent_key, mask_key, text_key
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import BLANK_CAPTION, BucketBatchSampler, KeyBook, Sample, choose_caption, load_batch, \
    samples_from_records
from kontext_trainer.data import choose_references, materialize_on_demand, read_manifests, record_problems
from kontext_trainer.data import draw_epoch
from kontext_trainer.prompts import read_validation_prompts
from kontext_trainer.weighting import dataset_weighting
from kontext_trainer.distributed import CollectiveTimeout, Dist, batch_sizes, describe_batch, gpu_problems, \
    init_distributed, local_world_size_from_env, shard_indices, world_size_from_env
from kontext_trainer.ema import EMA_WEIGHT_NAME, AdapterEMA
from kontext_trainer.evaluate import evaluate_loss, pick_train_eval
from kontext_trainer.attention import attention_context
from kontext_trainer.compile import can_compile_cuda, compile_blocks, eager
from kontext_trainer.flow import kontext_step, sample_sigmas
from kontext_trainer.phases import OUTSIDE_PHASES, PhaseClock
from kontext_data.fileio import atomic_dir, write_text_atomic
from kontext_data.problems import ProblemsError

EventFn = Callable[[str, dict], None]
CHECKPOINT_PREFIX = "checkpoint-"


def _kept_and_weights(report) -> str:
    """The tail of a quantization stage line (quanto's QuantizeReport or fp8's Fp8Report)."""
    return (f"{len(report.kept)} kept in bf16 ({', '.join(report.kept[:4])}...); weights "
            f"{report.bytes_before / 2**30:.2f} -> {report.bytes_after / 2**30:.2f} GiB")


class TrainError(ProblemsError):
    """A run cannot start or go on. `problems` lists every problem, one message each."""

    def __init__(self, problems: list[str], title: str = "cannot train"):
        super().__init__(problems, title=title, message=f"{title}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class TrainResult:
    """What a finished run wrote and measured."""

    lora_path: Path
    config_path: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_dirs: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    seconds_per_step: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)
    """The phase table of the run (kontext_trainer.phases.PhaseClock.summary)."""
    validation_losses: list[dict[str, Any]] = field(default_factory=list)
    """Every validation-loss evaluation of this run, as written to metrics.jsonl (step, val_loss, ...)."""
    ema_path: Path | None = None
    """pytorch_lora_weights_ema.safetensors when ema_decay is set."""


def check_records(records: list[dict], verify: bool) -> list[str]:
    """Every problem of the manifest's rows that would stop training: missing files, hash mismatches."""
    from kontext_data.imageio import content_hash

    problems: list[str] = []
    for r in records:
        files = [(r["target_path"], r["target_hash"], "target")] + [
            (p, h, f"reference {i + 1}") for i, (p, h) in enumerate(zip(r["reference_paths"], r["reference_hashes"]))]
        if r.get("mask_path"):
            files.append((r["mask_path"], r["mask_hash"], "mask"))
        for path, expected, what in files:
            if not os.path.isfile(path):
                problems.append(f"{r['sample_id']}: {what} file missing: {path}")
            elif verify:
                with open(path, "rb") as fh:
                    actual = content_hash(fh.read())
                if actual != expected:
                    problems.append(f"{r['sample_id']}: {what} {path} changed since the manifest was written "
                                    f"(hash {actual} != {expected}); re-run `kontext-data pair`")
        for name in ("bucket_width", "bucket_height"):
            if int(r[name]) % 16:
                problems.append(f"{r['sample_id']}: {name} {r[name]} is not a multiple of 16")
        for i, g in enumerate(r["reference_geometry"]):
            if int(g["bucket_width"]) % 16 or int(g["bucket_height"]) % 16:
                problems.append(f"{r['sample_id']}: reference {i + 1} bucket {g['bucket_width']}x{g['bucket_height']}"
                                " is not a multiple of 16")
    return problems


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError([f"device {name}: CUDA is not available on this machine (use --device cpu)"])
    return dev


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor per optimizer step (for LambdaLR): linear warmup over `warmup` steps from 1/warmup,
    then constant, linear decay to 0 or a cosine to 0 at `total`."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints under OUTPUT_DIR/checkpoints (with training_state.pt), oldest step first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "training_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class KontextLoRARecipe:
    """setup() -> train() (calls save_checkpoint / validation on schedule) -> the saved LoRA."""

    def __init__(self, config: TrainConfig, on_event: EventFn | None = None):
        self.cfg = config
        self._emit_fn = on_event or (lambda kind, data: None)
        self.output_dir = Path(config.output_dir)
        self.cache = FeatureCache(config.resolved_cache_dir)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.transformer = None
        self.vae = None
        self.scheduler = None
        self.writer = None
        self.dist = Dist()
        self.clock = PhaseClock()
        self.offload_report = None
        self.memory_plan: memory.MemoryPlan | None = None
        self.memory_hint: str | None = None  # a faster base for this card, said beside the memory plan
        self.final_lora: Path | None = None  # the final adapter, once written (before the final images)
        self.final_phase = False  # past the last step's barrier: rank 0 has written or is writing the adapter
        self.ema: AdapterEMA | None = None
        self.train_eval_samples: list[Sample] = []
        self.validation_losses: list[dict[str, Any]] = []
        self._metrics = None  # train()'s open metrics.jsonl, so evaluation lines keep the order of the steps

    def emit(self, kind: str, **data) -> None:
        """Send one event (`stage`, `warning`, `step`, ...) to the caller's on_event."""
        self._emit_fn(kind, data)

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything train() needs, in the order that keeps memory low: the data checked (every problem of the
        manifests and the prompts file raised together, before any model loads), the device, the caches (text
        encoders, then the VAE), the transformer with its adapter and optimizer, a checkpoint to resume from."""
        cfg = self.cfg
        with self.clock.phase("manifest"):
            self._read_data()
        try:
            self.model_dir = model_mod.resolve_model_dir(cfg.model, allow_download=cfg.download)
        except model_mod.ModelError as exc:
            raise TrainError(exc.problems, title=f"model {cfg.model}") from None
        self._place()
        self._describe_data()
        self._check_attention()
        try:
            self._build_caches()
        except CacheError as exc:
            raise TrainError([f"{exc.path}: {exc}"], title="caching") from None
        self._build_model()
        weights, groups = self.weighting.for_samples([s.sample_id for s in self.samples])
        self.sampler = BucketBatchSampler(self.samples, self.global_batch, cfg.seed, weights, groups)
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)
        if cfg.report_to == "tensorboard" and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.output_dir / "logs"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            write_text_atomic(self.output_dir / "config.resolved.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    def _read_data(self) -> None:
        """The manifests' rows checked, the dataset weighting and the validation prompts read, the training,
        validation and training-eval samples picked. Raises TrainError with every problem of the data."""
        cfg = self.cfg
        records, options = self._checked_records()
        for opts in options:
            self._check_resolution(opts)
        self.samples = samples_from_records([r for r in records if r["split"] == "train"])
        self.val_samples = self._pick_validation(samples_from_records([r for r in records if r["split"] == "eval"]))
        self.ignored_masks = 0
        if not cfg.mask_loss:  # every token weighs 1, as without masks: they are neither cached nor loaded
            self.ignored_masks = sum(s.mask is not None for s in self.samples)
            self.samples = [dataclasses.replace(s, mask=None) for s in self.samples]
            self.val_samples = [dataclasses.replace(s, mask=None) for s in self.val_samples]
        self._hold_out_validation()
        if cfg.validation_loss:  # as many training samples beside them: over-fitting shows as the gap
            self.train_eval_samples = pick_train_eval(self.samples, {s.sample_id for s in self.val_samples},
                                                      len(self.val_samples), cfg.seed)

    def _checked_records(self) -> tuple[list[dict], list[dict]]:
        """The rows and options of the manifests, with `self.weighting` and `self.val_prompts`; every problem of
        the manifests, their files, the dataset weights and the validation prompts file in one TrainError (the
        prompts file is checked now, so that a bad line stops the run before any model loads)."""
        from kontext_data.manifest import ManifestError, read_manifest

        cfg = self.cfg
        paths = cfg.manifest_paths
        records, options, problems = read_manifests(paths)
        if len(paths) == 1 and problems:
            try:
                read_manifest(paths[0])
            except ManifestError as exc:
                raise TrainError(exc.problems, title=f"manifest {cfg.manifest}") from None
        problems += check_records(records, cfg.verify) + record_problems(records)
        train_records = [r for r in records if r["split"] == "train"]
        if not train_records and records:
            problems.append("the manifest has no rows with split 'train'")
        self.weighting = dataset_weighting(train_records, records, paths, options, cfg.dataset_weights,
                                           cfg.dataset_repeats)
        problems += self.weighting.problems
        self.val_prompts, prompt_problems = (read_validation_prompts(cfg.validation_prompts)
                                             if cfg.validation_prompts else ([], []))
        if problems or prompt_problems:
            raise TrainError(problems + prompt_problems, title=" and ".join(
                [f"manifest {', '.join(paths)}"] * bool(problems)
                + [f"validation_prompts {cfg.validation_prompts}"] * bool(prompt_problems)))
        return records, options

    def _place(self) -> None:
        """The device (this process's GPU under data parallelism), the compute dtype and the memory limit."""
        cfg = self.cfg
        if world_size_from_env() > 1 and cfg.device != "cpu" and torch.cuda.is_available():
            # before the process group: accelerate would fail on a GPU index past the last with a bare CUDA error
            problems = gpu_problems(cfg.device, local_world_size_from_env(), torch.cuda.device_count())
            if problems:
                raise TrainError(problems, title="several processes")
        self.dist, dist_device = init_distributed(cfg.device, cfg.distributed_timeout_minutes)
        self.device = dist_device if dist_device is not None and cfg.device == "auto" else _resolve_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            # an indexed device: torch.cuda's memory-fraction calls refuse a bare "cuda"
            index = self.dist.local_rank if self.dist.enabled else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
        self.clock.device = self.device  # each phase's peak GPU memory
        self.dtype = quantize_mod.compute_dtype(cfg.base_model_precision)  # bf16 for quantized bases
        # the sampler draws global micro-batches; each process trains its share (at most device_batch samples)
        self.global_batch, self.device_batch = batch_sizes(cfg.train_batch_size, self.dist.world_size,
                                                           cfg.batch_semantics)
        self.comm_timing: dict[str, float] | None = {} if self.dist.enabled else None
        if self.dist.enabled:
            self.emit("stage", message=f"data parallel: {self.dist.describe(self.device)}; a process waits at most "
                                       f"{cfg.distributed_timeout_minutes:g} min for the others "
                                       f"(distributed_timeout_minutes)")
            self.emit("stage", message=describe_batch(cfg.train_batch_size, self.dist.world_size,
                                                      cfg.batch_semantics, cfg.gradient_accumulation_steps))
        self._limit_memory()

    def _describe_data(self) -> None:
        """The start-up lines about the model, the samples, the dataset weighting and the loss masks."""
        cfg = self.cfg
        self.emit("stage", message=f"model {self.model_dir} on {self.device} ({cfg.base_model_precision}); "
                                   f"{len(self.samples)} training samples in {self._n_buckets()} bucket(s), "
                                   f"{len(self.val_samples)} validation sample(s)"
                                   + (f", {len(self.val_prompts)} validation prompt(s)" if self.val_prompts else ""))
        self.emit("stage", message=self.weighting.describe([s.sample_id for s in self.samples]))
        n_masked = sum(s.mask is not None for s in self.samples)
        if n_masked:
            self.emit("stage", message=f"masked loss: {n_masked} of {len(self.samples)} training samples have a loss "
                                       f"mask; errors outside it weigh {cfg.mask_loss_weight:g} (mask_loss_weight)")
        elif self.ignored_masks:
            self.emit("stage", message=f"masked loss off (mask_loss false): the loss masks of {self.ignored_masks} "
                                       "training samples are ignored")

    def _check_attention(self) -> None:
        """Which attention kernels the steps will run, said once; `fa4` where FlashAttention 4 cannot run fails here,
        before any caching."""
        try:
            said = attention.announce(self.cfg.attention_backend, self.device)
        except attention.AttentionUnavailable as exc:
            raise TrainError([str(exc)], title="attention_backend") from None
        if said:
            self.emit(said[0], message=said[1])

    def _limit_memory(self) -> None:
        """memory_limit_gib: hold PyTorch's allocator to that much of the card (the memory plan uses it too)."""
        limit = self.cfg.memory_limit_gib
        if limit is None:
            return
        if self.device.type != "cuda":
            self.emit("warning", message=f"memory_limit_gib {limit:g}: only CUDA devices have a limit; ignored on "
                                         f"{self.device.type}")
            return
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        if limit >= total:
            self.emit("warning", message=f"memory_limit_gib {limit:g} is not below the card's {total:.1f} GiB: "
                                         "the whole card is used")
            return
        torch.cuda.set_per_process_memory_fraction(limit / total, self.device)
        self.emit("stage", message=f"memory limit: {limit:g} of the card's {total:.1f} GiB (memory_limit_gib)")

    def _card_gib(self) -> float:
        """GiB the run may use on its CUDA device: the card less what is held outside this process's allocator and
        context now (a display, another job, NCCL's buffers: said at start-up), or memory_limit_gib below that."""
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        free, total_bytes = torch.cuda.mem_get_info(self.device)
        others = memory.others_on_card_gib(total_bytes, free, torch.cuda.memory_reserved(self.device))
        usable = total - others
        if others >= 0.5:
            self.emit("stage", message=f"{others:.1f} GiB of {self.device} are held outside this run's allocator (a "
                                       f"display, another job, communication buffers): the memory plan counts "
                                       f"{usable:.1f} of its {total:.1f} GiB")
        return min(usable, self.cfg.memory_limit_gib or usable)

    def _synchronize(self) -> None:
        """Wait for the device, so a phase's wall time includes its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _n_buckets(self) -> int:
        return len({s.bucket for s in self.samples})

    def _check_resolution(self, options: dict) -> None:
        geometry = options.get("geometry") or {}
        cfg = self.cfg
        if cfg.resolution and geometry.get("resolution") and float(geometry["resolution"]) != float(cfg.resolution):
            self.emit("warning", message=f"resolution {cfg.resolution} differs from the manifest's "
                                         f"{geometry['resolution']:g}: the manifest's geometry is used (re-run "
                                         "`kontext-data pair --resolution` to change it)")
        if cfg.resolution_type and geometry.get("resolution_type") and geometry["resolution_type"] != cfg.resolution_type:
            self.emit("warning", message=f"resolution_type {cfg.resolution_type} differs from the manifest's "
                                         f"{geometry['resolution_type']}: the manifest's geometry is used")

    def _pick_validation(self, eval_samples: list[Sample]) -> list[Sample]:
        n = self.cfg.validation_samples
        if eval_samples:
            chosen = sorted(eval_samples, key=lambda s: s.sample_id)
            return chosen[:n] if n else chosen
        ordered = sorted(self.samples, key=lambda s: s.sample_id)
        return ordered[: (n or 2)]

    def _hold_out_validation(self) -> None:
        """validation_holdout without an eval split: the picked training samples leave training, so the validation
        loss is measured on pairs the adapter never saw."""
        if not self.cfg.validation_holdout or not self.val_samples or self.val_samples[0].split == "eval":
            return
        held = {s.sample_id for s in self.val_samples}
        rest = [s for s in self.samples if s.sample_id not in held]
        if not rest:
            raise TrainError([f"validation_holdout: holding out the {len(held)} validation sample(s) leaves no "
                              "training sample; lower validation_samples or turn validation_holdout off"],
                             title="validation_holdout")
        self.samples = rest
        # marked as an eval split's samples are, so caching and validation treat them alike
        self.val_samples = [dataclasses.replace(s, split="eval") for s in self.val_samples]
        self.emit("stage", message=f"validation: {len(held)} training sample(s) held out of training "
                                   "(validation_holdout)")

    # ------------------------------------------------------------------------------------------- caches

    def _build_caches(self) -> None:
        """Text embeddings, VAE latents and loss masks of every training and eval sample, encoded where the cache
        lacks them (shared out over the processes), then the `cache` event with what was encoded and reused."""
        from kontext_data.manifest import load_image

        cfg = self.cfg
        text_keys, latent_keys, mask_keys = self._cache_keys()
        self.keys = KeyBook(text=text_keys, latent=latent_keys, mask=mask_keys)

        def progress(stage, done, total):
            self.emit("progress", stage=stage, done=done, total=total)

        stats = {"text_total": len(text_keys), "latent_total": len(latent_keys)}
        if mask_keys:
            stats["mask_total"] = len(mask_keys)
        keyed_text = {k: c for c, k in text_keys.items()}
        keyed_latents = {k: e for e, k in latent_keys.items()}
        keyed_masks = {k: e for e, k in mask_keys.items()}
        enc = None
        for rank, world in self._cache_rounds():
            todo = self.cache.missing_text(keyed_text, rank, world)
            if todo:
                self.emit("stage", message=f"encoding {len(todo)} of {len(text_keys)} caption(s)")
                if enc is None:
                    with self.clock.phase("text encoders load"):
                        enc = model_mod.load_text_encoders(self.model_dir, self.dtype, self.device)
                with self.clock.phase("text cache") as phase:
                    done = self.cache.encode_text(enc, keyed_text, self.device, cfg.cache_batch_size or None,
                                                  cfg.max_sequence_length, progress, rank=rank, world_size=world)
                    self._synchronize()
                    phase["items"] = done
                stats["text_encoded"] = stats.get("text_encoded", 0) + done
        if enc is not None:
            model_mod.free(enc.text_encoder, enc.text_encoder_2)
            del enc
        with self.clock.phase("vae load"):
            self.vae = model_mod.load_vae(self.model_dir, self.dtype, self.device)
        if cfg.vae_tiling:
            self.vae.enable_tiling()
        for rank, world in self._cache_rounds():
            todo = self.cache.missing_latents(keyed_latents, rank, world)
            if todo:
                self.emit("stage", message=f"encoding {len(todo)} of {len(latent_keys)} image(s) with the VAE")
                with self.clock.phase("latent cache") as phase:
                    done = self.cache.encode_latents(self.vae, keyed_latents, self.device,
                                                     cfg.cache_batch_size or None, load_image, progress, rank=rank,
                                                     world_size=world, speedups=self._vae_speedups())
                    self._synchronize()
                    phase["items"] = done
                stats["latent_encoded"] = stats.get("latent_encoded", 0) + done
            if mask_keys:  # loss masks need no model: computed from their files on the CPU
                stats["mask_encoded"] = stats.get("mask_encoded", 0) + self.cache.encode_masks(
                    keyed_masks, progress, rank=rank, world_size=world)
        self.vae.to("cpu")  # back on the device only for validation
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache_stats = stats
        self.emit("cache", **stats, cache_dir=str(self.cache.root))

    def _vae_speedups(self) -> tuple[str, ...]:
        return ("compile",) if self.cfg.cache_compile_vae else ()

    def _cache_keys(self) -> tuple[dict, dict, dict]:
        """The content keys (model fingerprints, file hashes, geometry) of every caption, image and loss mask the
        run needs: training and eval samples, validation prompts, the blank caption of caption dropout."""
        cfg = self.cfg
        all_samples = self.samples + [s for s in self.val_samples if s.split == "eval"]
        captions = sorted({c for s in all_samples for c in s.captions} | {BLANK_CAPTION}
                          | {p.prompt for p in self.val_prompts})
        text_fp = "".join(model_mod.fingerprint(self.model_dir, part)
                          for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        text_keys = {c: text_key(text_fp, c, cfg.max_sequence_length) for c in captions}
        vae_fp = model_mod.fingerprint(self.model_dir, "vae")
        dtype_name = str(self.dtype).replace("torch.", "")
        entries = {e for s in all_samples for e in (s.target, *s.references)}
        latent_keys = {e: latent_key(vae_fp, e, dtype_name, self._vae_speedups()) for e in entries}
        mask_keys = {s.mask: mask_key(s.mask) for s in all_samples if s.mask is not None}
        return text_keys, latent_keys, mask_keys

    def _cache_rounds(self):
        """(rank, world) of each caching round, a barrier after each: one process encodes everything; several
        share the missing entries out by global rank, then, where the cache folder is not shared between machines
        (what other machines wrote is not here), each machine's processes share out what it still lacks."""
        yield self.dist.rank, self.dist.world_size
        self.dist.barrier("the other processes' shares of the cache")  # every rank's share is written
        if self.dist.world_size > self.dist.local_world_size:  # several machines
            yield self.dist.local_rank, self.dist.local_world_size
            self.dist.barrier("the processes of a machine whose own cache lacked entries")

    # ------------------------------------------------------------------------------------------- model

    def _build_model(self) -> None:
        """The transformer, loaded as the memory plan says, with its adapter, kernels and optimizer."""
        self._decide_compile()
        plan, host_blocks, skeleton = self._memory_plan()
        self.memory_plan = plan
        self._load_transformer(host_blocks, skeleton)
        self._attach_adapter()
        self._prepare_blocks(plan)
        self._new_optimizer()
        self.scheduler = model_mod.load_scheduler(self.model_dir)
        self.ema = self._make_ema()
        if self.ema is not None:
            self.emit("stage", message=f"EMA of the adapter: decay {self.cfg.ema_decay:g}"
                                       + (" with warm-up" if self.cfg.ema_warmup else "")
                                       + f", float32 on {self.device} (ema_decay)")
        self._describe_adapter()

    def _memory_plan(self) -> tuple["memory.MemoryPlan", list[str], torch.nn.Module]:
        """The memory plan, the names of the blocks it offloads and the meta-device model it read them from (the
        loader fills that one). It comes first, from the model's shapes alone:
        blocks it offloads are loaded straight into CPU memory, so a card smaller than the whole base (int8 FLUX is
        11.1 GiB) never has to hold it."""
        cfg = self.cfg
        meta = model_mod.empty_transformer(self.model_dir, self.dtype)
        self._base_params = sum(p.numel() for p in meta.parameters())
        plan = memory.MemoryPlan(0.0, 0.0, "no checkpointing (gradient_checkpointing false)")
        card = self._card_gib() if self.device.type == "cuda" else 0.0  # read once: both plans use it
        if cfg.gradient_checkpointing or cfg.activation_memory_budget is not None:  # an explicit budget wins
            plan = self._checkpoint_plan(card)
        plan = self._offload_plan(plan, memory.estimate_block_bytes(meta, cfg.base_model_precision), card)
        if cfg.offload_blocks is None and plan.offload_blocks:  # the plan's own offload, not the user's
            self.memory_hint = memory.quantized_instead(
                plan, cfg.base_model_precision, card, memory.allocator_headroom_gib(), self._step_shape(),
                memory.estimate_block_bytes(meta, "int8-quanto"), self.compile)
        names = {id(m): n for n, m in meta.named_modules()}
        return plan, [names[id(b)] for b in model_mod.transformer_blocks(meta)[:plan.offload_blocks]], meta

    def _load_transformer(self, host_blocks: list[str], skeleton: torch.nn.Module) -> None:
        """The frozen base, quantized (int8/fp8-quanto) as it loads, before the adapter is attached."""
        cfg = self.cfg
        with self.clock.phase("model load"):
            self.transformer, self.quantize_report = quantize_mod.load_transformer(
                self.model_dir, cfg.base_model_precision, self.device, cfg.quantize_on, host_blocks=set(host_blocks),
                skeleton=skeleton)
        if self.quantize_report is not None:
            r = self.quantize_report
            self.emit("stage", message=f"{r.precision}: {len(r.quantized)} Linear modules quantized, "
                                       f"{_kept_and_weights(r)}")

    def _attach_adapter(self) -> None:
        """The LoRA/LoKr adapter on the device; then fp8-matmul's conversion (the adapter stays float32) or quanto's
        weights as plain tensors (compilable)."""
        cfg = self.cfg
        try:
            self.lora_config = adapters.attach_from_config(self.transformer, cfg)
        except ValueError as exc:
            raise TrainError([str(exc)], title="lora_targets") from None
        for p in adapters.trainable_parameters(self.transformer):  # the adapter of a block loaded into CPU memory
            if p.device != self.device:
                p.data = p.data.to(self.device)
        if cfg.base_model_precision == quantize_mod.FP8_MATMUL:  # after the adapter, which stays float32
            try:
                r = quantize_mod.to_fp8_matmul(self.transformer, self.device)
            except RuntimeError as exc:
                raise TrainError([str(exc)], title="base_model_precision") from None
            self.quantize_report = r
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.emit("stage", message=f"fp8-matmul: {len(r.converted)} base Linear modules on fp8 weights and fp8 "
                                       f"matmuls, {_kept_and_weights(r)}")
        if quantize_mod.is_quantized(cfg.base_model_precision):
            quantize_mod.to_dequant_linears(self.transformer)

    def _prepare_blocks(self, plan: "memory.MemoryPlan") -> None:
        """Fused q/k/v, the plan's activation checkpointing and block offload, and compiled blocks."""
        cfg = self.cfg
        if cfg.fuse_qkv_projections:
            n = fuse_mod.fuse_qkv(self.transformer)
            total = sum(1 for m in self.transformer.modules() if type(m).__name__ == "FluxAttention")
            self.emit("stage", message=f"fused q/k/v projections in {n} of {total} attentions"
                                       + ("" if n == total else " (attentions with LoKr, or with only some of q/k/v "
                                                                  "adapted, stay unfused)"))
        self.transformer.train()
        memory.set_activation_checkpointing(self.transformer, plan.fraction)
        self.emit("stage", message=f"memory: {plan.reason}")
        if self.memory_hint:
            self.emit("stage", message=f"memory: {self.memory_hint}")
        if plan.offload_blocks:
            from kontext_trainer import offload

            self.offload_report = offload.enable_block_offload(self.transformer, plan.offload_blocks, self.device)
            self.emit("stage", message=self.offload_report.describe())
        if self.compile:
            compile_blocks(self.transformer, memory_budget=plan.budget)
            why = "compile_blocks" if cfg.compile_blocks else "on CUDA by default; compile_blocks=false turns it off"
            self.emit("stage", message=f"torch.compile of the transformer blocks ({why}): the first steps include "
                                       f"compiling")

    def _new_optimizer(self) -> None:
        """A fresh optimizer and learning-rate schedule over the adapter's current trainable parameters."""
        cfg = self.cfg
        self.params = adapters.trainable_parameters(self.transformer)
        self.optimizer = build_optimizer(cfg, self.params)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps))

    def _describe_adapter(self) -> None:
        """The start-up line about the adapter (and the warning for a LoKr diffusers' own loader cannot read)."""
        cfg = self.cfg
        n = sum(p.numel() for p in self.params)
        if cfg.adapter == "lokr" and cfg.lokr_factor != cfg.lokr_factor_ff and any(
                adapters.is_feed_forward(m) for m in self.lora_config.target_modules):
            self.emit("warning", message=f"LoKr with two factors ({cfg.lokr_factor} attention, {cfg.lokr_factor_ff} "
                                         "feed-forward): diffusers' own loader reads one factor per file; load it "
                                         "with kontext_trainer.adapters.load_adapter or export it for ComfyUI "
                                         "(set lokr_factor_ff = lokr_factor for plain diffusers)")
        kind = (f"LoKr factor {cfg.lokr_factor}/{cfg.lokr_factor_ff} (attention/ffs)"
                + (" full matrix" if cfg.lokr_full_matrix else f" rank {cfg.lora_rank}")
                if cfg.adapter == "lokr" else f"LoRA rank {cfg.lora_rank}")
        self.emit("stage", message=f"{kind} on {len(self.lora_config.target_modules)} modules "
                                   f"({n:,} trainable parameters), optimizer {cfg.optimizer}")

    def _make_ema(self) -> AdapterEMA | None:
        """The EMA of the adapter's current weights (ema_decay), or None when off."""
        if self.cfg.ema_decay is None:
            return None
        named = [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]
        return AdapterEMA(named, self.cfg.ema_decay, self.cfg.ema_warmup)

    def _decide_compile(self) -> None:
        cfg = self.cfg
        self.compile = cfg.compile_blocks if cfg.compile_blocks is not None else self.device.type == "cuda"
        if self.compile and self.device.type == "cuda" and not can_compile_cuda():
            if cfg.compile_blocks:
                raise TrainError(["compile_blocks: torch.compile needs Triton for CUDA, and it is not installed "
                                  "(pip install triton, or set compile_blocks false)"], title="compile_blocks")
            self.compile = False
            self.emit("warning", message="torch.compile needs Triton, which is not installed: the transformer "
                                         "blocks run eager (about 1.25x slower steps; pip install triton)")

    def _step_shape(self) -> "memory.StepShape":
        cfg = self.cfg
        tokens = max((memory.sample_tokens(s.target.size, [r.size for r in s.references]) for s in self.samples),
                     default=0)
        return memory.StepShape(tokens, cfg.base_model_precision, self.device_batch,
                               wide_adapter=cfg.adapter == "lokr" or cfg.lora_targets != "attention",
                               scale=min(1.0, self._base_params / memory.FULL_TRANSFORMER_PARAMS),
                               fa4=attention.runs_fa4(cfg.attention_backend, self.device, tokens))

    def _offload_plan(self, plan: "memory.MemoryPlan", sizes: list[int], card_gib: float) -> "memory.MemoryPlan":
        """offload_blocks N: the first N blocks offloaded (and checkpointed); default on CUDA: as few as make the
        step fit the card when the plan alone does not. `sizes`: the frozen bytes of each block once loaded."""
        cfg = self.cfg
        if cfg.offload_blocks:
            n = cfg.offload_blocks
            if n > len(sizes):
                raise TrainError([f"offload_blocks {n}: the transformer has {len(sizes)} blocks"],
                                 title="offload_blocks")
            resident = sum(sorted(sizes[:n], reverse=True)[:memory.OFFLOAD_SLOTS])
            fraction = max(plan.fraction, n / len(sizes))
            peak = max(0.0, plan.peak_gib - (sum(sizes[:n]) - resident) / 2**30) if plan.peak_gib else 0.0
            return memory.MemoryPlan(fraction, peak, f"{plan.reason}; offloading the first {n} blocks "
                                                    f"(offload_blocks; they are checkpointed)", plan.budget, n)
        if cfg.offload_blocks == 0 or self.device.type != "cuda" or not plan.peak_gib:
            return plan
        limit = card_gib - memory.allocator_headroom_gib()
        return memory.plan_with_offload(plan, limit, sizes, self._step_shape(), self.compile)

    def _checkpoint_plan(self, card_gib: float) -> "memory.MemoryPlan":
        """The checkpointed fraction: the config's, else on CUDA the fastest that fits the card, else all."""
        cfg = self.cfg
        shape = self._step_shape()

        def peak(fraction, budget=1.0):
            return shape.peak_gib(fraction, budget, self.compile)

        if cfg.checkpoint_fraction is not None:
            f = cfg.checkpoint_fraction
            return memory.MemoryPlan(f, peak(f), f"checkpointing {f:.0%} of the blocks (checkpoint_fraction)")
        if cfg.activation_memory_budget is not None and self.compile:
            b = cfg.activation_memory_budget
            return memory.MemoryPlan(0.0, peak(0.0, b), f"compiled blocks with activation memory budget {b:g} "
                                                       f"(activation_memory_budget)", b)
        if cfg.activation_memory_budget is not None:  # compile fell back to eager (no Triton)
            self.emit("warning", message="activation_memory_budget needs compiled blocks: checkpointing every "
                                         "block instead")
            return memory.MemoryPlan(1.0, peak(1.0), "checkpointing every block (blocks not compiled)")
        if self.device.type != "cuda":
            return memory.MemoryPlan(1.0, 0.0, "checkpointing every block (not on CUDA)")
        return memory.plan_memory(card_gib, shape, headroom_gib=memory.allocator_headroom_gib(),
                                 compiled=self.compile)

    # ------------------------------------------------------------------------------------------- train

    def _caption_for(self, sample: Sample, epoch: int | str) -> str:
        return choose_caption(sample, self.cfg.seed, epoch, self.cfg.caption_dropout_probability)

    def train(self) -> TrainResult:
        """Optimizer steps up to max_train_steps (from a resumed step on), with checkpoints and validations on
        schedule; then the final validation loss, the adapter (and its EMA) and the last checkpoint saved, the final
        validation images, and the run's result. The adapter is written before the images are rendered: a
        rendering that fails (out of memory at a larger validation size, an interrupt) costs the images, never the
        trained adapter."""
        cfg = self.cfg
        losses: list[tuple[int, float]] = []
        validation_dirs: list[Path] = []
        it = self.sampler.iterate(self.epoch, self.position, with_copy=True)
        started = time.perf_counter()
        first_step = self.step
        # rank 0 alone writes outputs
        metrics_path = self.output_dir / "metrics.jsonl" if self.dist.is_main else Path(os.devnull)
        if self.step == 0 and self._loss_on():
            self.validate(images=False)  # the baseline every later validation loss is compared with
        with open(metrics_path, "a", encoding="utf-8") as metrics:
            self._metrics = metrics
            while self.step < cfg.max_train_steps:
                step_loss, dt = self._optimizer_step(it)
                losses.append((self.step, step_loss))
                self._log_step(metrics, step_loss, dt)
                validation_dirs += self._on_schedule()
        if self._loss_on():  # skip_final_validation skips the images, not the cheap loss
            self.validate(images=False)
        self.dist.barrier("the other processes' last step")
        self.final_phase = True  # rank 0 writes the adapter now, before the final images
        with self.clock.phase("save"):
            lora_path = self.save_final()
        if cfg.checkpointing_steps:
            self.save_checkpoint()
        if not cfg.skip_final_validation:
            validation_dirs.append(self.validate(loss=False))
        if self.writer:
            self.writer.flush()
            self.writer.close()
        timings = self._timings()
        self.emit("timings", **timings)
        return TrainResult(lora_path=lora_path, config_path=self.output_dir / "config.resolved.json", losses=losses,
                           validation_dirs=validation_dirs, checkpoints=list_checkpoints(self.output_dir),
                           seconds_per_step=(time.perf_counter() - started) / max(1, self.step - first_step),
                           timings=timings, validation_losses=list(self.validation_losses),
                           ema_path=self.output_dir / EMA_WEIGHT_NAME if self.ema is not None else None)

    def _timings(self) -> dict[str, Any]:
        """The phase table with the samples a step trains and their rate; with several processes, each rank's
        caching, validation loss and images (each computes a share), waiting (idle: the slowest rank's lead at the
        all-reduce) and all-reduce seconds (a collective)."""
        cfg = self.cfg
        timings = self.clock.summary(self.device)
        timings["samples_per_step"] = self.global_batch * cfg.gradient_accumulation_steps
        if timings.get("steady_s_per_step"):
            timings["samples_per_s"] = round(timings["samples_per_step"] / timings["steady_s_per_step"], 3)
        if self.dist.enabled:
            mine = {k: round(v, 3) for k, v in (self.comm_timing or {}).items()}
            mine.update({k: round(self.clock.phases[k], 3) for k in ("text cache", "latent cache", "validation loss",
                                                                     "validation") if k in self.clock.phases})
            timings["processes"] = self.dist.world_size
            timings["per_rank"] = self.dist.gather(mine)
        return timings

    def _optimizer_step(self, it) -> tuple[float, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches drawn from `it`, gradients summed over
        the processes: (the step's loss, its seconds). Raises TrainError when a loss or gradient is not finite,
        before the optimizer steps."""
        cfg = self.cfg
        t0 = time.perf_counter()
        step_loss = 0.0
        failure = None
        shapes: list = []
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.gradient_accumulation_steps):
            try:
                step_loss += self._micro_step(next(it), micro, shapes)
            except FloatingPointError as exc:
                failure = str(exc)
                break
        # every rank learns of a non-finite loss on any rank before the gradient all-reduce (no hang)
        if self.dist.sum_scalar(1.0 if failure else 0.0, self.device) > 0:
            raise self._diverged(failure or "a non-finite loss on another process")
        self.dist.all_reduce_grads(self.params, self.comm_timing)
        step_loss = self.dist.sum_scalar(step_loss, self.device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        if not math.isfinite(grad_norm):  # never step on inf/NaN gradients
            raise self._diverged(f"non-finite gradient norm {grad_norm} (loss {step_loss})")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.clock.step(dt, shapes)
        return step_loss, dt

    def _micro_step(self, drawn: tuple, micro: int, shapes: list) -> float:
        """Forward and backward of this process's shard of one micro-batch (`drawn` from the sampler: epoch,
        position, indices, copy); its (bucket, size) is appended to `shapes`. Returns its share of the step's loss
        (0 for an empty shard, which contributes zero gradients to the all-reduce)."""
        cfg = self.cfg
        epoch, position, idx, copy = drawn
        draw = draw_epoch(epoch, copy)  # a repeated sample's viewings draw their captions anew
        self.epoch, self.position = epoch, position
        shard = shard_indices(idx, self.dist.rank, self.dist.world_size)  # all of it in one process
        if not shard:
            return 0.0
        batch_samples = [self.samples[i] for i in shard]
        shapes.append((batch_samples[0].bucket, len(batch_samples)))
        captions = [self._caption_for(s, draw) for s in batch_samples]
        chosen = choose_references(batch_samples, cfg.reference_sampling, cfg.seed, draw)
        batch = load_batch(batch_samples, self.cache, self.keys, captions, chosen).to(self.device, self.dtype)
        sigmas, noise = self._sigmas_and_noise(batch_samples, batch, micro)
        weight = len(shard) / len(idx) / cfg.gradient_accumulation_steps
        return kontext_step(
            self.transformer, batch, None, scheme=cfg.timestep_sampling, shift=cfg.flow_shift,
            logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, guidance=cfg.train_guidance,
            attention_backend=cfg.attention_backend, loss_scale=weight, sigmas=sigmas, noise=noise,
            mask_loss_weight=cfg.mask_loss_weight,
        ) * weight

    def _log_step(self, metrics, step_loss: float, dt: float) -> None:
        """The step's metrics.jsonl line, TensorBoard scalars (every logging_steps) and `step` event."""
        lr = self.lr_scheduler.get_last_lr()[0]
        metrics.write(json.dumps({"step": self.step, "loss": step_loss, "lr": lr, "step_time": dt,
                                  "epoch": self.epoch}) + "\n")
        if self.writer and self.step % self.cfg.logging_steps == 0:
            self.writer.add_scalar("train/loss", step_loss, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/step_time_s", dt, self.step)
        self.emit("step", step=self.step, total=self.cfg.max_train_steps, loss=step_loss, lr=lr, step_time=dt)

    def _on_schedule(self) -> list[Path]:
        """The checkpoint and validation due after this step (the last step's come after the loop); returns the
        validation folders written."""
        cfg = self.cfg
        if self.step == cfg.max_train_steps:
            return []
        if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
            self.save_checkpoint()
        if cfg.validation_steps and self.step % cfg.validation_steps == 0:
            return [self.validate()]
        return []

    # ------------------------------------------------------------------------------------------- validation

    def _sigmas_and_noise(self, samples: list[Sample], batch, micro: int):
        """Sigma and noise of each sample, from a generator keyed by (seed, step, micro-batch, sample id): the
        same whichever process or batch position holds the sample."""
        cfg = self.cfg
        sigmas, noise = [], []
        for s, z in zip(samples, batch.target):
            gen = torch.Generator().manual_seed(hash_seed(cfg.seed, self.step, micro, s.sample_id))
            sigmas.append(sample_sigmas(1, gen, cfg.timestep_sampling, cfg.flow_shift, cfg.logit_mean,
                                        cfg.logit_std))
            noise.append(torch.randn(tuple(z.shape), generator=gen, dtype=torch.float32))
        return torch.cat(sigmas), torch.stack(noise)

    def validate(self, images: bool = True, loss: bool = True) -> Path:
        """The validation loss (`loss`, when validation_loss is on), then the image strips (`images`); with
        ema_validate both again with the EMA weights. Several processes share both out; rank 0 writes."""
        out_dir = self.output_dir / "validation" / f"step_{self.step:06d}"
        # compiled blocks run eagerly here: validation's no-grad, eval-mode forwards would compile graphs of their
        # own (one per block type and mode) for a few dozen forwards
        with eager() if self.compile else contextlib.nullcontext():
            if loss and self._loss_on():
                with self.clock.phase("validation loss"):
                    self._validation_loss()
            if images:
                with self.clock.phase("validation"):
                    out_dir = self._validate()
                    if self.ema is not None and self.cfg.ema_validate:
                        with self.ema.applied(self.params):
                            self._validate(ema=True)
        self.dist.barrier("rank 0's validation outputs")
        return out_dir

    def _loss_on(self) -> bool:
        return self.cfg.validation_loss and bool(self.val_samples)

    def _validation_loss(self) -> dict[str, Any]:
        """Evaluate (every process its share), then write metrics.jsonl's line, the TensorBoard scalars and the
        `validation_loss` event (rank 0)."""
        record: dict[str, Any] = {"step": self.step}
        try:
            self._loss_into(record, "")
            if self.ema is not None and self.cfg.ema_validate:
                with self.ema.applied(self.params):
                    self._loss_into(record, "ema_")
        except FloatingPointError as exc:
            self.emit("warning", message=f"validation loss at step {self.step}: {exc}")
            return record
        record["val_samples"] = len(self.val_samples)
        record["train_eval_samples"] = len(self.train_eval_samples)
        self.validation_losses.append(record)
        if not self.dist.is_main:
            return record
        line = json.dumps(record) + "\n"
        if self._metrics is not None and not self._metrics.closed:
            self._metrics.write(line)
        else:  # before or after train()'s loop
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(line)
        if self.writer:
            for prefix in ("", "ema_"):
                for key, tag in (("val_loss", "val"), ("train_eval_loss", "train_eval")):
                    if prefix + key not in record:
                        continue
                    tag += "_ema" if prefix else ""
                    self.writer.add_scalar(f"{tag}/loss", record[prefix + key], self.step)
                    for sigma, value in record[prefix + key + "_by_sigma"].items():
                        self.writer.add_scalar(f"{tag}/loss_sigma_{sigma}", value, self.step)
        self.emit("validation_loss", **record)
        return record

    def _loss_into(self, record: dict[str, Any], prefix: str) -> None:
        cfg = self.cfg

        def load(group: list[Sample]):
            return load_batch(group, self.cache, self.keys, [s.captions[0] for s in group])

        for key, samples in (("val_loss", self.val_samples), ("train_eval_loss", self.train_eval_samples)):
            report = evaluate_loss(self.transformer, samples, load, sigmas=cfg.validation_sigmas, seed=cfg.seed,
                                   # one process's share of a training micro-batch: its steps' shapes and memory
                                   batch_size=self.device_batch, device=self.device, dtype=self.dtype,
                                   guidance=cfg.train_guidance, attention_backend=cfg.attention_backend,
                                   mask_loss_weight=cfg.mask_loss_weight,  # the training loss's own weighting
                                   share=(self.dist.rank, self.dist.world_size),
                                   gather=lambda v: self.dist.gather(v, "the other processes' validation loss"))
            if report is not None:
                record[prefix + key] = report.mean
                record[prefix + key + "_by_sigma"] = report.by_sigma

    def _validate(self, ema: bool = False) -> Path:
        """The strips of the eval samples and the validation prompts. With several processes each renders a
        contiguous share of them (the others would otherwise wait for rank 0: the images are the same whichever
        process renders them, seeded by validation_seed); rank 0 gathers them in order and writes them."""
        from kontext_data.manifest import load_image

        from kontext_trainer.validate import run_validation, save_strips

        cfg = self.cfg
        out_dir = self.output_dir / "validation" / f"step_{self.step:06d}"
        out_dir, tag = (out_dir / "ema", "validation_ema") if ema else (out_dir, "validation")
        n_eval = len(self.val_samples)
        mine = shard_indices(list(range(n_eval + len(self.val_prompts))), self.dist.rank, self.dist.world_size)
        samples = [self.val_samples[i] for i in mine if i < n_eval]
        prompts = [self.val_prompts[i - n_eval] for i in mine if i >= n_eval]
        results = []
        if mine:
            captions = [s.captions[0] for s in samples]
            embeddings = [self.cache.load_text(self.keys.text[c]) for c in captions]
            self.vae.to(self.device)
            try:
                results = run_validation(
                    self.transformer, self.vae, self.scheduler,
                    materialize_on_demand(samples, self.cache.root / "on-demand"), captions, embeddings,
                    load_image=load_image, guidance=cfg.validation_guidance,
                    num_inference_steps=cfg.validation_num_inference_steps, resolution=cfg.validation_resolution,
                    seed=cfg.validation_seed, device=self.device, dtype=self.dtype,
                    attention_context=lambda: attention_context(cfg.attention_backend, self.device),
                ) if samples else []
                results += self._validate_prompts(prompts)
            finally:
                self.vae.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if self.dist.enabled:  # every share, in rank order: the original order
            results = [r for share in self.dist.gather(results, "the other processes' validation images")
                       for r in share]
        if not self.dist.is_main:
            return out_dir
        paths = save_strips(results, out_dir)
        if self.writer:
            import numpy as np

            for r in results:
                self.writer.add_image(f"{tag}/{r.sample_id}", np.asarray(r.strip), self.step, dataformats="HWC")
                self.writer.add_text(f"{tag}/{r.sample_id}", r.caption or "(blank)", self.step)
        self.emit("validation", step=self.step, dir=str(out_dir), files=[str(p) for p in paths],
                  **({"ema": True} if ema else {}))
        return out_dir

    def _validate_prompts(self, prompts: list) -> list:
        """The edits of `prompts` (validation_prompts), beside the eval strips (same pipeline and settings); their
        strips join the validation results (TensorBoard, the validation event)."""
        if not prompts:
            return []
        from kontext_trainer.validate import run_prompt_validation

        cfg = self.cfg
        embeddings = [self.cache.load_text(self.keys.text[p.prompt]) for p in prompts]
        area = max(w * h for w, h in (s.target.size for s in self.samples))
        return run_prompt_validation(
            self.transformer, self.vae, self.scheduler, prompts, embeddings, area=area,
            guidance=cfg.validation_guidance, num_inference_steps=cfg.validation_num_inference_steps,
            resolution=cfg.validation_resolution, seed=cfg.validation_seed, device=self.device, dtype=self.dtype,
            attention_context=lambda: attention_context(cfg.attention_backend, self.device))

    # ------------------------------------------------------------------------------------------- saving

    def save_final(self) -> Path:
        """Write the final adapter (and its EMA) to OUTPUT_DIR on rank 0; returns the adapter's path."""
        if not self.dist.is_main:
            return self.output_dir / adapters.LORA_WEIGHT_NAME
        path = adapters.save_lora(self.transformer, self.output_dir, training_config=self._training_metadata())
        self.final_lora = path
        self.emit("saved", path=str(path))
        if self.ema is not None:
            ema_path = self.ema.save(self.transformer, self.params, self.output_dir, self._training_metadata())
            self.emit("saved", path=str(ema_path), ema=True)
        return path

    def _training_metadata(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["step"] = self.step
        d["model_dir"] = str(self.model_dir)
        return d

    def save_checkpoint(self) -> Path:
        """Write checkpoints/checkpoint-NNNNNN atomically (temp folder renamed) and keep the newest K. Rank 0
        writes; every rank waits until it is complete."""
        if not self.dist.is_main:
            self.dist.barrier("rank 0's checkpoint")
            return self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        try:
            with self.clock.phase("checkpoint"):
                return self._save_checkpoint()
        finally:
            self.dist.barrier("rank 0's checkpoint")

    def _save_checkpoint(self) -> Path:
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        with atomic_dir(final) as tmp:  # a checkpoint folder appears whole or not at all
            adapters.save_lora(self.transformer, tmp, training_config=self._training_metadata())
            if self.ema is not None:
                self.ema.save(self.transformer, self.params, tmp, self._training_metadata())
            torch.save({
                "step": self.step, "epoch": self.epoch, "position": self.position, "global_batch": self.global_batch,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
            }, tmp / "training_state.pt")
            (tmp / "config.resolved.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        for old in list_checkpoints(self.output_dir)[:-self.cfg.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        self.emit("checkpoint", path=str(final), step=self.step)
        return final

    def out_of_memory(self, exc: BaseException) -> TrainError:
        """The TrainError for running out of GPU memory: where (the phase, the step), how much PyTorch held of
        the card, what the memory plan predicted, and what to change (memory.out_of_memory_advice)."""
        phase = self.clock.phase_of(exc)
        where = f"in {phase}" + (f" at step {self.step + 1}" if phase == OUTSIDE_PHASES else "")
        device = getattr(self, "device", None)  # set once the run has placed itself
        held = ""
        if device is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            held = (f": PyTorch held {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB of the card's "
                    f"{total:.1f} GiB")
        problems = [f"out of GPU memory {where}" + (f" on {device}{held}" if device is not None else "")]
        plan = self.memory_plan
        if plan is not None:
            problems.append(f"the memory plan: {plan.reason}")
        n_blocks = len(model_mod.transformer_blocks(self.transformer)) if self.transformer is not None else 57
        problems += [f"try {tip}" for tip in memory.out_of_memory_advice(phase, plan, self.cfg.base_model_precision,
                                                                        n_blocks)]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"PyTorch said: {first[:300]}")
        return TrainError(problems + self._kept(), title="out of GPU memory")

    def timed_out(self, exc: CollectiveTimeout) -> TrainError:
        """The TrainError for a process that waited for the others past distributed_timeout_minutes."""
        minutes = self.cfg.distributed_timeout_minutes
        problems = [f"{exc} ({minutes:g} min, distributed_timeout_minutes)",
                    f"if that work is just slow, give it more time: --set distributed_timeout_minutes="
                    f"{max(120, 4 * minutes):g}; rank 0 alone writes checkpoints, and the validation images take "
                    f"validation_samples x validation_num_inference_steps denoising steps, shared out over the "
                    f"processes"]
        return TrainError(problems + self._kept(), title="timeout between processes")

    def _kept(self) -> list[str]:
        """The last line of an error that stops the run: what it kept. The final adapter once written (rank 0
        knows; the others, once past the last step's barrier, know rank 0 writes it before the final images),
        else the checkpoints; nothing when there are none."""
        if self.final_lora is not None:
            return [f"the trained adapter was saved before the final validation images: {self.final_lora}"]
        if self.final_phase:
            return [f"the trained adapter was written by rank 0 before the final validation images: "
                    f"{self.output_dir / adapters.LORA_WEIGHT_NAME}"]
        if list_checkpoints(self.output_dir):
            return ["checkpoints already written are intact: resume with --resume latest"]
        return []

    def _diverged(self, detail: str) -> TrainError:
        """The error that stops a run whose loss or gradients became NaN/Inf: nothing of this step is saved (no
        optimizer step, no checkpoint, no final adapter); it names the step and the checkpoint to resume from."""
        failed = self.step + 1
        if self.writer:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        found = list_checkpoints(self.output_dir)
        problems = [f"step {failed}: {detail}. Training stopped; nothing of step {failed} was saved."]
        if found:
            problems.append(f"last good checkpoint: {found[-1]} (step {int(found[-1].name[len(CHECKPOINT_PREFIX):])}); "
                            f"resume with `--resume {found[-1]}` (or `--resume latest`) and a lower learning rate "
                            f"(now {self.cfg.learning_rate:g})")
        else:
            problems.append("no checkpoint was written before it (set checkpointing_steps to keep resumable "
                            f"checkpoints); lower the learning rate (now {self.cfg.learning_rate:g}) and start again")
        return TrainError(problems, title="training diverged (NaN/Inf)")

    def _resume(self, spec: str) -> None:
        if spec == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                self.emit("warning", message=f"resume_from_checkpoint latest: no checkpoint in "
                                             f"{self.output_dir / 'checkpoints'}; starting from step 0")
                return
            ckpt = found[-1]
        else:
            ckpt = Path(spec)
            if not (ckpt / "training_state.pt").is_file():
                raise TrainError([f"resume_from_checkpoint {spec}: not a checkpoint folder (no training_state.pt)"])
        state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
        try:
            adapters.load_lora_into(self.transformer, ckpt / adapters.LORA_WEIGHT_NAME)
        except ValueError as exc:
            raise TrainError([str(exc) + " (was it trained with other lora_rank / lora_targets?)"]) from None
        self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        saved_batch = state.get("global_batch", self.global_batch)  # checkpoints before per-device batches: same
        if saved_batch != self.global_batch:
            self.emit("warning", message=f"{ckpt.name} trained {saved_batch} samples per micro-step, this run "
                                         f"{self.global_batch} (another number of processes with per-device "
                                         "batches, or another train_batch_size): it goes on from the same step, but "
                                         "the batches from here differ from those of an uninterrupted run")
        if self.ema is not None and state.get("ema") is not None:
            try:
                self.ema.load_state_dict(state["ema"])
            except ValueError as exc:
                raise TrainError([f"{ckpt}: {exc}"]) from None
        elif self.ema is not None:
            self.ema = self._make_ema()
            self.emit("warning", message=f"{ckpt} holds no EMA (ema_decay was off): the EMA starts from its weights")
        self.emit("stage", message=f"resumed from {ckpt} at step {self.step}")


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from `parts` (xxh64 of their text): the same on every process and Python run."""
    import xxhash

    return xxhash.xxh64_intdigest(":".join(str(p) for p in parts).encode()) & ((1 << 63) - 1)


build_optimizer = optim_mod.build_optimizer  # re-export: it lives in kontext_trainer/optim.py


def train(config: TrainConfig, on_event: EventFn | None = None) -> TrainResult:
    """Library entry point: setup + train."""
    recipe = KontextLoRARecipe(config, on_event)
    try:
        recipe.setup()
        result = recipe.train()
    except torch.OutOfMemoryError as exc:
        raise recipe.out_of_memory(exc) from None
    except CollectiveTimeout as exc:
        raise recipe.timed_out(exc) from None
    recipe.dist.close()  # the process group's threads end before the interpreter does
    return result
