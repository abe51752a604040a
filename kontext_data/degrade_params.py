"""The degradation types' parameters as data: names, kinds, defaults, limits and their documentation.

In: nothing (declarations). Out: `PARAM_SPECS` (type -> parameter -> `Param`), the SimpleTuner type `ALIASES` and the
upscale method names. kontext_data.degradations implements the types and validates values against these specs;
`kontext-data degrade` generates one option per parameter from them. Pure Python (no numpy/OpenCV), so building the
command line's options costs nothing at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UPSCALE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos")
"""Interpolation back to the original size after a downscale (OpenCV's nearest, linear, cubic, Lanczos-4)."""

#: SimpleTuner generator names -> our canonical names
ALIASES: dict[str, str] = {"superresolution": "blur", "jpeg_artifacts": "jpeg"}


@dataclass(frozen=True)
class Param:
    """One parameter: default, kind ('float', 'int', 'bool', 'str', 'int_pair', 'int_list'), limits."""

    default: Any
    kind: str
    doc: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # None allowed
    exclusive_min: bool = False


PARAM_SPECS: dict[str, dict[str, Param]] = {
    "blur": {
        "blur_radius": Param(2.0, "float", "Gaussian sigma / box half-width in px (motion: default length 2r+1)",
                             minimum=0.0, maximum=256.0),
        "blur_type": Param("gaussian", "str", "kernel shape", choices=("gaussian", "box", "motion", "both")),
        "motion_length": Param(None, "float", "motion streak length in px (default 2*blur_radius+1)",
                               minimum=1.0, maximum=512.0, optional=True),
        "motion_angle": Param(None, "float", "motion direction in degrees (default: drawn per image in [0,180))",
                              minimum=-360.0, maximum=360.0, optional=True),
        "add_noise": Param(True, "bool", "add Gaussian noise after the blur"),
        "noise_level": Param(0.02, "float", "noise std as a fraction of 255", minimum=0.0, maximum=1.0),
        "downscale_factor": Param(None, "float", "down-then-up scale factor before the blur (>1)",
                                  minimum=1.0, maximum=64.0, optional=True),
        "jpeg_quality": Param(None, "int", "optional final JPEG pass at this quality (output is .jpg)",
                              minimum=1, maximum=100, optional=True),
    },
    "jpeg": {
        "quality_mode": Param("fixed", "str", "how the base quality is chosen", choices=("fixed", "range", "random")),
        "quality": Param(25, "int", "base quality for quality_mode=fixed", minimum=1, maximum=100),
        "quality_range": Param([10, 50], "int_pair", "inclusive [low, high] for quality_mode=range",
                               minimum=1, maximum=100),
        "quality_list": Param([10, 20, 30, 40], "int_list", "choices for quality_mode=random",
                              minimum=1, maximum=100),
        "compression_rounds": Param(1, "int", "number of encode/decode rounds", minimum=1, maximum=50),
        "round_quality_decay": Param(0.9, "float", "quality multiplier per extra round",
                                     minimum=0.0, maximum=1.0, exclusive_min=True),
        "subsampling": Param(None, "str", "chroma subsampling (default: libjpeg's 4:2:0)",
                             choices=("4:4:4", "4:2:2", "4:2:0"), optional=True),
        "optimize": Param(False, "bool", "optimized Huffman tables (same pixels, smaller file)"),
        "progressive": Param(False, "bool", "progressive JPEG (same pixels, other byte layout)"),
    },
    "noise": {
        "noise_type": Param("gaussian", "str", "noise model", choices=("gaussian", "poisson")),
        "noise_level": Param(0.02, "float", "gaussian: std / 255; poisson: std at white / 255",
                             minimum=0.0, maximum=1.0),
    },
    "downscale": {
        "factor": Param(2.0, "float", "downscale factor (area averaging)", minimum=1.0, maximum=64.0),
        "upscale": Param("bilinear", "str", "interpolation back to the original size",
                         choices=UPSCALE_METHODS),
        "restore_size": Param(True, "bool", "scale back up to the original size (False: keep the small image)"),
    },
}


def canonical_type(name: str) -> str | None:
    """Our name of a degradation type given by our name or a SimpleTuner alias (any case); None when unknown."""
    name = str(name).strip().lower()
    name = ALIASES.get(name, name)
    return name if name in PARAM_SPECS else None


def valid_type_names() -> str:
    """`blur, jpeg, ..., superresolution (= blur), ...`: what a message lists as the valid types."""
    return ", ".join(list(PARAM_SPECS) + [f"{a} (= {c})" for a, c in ALIASES.items()])
