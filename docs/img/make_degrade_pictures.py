"""Regenerate the pictures of docs/degrade.md (docs/img/degrade_*.png), deterministically, no network.

    .venv/bin/python docs/img/make_degrade_pictures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from kontext_data import degradations as D  # noqa: E402

W, H = 240, 160

PICTURES = {
    "original": [],
    "blur_gaussian": [("blur", {"blur_radius": 3.0, "add_noise": False})],
    "blur_superresolution_guide": [("superresolution", {"blur_radius": 3.0, "noise_level": 0.02})],
    "blur_box": [("blur", {"blur_type": "box", "blur_radius": 3.0, "add_noise": False})],
    "blur_motion": [("blur", {"blur_type": "motion", "motion_length": 15, "motion_angle": 30, "add_noise": False})],
    "blur_downscale_jpeg": [("blur", {"blur_radius": 1.0, "downscale_factor": 3, "jpeg_quality": 30})],
    "jpeg_q10_2rounds": [("jpeg", {"quality": 10, "compression_rounds": 2})],
    "jpeg_guide_range": [("jpeg_artifacts", {"quality_mode": "range", "quality_range": [10, 30],
                                             "compression_rounds": 2})],
    "noise_gaussian": [("noise", {"noise_level": 0.08})],
    "noise_poisson": [("noise", {"noise_type": "poisson", "noise_level": 0.15})],
    "downscale_x4": [("downscale", {"factor": 4, "upscale": "bilinear"})],
    "downscale_x4_nearest": [("downscale", {"factor": 4, "upscale": "nearest"})],
}


def scene() -> np.ndarray:
    """A small synthetic photo: sky gradient, sun, hills, a house with fine lines, and text."""
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    img = ((1 - y) * np.array([120, 170, 235]) + y * np.array([230, 240, 250])) * np.ones((1, W, 1))
    img = img.astype(np.uint8).copy()
    cv2.circle(img, (190, 35), 18, (255, 210, 60), -1, cv2.LINE_AA)
    pts = np.array([[0, 120], [60, 95], [120, 115], [180, 90], [240, 110], [240, 160], [0, 160]], np.int32)
    cv2.fillPoly(img, [pts], (70, 140, 60), cv2.LINE_AA)
    cv2.rectangle(img, (40, 80), (100, 130), (200, 80, 60), -1)
    cv2.fillPoly(img, [np.array([[35, 80], [70, 55], [105, 80]], np.int32)], (120, 50, 40), cv2.LINE_AA)
    for x in range(46, 96, 6):
        cv2.line(img, (x, 95), (x, 125), (250, 240, 220), 1)
    cv2.putText(img, "Kontext", (118, 150), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(img, "Kontext", (118, 150), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (20, 20, 20), 1, cv2.LINE_AA)
    return img


def main() -> None:
    base = scene()
    for name, steps in PICTURES.items():
        img = base if not steps else D.apply_chain(base, D.resolve_chain(steps), np.random.default_rng(0))
        out = HERE / f"degrade_{name}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        out.write_bytes(buf.tobytes())
        print(f"{out.relative_to(HERE.parents[1])}: {len(buf) // 1024} KiB")


if __name__ == "__main__":
    main()
