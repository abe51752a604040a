#!/usr/bin/env python
"""Benchmark the content check (`kontext-data check`): cost per pair against baselines measured in the same run.

What it does:

1. Writes N edit pairs (default 400) with examples/make_sample.py at --size (default 1024 px, so ~1 MP; JPEG
   quality 95 with --jpeg, the default) and shuffles the references of a known 5 % of them on disk, then pairs them
   with `kontext_data.pairing` at --resolution (default 1024). Same arguments, same bytes.
   The scenes are flat shapes on plain or gradient backgrounds: they decode somewhat faster than photographs of
   the same size, so real data costs a little more per pair (decoding dominates).
2. Times, each over all N pairs, one after the other, page cache hot (a warm-up pass reads every file):
   * baseline "decode": one process opens both files of every pair with PIL and decodes them to RGB -- the floor
     of any check that looks at pixels;
   * baseline "load_image": one process runs `manifest.load_image` on both (the trainer's exact pixels: full
     decode, Lanczos resize, crop);
   * check, 1 process: `check_manifest(..., CheckConfig(workers=1))`;
   * check, all cores: `check_manifest(..., CheckConfig(workers=0))` (spawn pool; pool start-up counts).
3. Prints ms/pair, pairs/s and the ratio to each baseline, with the machine (CPU model, cores, Python and library
   versions), and the precision/recall of the "unrelated" flag on the shuffled 5 %.

Results: a table on stdout, JSON in benchmarks/results/bench_check-<hostname>-<date>[-n<N>-s<SIZE>].json (unless
--no-save) and --json PATH. The machine's CPU may be shared with other work: repeat a run before trusting a
difference of less than ~15 %.

Example:
    .venv/bin/python benchmarks/bench_check.py                    # 400 pairs of ~1 MP JPEGs
    .venv/bin/python benchmarks/bench_check.py --n 200 --size 512 --no-save
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from machine import RESULTS_DIR, machine_info as base_machine_info, package_version

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    return {**base_machine_info(),
            "libraries": {d: package_version(d) for d in ("numpy", "pillow", "opencv-python-headless", "pyarrow")}}


def make_dataset(work: Path, n: int, size: int, jpeg: bool, resolution: int) -> tuple[Path, set[str]]:
    import numpy as np

    from kontext_data.geometry import GeometryOptions
    from kontext_data.pairing import PairConfig, pair_folders

    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    ms.make_sample(work, n=n, size=size, seed=0, jpeg=jpeg)
    ext = ".jpg" if jpeg else ".png"
    rng = np.random.default_rng(0)
    square = [i for i in range(n) if i % 8 not in (3, 6)]
    chosen = sorted(int(i) for i in rng.choice(square, size=max(2, round(0.05 * n)), replace=False))
    paths = [work / "reference" / f"{ms._rel_stem(i, n)}{ext}" for i in chosen]
    data = [p.read_bytes() for p in paths]
    for j, p in enumerate(paths):
        p.write_bytes(data[(j + 1) % len(paths)])
    res = pair_folders(PairConfig(edited=work / "edited", references=(work / "reference",), out=work / "m.parquet",
                                  geometry=GeometryOptions(resolution=resolution), workers=0, cache_dir=None))
    if not res.manifest:
        raise SystemExit(f"pairing failed: {[p.message for p in res.problems][:5]}")
    return work / "m.parquet", {f"edited:{ms._rel_stem(i, n)}{ext}" for i in chosen}


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: .venv/bin/python benchmarks/bench_check.py --n 200 --size 512")
    ap.add_argument("--n", type=int, default=400, help="pairs (default 400)")
    ap.add_argument("--size", type=int, default=1024, help="long edge of the images in pixels (default 1024)")
    ap.add_argument("--resolution", type=int, default=1024, help="pairing resolution (default 1024)")
    ap.add_argument("--png", action="store_true", help="PNG files instead of JPEG (quality 95)")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the data (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/...json")
    args = ap.parse_args(argv)
    if args.n < 40 or not 64 <= args.size <= 4096:
        ap.error("--n must be >= 40 and --size between 64 and 4096")

    from PIL import Image

    from kontext_data.check import CheckConfig, check_manifest
    from kontext_data.manifest import load_image, read_manifest

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_check_"))
    try:
        t_make, (manifest, shuffled) = timed(lambda: make_dataset(work, args.n, args.size, not args.png, args.resolution))
        records = read_manifest(manifest).records()
        for r in records:  # warm the page cache
            Path(r["target_path"]).read_bytes()
            Path(r["reference_paths"][0]).read_bytes()

        def decode_all():
            for r in records:
                for p in (r["target_path"], r["reference_paths"][0]):
                    with Image.open(p) as im:
                        im.convert("RGB").load()

        def load_all():
            for r in records:
                load_image(r["target_path"], r)
                load_image(r["reference_paths"][0], r["reference_geometry"][0])

        n = len(records)
        runs = {}
        runs["baseline: decode both (PIL, 1 process)"] = timed(decode_all)[0]
        runs["baseline: load_image both (1 process)"] = timed(load_all)[0]
        t1, res1 = timed(lambda: check_manifest(manifest, CheckConfig(workers=1)))
        runs["check, 1 process"] = t1
        tn, resn = timed(lambda: check_manifest(manifest, CheckConfig(workers=0)))
        runs[f"check, {resn.workers} processes (spawn pool, start-up included)"] = tn
        flagged = {s.sample_id for s in resn.samples if "unrelated" in s.flags}
        tp = len(flagged & shuffled)
        precision, recall = tp / max(1, len(flagged)), tp / max(1, len(shuffled))
        same = [a.similarity for a in res1.samples] == [b.similarity for b in resn.samples]

        info = machine_info()
        base = runs["baseline: decode both (PIL, 1 process)"]
        print(f"bench_check: {n} pairs of {args.size} px {'PNG' if args.png else 'JPEG'} images, paired at "
              f"{args.resolution} (made in {t_make:.1f} s)")
        print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), Python {info['python']}, "
              + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()))
        print(f"{'run':<58} {'s':>7} {'ms/pair':>8} {'pairs/s':>8} {'vs decode':>9}")
        for name, t in runs.items():
            print(f"{name:<58} {t:7.2f} {1000 * t / n:8.2f} {n / t:8.1f} {base / t:8.2f}x")
        print(f"unrelated flag: precision {precision:.3f}, recall {recall:.3f} ({len(shuffled)} shuffled, "
              f"{len(flagged)} flagged); other flags: "
              + ", ".join(f"{k} {v}" for k, v in resn.counts().items() if k != "unrelated"))
        print(f"same scores in 1 and {resn.workers} processes: {same}")
        result = {"benchmark": "bench_check", "date": datetime.date.today().isoformat(), "machine": info,
                  "n": n, "size": args.size, "resolution": args.resolution, "format": "png" if args.png else "jpeg",
                  "runs": {k: {"seconds": round(t, 4), "ms_per_pair": round(1000 * t / n, 3)} for k, t in runs.items()},
                  "precision_unrelated": precision, "recall_unrelated": recall, "shuffled": len(shuffled),
                  "flag_counts": resn.counts(), "deterministic_across_processes": same}
        if not args.no_save:
            suffix = "" if (args.n, args.size) == (400, 1024) else f"-n{args.n}-s{args.size}"
            out = RESULTS_DIR / f"bench_check-{socket.gethostname()}-{result['date']}{suffix}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"results: {out}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if same else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
