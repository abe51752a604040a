"""On-disk caches of text embeddings and VAE latents, keyed by content, never by step order.

In: the captions and the image entries of a manifest, a model directory. Out: one safetensors file per unique
caption (`text/<key>.safetensors`: T5 `prompt_embeds` (L, D) and CLIP `pooled` (P,)) and one per image entry
(`latents/<k2>/<key>.safetensors`: `latent` (C, h, w), already normalized as `(mode - shift) * scale`), and one per
loss mask (`masks/<k2>/<key>.safetensors`: `mask` (h, w) float32 in [0, 1] at latent resolution).

Keys:
- text:   xxh3_128 of (CLIP + T5 fingerprints, max_sequence_length, the caption text);
- latent: xxh3_128 of (VAE fingerprint, the file's manifest hash, its size and mtime, the six geometry fields,
  the dtype). A changed file (even without a new manifest), crop or VAE re-encodes that entry only.
  An on-demand reference (`kontext-data degrade --on-demand`: no file, synthesized from its source with the
  record's seed) adds the record's `params_hash` and `seed` to the key of its source file: the record fixes
  every random draw, so its pixels are the same on every call and its latent is cached like any other.
- mask:   xxh3_128 of (MASK_FORMAT, the mask file's manifest hash, its size and mtime, the TARGET's six geometry
  fields, the latent factor). No model fingerprint: a mask is computed from its file alone (`mask_latent`), so
  changing the VAE or the dtype keeps it, and a changed mask file or crop recomputes that mask only.
Reshuffling, resuming or editing the manifest cannot pair a caption with the wrong image: a sample looks its
entries up by its own content keys. Files are written to a temp name and renamed (atomic).

Encoding overlaps the CPU and the device (kontext_trainer.encode): images are decoded on threads while the VAE
encodes the previous batch, and files are written on a background thread; the batches, hence the bytes, are those
of a plain sequential loop over the same batch size.

The library never prints: `progress(stage, done, total)` is called while encoding, after each batch of files is
written (a caller times these calls for images/s or captions/s).
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from kontext_data.fileio import atomic_path
from kontext_data.manifest import GEOMETRY_FIELDS
from kontext_trainer import encode as encode_mod
from kontext_data.problems import ProblemsError

ProgressFn = Callable[[str, int, int], None]
CACHE_FORMAT = 1
MASK_FORMAT = 1
"""Version of how a mask file becomes its cached tensor (`mask_latent`); changing that procedure must bump it, so
every cached mask is recomputed rather than silently reused."""
LATENT_FACTOR = 8
"""Pixels per latent pixel: FLUX's AutoencoderKL (and the tiny test model's) downsamples 3 times by 2."""


class CacheError(ProblemsError, RuntimeError):
    """An entry could not be encoded or stored; `path` names its file (the image, or the cache file)."""

    def __init__(self, path: str, message: str):
        super().__init__([message])
        self.path = path


def _hash(obj: Any) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(obj, sort_keys=True, default=str).encode())


def text_key(encoder_fingerprint: str, caption: str, max_sequence_length: int) -> str:
    """The cache key of a caption's text embeddings."""
    return _hash({"v": CACHE_FORMAT, "kind": "text", "fp": encoder_fingerprint, "len": max_sequence_length,
                  "caption": caption})


@dataclass(frozen=True)
class ImageEntry:
    """One image as the trainer sees it: file + recorded geometry (target or one reference)."""

    path: str
    file_hash: str
    geometry: tuple[int, ...]  # GEOMETRY_FIELDS, in that order
    synth: str = ""  # on-demand degradation record (canonical JSON); empty for an ordinary file

    @staticmethod
    def from_geometry(path: str, file_hash: str, geometry: Mapping[str, Any], synth: str = "") -> "ImageEntry":
        """An entry from a manifest row's geometry mapping (GEOMETRY_FIELDS)."""
        return ImageEntry(path=str(path), file_hash=file_hash,
                          geometry=tuple(int(geometry[k]) for k in GEOMETRY_FIELDS), synth=synth)

    @property
    def on_demand(self) -> bool:
        """Whether the image is synthesized from its source (kontext-data degrade --on-demand)."""
        return bool(self.synth)

    @property
    def synth_record(self) -> dict:
        """The on-demand degradation record ({} for an ordinary file)."""
        return json.loads(self.synth) if self.synth else {}

    @property
    def geometry_dict(self) -> dict[str, int]:
        """The geometry as {field: value}, as the manifest writes it."""
        return dict(zip(GEOMETRY_FIELDS, self.geometry))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the final crop."""
        g = self.geometry_dict
        return g["bucket_width"], g["bucket_height"]


def latent_key(vae_fingerprint: str, entry: ImageEntry, dtype: str, speedups: Iterable[str] = ()) -> str:
    """The cache key of an image entry's latent (see the module docstring for what it covers). `speedups`: the
    `encode.vae_speedups` the latent is encoded with (they change its last bits); none keeps the key it always had."""
    try:
        st = os.stat(entry.path)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    key = {"v": CACHE_FORMAT, "kind": "latent", "fp": vae_fingerprint, "hash": entry.file_hash,
           "stat": stamp, "geometry": entry.geometry, "dtype": dtype}
    if entry.synth:
        rec = entry.synth_record
        key["synth"] = {"params_hash": rec.get("params_hash"), "seed": rec.get("seed")}
    if speedups:
        key["speedups"] = sorted(set(speedups))
    return _hash(key)


def mask_key(entry: ImageEntry) -> str:
    """The cache key of a loss mask: `entry` holds the mask file, its manifest hash and the TARGET's geometry."""
    try:
        st = os.stat(entry.path)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    return _hash({"v": MASK_FORMAT, "kind": "mask", "hash": entry.file_hash, "stat": stamp,
                  "geometry": entry.geometry, "factor": LATENT_FACTOR})


def mask_latent(entry: ImageEntry, factor: int = LATENT_FACTOR) -> torch.Tensor:
    """The loss mask of `entry` at latent resolution: (H/factor, W/factor) float32 in [0, 1], each value the mean of
    the factor x factor pixels of the cropped mask it covers (`kontext_data.manifest.load_mask`: the target's resize
    and crop). An area average, so a latent pixel half inside the mask weighs half, and an all-white mask gives
    exactly 1.0 everywhere."""
    from kontext_data.manifest import load_mask

    px = torch.from_numpy(load_mask(entry.path, entry.geometry_dict))
    h, w = px.shape
    if h % factor or w % factor:
        raise ValueError(f"{entry.path}: a {w}x{h} crop is not a multiple of the latent factor {factor}")
    return px.reshape(h // factor, factor, w // factor, factor).mean(dim=(1, 3)).clamp_(0.0, 1.0).contiguous()


def load_entry_image(entry: ImageEntry, load_image: Callable | None = None):
    """The PIL image of one entry: the file through `load_image(path, geometry)` (default
    kontext_data.manifest.load_image), or for an on-demand reference the pixels synthesized from its source with
    the record's seed (EXIF orientation applied by the synthesis), then the recorded geometry."""
    if entry.synth:
        from PIL import Image

        from kontext_data.degrade import synthesize_reference
        from kontext_data.geometry import apply_geometry

        return apply_geometry(Image.fromarray(synthesize_reference(entry.path, entry.synth_record)),
                              entry.geometry_dict)
    if load_image is None:
        from kontext_data.manifest import load_image
    return load_image(entry.path, entry.geometry_dict)


def shard_of(keys, rank: int, world_size: int) -> list:
    """This rank's disjoint share of `keys` (sorted, every world_size-th; keys are content hashes, so the shares
    are balanced): the ranks together cover every key exactly once."""
    return sorted(keys)[rank::world_size] if world_size > 1 else sorted(keys)


def save_entry(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write one cache entry (safetensors, the tensors contiguous on the CPU) atomically
    (`kontext_data.fileio.atomic_path`): a reader or a crash never sees half a file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@dataclass
class CacheStats:
    """How many entries a run needed and how many it encoded."""

    text_total: int = 0
    text_encoded: int = 0
    latent_total: int = 0
    latent_encoded: int = 0


class FeatureCache:
    """Paths and loading of cached entries under `root`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def text_path(self, key: str) -> Path:
        """The file of a caption's embeddings."""
        return self.root / "text" / f"{key}.safetensors"

    def latent_path(self, key: str) -> Path:
        """The file of an image entry's latent."""
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def load_text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 prompt_embeds (L, D), CLIP pooled (P,)) of a cached caption."""
        from safetensors.torch import load_file

        d = load_file(str(self.text_path(key)))
        return d["prompt_embeds"], d["pooled"]

    def load_latent(self, key: str) -> torch.Tensor:
        """The normalized latent (C, h, w) of a cached image entry."""
        from safetensors.torch import load_file

        return load_file(str(self.latent_path(key)))["latent"]

    def mask_path(self, key: str) -> Path:
        """The file of a loss mask at latent resolution."""
        return self.root / "masks" / key[:2] / f"{key}.safetensors"

    def load_mask(self, key: str) -> torch.Tensor:
        """The loss mask (h, w), float32 in [0, 1], of a cached mask entry."""
        from safetensors.torch import load_file

        return load_file(str(self.mask_path(key)))["mask"]

    # ----------------------------------------------------------------------------------- text

    def missing_text(self, keyed_captions: Mapping[str, str], rank: int = 0, world_size: int = 1) -> dict[str, str]:
        """Captions without a cache file, among this rank's share of the keys (`shard_of`: the shares are
        disjoint, so no other rank writes them and the answer cannot race)."""
        return {k: keyed_captions[k] for k in shard_of(keyed_captions, rank, world_size)
                if not self.text_path(k).is_file()}

    def encode_text(self, encoders, keyed_captions: Mapping[str, str], device, batch_size: int | None = None,
                    max_sequence_length: int = 512, progress: ProgressFn | None = None, rank: int = 0,
                    world_size: int = 1, contiguous_bias: bool = True) -> int:
        """Encode and store every caption (key -> text) whose file is missing, exactly as FluxKontextPipeline
        encodes a prompt (its own encode_prompt), `batch_size` captions per call (None: `auto_cache_batch_size`).
        Returns how many were encoded. With world_size > 1 this rank encodes only its share (`shard_of`); the caller
        puts a barrier after it.

        `contiguous_bias` runs T5 with its position bias contiguous (`encode.patch_t5_position_bias`, undone on
        return): the same numbers on the CPU, about twice the speed on CUDA, where the fused attention kernel then
        rounds differently in the last bits. Files are written on a background thread while the next batch is
        encoded; `progress("text", done, total)` follows the files written."""
        from diffusers import FluxKontextPipeline

        todo = sorted(self.missing_text(keyed_captions, rank, world_size).items())
        if not todo:
            return 0
        device = torch.device(device)
        batch_size = batch_size or auto_cache_batch_size(device, "text")
        pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=encoders.text_encoder,
                                   tokenizer=encoders.tokenizer, text_encoder_2=encoders.text_encoder_2,
                                   tokenizer_2=encoders.tokenizer_2, transformer=None)
        if progress:
            progress("text", 0, len(todo))
        patched = encode_mod.patch_t5_position_bias(encoders.text_encoder_2) if contiguous_bias else 0
        report = (lambda n: progress("text", n, len(todo))) if progress else None
        try:
            with encode_mod.BoundedWriter(depth=2, threads=2, on_written=report) as writer, torch.no_grad():
                for i in range(0, len(todo), batch_size):
                    chunk = todo[i:i + batch_size]
                    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=[c for _, c in chunk], prompt_2=None,
                                                                  device=device,
                                                                  max_sequence_length=max_sequence_length)
                    (prompt_embeds, pooled), ready = encode_mod.to_host(prompt_embeds, pooled)
                    writer.submit(self._write_text, chunk, prompt_embeds, pooled, ready)
                return writer.drain()
        finally:
            if patched:
                encode_mod.unpatch_t5_position_bias(encoders.text_encoder_2)

    def _write_text(self, chunk, prompt_embeds: torch.Tensor, pooled: torch.Tensor, ready) -> int:
        encode_mod.wait(ready)
        for j, (key, caption) in enumerate(chunk):
            _save_or_raise({"prompt_embeds": prompt_embeds[j], "pooled": pooled[j]}, self.text_path(key),
                           {"caption": caption[:4000]})
        return len(chunk)

    # ----------------------------------------------------------------------------------- latents

    def missing_latents(self, keyed_entries: Mapping[str, ImageEntry], rank: int = 0,
                        world_size: int = 1) -> dict[str, ImageEntry]:
        """Entries without a cache file, among this rank's share of the keys (as `missing_text`)."""
        return {k: keyed_entries[k] for k in shard_of(keyed_entries, rank, world_size)
                if not self.latent_path(k).is_file()}

    def encode_latents(self, vae, keyed_entries: Mapping[str, ImageEntry], device, batch_size: int | None = None,
                       load_image: Callable | None = None, progress: ProgressFn | None = None, rank: int = 0,
                       world_size: int = 1, workers: int | None = None, speedups: Iterable[str] = ()) -> int:
        """VAE-encode every missing entry (grouped by size, `batch_size` per call; None: `auto_cache_batch_size`)
        and store it normalized. On-demand references are synthesized (`load_entry_image`). With world_size > 1 this
        rank encodes the missing entries of its share of the keys (`shard_of`); the caller puts a barrier after it.

        Pipelined, with the batches (so the bytes) of a sequential loop: `workers` threads (None: up to 8) decode
        and convert the images of the next two batches while the device encodes the current one; latents come back
        through pinned memory without a sync; files are written on a background thread. A file that cannot be read
        raises CacheError naming it, after the work in flight has settled (no temp file is left).
        `progress("latents", done, total)` follows the files written. `speedups`: `encode.vae_speedups` (off by
        default: they change the latents in the last bits)."""
        todo = self.missing_latents(keyed_entries, rank, world_size)
        if not todo:
            return 0
        device = torch.device(device)
        by_size: dict[tuple[int, int], list[tuple[str, ImageEntry]]] = {}
        for key, entry in sorted(todo.items()):
            by_size.setdefault(entry.size, []).append((key, entry))
        if not batch_size:
            w, h = max(by_size, key=lambda s: s[0] * s[1])
            batch_size = auto_cache_batch_size(device, "vae", pixels=w * h, dtype=vae.dtype)
        chunks = [items[i:i + batch_size] for items in by_size.values() for i in range(0, len(items), batch_size)]
        if progress:
            progress("latents", 0, len(todo))
        report = (lambda n: progress("latents", n, len(todo))) if progress else None
        pin = device.type == "cuda"
        loader = ThreadPoolExecutor(max_workers=_threads(workers),
                                    thread_name_prefix="kontext-cache-load")
        ahead: deque = deque()

        def start(chunk):
            w, h = chunk[0][1].size
            buf = torch.empty((len(chunk), h, w, 3), dtype=vae.dtype, pin_memory=pin)
            return buf, [loader.submit(load_entry_into, e, load_image, buf, j) for j, (_, e) in enumerate(chunk)]

        try:
            with encode_mod.BoundedWriter(depth=2, on_written=report) as writer, \
                    encode_mod.vae_speedups(vae, speedups):
                ahead.extend(start(c) for c in chunks[:2])  # at most two batches decoded ahead
                for i, chunk in enumerate(chunks):
                    buf, loads = ahead.popleft()
                    odd = [f.result() for f in loads]  # a worker's CacheError is raised here
                    if i + 2 < len(chunks):
                        ahead.append(start(chunks[i + 2]))
                    if any(odd):
                        # an image whose size is not the batch's: the whole-batch conversion, as it always was
                        x = images_to_tensor([load_entry_image(e, load_image) for _, e in chunk])
                        x = x.to(device=device, dtype=vae.dtype)
                    else:
                        # (B, H, W, 3) -> (B, 3, H, W): images_to_tensor's own layout, so the convolutions get the
                        # input they always got
                        x = buf.to(device, non_blocking=True).permute(0, 3, 1, 2)
                    (latents,), ready = encode_mod.to_host(_vae_encode(vae, x))
                    del x, buf
                    writer.submit(self._write_latents, chunk, latents, ready)
                return writer.drain()
        finally:
            for _, loads in ahead:
                for f in loads:
                    f.cancel()
            loader.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------- masks

    def missing_masks(self, keyed_entries: Mapping[str, ImageEntry], rank: int = 0,
                      world_size: int = 1) -> dict[str, ImageEntry]:
        """Masks without a cache file, among this rank's share of the keys (as `missing_text`)."""
        return {k: keyed_entries[k] for k in shard_of(keyed_entries, rank, world_size)
                if not self.mask_path(k).is_file()}

    def encode_masks(self, keyed_entries: Mapping[str, ImageEntry], progress: ProgressFn | None = None,
                     rank: int = 0, world_size: int = 1, workers: int | None = None) -> int:
        """Compute and store every missing mask of this rank's share (`mask_latent`) on `workers` threads (None: up to
        8; PIL and torch release the GIL while decoding and resizing). No model is needed. Returns how many were
        written. A mask that cannot be read raises CacheError naming it, after the work in flight has settled.
        `progress("masks", done, total)` follows the files written."""
        todo = sorted(self.missing_masks(keyed_entries, rank, world_size).items())
        if not todo:
            return 0
        if progress:
            progress("masks", 0, len(todo))

        def one(item) -> None:
            key, entry = item
            try:
                mask = mask_latent(entry)
            except Exception as exc:
                raise CacheError(entry.path, f"{entry.path}: cannot read this loss mask ({type(exc).__name__}: "
                                             f"{exc})") from exc
            _save_or_raise({"mask": mask}, self.mask_path(key), {"path": entry.path, "hash": entry.file_hash})

        done = 0
        with ThreadPoolExecutor(max_workers=_threads(workers),
                                thread_name_prefix="kontext-cache-mask") as pool:
            futures = [pool.submit(one, item) for item in todo]
            try:
                for f in futures:
                    f.result()
                    done += 1
                    if progress:
                        progress("masks", done, len(todo))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return done

    def _write_latents(self, chunk, latents: torch.Tensor, ready) -> int:
        encode_mod.wait(ready)
        for j, (key, entry) in enumerate(chunk):
            _save_or_raise({"latent": latents[j]}, self.latent_path(key),
                           {"path": entry.path, "hash": entry.file_hash, "synth": entry.synth})
        return len(chunk)


def _threads(workers: int | None) -> int:
    """Threads of a loader pool: `workers`, else one per CPU up to 8 (decoding and resizing release the GIL)."""
    from kontext_data.workers import available_cpus

    return workers or min(8, available_cpus())


def _save_or_raise(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    try:
        save_entry(tensors, path, metadata)
    except Exception as exc:
        raise CacheError(str(path), f"{path}: cannot write this cache file ({type(exc).__name__}: {exc})") from exc


def load_entry_into(entry: ImageEntry, load_image: Callable | None, buf: torch.Tensor, j: int) -> bool:
    """Decode one entry and write its `images_to_tensor` values into row j of the batch buffer (B, H, W, 3), in
    the buffer's dtype (the same rounding as `.to(dtype)`). Runs in a loader thread (PIL, NumPy and torch release
    the GIL here). True: the image is not of the batch's size (the caller converts the whole batch itself)."""
    try:
        img = load_entry_image(entry, load_image)
        if (img.size[1], img.size[0]) != tuple(buf.shape[1:3]) or img.size[0] % 16 or img.size[1] % 16:
            return True
        x = images_to_tensor([img])
        if x.shape[1] != 3:
            return True
        buf[j].copy_(x[0].permute(1, 2, 0))
        return False
    except Exception as exc:
        what = "synthesize the on-demand reference from" if entry.synth else "read"
        raise CacheError(entry.path, f"{entry.path}: cannot {what} this image ({type(exc).__name__}: {exc})") from exc


def auto_cache_batch_size(device, kind: str, pixels: int = 1024 * 1024, dtype: torch.dtype = torch.bfloat16) -> int:
    """The batch size of `encode_latents` (kind "vae" or "latents") or `encode_text` (kind "text") when the user
    set none. `pixels`: the largest image's pixel count (encode_latents passes it when its batch_size is None).

    Off CUDA: 1 (what the cache always used; larger batches buy little on a CPU). On CUDA: text 16 captions (T5-XXL
    at 512 tokens is compute-bound from there); VAE 8 images at 1 MP (H100: ~34 images/s against ~20 at batch 1,
    ~12 GiB), more for smaller images (the same ~8 MP per call), never more than 16, and fewer where the free memory
    would not hold them (~1.5 GiB per MP in bf16, twice that in fp32)."""
    if kind not in ("vae", "latents", "text"):
        raise ValueError(f"auto_cache_batch_size: kind must be 'vae' (or 'latents') or 'text', not {kind!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    free = _available_gpu_bytes(device)
    if kind == "text":  # activations of T5-XXL at 512 tokens: ~0.1 GiB per caption beside its weights
        return max(1, min(16, int(0.8 * free // (0.12 * 2**30))))
    mp = max(pixels, 1) / 2**20
    by_speed = round(8 / mp)
    per_image = 1.5 * 2**30 * mp * torch.tensor([], dtype=dtype).element_size() / 2
    return max(1, min(16, by_speed, int(0.8 * free // per_image)))


def _available_gpu_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: the card's free memory plus what PyTorch holds unused,
    within the share torch.cuda.set_per_process_memory_fraction allows (memory_limit_gib)."""
    if device.index is None:  # torch.cuda's memory-fraction query refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(max(0, min(available, fraction * total - allocated)))


def images_to_tensor(images: Iterable) -> torch.Tensor:
    """PIL RGB images of one size -> (B, 3, H, W) in [-1, 1], as the pipeline's VaeImageProcessor does."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=16)
    images = list(images)
    w, h = images[0].size
    return proc.preprocess(images, height=h, width=w)


def encode_images(vae, images, device) -> torch.Tensor:
    """Normalized latents `(mode - shift_factor) * scaling_factor` of PIL images (same size), on the CPU."""
    x = images_to_tensor(images).to(device=device, dtype=vae.dtype)
    return _vae_encode(vae, x).to("cpu")


def _vae_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Normalized latents of a batch already on the VAE's device, left there."""
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    return (mode - vae.config.shift_factor) * vae.config.scaling_factor
