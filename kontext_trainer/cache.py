"""On-disk caches of text embeddings and VAE latents, keyed by content, never by step order.

In: the captions and the image entries of a manifest, a model directory. Out: one safetensors file per unique
caption (`text/<key>.safetensors`: T5 `prompt_embeds` (L, D) and CLIP `pooled` (P,)) and one per image entry
(`latents/<k2>/<key>.safetensors`: `latent` (C, h, w), already normalized as `(mode - shift) * scale`).

Keys:
- text:   xxh3_128 of (CLIP + T5 fingerprints, max_sequence_length, the caption text);
- latent: xxh3_128 of (VAE fingerprint, the file's manifest hash, its size and mtime, the six geometry fields,
  the dtype). A changed file (even without a new manifest), crop or VAE re-encodes that entry only.
  An on-demand reference (`kontext-data degrade --on-demand`: no file, synthesized from its source with the
  record's seed) adds the record's `params_hash` and `seed` to the key of its source file: the record fixes
  every random draw, so its pixels are the same on every call and its latent is cached like any other.
Reshuffling, resuming or editing the manifest cannot pair a caption with the wrong image: a sample looks its
entries up by its own content keys. Files are written to a temp name and renamed (atomic).

The library never prints: `progress(stage, done, total)` is called while encoding.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from kontext_data.manifest import GEOMETRY_FIELDS

ProgressFn = Callable[[str, int, int], None]
CACHE_FORMAT = 1


def _hash(obj: Any) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(obj, sort_keys=True, default=str).encode())


def text_key(encoder_fingerprint: str, caption: str, max_sequence_length: int) -> str:
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
        return ImageEntry(path=str(path), file_hash=file_hash,
                          geometry=tuple(int(geometry[k]) for k in GEOMETRY_FIELDS), synth=synth)

    @property
    def on_demand(self) -> bool:
        return bool(self.synth)

    @property
    def synth_record(self) -> dict:
        return json.loads(self.synth) if self.synth else {}

    @property
    def geometry_dict(self) -> dict[str, int]:
        return dict(zip(GEOMETRY_FIELDS, self.geometry))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the final crop."""
        g = self.geometry_dict
        return g["bucket_width"], g["bucket_height"]


def latent_key(vae_fingerprint: str, entry: ImageEntry, dtype: str) -> str:
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
    return _hash(key)


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


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class CacheStats:
    text_total: int = 0
    text_encoded: int = 0
    latent_total: int = 0
    latent_encoded: int = 0


class FeatureCache:
    """Paths and loading of cached entries under `root`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def text_path(self, key: str) -> Path:
        return self.root / "text" / f"{key}.safetensors"

    def latent_path(self, key: str) -> Path:
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def load_text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        d = load_file(str(self.text_path(key)))
        return d["prompt_embeds"], d["pooled"]

    def load_latent(self, key: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.latent_path(key)))["latent"]

    # ----------------------------------------------------------------------------------- text

    def missing_text(self, keyed_captions: Mapping[str, str], rank: int = 0, world_size: int = 1) -> dict[str, str]:
        """Captions without a cache file, among this rank's share of the keys (`shard_of`: the shares are
        disjoint, so no other rank writes them and the answer cannot race)."""
        return {k: keyed_captions[k] for k in shard_of(keyed_captions, rank, world_size)
                if not self.text_path(k).is_file()}

    def encode_text(self, encoders, keyed_captions: Mapping[str, str], device, batch_size: int,
                    max_sequence_length: int, progress: ProgressFn | None = None, rank: int = 0,
                    world_size: int = 1) -> int:
        """Encode and store every caption (key -> text) whose file is missing, exactly as FluxKontextPipeline
        encodes a prompt (its own encode_prompt). Returns how many were encoded. With world_size > 1 this rank
        encodes only its share (`shard_of`); the caller puts a barrier after it."""
        from diffusers import FluxKontextPipeline

        todo = sorted(self.missing_text(keyed_captions, rank, world_size).items())
        if not todo:
            return 0
        pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=encoders.text_encoder,
                                   tokenizer=encoders.tokenizer, text_encoder_2=encoders.text_encoder_2,
                                   tokenizer_2=encoders.tokenizer_2, transformer=None)
        done = 0
        if progress:
            progress("text", 0, len(todo))
        with torch.no_grad():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=[c for _, c in chunk], prompt_2=None,
                                                              device=torch.device(device),
                                                              max_sequence_length=max_sequence_length)
                for j, (key, caption) in enumerate(chunk):
                    _atomic_save({"prompt_embeds": prompt_embeds[j], "pooled": pooled[j]}, self.text_path(key),
                                 {"caption": caption[:4000]})
                done += len(chunk)
                if progress:
                    progress("text", done, len(todo))
        return done

    # ----------------------------------------------------------------------------------- latents

    def missing_latents(self, keyed_entries: Mapping[str, ImageEntry], rank: int = 0,
                        world_size: int = 1) -> dict[str, ImageEntry]:
        """Entries without a cache file, among this rank's share of the keys (as `missing_text`)."""
        return {k: keyed_entries[k] for k in shard_of(keyed_entries, rank, world_size)
                if not self.latent_path(k).is_file()}

    def encode_latents(self, vae, keyed_entries: Mapping[str, ImageEntry], device, batch_size: int,
                       load_image: Callable | None = None, progress: ProgressFn | None = None, rank: int = 0,
                       world_size: int = 1) -> int:
        """VAE-encode every missing entry (grouped by size, `batch_size` per call) and store it normalized.
        On-demand references are synthesized (`load_entry_image`). With world_size > 1 this rank encodes the
        missing entries of its share of the keys (`shard_of`); the caller puts a barrier after it."""
        todo = self.missing_latents(keyed_entries, rank, world_size)
        if not todo:
            return 0
        by_size: dict[tuple[int, int], list[tuple[str, ImageEntry]]] = {}
        for key, entry in sorted(todo.items()):
            by_size.setdefault(entry.size, []).append((key, entry))
        done = 0
        if progress:
            progress("latents", 0, len(todo))
        for items in by_size.values():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                images = [load_entry_image(e, load_image) for _, e in chunk]
                latents = encode_images(vae, images, device)
                for j, (key, entry) in enumerate(chunk):
                    _atomic_save({"latent": latents[j]}, self.latent_path(key),
                                 {"path": entry.path, "hash": entry.file_hash, "synth": entry.synth})
                done += len(chunk)
                if progress:
                    progress("latents", done, len(todo))
        return done


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
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    z = (mode - vae.config.shift_factor) * vae.config.scaling_factor
    return z.to("cpu")
