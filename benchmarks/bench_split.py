"""Benchmark `kontext-data split` on generated composites stored in Parquet.

Writes N (default 5,000) 1024x512 two-panel composites (Hugging Face ``{bytes, path}`` image struct,
nested ``description`` captions) into Parquet, then measures, each in a fresh subprocess:

* baseline: the plain loop everybody writes first: stream the Parquet rows, decode, cut in half, encode
  both panels as PNG (same OpenCV codec and level as split), write them; one process;
* split, 1 worker: kontext_data.split in-process (gutter detection, atomic writes, captions, resume
  checks) - the per-core overhead against the baseline;
* split, all cores: the spawn pool.

For each: rows/s and the peak RSS of the whole process tree (sampled every 20 ms from /proc), which
must stay flat however many rows the Parquet holds. Prints the machine (CPU model, cores, versions).

    python benchmarks/bench_split.py                 # 5,000 rows, JPEG composites (as most scraped sets)
    python benchmarks/bench_split.py --rows 500 --source-format png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]




def _tree_rss_kib(pid: int) -> int:
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _measure(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, peak tree RSS in MiB, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kib(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{err}")
    return seconds, peak // 1024, out


def generate(path: Path, rows: int, source_format: str, distinct: int = 48) -> int:
    """Write ``rows`` composites (``distinct`` different images, cycled) to one Parquet file."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct):
        # photo-like: smooth shapes plus sensor noise (compresses like a photo, not like flat colour)
        low = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
        img = cv2.resize(low, (1024, 512), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92]) if source_format == "jpeg" else (".png", [])
        encoded.append(cv2.imencode(ext, img, params)[1].tobytes())
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    desc_type = pa.struct([("description_0", pa.string()), ("description_1", pa.string())])
    writer = None
    for start in range(0, rows, 500):
        idx = range(start, min(rows, start + 500))
        table = pa.table({
            "image": pa.array([{"bytes": encoded[i % distinct], "path": f"{i}.img"} for i in idx], struct),
            "description": pa.array([{"description_0": f"edit {i}", "description_1": f"ref {i}"} for i in idx],
                                    desc_type),
        })
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=100)
    writer.close()
    return sum(len(e) for e in encoded) // distinct


BASELINE = r"""
import sys, os, cv2, numpy as np, pyarrow.parquet as pq
cv2.setNumThreads(1)
src, out = sys.argv[1], sys.argv[2]
for role in ("edit", "reference"):
    os.makedirs(os.path.join(out, role), exist_ok=True)
n = 0
for batch in pq.ParquetFile(src).iter_batches(batch_size=16, columns=["image", "description"]):
    for row in batch.to_pylist():
        img = cv2.imdecode(np.frombuffer(row["image"]["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
        w = img.shape[1] // 2
        for role, panel, text in (("edit", img[:, :w], row["description"]["description_0"]),
                                  ("reference", img[:, w:2 * w], row["description"]["description_1"])):
            name = os.path.join(out, role, f"{n:08d}")
            with open(name + ".png", "wb") as f:
                f.write(cv2.imencode(".png", panel, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
            with open(name + ".txt", "w", encoding="utf-8") as f:
                f.write(text + "\n")
        n += 1
print(n)
"""

SPLIT = r"""
import sys, json
from pathlib import Path
from kontext_data.split import SplitConfig, split_composites
cfg = SplitConfig(sources=(sys.argv[1],), out=Path(sys.argv[2]), workers=int(sys.argv[3]),
                  caption_columns=(("edit", "description.description_0"), ("reference", "description.description_1")))
r = split_composites(cfg)
print(json.dumps({"written": r.written, "failed": r.failed, "skipped": r.skipped_done}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--source-format", choices=("jpeg", "png"), default="jpeg")
    ap.add_argument("--skip-one-worker", action="store_true", help="skip the 1-worker split run")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()

    import cv2
    import numpy
    import pyarrow

    work = Path(tempfile.mkdtemp(prefix="bench_split_"))
    try:
        src = work / "composites.parquet"
        t0 = time.perf_counter()
        avg = generate(src, args.rows, args.source_format)
        gen_s = time.perf_counter() - t0
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
              f"numpy {numpy.__version__}, opencv {cv2.__version__}, pyarrow {pyarrow.__version__}")
        print(f"data: {args.rows} rows of 1024x512 {args.source_format} composites (~{avg // 1024} KiB each), "
              f"Parquet {src.stat().st_size / 2**20:.0f} MiB, generated in {gen_s:.1f} s; output PNG (level 1)")
        out_dir = work / "out"
        runs = [("baseline loop (1 process)", [sys.executable, "-c", BASELINE, str(src), str(out_dir)])]
        if not args.skip_one_worker:
            runs.append(("split, 1 worker", [sys.executable, "-c", SPLIT, str(src), str(out_dir), "1"]))
        runs.append((f"split, {args.workers} workers",
                     [sys.executable, "-c", SPLIT, str(src), str(out_dir), str(args.workers)]))
        figures = []
        for label, cmd in runs:
            shutil.rmtree(out_dir, ignore_errors=True)
            seconds, rss, out = _measure(cmd)
            figures.append({"run": label, "seconds": round(seconds, 2), "rows_per_s": round(args.rows / seconds, 1),
                            "peak_rss_mib": rss, "output": out.strip()})
            print(f"{label:28s} {args.rows / seconds:8.1f} rows/s  {seconds:7.1f} s  peak RSS {rss:6d} MiB  {out.strip()}")
        # resume: a second run over finished output only checks files
        resume_out = work / "resume"
        _measure([sys.executable, "-c", SPLIT, str(src), str(resume_out), str(args.workers)])
        seconds, rss, out = _measure([sys.executable, "-c", SPLIT, str(src), str(resume_out), str(args.workers)])
        print(f"{'resume over finished output':28s} {args.rows / seconds:8.1f} rows/s  {seconds:7.1f} s  "
              f"peak RSS {rss:6d} MiB  {out.strip()}")
        figures.append({"run": "resume", "seconds": round(seconds, 2), "peak_rss_mib": rss, "output": out.strip()})
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "rows": args.rows,
                                             "source_format": args.source_format, "runs": figures}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
