#!/usr/bin/env python
"""Write a small synthetic FLUX.1 Kontext edit dataset (numpy + pillow only, deterministic).

Every sample is a scene -- a plain or gradient background with 2-4 flat shapes (circles, squares,
triangles) of named colours -- and one edit applied to it:

* recolor one object  ("make the red circle blue")
* move one object     ("move the green square to the left")
* remove one object   ("remove the yellow triangle")

Layout written under OUTDIR (the folder pairing SimpleTuner users know)::

    OUTDIR/reference/scene_000.png        the scene before the edit
    OUTDIR/edited/scene_000.png           the scene after the edit (the training target)
    OUTDIR/edited/scene_000.txt           the edit instruction (caption)
    OUTDIR/reference/outdoor/scene_030.png   a few samples live in a subfolder (recursion)
    OUTDIR/edited/outdoor/scene_030.png
    OUTDIR/edited/outdoor/scene_030.txt

Most images are SIZE x SIZE; every 8th sample is landscape (SIZE x 3/4 SIZE) and every 8th portrait
(3/4 SIZE x SIZE), so bucketing has work. Shapes never overlap, so every edit changes pixels.

The same (n, size, seed, format) gives byte-identical files: each sample draws from its own
``numpy.random.default_rng([seed, index])``, and images are written by PIL with fixed parameters
(PNG: compress_level 6, no optimize, no metadata chunks; JPEG: quality 95, 4:2:0, baseline). Files are
written to a temporary name in the same folder and then renamed, so an interrupted run never leaves a
half-written image. Existing files of other names are left alone.

Example::

    python examples/make_sample.py demo_data --n 32 --size 128 --seed 0
    python examples/make_sample.py demo_jpg --jpeg

From Python (``examples/`` is not a package; load the file)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sample", "examples/make_sample.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    counts = mod.make_sample("demo_data", n=32, size=128, seed=0)
"""

import argparse
import io
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from kontext_data.fileio import write_bytes_atomic

# Named colours of the objects: saturated, far apart, none close to the backgrounds below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "orange": (245, 135, 20),
    "purple": (140, 40, 180),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
# Backgrounds: muted greys and pastels (plain) and pairs of them (vertical or horizontal gradient).
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (170, 160, 150),
    (150, 170, 190),
    (190, 200, 170),
    (110, 120, 135),
    (200, 185, 200),
)
EDITS = ("recolor", "move", "remove")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SUBFOLDER = "outdoor"
PNG_PARAMS = {"format": "PNG", "compress_level": 6, "optimize": False}
JPEG_PARAMS = {"format": "JPEG", "quality": 95, "subsampling": 2, "optimize": False, "progressive": False}


@dataclass(frozen=True)
class Obj:
    """One flat shape: kind, colour name, top-left corner (x, y) and side length in pixels."""

    shape: str
    color: str
    x: int
    y: int
    side: int

    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.side, self.y + self.side)


@dataclass(frozen=True)
class Sample:
    """A generated sample: relative path without extension, image size, before/after scenes, caption."""

    rel_stem: str
    width: int
    height: int
    background: tuple
    before: tuple[Obj, ...]
    after: tuple[Obj, ...]
    edit: str
    caption: str


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _free(box: tuple[int, int, int, int], others: list[Obj], gap: int) -> bool:
    return all(not _overlaps(box, o.box(), gap) for o in others)


# FluxKontextPipeline's preferred ~1 MP resolutions (width, height), alternating landscape and portrait from the
# squarest out, for `aspects`: a dataset that fills several aspect buckets, as real photo collections do.
KONTEXT_ASPECTS = ((1024, 1024), (1104, 944), (944, 1104), (1184, 880), (880, 1184), (1248, 832), (832, 1248),
                   (1328, 800), (800, 1328), (1392, 752), (752, 1392), (1456, 720), (720, 1456), (1504, 688),
                   (688, 1504), (1568, 672), (672, 1568))


def _sample_size(index: int, size: int, aspects: int = 0) -> tuple[int, int]:
    if aspects:
        w, h = KONTEXT_ASPECTS[index % aspects]
        return max(32, w * size // 1024), max(32, h * size // 1024)  # the same area as size x size
    short = max(32, size * 3 // 4)
    if index % 8 == 3:
        return size, short  # landscape, e.g. 128x96
    if index % 8 == 6:
        return short, size  # portrait, e.g. 96x128
    return size, size


def _rel_stem(index: int, n: int) -> str:
    name = f"scene_{index:0{max(3, len(str(n - 1)))}d}"
    # The last eighth (at least one sample once n >= 4) goes to a subfolder, to exercise recursion.
    if n >= 4 and index >= n - max(1, n // 8):
        return f"{SUBFOLDER}/{name}"
    return name


def _place_objects(rng: np.random.Generator, width: int, height: int) -> list[Obj]:
    count = int(rng.integers(2, 5))
    short = min(width, height)
    gap = max(2, short // 32)
    objs: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for _ in range(200):  # rejection sampling; 2-4 shapes of <= 1/4 the short edge always fit
        if len(objs) == count:
            break
        side = int(rng.integers(short // 6, short // 4 + 1))
        x = int(rng.integers(gap, width - side - gap + 1))
        y = int(rng.integers(gap, height - side - gap + 1))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        if (color, shape) in used:  # names must be unambiguous in the instruction
            continue
        obj = Obj(shape, color, x, y, side)
        if _free(obj.box(), objs, gap):
            objs.append(obj)
            used.add((color, shape))
    return objs


def _edit(rng: np.random.Generator, objs: list[Obj], width: int, height: int) -> tuple[str, list[Obj], str]:
    target_i = int(rng.integers(len(objs)))
    target = objs[target_i]
    others = objs[:target_i] + objs[target_i + 1 :]
    name = f"{target.color} {target.shape}"
    kinds = list(EDITS)
    first = int(rng.integers(len(kinds)))
    for kind in kinds[first:] + kinds[:first]:
        if kind == "recolor":
            taken = {(o.color, o.shape) for o in others} | {(target.color, target.shape)}
            choices = [c for c in COLORS if (c, target.shape) not in taken]
            new = choices[int(rng.integers(len(choices)))]
            after = objs.copy()
            after[target_i] = Obj(target.shape, new, target.x, target.y, target.side)
            return "recolor", after, f"make the {name} {new}"
        if kind == "move":
            gap = max(2, min(width, height) // 32)
            names = list(DIRECTIONS)
            start = int(rng.integers(len(names)))
            for direction in names[start:] + names[:start]:
                dx, dy = DIRECTIONS[direction]
                span = width if dx else height
                for frac in (4, 6, 8):  # try a big move first, then smaller ones
                    step = max(target.side // 2, span // frac)
                    moved = Obj(target.shape, target.color, target.x + dx * step, target.y + dy * step, target.side)
                    b = moved.box()
                    inside = b[0] >= gap and b[1] >= gap and b[2] <= width - gap and b[3] <= height - gap
                    if inside and _free(b, others, gap):
                        after = objs.copy()
                        after[target_i] = moved
                        where = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
                        return "move", after, f"move the {name} {where[direction]}"
            continue  # no room to move it: fall through to the next kind
        if kind == "remove":
            return "remove", others, f"remove the {name}"
    raise RuntimeError("unreachable: remove always applies")


def _background(rng: np.random.Generator, width: int, height: int) -> tuple:
    a = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    style = int(rng.integers(3))  # 0 plain, 1 vertical gradient, 2 horizontal gradient
    if style == 0:
        return ("plain", a)
    b = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return ("vertical" if style == 1 else "horizontal", a, b)


def _render(width: int, height: int, background: tuple, objs: tuple[Obj, ...]) -> Image.Image:
    if background[0] == "plain":
        img = Image.new("RGB", (width, height), background[1])
    else:
        a = np.asarray(background[1], dtype=np.float32)
        b = np.asarray(background[2], dtype=np.float32)
        steps = height if background[0] == "vertical" else width
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        ramp = np.rint(a + (b - a) * t).astype(np.uint8)  # (steps, 3)
        if background[0] == "vertical":
            arr = np.broadcast_to(ramp[:, None, :], (height, width, 3))
        else:
            arr = np.broadcast_to(ramp[None, :, :], (height, width, 3))
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    draw = ImageDraw.Draw(img)
    for o in objs:
        x0, y0, x1, y1 = o.x, o.y, o.x + o.side - 1, o.y + o.side - 1
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def build_sample(index: int, n: int, size: int, seed: int, aspects: int = 0) -> Sample:
    """The scene description of sample `index` (pure: depends only on its arguments)."""
    rng = np.random.default_rng([seed, index])
    width, height = _sample_size(index, size, aspects)
    background = _background(rng, width, height)
    before = _place_objects(rng, width, height)
    edit, after, caption = _edit(rng, before, width, height)
    return Sample(_rel_stem(index, n), width, height, background, tuple(before), tuple(after), edit, caption)


def _encode(img: Image.Image, jpeg: bool) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **(JPEG_PARAMS if jpeg else PNG_PARAMS))
    return buf.getvalue()


def make_sample(outdir: str | os.PathLike, n: int = 32, size: int = 128, seed: int = 0, jpeg: bool = False,
                aspects: int = 0) -> dict:
    """Write `n` synthetic edit pairs under `outdir` (see the module docstring); return the counts.

    `aspects` N > 0: sample i takes the (i mod N)-th of Kontext's preferred resolutions (KONTEXT_ASPECTS) scaled to
    the area of size x size, instead of the default square / 4:3 / 3:4 mix: N aspect buckets.
    Raises ValueError for n < 1, size outside [32, 4096], a negative seed or aspects outside [0, 17].
    """
    if not 0 <= aspects <= len(KONTEXT_ASPECTS):
        raise ValueError(f"aspects must be between 0 and {len(KONTEXT_ASPECTS)}, got {aspects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 32 <= size <= 4096:
        raise ValueError(f"size must be between 32 and 4096 pixels, got {size}")
    outdir = os.fspath(outdir)
    ext = ".jpg" if jpeg else ".png"
    counts = {"pairs": 0, "captions": 0, "subfolder": 0, "non_square": 0, "bytes": 0}
    counts.update({f"edit_{k}": 0 for k in EDITS})
    made_dirs: set[str] = set()
    for i in range(n):
        s = build_sample(i, n, size, seed, aspects)
        edited = os.path.join(outdir, "edited", s.rel_stem)
        reference = os.path.join(outdir, "reference", s.rel_stem)
        for d in (os.path.dirname(edited), os.path.dirname(reference)):
            if d not in made_dirs:
                os.makedirs(d, exist_ok=True)
                made_dirs.add(d)
        ref_bytes = _encode(_render(s.width, s.height, s.background, s.before), jpeg)
        edit_bytes = _encode(_render(s.width, s.height, s.background, s.after), jpeg)
        write_bytes_atomic(reference + ext, ref_bytes)
        write_bytes_atomic(edited + ext, edit_bytes)
        write_bytes_atomic(edited + ".txt", (s.caption + "\n").encode("utf-8"))
        counts["pairs"] += 1
        counts["captions"] += 1
        counts["subfolder"] += "/" in s.rel_stem
        counts["non_square"] += s.width != s.height
        counts[f"edit_{s.edit}"] += 1
        counts["bytes"] += len(ref_bytes) + len(edit_bytes)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_sample.py",
        description="Write a small deterministic synthetic FLUX.1 Kontext edit dataset: "
        "OUTDIR/reference/ (before), OUTDIR/edited/ (after) and a caption <stem>.txt beside each "
        "edited image holding the edit instruction.",
        epilog="example: python examples/make_sample.py demo_data --n 32 --size 128 --seed 0",
    )
    parser.add_argument("outdir", help="output folder (created if missing; other files in it are left alone)")
    parser.add_argument("--n", type=int, default=32, help="number of pairs (default 32)")
    parser.add_argument("--size", type=int, default=128, help="long edge in pixels, 32-4096 (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed -> same bytes (default 0)")
    parser.add_argument("--jpeg", action="store_true", help="write .jpg (quality 95) instead of .png")
    parser.add_argument("--aspects", type=int, default=0,
                        help="N > 0: cycle through N of Kontext's preferred aspect ratios at the area of SIZE x SIZE "
                             "(N buckets; up to 17); default: square with some 4:3 and 3:4")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if not 32 <= args.size <= 4096:
        parser.error(f"--size must be between 32 and 4096, got {args.size}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        counts = make_sample(args.outdir, n=args.n, size=args.size, seed=args.seed, jpeg=args.jpeg,
                             aspects=args.aspects)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        print(f"error: cannot write under {args.outdir}: {e}. Pick a writable folder.", file=sys.stderr)
        return 1
    edits = ", ".join(f"{counts['edit_' + k]} {k}" for k in EDITS)
    print(
        f"wrote {counts['pairs']} pairs to {args.outdir} ({edits}; {counts['non_square']} non-square, "
        f"{counts['subfolder']} in {SUBFOLDER}/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
