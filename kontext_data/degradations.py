"""Synthetic degradations for restoration edits (deblur, JPEG-artifact removal, denoise, super-resolution).

Every degradation is a pure function ``fn(image, rng, **params) -> image`` registered in :data:`REGISTRY`:

- ``image`` is an RGB ``uint8`` array of shape (H, W, 3) (a ``PIL.Image`` is accepted and converted);
- ``rng`` is a :class:`numpy.random.Generator`; it is the only source of randomness, so the same image,
  parameters and generator state give the same pixels (the OpenCV noise generator is re-seeded from ``rng``
  before every use, never left to its global state);
- the result is a new RGB ``uint8`` array; the input is never modified.

Parameters are checked by :func:`resolve_chain`, which fills defaults (those of the SimpleTuner generators users
know: ``superresolution`` and ``jpeg_artifacts`` are accepted as aliases of ``blur`` and ``jpeg``) and rejects
unknown types, parameters or values with the list of valid ones. The trainer reuses :func:`apply_chain` and
:func:`load_rgb` to synthesize references at load time (see ``kontext_data.degrade.synthesize_reference``).

This module imports only numpy, OpenCV and Pillow (no torch).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from kontext_data.degrade_params import ALIASES, PARAM_SPECS, Param, canonical_type, valid_type_names
from kontext_data.problems import ProblemsError

__all__ = [
    "REGISTRY",
    "ALIASES",
    "PARAM_SPECS",
    "ChainError",
    "Step",
    "resolve_chain",
    "apply_chain",
    "chain_hash",
    "chain_output_codec",
    "load_rgb",
    "decode_source",
    "decode_image_bytes",
    "encode_png",
    "jpeg_quality_for_round",
    "motion_kernel",
]

SCHEMA_VERSION = 1

# Fastest lossless setting measured for noisy/blurred 1 MP images (see docs/degrade.md): zlib level 1,
# Huffman-only strategy, "Up" filter: ~22 ms per 1 MP image on our 2-core machines, same size as OpenCV's
# default (level 1, RLE, Sub; ~24 ms) and 8x faster than PIL's default level 6. Lossless either way:
# the choice changes the file size and speed, never the pixels, so it is not part of the parameter hash.
PNG_ENCODE_PARAMS = (
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
)


class ChainError(ProblemsError, ValueError):
    """Invalid degradation chain: ``problems`` lists every problem found, each naming the fix."""

    usage = True

    def __init__(self, problems: list[str]):
        super().__init__(problems, message="; ".join(problems))


# --------------------------------------------------------------------------------------------- helpers


def _as_rgb(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
    else:  # PIL.Image or anything array-like
        convert = getattr(image, "convert", None)
        arr = np.asarray(convert("RGB") if convert is not None else image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"expected an RGB uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _cv_seed(rng: np.random.Generator) -> int:
    # OpenCV's RNG (used for its ~3x faster randn) is thread-local; seed it from rng before every use.
    return int(rng.integers(1, 2**31 - 1))


def decode_image_bytes(data: bytes | np.ndarray) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (libjpeg-turbo / libpng through OpenCV).

    Gives the same pixels as ``PIL.Image.open(...).convert("RGB")`` for baseline JPEGs (both use libjpeg-turbo
    with its default IDCT and upsampling; checked in the tests).
    """
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    arr = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    if arr is None:
        raise ValueError("cannot decode image bytes")
    return arr


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), EXIF orientation applied.

    OpenCV decodes (it applies EXIF orientation, drops alpha, and reduces 16-bit to 8-bit); formats OpenCV
    cannot read (GIF, ...) go through Pillow with ``ImageOps.exif_transpose``. Truncated or corrupt files
    raise ``ValueError`` naming the file. The degrade stage and the on-demand loader both read sources with
    this function, which is what makes their pixels identical.
    """
    return decode_source(np.fromfile(Path(path), dtype=np.uint8), str(path))


def decode_source(data: np.ndarray, name: str = "image") -> np.ndarray:
    """:func:`load_rgb` on bytes already read (``data``: uint8 array); ``name`` goes into error messages."""
    if data.size == 0:
        raise ValueError(f"{name}: empty file")
    arr = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB)
    if arr is not None:
        return arr
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any decoder error means "corrupt"
        raise ValueError(f"{name}: cannot decode image: the file is corrupt, truncated or not an image "
                         f"({type(exc).__name__}); re-export it or move it out of the folder") from None


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 image (fast setting, see ``PNG_ENCODE_PARAMS``)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), list(PNG_ENCODE_PARAMS))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


_SUBSAMPLING = {
    "4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
}


def _encode_jpeg(image: np.ndarray, quality: int, subsampling: str | None = None,
                 optimize: bool = False, progressive: bool = False, bgr: bool = False) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    if subsampling is not None:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, _SUBSAMPLING[subsampling]]
    if optimize:
        params += [cv2.IMWRITE_JPEG_OPTIMIZE, 1]
    if progressive:
        params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    ok, buf = cv2.imencode(".jpg", image if bgr else cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


# ----------------------------------------------------------------------------------- the degradations


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img.copy()
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _box_blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Box of half-width ``radius`` (PIL BoxBlur semantics: fractional radii weight the two edge pixels)."""
    if radius <= 0:
        return img.copy()
    n = int(math.floor(radius))
    frac = radius - n
    if frac < 1e-9:
        return cv2.blur(img, (2 * n + 1, 2 * n + 1), borderType=cv2.BORDER_REFLECT_101)
    k = np.ones(2 * n + 3, np.float32)
    k[0] = k[-1] = frac
    k /= k.sum()
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


def motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalized float32 kernel of a straight camera shake: a line of ``length`` px at ``angle_deg``
    (0 = horizontal, counter-clockwise), anti-aliased by bilinear splatting of dense samples."""
    length = max(float(length), 1.0)
    size = int(math.ceil(length)) // 2 * 2 + 3
    k = np.zeros((size, size), np.float64)
    c = (size - 1) / 2.0
    theta = math.radians(angle_deg)
    dx, dy = math.cos(theta), -math.sin(theta)
    n = max(int(math.ceil(length * 8)), 2)
    for t in np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, n):
        x, y = c + t * dx, c + t * dy
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        k[y0, x0] += (1 - fx) * (1 - fy)
        k[y0, x0 + 1] += fx * (1 - fy)
        k[y0 + 1, x0] += (1 - fx) * fy
        k[y0 + 1, x0 + 1] += fx * fy
    return (k / k.sum()).astype(np.float32)


def _motion_blur(img: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    return cv2.filter2D(img, -1, motion_kernel(length, angle_deg), borderType=cv2.BORDER_REFLECT_101)


def _gaussian_noise(img: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """Add N(0, (level*255)^2) per channel, rounded, with saturation (OpenCV randn seeded from rng)."""
    if level <= 0:
        return img.copy()
    noise = np.empty(img.shape, np.int16)
    cv2.setRNGSeed(_cv_seed(rng))
    cv2.randn(noise.reshape(img.shape[0], -1), 0.0, float(level) * 255.0)  # single-channel view: all channels
    return cv2.add(img, noise, dtype=cv2.CV_8U)


def _poisson_noise(img: np.ndarray, rng: np.random.Generator, level: float) -> np.ndarray:
    """Shot noise: photon counts Poisson(x * peak) with peak = 1/level^2, so the std at white is ``level``."""
    if level <= 0:
        return img.copy()
    peak = 1.0 / (float(level) ** 2)
    counts = rng.poisson(img.astype(np.float32) * np.float32(peak / 255.0))
    out = counts.astype(np.float32) * np.float32(255.0 / peak)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_INTERP = {  # the order of degrade_params.UPSCALE_METHODS
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _down_up(img: np.ndarray, factor: float, upscale: str = "bilinear", restore_size: bool = True) -> np.ndarray:
    if factor <= 1:
        return img.copy()
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    if not restore_size:
        return small
    return cv2.resize(small, (w, h), interpolation=_INTERP[upscale])


def _blur_impl(image: Any, rng: np.random.Generator, *, encode_last: bool, blur_radius: float,
               blur_type: str, motion_length: float | None, motion_angle: float | None, add_noise: bool,
               noise_level: float, downscale_factor: float | None, jpeg_quality: int | None):
    img = _as_rgb(image)
    if downscale_factor is not None and downscale_factor > 1:
        img = _down_up(img, downscale_factor)
    if blur_type == "gaussian":
        img = _gaussian_blur(img, blur_radius)
    elif blur_type == "box":
        img = _box_blur(img, blur_radius)
    elif blur_type == "both":  # SimpleTuner's "both": box then gaussian, each at 0.7 x radius
        img = _gaussian_blur(_box_blur(img, blur_radius * 0.7), blur_radius * 0.7)
    elif blur_type == "motion":
        length = motion_length if motion_length is not None else 2.0 * blur_radius + 1.0
        angle = motion_angle if motion_angle is not None else float(rng.uniform(0.0, 180.0))
        img = _motion_blur(img, length, angle)
    if add_noise and noise_level > 0:
        img = _gaussian_noise(img, rng, noise_level)
    if jpeg_quality is None:
        return (img, None) if encode_last else img
    data = _encode_jpeg(img, jpeg_quality)
    return (None, data) if encode_last else decode_image_bytes(data)


def blur(image: Any, rng: np.random.Generator, **params) -> np.ndarray:
    """Deblur / super-resolution reference (SimpleTuner ``superresolution``).

    Order: optional down-then-up scaling (``downscale_factor``), blur (``blur_type`` with ``blur_radius`` =
    Gaussian sigma / box half-width / motion length default ``2*radius+1``), optional Gaussian noise
    (``add_noise``, ``noise_level`` = std as a fraction of 255), optional final JPEG pass (``jpeg_quality``).
    """
    return _blur_impl(image, rng, encode_last=False, **params)


def jpeg_quality_for_round(base: int, round_idx: int, decay: float) -> int:
    """Quality of compression round ``round_idx`` (0-based): ``base`` first, then
    ``clamp(int(base * decay**round_idx), 1, 95)`` (SimpleTuner's rule)."""
    if round_idx == 0:
        return int(base)
    return max(1, min(95, int(base * decay**round_idx)))


def _jpeg_impl(image: Any, rng: np.random.Generator, *, encode_last: bool, quality_mode: str, quality: int,
               quality_range: list[int], quality_list: list[int], compression_rounds: int,
               round_quality_decay: float, subsampling: str | None, optimize: bool, progressive: bool):
    img = _as_rgb(image)
    if quality_mode == "fixed":
        base = int(quality)
    elif quality_mode == "range":
        base = int(rng.integers(quality_range[0], quality_range[1], endpoint=True))
    else:  # "random": one of quality_list
        base = int(quality_list[int(rng.integers(0, len(quality_list)))])
    data = b""
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # rounds stay in OpenCV's BGR: no conversion per round
    for r in range(compression_rounds):
        if r:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        data = _encode_jpeg(bgr, jpeg_quality_for_round(base, r, round_quality_decay), subsampling,
                            optimize, progressive, bgr=True)
    return (None, data) if encode_last else decode_image_bytes(data)


def jpeg(image: Any, rng: np.random.Generator, **params) -> np.ndarray:
    """JPEG-artifact reference (SimpleTuner ``jpeg_artifacts``): ``compression_rounds`` encode/decode rounds;
    the base quality is ``quality`` (fixed), uniform in ``quality_range`` inclusive (range) or one of
    ``quality_list`` (random); later rounds use :func:`jpeg_quality_for_round`."""
    return _jpeg_impl(image, rng, encode_last=False, **params)


def noise(image: Any, rng: np.random.Generator, *, noise_type: str, noise_level: float) -> np.ndarray:
    """Sensor noise. ``gaussian``: N(0, (noise_level*255)^2) per channel, rounded, saturated.
    ``poisson``: shot noise with the std at white equal to ``noise_level`` (peak = 1/noise_level^2 photons)."""
    img = _as_rgb(image)
    if noise_type == "gaussian":
        return _gaussian_noise(img, rng, noise_level)
    return _poisson_noise(img, rng, noise_level)


def downscale(image: Any, rng: np.random.Generator, *, factor: float, upscale: str,
              restore_size: bool) -> np.ndarray:
    """Area-averaged downscale by ``factor``; then back to the original size with ``upscale`` interpolation
    when ``restore_size`` (a same-size super-resolution reference), else the small image (reference_loose)."""
    return _down_up(_as_rgb(image), factor, upscale, restore_size)


#: name -> pure function ``(image, rng, **params) -> RGB uint8 array``
REGISTRY: dict[str, Callable[..., np.ndarray]] = {
    "blur": blur,
    "jpeg": jpeg,
    "noise": noise,
    "downscale": downscale,
}


# Variants that stop before the final decode and return (pixels, None) or (None, jpeg_bytes): the stage
# writes the exact bytes of the last requested JPEG round instead of decoding and re-encoding them.
_ENCODING_TAIL: dict[str, Callable[..., tuple[np.ndarray | None, bytes | None]]] = {
    "blur": lambda image, rng, **p: _blur_impl(image, rng, encode_last=True, **p),
    "jpeg": lambda image, rng, **p: _jpeg_impl(image, rng, encode_last=True, **p),
}


# ------------------------------------------------------------------------------------ parameter specs


def _check_value(type_name: str, key: str, spec: Param, value: Any) -> tuple[Any, str | None]:
    where = f"{type_name}.{key}"
    if value is None:
        return (None, None) if spec.optional else (None, f"{where}: null is not allowed (default {spec.default!r})")

    def num(v: Any, kind: str) -> tuple[Any, str | None]:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None, f"{where}: expected a number, got {v!r}"
        try:
            x = float(v)
        except ValueError:
            return None, f"{where}: expected a number, got {v!r}"
        if not math.isfinite(x):
            return None, f"{where}: expected a finite number, got {v!r}"
        if kind == "int":
            if x != int(x):
                return None, f"{where}: expected an integer, got {v!r}"
            x = int(x)
        lo, hi = spec.minimum, spec.maximum
        if lo is not None and (x < lo or (spec.exclusive_min and x == lo)):
            return None, f"{where}: {v!r} is out of range ({'>' if spec.exclusive_min else '>='} {lo}, <= {hi})"
        if hi is not None and x > hi:
            return None, f"{where}: {v!r} is out of range (>= {lo}, <= {hi})"
        return x, None

    if spec.kind in ("float", "int"):
        return num(value, spec.kind)
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes"), None
        return None, f"{where}: expected true or false, got {value!r}"
    if spec.kind == "str":
        if not isinstance(value, str) or value not in spec.choices:
            valid = ", ".join(spec.choices) + (", null" if spec.optional else "")
            return None, f"{where}: {value!r} is not valid; valid values: {valid}"
        return value, None
    # int_pair / int_list
    if isinstance(value, str):
        value = [p for p in value.replace(",", " ").replace("-", " ").split() if p]
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"{where}: expected a list of integers, got {value!r}"
    out = []
    for v in value:
        x, err = num(v, "int")
        if err:
            return None, err
        out.append(x)
    if spec.kind == "int_pair":
        if len(out) != 2 or out[0] > out[1]:
            return None, f"{where}: expected [low, high] with low <= high, got {value!r}"
    return out, None


@dataclass(frozen=True)
class Step:
    """One resolved step of a chain: canonical type name and its full parameters (defaults filled)."""

    type: str
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"type": self.type, "params": dict(self.params)}


def resolve_chain(steps: list[tuple[str, dict]]) -> list[Step]:
    """Validate ``[(type name, {param: value}), ...]`` and fill defaults.

    Raises :class:`ChainError` listing every unknown type, unknown parameter and invalid value at once.
    """
    problems: list[str] = []
    out: list[Step] = []
    if not steps:
        problems.append(f"no degradation type given; valid types: {valid_type_names()}")
    for name, given in steps:
        canon = canonical_type(name)
        if canon is None:
            problems.append(f"unknown degradation type {name!r}; valid types: {valid_type_names()}")
            continue
        specs = PARAM_SPECS[canon]
        params: dict[str, Any] = {}
        for key in given:
            if key not in specs:
                problems.append(f"{canon}: unknown parameter {key!r}; valid parameters: {', '.join(specs)}")
        for key, spec in specs.items():
            value = given.get(key, spec.default)
            if key not in given and isinstance(value, list):
                value = list(value)
            v, err = _check_value(canon, key, spec, value)
            if err:
                problems.append(err)
            params[key] = v
        out.append(Step(canon, params))
    if problems:
        raise ChainError(problems)
    return out


def chain_from_json(chain: list[dict]) -> list[Step]:
    """Steps from recorded JSON (``[{"type": ..., "params": {...}}]``), re-validated."""
    return resolve_chain([(s["type"], dict(s.get("params", {}))) for s in chain])


def chain_hash(chain: list[Step]) -> str:
    """Stable hash (sha256, 16 hex) of the resolved chain: changes whenever any parameter changes."""
    blob = json.dumps({"schema": SCHEMA_VERSION, "chain": [s.to_json() for s in chain]},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def chain_output_codec(chain: list[Step]) -> str:
    """``"jpeg"`` when the last step ends with a JPEG pass (its exact bytes are the output), else ``"png"``."""
    last = chain[-1]
    if last.type == "jpeg" or (last.type == "blur" and last.params.get("jpeg_quality") is not None):
        return "jpeg"
    return "png"


def apply_chain(image: Any, chain: list[Step], rng: np.random.Generator, *, encode_last: bool = False):
    """Run the steps in order with one generator.

    ``encode_last=False``: return the RGB uint8 array. ``encode_last=True``: return ``(pixels, None)`` for a
    lossless chain or ``(None, jpeg_bytes)`` for a chain that ends with a JPEG pass (the bytes of the last round,
    not decoded); decoding those bytes gives exactly what ``encode_last=False`` returns.
    """
    img = _as_rgb(image)
    for i, step in enumerate(chain):
        last = i == len(chain) - 1
        if last and encode_last:
            tail = _ENCODING_TAIL.get(step.type)
            if tail is not None:
                return tail(img, rng, **step.params)
            return REGISTRY[step.type](img, rng, **step.params), None
        img = REGISTRY[step.type](img, rng, **step.params)
    return img
