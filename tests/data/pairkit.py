"""Small builders of image folders for the pairing tests (real files written with PIL)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image(size=(64, 48), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def save(path: Path, img: Image.Image | None = None, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = img if img is not None else image(seed=zlib.crc32(path.name.encode()))
    img.save(path, format=fmt, **kw)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def pair(root: Path, rel: str, size=(64, 48), text: str | None = "make it red", seed=0, ref_size=None) -> None:
    """edited/<rel> and reference/<rel> (+ caption beside the edited image)."""
    save(root / "edited" / rel, image(size, seed))
    save(root / "reference" / rel, image(ref_size or size, seed + 1000))
    if text is not None:
        caption((root / "edited" / rel).with_suffix(".txt"), text)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()
