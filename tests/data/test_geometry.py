"""Bucket geometry: alignment, areas, crop boxes inside the resized image, SimpleTuner options."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from kontext_data.geometry import KONTEXT_PREFERRED_RESOLUTIONS, GeometryOptions, apply_geometry, compute_geometry

SIZES = [(1024, 1024), (1536, 1024), (1024, 1536), (4000, 3000), (333, 777), (640, 480), (1920, 1080)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("aspect", ["preserve", "square", "closest"])
@pytest.mark.parametrize("style", ["center", "random", "corner"])
def test_crop_inside_resized_image_and_aligned(size, aspect, style):
    opts = GeometryOptions(resolution=1024, crop_aspect=aspect, crop_style=style)
    g = compute_geometry(*size, opts, np.random.default_rng(0))
    assert g.bucket_width % 16 == 0 and g.bucket_height % 16 == 0
    assert 0 <= g.crop_left <= g.intermediary_width - g.bucket_width
    assert 0 <= g.crop_top <= g.intermediary_height - g.bucket_height
    # the resize keeps the image's aspect ratio (within a pixel of rounding)
    assert abs(g.intermediary_width / g.intermediary_height - size[0] / size[1]) < 2 / min(g.intermediary_width, g.intermediary_height) + 1e-9
    # about one megapixel
    assert 0.85 < g.bucket_width * g.bucket_height / 1024**2 < 1.1


def test_pixel_area_preserve_matches_area_and_floors():
    g = compute_geometry(1536, 1024, GeometryOptions(resolution=1024))
    assert (g.bucket_width, g.bucket_height) == (1248, 832)  # floor of (1254.1, 836.1) to 16


def test_pixel_resolution_is_the_shorter_edge_and_alignment_64():
    g = compute_geometry(1000, 2000, GeometryOptions(resolution=512, resolution_type="pixel", alignment=64))
    assert g.bucket_width == 512 and g.bucket_height == 1024


def test_area_resolution_in_megapixels():
    g = compute_geometry(1000, 1000, GeometryOptions(resolution=0.25, resolution_type="area", crop_aspect="square"))
    assert (g.bucket_width, g.bucket_height) == (496, 496)  # sqrt(250000) = 500, nearest multiple of 16


def test_closest_snaps_to_kontext_inference_aspects():
    aspects = {round(w / h, 4) for w, h in KONTEXT_PREFERRED_RESOLUTIONS}
    for size in SIZES:
        g = compute_geometry(*size, GeometryOptions(resolution=1024, crop_aspect="closest"))
        ar = g.bucket_width / g.bucket_height
        assert min(abs(math.log(ar / a)) for a in aspects) < 0.03


def test_square_center_and_corner_boxes():
    c = compute_geometry(2000, 1000, GeometryOptions(resolution=512, crop_aspect="square"))
    assert (c.intermediary_width, c.intermediary_height, c.crop_left, c.crop_top) == (1024, 512, 256, 0)
    k = compute_geometry(2000, 1000, GeometryOptions(resolution=512, crop_aspect="square", crop_style="corner"))
    assert (k.crop_left, k.crop_top) == (512, 0)


def test_max_size_downsamples_then_crops_a_zoomed_bucket():
    opts = GeometryOptions(resolution=512, crop_aspect="square", max_size=1536, target_downsample_size=1024)
    g = compute_geometry(3000, 3000, opts)
    assert (g.intermediary_width, g.bucket_width) == (1024, 512)
    small = compute_geometry(1200, 1200, opts)  # under max_size: plain resize to cover the bucket
    assert small.intermediary_width == 512


def test_no_crop_resizes_straight_to_the_bucket():
    g = compute_geometry(1536, 1000, GeometryOptions(resolution=512, crop=False))
    assert (g.intermediary_width, g.intermediary_height) == (g.bucket_width, g.bucket_height)
    assert (g.crop_left, g.crop_top) == (0, 0)


def test_random_crop_needs_rng_and_options_are_validated():
    with pytest.raises(ValueError):
        compute_geometry(100, 50, GeometryOptions(resolution=32, crop_style="random"))
    problems = GeometryOptions(resolution_type="megapixel", alignment=12, max_size=100).problems()
    assert len(problems) == 3


def test_apply_geometry_output_size_and_content():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 150:] = 255  # right quarter white
    g = compute_geometry(200, 100, GeometryOptions(resolution=48, crop_aspect="square", crop_style="corner"))
    out = np.asarray(apply_geometry(Image.fromarray(arr), g.as_dict()))
    assert out.shape == (48, 48, 3)
    assert out[:, -1].mean() > 250  # corner crop keeps the white right edge
