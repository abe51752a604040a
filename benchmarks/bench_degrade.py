"""Benchmark of `kontext-data degrade` against two baselines measured in the same run.

    .venv/bin/python benchmarks/bench_degrade.py [--n 200] [--st-images 60] [--json-out FILE]

On N generated ~1 MP JPEG photos-like images (1152x896, q95) it prints images/s for the chains
- jpeg: 2 rounds, quality drawn in 10-30 (the guide's jpeg_artifacts block),
- blur: Gaussian radius 3 + noise 0.02 (the guide's superresolution block),
with 1 worker and with all cores, for:
- command: kontext_data.degrade.run_degrade (what the CLI runs, with seeds, records, atomic renames);
- fastest: a plain loop / plain Pool over the same files with the fastest call found for each stage (decode,
  filter, noise, encode: picked by the per-stage micro-benchmark printed first), writing the files, no framework;
- simpletuner: the same chain done the way SimpleTuner's generators do it (PIL decode, PIL GaussianBlur, float64
  NumPy noise, PIL save with default settings: PNG for the blur chain, as for .png sources, so that both sides
  write lossless files; the jpeg chain saves JPEG as SimpleTuner does for .jpg sources, i.e. with its extra q75
  pass); run on --st-images images.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

import cv2
import numpy as np
import PIL
from PIL import Image, ImageFilter, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kontext_data import degradations as D  # noqa: E402
from kontext_data.degrade import DegradeConfig, build_chain, run_degrade  # noqa: E402
from kontext_data.workers import available_cpus, tune_malloc  # noqa: E402

W, H = 1152, 896
JPEG_Q = (10, 30)
BLUR_SIGMA = 3.0
NOISE = 0.02




def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)
        img = cv2.resize(low, (W, H), interpolation=cv2.INTER_CUBIC)
        mid = cv2.resize(rng.integers(0, 256, (112, 144, 3), dtype=np.uint8), (W, H),
                         interpolation=cv2.INTER_LINEAR)
        img = cv2.addWeighted(img, 0.8, mid, 0.2, 0)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))  # sensor-like fine detail
        p = folder / f"sub{i % 4}" / f"img_{i:04d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------- per-stage micro bench


def _t(fn, n=15) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def stage_table(sample: Path) -> list[tuple[str, str, float]]:
    cv2.setNumThreads(1)
    data = sample.read_bytes()
    arr = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    rng = np.random.default_rng(0)
    noise16 = np.empty(bgr.shape, np.int16)
    blurred = cv2.GaussianBlur(bgr, (0, 0), BLUR_SIGMA)
    noisy = cv2.add(blurred, rng.integers(-5, 6, bgr.shape).astype(np.int16), dtype=cv2.CV_8U)
    noisy_pil = Image.fromarray(noisy)

    def pil_save(img, fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b

    def cv_noise():
        cv2.randn(noise16.reshape(bgr.shape[0], -1), 0.0, NOISE * 255)
        return cv2.add(blurred, noise16, dtype=cv2.CV_8U)

    rows = [
        ("decode 1MP JPEG", "OpenCV imdecode", _t(lambda: cv2.imdecode(arr, cv2.IMREAD_COLOR))),
        ("decode 1MP JPEG", "OpenCV imdecode RGB", _t(lambda: cv2.imdecode(arr, cv2.IMREAD_COLOR_RGB))),
        ("decode 1MP JPEG", "PIL open+convert+asarray",
         _t(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))),
        ("gaussian blur s3", "OpenCV GaussianBlur", _t(lambda: cv2.GaussianBlur(bgr, (0, 0), BLUR_SIGMA))),
        ("gaussian blur s3", "PIL GaussianBlur(3)", _t(lambda: pil.filter(ImageFilter.GaussianBlur(3)), 5)),
        ("gaussian noise", "OpenCV randn int16 + saturating add", _t(cv_noise)),
        ("gaussian noise", "NumPy Generator float32", _t(lambda: np.clip(
            blurred + rng.standard_normal(bgr.shape, dtype=np.float32) * np.float32(NOISE * 255), 0, 255)
            .astype(np.uint8))),
        ("gaussian noise", "NumPy float64 (SimpleTuner)", _t(lambda: (np.clip(
            blurred.astype(np.float32) / 255 + np.random.normal(0, NOISE, bgr.shape), 0, 1) * 255)
            .astype(np.uint8), 5)),
        ("encode JPEG q20", "OpenCV imencode", _t(lambda: cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 20]))),
        ("encode JPEG q20", "PIL save", _t(lambda: pil_save(pil, "JPEG", quality=20))),
        ("lossless PNG (noisy)", "OpenCV level1 huffman+up (chosen)",
         _t(lambda: cv2.imencode(".png", noisy, list(D.PNG_ENCODE_PARAMS)), 5)),
        ("lossless PNG (noisy)", "OpenCV default (level1 rle+sub)", _t(lambda: cv2.imencode(".png", noisy), 5)),
        ("lossless PNG (noisy)", "PIL compress_level=1", _t(lambda: pil_save(noisy_pil, "PNG", compress_level=1), 3)),
        ("lossless PNG (noisy)", "PIL default (level 6)", _t(lambda: pil_save(noisy_pil, "PNG"), 3)),
        ("lossless WebP (noisy)", "OpenCV webp lossless",
         _t(lambda: cv2.imencode(".webp", noisy, [cv2.IMWRITE_WEBP_QUALITY, 101]), 2)),
    ]
    sizes = {
        "png chosen": len(cv2.imencode(".png", noisy, list(D.PNG_ENCODE_PARAMS))[1]),
        "png opencv default": len(cv2.imencode(".png", noisy)[1]),
        "png PIL default": len(pil_save(noisy_pil, "PNG").getvalue()),
    }
    return rows, sizes


# ------------------------------------------------------------------------------------- baselines


class Fastest:
    """No framework: fastest call per stage, BGR throughout (no colour conversions), one write per file."""

    def __init__(self, src: Path, out: Path, kind: str):
        self.src, self.out, self.kind = src, out, kind

    def __call__(self, rel: str) -> int:
        data = np.fromfile(self.src / rel, np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
        seed = hash(rel) & 0x7FFFFFFF
        if self.kind == "jpeg":
            q = 10 + seed % 21
            buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1]
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, max(1, int(q * 0.9))])[1]
            dst = self.out / rel
        else:
            img = cv2.GaussianBlur(img, (0, 0), BLUR_SIGMA)
            noise = np.empty(img.shape, np.int16)
            cv2.setRNGSeed(seed)
            cv2.randn(noise.reshape(img.shape[0], -1), 0.0, NOISE * 255)
            img = cv2.add(img, noise, dtype=cv2.CV_8U)
            buf = cv2.imencode(".png", img, list(D.PNG_ENCODE_PARAMS))[1]
            dst = (self.out / rel).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            f.write(buf)
        return 1


class SimpleTunerStyle:
    """PIL decode, PIL GaussianBlur, float64 NumPy noise, PIL save in the source's format (JPEG q75 for .jpg)."""

    def __init__(self, src: Path, out: Path, kind: str):
        self.src, self.out, self.kind = src, out, kind

    def __call__(self, rel: str) -> int:
        img = Image.open(self.src / rel).convert("RGB")
        if self.kind == "jpeg":
            q = np.random.randint(10, 31)
            for r in range(2):
                b = io.BytesIO()
                img.save(b, format="JPEG", quality=q if r == 0 else max(1, min(95, int(q * 0.9))))
                b.seek(0)
                img = Image.open(b).convert("RGB")
        else:
            img = img.filter(ImageFilter.GaussianBlur(radius=BLUR_SIGMA))
            arr = np.array(img).astype(np.float32) / 255.0
            arr = np.clip(arr + np.random.normal(0, NOISE, arr.shape), 0, 1)
            img = Image.fromarray((arr * 255).astype(np.uint8))
        if self.kind == "jpeg":  # SimpleTuner saves in the source's format: on .jpg an extra q75 lossy pass
            dst, fmt = self.out / rel, "JPEG"
        else:  # like for like with our lossless output: PNG, as SimpleTuner writes for .png sources
            dst, fmt = (self.out / rel).with_suffix(".png"), "PNG"
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, format=fmt)
        return 1


def _init_fast():
    cv2.setNumThreads(1)
    tune_malloc()


def _init_plain():
    cv2.setNumThreads(1)


def run_loop(job, rels: list[str], workers: int, init) -> float:
    t0 = time.perf_counter()
    if workers == 1:
        init()
        for r in rels:
            job(r)
    else:
        with mp.get_context("spawn").Pool(workers, initializer=init) as pool:
            for _ in pool.imap_unordered(job, rels, chunksize=4):
                pass
    return len(rels) / (time.perf_counter() - t0)


def run_command(src: Path, out: Path, kind: str, workers: int) -> float:
    if kind == "jpeg":
        chain = build_chain(["jpeg"], {"quality_mode": "range", "quality_range": list(JPEG_Q),
                                       "compression_rounds": 2})
    else:
        chain = build_chain(["blur"], {"blur_radius": BLUR_SIGMA, "add_noise": True, "noise_level": NOISE})
    cfg = DegradeConfig(src=src, out=out, chain=tuple(chain), captions=("deblur", "sharpen image"),
                        workers=workers)
    t0 = time.perf_counter()
    res = run_degrade(cfg)
    dt = time.perf_counter() - t0
    if res.failed or res.written != res.selected:
        raise SystemExit(f"command run failed: {res.to_json()}")
    return res.written / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--st-images", type=int, default=60, help="images for the slow SimpleTuner-style chain")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    cores = available_cpus()
    print(f"machine: {cpu_model()}, {cores} cores usable (host has {os.cpu_count()}), {platform.platform()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}, "
          f"pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')}, "
          f"zlib {features.version('zlib')})")
    tmp = Path(tempfile.mkdtemp(prefix="bench_degrade_"))
    try:
        src = tmp / "src"
        paths = make_images(src, args.n)
        rels = sorted(p.relative_to(src).as_posix() for p in paths)
        for p in paths:  # warm the page cache for every contender alike
            p.read_bytes()
        print(f"{args.n} images {W}x{H} JPEG q95, {sum(p.stat().st_size for p in paths) / 1e6:.0f} MB\n")

        rows, sizes = stage_table(paths[0])
        print("per-stage, 1 thread (ms per 1 MP image):")
        for stage, how, ms in rows:
            print(f"  {stage:22s} {how:38s} {ms:7.1f}")
        print("  PNG sizes (noisy 1 MP): " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
        print()

        results = {}
        worker_counts = [1] + ([cores] if cores > 1 else [])
        for kind in ("jpeg", "blur"):
            for w in worker_counts:
                r = {}
                out = tmp / f"out_{kind}_{w}"
                r["fastest"] = run_loop(Fastest(src, out / "fast", kind), rels, w, _init_fast)
                r["command"] = run_command(src, out / "cmd", kind, w)
                st_rels = rels[: args.st_images]
                r["simpletuner"] = run_loop(SimpleTunerStyle(src, out / "st", kind), st_rels, w, _init_plain)
                shutil.rmtree(out, ignore_errors=True)
                results[(kind, w)] = r
        print(f"throughput (images/s; simpletuner-style on {min(args.st_images, args.n)} images):")
        print(f"  {'chain':6s} {'workers':>7s} {'command':>9s} {'fastest':>9s} {'simpletuner':>12s} "
              f"{'cmd/fastest':>12s} {'cmd/ST':>7s}")
        for (kind, w), r in results.items():
            print(f"  {kind:6s} {w:7d} {r['command']:9.1f} {r['fastest']:9.1f} {r['simpletuner']:12.1f} "
                  f"{r['command'] / r['fastest']:11.0%} {r['command'] / r['simpletuner']:6.1f}x")
        if cores > 1:
            for kind in ("jpeg", "blur"):
                s = results[(kind, cores)]["command"] / results[(kind, 1)]["command"]
                print(f"  scaling {kind}: command 1 -> {cores} workers: {s:.2f}x")
        if args.json_out:
            args.json_out.write_text(json.dumps({
                "cpu": cpu_model(), "cores": cores, "n": args.n,
                "stages_ms": [{"stage": s, "how": h, "ms": m} for s, h, m in rows],
                "throughput": [{"chain": k, "workers": w, **r} for (k, w), r in results.items()],
            }, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
