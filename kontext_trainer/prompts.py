"""Validation prompts: extra edits rendered at every validation, from a JSONL file (`validation_prompts`).

In: a JSONL file, one JSON object per line:
    {"image": "refs/cat.jpg", "prompt": "make the cat wear a hat", "seed": 3, "size": "1024x768"}
`image` (one reference) or `images` (several; the pipeline takes the first, the strip shows all), `prompt` (the
instruction), optional `seed` (default validation_seed), `width` + `height` or `size` (WxH, N, or [W, H]; multiples
of 16; default validation_resolution, else the reference's own shape). Relative image paths are taken from the
file's folder. Blank lines are skipped.

Out: `ValidationPrompt`s, and every problem of the file (unreadable JSON with its line number, a missing prompt or
image, an image that cannot be read, a size that is not a multiple of 16, unknown keys), all listed together so
they stop a run at start-up, before any model loads, not at its first validation.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

KEYS = ("image", "images", "prompt", "seed", "width", "height", "size")


@dataclass(frozen=True)
class ValidationPrompt:
    """One checked line of the validation prompts file."""

    line: int
    """Line of the JSONL file (1-based)."""
    prompt: str
    images: tuple[str, ...]
    """Absolute paths of the reference image(s)."""
    image_sizes: tuple[tuple[int, int], ...]
    """(width, height) of each reference after EXIF orientation, read from its header at start-up."""
    seed: int | None = None
    size: tuple[int, int] | None = None
    """(width, height) of the output, or None: validation_resolution, else the reference's shape."""
    name: str = ""
    """Stable file stem of its strip: prompt-NN-<words of the prompt>."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40]


def _size(value, where: str, problems: list[str]) -> tuple[int, int] | None:
    """`size` (WxH, N, an int, or [W, H]) as (width, height), or a problem."""
    w = h = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        w = h = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(x\s*\d+\s*)?", value):
        a, _, b = value.lower().partition("x")
        w, h = int(a), int(b or a)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        w, h = value
    if w is None:
        problems.append(f"{where}: size {value!r} is not WxH, N or [W, H]")
        return None
    return _check_size(w, h, where, problems)


def _check_size(w: int, h: int, where: str, problems: list[str]) -> tuple[int, int] | None:
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        lo = (max(16, w // 16 * 16), max(16, h // 16 * 16))
        problems.append(f"{where}: size {w}x{h} must be positive multiples of 16 (Kontext's latent patch), e.g. "
                        f"{lo[0]}x{lo[1]}")
        return None
    return w, h


def read_validation_prompts(path: str | os.PathLike) -> tuple[list[ValidationPrompt], list[str]]:
    """The prompts of a JSONL file and every problem of it (each naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: no such file (validation_prompts)"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot be read as UTF-8 text ({exc})"]
    folder = path.resolve().parent
    prompts: list[ValidationPrompt] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        item = _json_object(raw, where, problems)
        if item is None:
            continue
        before = len(problems)
        unknown = sorted(set(item) - set(KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(KEYS)})")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: no \"prompt\" (the edit instruction, a non-empty string)")
        images, sizes = _references(item, where, folder, problems)
        seed = item.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            problems.append(f"{where}: seed {seed!r} is not a whole number >= 0")
        size = _output_size(item, where, problems)
        if len(problems) > before:
            continue
        n = len(prompts) + 1
        prompts.append(ValidationPrompt(line=number, prompt=prompt, images=tuple(images), image_sizes=tuple(sizes),
                                        seed=seed, size=size, name=f"prompt-{n:02d}-{_slug(prompt)}".rstrip("-")))
    if not prompts and not problems:
        problems.append(f"{path}: no prompts (one JSON object per line, e.g. "
                        '{"image": "ref.png", "prompt": "make it blue"})')
    return prompts, problems


def _json_object(raw: str, where: str, problems: list[str]) -> dict | None:
    """One line's JSON object, or None with its problem."""
    try:
        item = json.loads(raw)
    except ValueError as exc:
        problems.append(f"{where}: not valid JSON ({exc}); each line must be one object such as "
                        '{"image": "ref.png", "prompt": "make it blue"}')
        return None
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a JSON object, got {type(item).__name__}")
        return None
    return item


def _references(item: dict, where: str, folder: Path, problems: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The line's reference images (`image` or `images`, relative to `folder`) as absolute paths, and their
    (width, height) read from their headers; every missing or unreadable one is a problem."""
    from kontext_data.imageio import probe_file

    if "image" in item and "images" in item:
        problems.append(f"{where}: give \"image\" or \"images\", not both")
        refs = []
    elif "images" in item:
        refs = item["images"] if isinstance(item["images"], list) else None
        if not refs or not all(isinstance(r, str) and r for r in refs):
            problems.append(f"{where}: \"images\" must be a non-empty list of image paths")
            refs = []
    elif isinstance(item.get("image"), str) and item["image"]:
        refs = [item["image"]]
    else:
        problems.append(f"{where}: no reference image (\"image\": a path, or \"images\": a list of paths)")
        refs = []
    images, sizes = [], []
    for ref in refs:
        p = Path(os.path.expanduser(ref))
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            problems.append(f"{where}: image not found: {p}" + ("" if Path(ref).is_absolute() else
                                                               f" (relative paths start at {folder})"))
            continue
        info = probe_file(p)
        if info.problem:
            problems.append(f"{where}: cannot read image {p} ({info.problem}: {info.detail})")
            continue
        images.append(str(p))
        sizes.append((info.width, info.height))
    return images, sizes


def _output_size(item: dict, where: str, problems: list[str]) -> tuple[int, int] | None:
    """The line's output size (`size`, or `width` + `height`), or None: the default size."""
    if "size" in item and ("width" in item or "height" in item):
        problems.append(f"{where}: give \"size\" or \"width\"/\"height\", not both")
    elif "size" in item:
        return _size(item["size"], where, problems)
    elif "width" in item or "height" in item:
        w, h = item.get("width"), item.get("height")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h)):
            problems.append(f"{where}: width and height must both be given, as whole numbers (got {w!r}, {h!r})")
        else:
            return _check_size(w, h, where, problems)
    return None


def reference_geometry(size: tuple[int, int], area: int) -> dict[str, int]:
    """How a prompt's reference of (width, height) is sized for the pipeline: as `kontext-data pair` sizes a
    training image for resolution_type pixel_area at the training buckets' `area` (its aspect kept, sides floored
    to multiples of 16, centre crop of the remainder). The manifest's geometry fields, for `apply_geometry`."""
    from kontext_data.geometry import GeometryOptions, compute_geometry

    w, h = size
    return compute_geometry(w, h, GeometryOptions(resolution=math.sqrt(area), resolution_type="pixel_area")).as_dict()
