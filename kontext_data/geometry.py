"""Bucket and crop geometry, SimpleTuner-compatible, decided from image sizes alone (no pixels).

In: an image's oriented width/height and the geometry options. Out: a `Geometry` (intermediary size = the size
after resize, the crop box, the bucket = final size). `apply_geometry` turns pixels + a recorded geometry into the
training image; it is the single definition of that transform, used by `manifest.load_image` and the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import numpy as np

RESOLUTION_TYPES = ("pixel_area", "pixel", "area")
CROP_STYLES = ("center", "random", "corner")
CROP_ASPECTS = ("square", "preserve", "closest")

# The ~1 MP resolutions FluxKontextPipeline snaps a reference to, as (width, height); `closest` buckets use their
# aspect ratios, so training buckets match what inference feeds the model.
KONTEXT_PREFERRED_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
KONTEXT_ASPECTS = tuple(w / h for w, h in KONTEXT_PREFERRED_RESOLUTIONS)


@dataclass(frozen=True)
class GeometryOptions:
    """How images become training buckets (the SimpleTuner dataset keys in brackets)."""

    resolution: float = 1024
    """Target size [resolution]: pixels for pixel/pixel_area, megapixels for area."""
    resolution_type: str = "pixel_area"
    """pixel_area: area = resolution^2; pixel: shorter edge = resolution; area: resolution megapixels."""
    alignment: int = 16
    """Bucket sides are multiples of this (16 = Kontext's native multiple; 64 for SimpleTuner parity)."""
    max_size: int | None = None
    """[maximum_image_size] shorter edge above which the image is first downsampled to target_downsample_size."""
    target_downsample_size: int | None = None
    """[target_downsample_size] shorter edge after that downsampling (>= the bucket), before the crop."""
    crop: bool = True
    """[crop] crop to the bucket; with False the image is resized straight to the bucket."""
    crop_style: str = "center"
    """[crop_style] center | random | corner (bottom-right, as SimpleTuner)."""
    crop_aspect: str = "preserve"
    """[crop_aspect] square | preserve (image aspect, aligned) | closest (nearest Kontext inference aspect)."""

    def problems(self) -> list[str]:
        out = []
        if self.resolution_type not in RESOLUTION_TYPES:
            out.append(f"--resolution-type {self.resolution_type!r} is not one of {list(RESOLUTION_TYPES)}")
        if self.crop_style not in CROP_STYLES:
            out.append(f"--crop-style {self.crop_style!r} is not one of {list(CROP_STYLES)}")
        if self.crop_aspect not in CROP_ASPECTS:
            out.append(f"--crop-aspect {self.crop_aspect!r} is not one of {list(CROP_ASPECTS)}")
        if not self.resolution or self.resolution <= 0:
            out.append("--resolution must be > 0")
        if self.alignment < 1 or self.alignment % 8:
            out.append(f"--alignment {self.alignment} must be a positive multiple of 8 (the VAE's factor)")
        if (self.max_size is None) != (self.target_downsample_size is None):
            out.append("--max-size and --target-downsample-size go together: give both or neither")
        return out

    def target_area(self) -> float:
        if self.resolution_type == "area":
            return float(self.resolution) * 1_000_000
        return float(self.resolution) ** 2


@dataclass(frozen=True)
class Geometry:
    """Where an image of (width, height) ends up: resize to intermediary, then crop the bucket at (left, top)."""

    intermediary_width: int
    intermediary_height: int
    crop_left: int
    crop_top: int
    bucket_width: int
    bucket_height: int

    def as_dict(self) -> dict[str, int]:
        return {"intermediary_width": self.intermediary_width, "intermediary_height": self.intermediary_height,
                "crop_left": self.crop_left, "crop_top": self.crop_top,
                "bucket_width": self.bucket_width, "bucket_height": self.bucket_height}


def _align(x: float, a: int) -> int:
    return max(a, int(round(x / a)) * a)


def _floor_align(x: float, a: int) -> int:
    return max(a, int(math.floor(x / a)) * a)


def bucket_size(width: int, height: int, opts: GeometryOptions) -> tuple[int, int]:
    """The final (bucket) size for an image of this oriented size."""
    a = opts.alignment
    if opts.crop_aspect == "square":
        if opts.resolution_type == "pixel":
            side = opts.resolution
        else:
            side = math.sqrt(opts.target_area())
        side = _align(side, a)
        return side, side
    aspect = width / height
    if opts.crop_aspect == "closest":
        aspect = min(KONTEXT_ASPECTS, key=lambda k: abs(math.log(k / aspect)))
    if opts.resolution_type == "pixel":
        short = float(opts.resolution)
        bw, bh = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = opts.target_area()
        bw, bh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if opts.crop_aspect == "preserve":
        # never stretch: floor both sides, so the crop only trims the alignment remainder
        return _floor_align(bw, a), _floor_align(bh, a)
    return _align(bw, a), _align(bh, a)


def compute_geometry(width: int, height: int, opts: GeometryOptions, rng: "np.random.Generator | None" = None) -> Geometry:
    """Geometry of one image. `rng` is needed only for crop_style='random' (seeded per sample by the caller)."""
    bw, bh = bucket_size(width, height, opts)
    if not opts.crop:
        return Geometry(bw, bh, 0, 0, bw, bh)
    scale = max(bw / width, bh / height)  # the smallest resize that covers the bucket
    if opts.max_size is not None and min(width, height) > opts.max_size:
        scale = max(scale, opts.target_downsample_size / min(width, height))
    iw = max(bw, int(round(width * scale)))
    ih = max(bh, int(round(height * scale)))
    if opts.crop_style == "center":
        left, top = (iw - bw) // 2, (ih - bh) // 2
    elif opts.crop_style == "corner":
        left, top = iw - bw, ih - bh
    else:
        if rng is None:
            raise ValueError("crop_style='random' needs a seeded rng")
        left = int(rng.integers(0, iw - bw + 1))
        top = int(rng.integers(0, ih - bh + 1))
    return Geometry(iw, ih, left, top, bw, bh)


def apply_geometry(image, geometry: Mapping[str, Any], resample=None):
    """Resize a PIL image to the recorded intermediary size (Lanczos, or `resample`) and crop the recorded bucket.

    `resample` is for loss masks (`manifest.load_mask`): Lanczos rings at a mask's hard edges; the crop box is the
    same whatever the filter, so a mask stays aligned with its image."""
    from PIL import Image

    iw, ih = int(geometry["intermediary_width"]), int(geometry["intermediary_height"])
    left, top = int(geometry["crop_left"]), int(geometry["crop_top"])
    bw, bh = int(geometry["bucket_width"]), int(geometry["bucket_height"])
    if image.size != (iw, ih):
        image = image.resize((iw, ih), Image.Resampling.LANCZOS if resample is None else resample)
    if (left, top, bw, bh) != (0, 0, iw, ih):
        image = image.crop((left, top, left + bw, top + bh))
    return image
