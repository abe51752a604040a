#!/usr/bin/env python
"""Where the caching time goes: kontext-train's text and latent caches against their encoders alone.

Full-size random encoders built in memory on the GPU (T5-XXL, CLIP-L and FLUX's VAE: the classes and configurations
of `kontext-train make-random-model --full`, no download, no disk), synthetic captions (unique, 512 tokens each as
the cache pads them) and smooth random JPEGs at --size:
- text: T5 alone (its forward at the cache's batch size, contiguous position bias, median of timed calls), then
  `FeatureCache.encode_text` over --captions captions twice, each into an empty cache (the first pays the first
  CUDA calls; the second shows the steady rate), with the seconds to the first file written;
- latents: the VAE alone (its encode of a batch already on the device), the same with a sequential loop's CPU share
  (`cache.encode_images`: PIL -> tensor, copies, latents back; the GPU run of 2026-12-05 recorded only this one,
  as `vae_alone_per_s`), then `FeatureCache.encode_latents`
  over --images images into an empty cache, once per --vae-speedups set (`encode.vae_speedups`: off by default in
  the trainer because they change the latents in the last bits).
Prints the rates with the machine and writes JSON to benchmarks/results/bench_cache-<gpu>-<date>.json.

GPU:  python benchmarks/bench_cache.py --captions 320 --images 256
CPU:  python benchmarks/bench_cache.py --tiny --device cpu --captions 4 --images 4 --size 64   (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_smoke import machine_info, no_cuda  # noqa: E402
from machine import results_file  # noqa: E402
from t5_bias_check import CAPTIONS, captions_per_s, items_per_s, sync  # noqa: E402


def build_encoders(variant: str, device: torch.device, dtype: torch.dtype):
    """The text encoders (as model.load_text_encoders returns them) and the VAE, random, built on `device`."""
    from kontext_trainer import builder
    from kontext_trainer.model import TextEncoders

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        parts = {n: builder.build_component(n, variant, str(device), dtype)
                 for n in ("text_encoder", "text_encoder_2", "vae")}
    enc = TextEncoders(tokenizer=builder.build_tokenizer("tokenizer", variant), text_encoder=parts["text_encoder"],
                       tokenizer_2=builder.build_tokenizer("tokenizer_2", variant),
                       text_encoder_2=parts["text_encoder_2"])
    return enc, parts["vae"]


def write_images(folder: Path, n: int, size: int) -> list:
    """`n` smooth random RGB JPEGs of size x size (low-frequency noise: decodes like a photo, not like static), as
    cache ImageEntry objects of a plain size x size crop."""
    import numpy as np
    from PIL import Image

    from kontext_trainer.cache import ImageEntry

    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        path = folder / f"img_{i:05d}.jpg"
        img.save(path, quality=90)
        geometry = {"intermediary_width": size, "intermediary_height": size, "crop_left": 0, "crop_top": 0,
                    "bucket_width": size, "bucket_height": size}
        entries.append(ImageEntry.from_geometry(str(path), f"synthetic-{i}", geometry))
    return entries


class Clock:
    """Seconds from start to each progress report, for the time to the first file and the steady rate."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def __call__(self, stage, done, total):
        self.marks.append((time.perf_counter() - self.t0, done))

    def summary(self, total_s: float, n: int) -> dict:
        done = [(t, d) for t, d in self.marks if d > 0]
        out = {"items": n, "seconds": round(total_s, 3), "per_s": round(n / total_s, 2)}
        if done:
            first_t, first_n = done[0]
            out["first_file_s"] = round(first_t, 3)
            if n > first_n and total_s > first_t:
                out["after_first_batch_per_s"] = round((n - first_n) / (total_s - first_t), 2)
        return out


def timed(fn, device: torch.device, clock: Clock) -> float:
    sync(device)
    t = time.perf_counter()
    clock.t0 = t
    fn()
    sync(device)
    return time.perf_counter() - t


def text_part(args, enc, device, work: Path) -> dict:
    from kontext_trainer.cache import FeatureCache, auto_cache_batch_size
    from kontext_trainer.encode import patch_t5_position_bias, unpatch_t5_position_bias

    batch = args.batch_text or auto_cache_batch_size(device, "text")
    ids = enc.tokenizer_2([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], padding="max_length", max_length=512,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    patch_t5_position_bias(enc.text_encoder_2)
    out = {"batch": batch, "t5_alone_per_s": round(captions_per_s(enc.text_encoder_2, ids, device, 5), 2)}
    unpatch_t5_position_bias(enc.text_encoder_2)
    captions = {f"k{i:06d}": f"{CAPTIONS[i % len(CAPTIONS)]} (take {i})" for i in range(args.captions)}
    for run in ("first", "second"):
        cache, clock = FeatureCache(work / f"text-{run}"), Clock()
        seconds = timed(lambda: cache.encode_text(enc, captions, device, batch, progress=clock), device, clock)
        out[f"cache_{run}"] = clock.summary(seconds, len(captions))
    return out


def latent_part(args, vae, device, work: Path) -> dict:
    from kontext_trainer.cache import (FeatureCache, auto_cache_batch_size, encode_images, images_to_tensor,
                                       load_entry_image)
    from kontext_trainer.encode import vae_speedups

    entries = write_images(work / "images", args.images, args.size)
    batch = args.batch_vae or auto_cache_batch_size(device, "vae", pixels=args.size * args.size, dtype=vae.dtype)
    images = [load_entry_image(e) for e in entries[:batch]]
    x = images_to_tensor(images).to(device=device, dtype=vae.dtype)

    def rate(fn) -> float:
        return round(items_per_s(fn, batch, device, 3), 2)

    with torch.no_grad():
        vae_alone = rate(lambda: vae.encode(x).latent_dist.mode())
    # the same with the CPU's share of a sequential loop: PIL -> tensor, the copies, the latents back on the CPU
    out = {"batch": batch, "vae_alone_per_s": vae_alone,
           "vae_with_preprocessing_per_s": rate(lambda: encode_images(vae, images, device)), "cache": {}}
    keyed = {f"k{i:06d}": e for i, e in enumerate(entries)}
    for spec in args.vae_speedups:
        names = () if spec == "none" else tuple(spec.split(","))
        cache, clock = FeatureCache(work / f"latents-{spec.replace(',', '+')}"), Clock()
        seconds = timed(lambda: cache.encode_latents(vae, keyed, device, batch, progress=clock, speedups=names),
                        device, clock)
        out["cache"][spec] = clock.summary(seconds, len(keyed))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny encoders (CPU run that keeps this script working)")
    ap.add_argument("--captions", type=int, default=320)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch-text", type=int, default=None, help="captions per call (default: the cache's)")
    ap.add_argument("--batch-vae", type=int, default=None, help="images per call (default: the cache's)")
    ap.add_argument("--vae-speedups", nargs="+", default=["none", "channels_last,cudnn_benchmark",
                                                           "channels_last,cudnn_benchmark,compile"],
                    help="sets of encode.vae_speedups to time the latent cache with ('none': the default path)")
    ap.add_argument("--parts", nargs="+", default=["text", "latents"], choices=["text", "latents"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if no_cuda(device, "use --tiny --device cpu"):
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = machine_info(device)
    print(json.dumps(info), flush=True)
    t = time.perf_counter()
    enc, vae = build_encoders("tiny" if args.tiny else "full", device, dtype)
    result = {"machine": info, "variant": "tiny" if args.tiny else "full (random)", "size": args.size,
              "build_s": round(time.perf_counter() - t, 1)}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        if "text" in args.parts:
            result["text"] = r = text_part(args, enc, device, work)
            print(f"text (batch {r['batch']}): T5 alone {r['t5_alone_per_s']} captions/s; cache "
                  + "; ".join(f"{k[6:]} run {v['per_s']}/s (first file {v.get('first_file_s')} s, then "
                              f"{v.get('after_first_batch_per_s')}/s)" for k, v in r.items() if k.startswith("cache_")),
                  flush=True)
        if "latents" in args.parts:
            result["latents"] = r = latent_part(args, vae, device, work)
            print(f"latents at {args.size} px (batch {r['batch']}): VAE alone {r['vae_alone_per_s']} images/s "
                  f"({r['vae_with_preprocessing_per_s']} with a sequential loop's CPU work); cache "
                  + "; ".join(f"{k}: {v['per_s']}/s (then {v.get('after_first_batch_per_s')}/s)"
                              for k, v in r["cache"].items()), flush=True)
    out = args.out or results_file("bench_cache", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
