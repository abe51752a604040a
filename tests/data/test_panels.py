"""kontext_data.panels: equal panels, gutters (auto, explicit, JPEG ringing), remainders, unequal panels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kontext_data.panels import GeometryError, plan_axis, plan_panels
from kontext_data.split import split_composites
from splitkit import PANEL, composite, config, panel, photo, read


def test_subjects200k_style_gutter_is_detected_and_removed(tmp_path):
    # 8 px white frame around each panel: 16 px gutter between them, 8 px outer margin (kept)
    left, right = panel(1), panel(2)
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "s.png"), composite([left, right], 2, 1, gutter=16, margin=8))
    result = split_composites(config(src, tmp_path / "o"))
    assert result.ok
    assert result.gutters == {"x:16": 1}
    assert result.panel_sizes == {f"{PANEL + 8}x{PANEL + 16}": 1}
    edit, ref = read(tmp_path / "o/edit/s.png"), read(tmp_path / "o/reference/s.png")
    np.testing.assert_array_equal(edit[8:-8, 8:], left)  # the right edge of the left panel is content
    np.testing.assert_array_equal(ref[8:-8, :-8], right)


def test_gutter_found_in_jpeg_composites_despite_ringing(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    panels = {}
    for i in range(3):
        panels[i] = (photo(30 + i), photo(40 + i))
        image = composite(list(panels[i]), 2, 1, gutter=16, margin=8)
        cv2.imwrite(str(src / f"j{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    auto = split_composites(config(src, tmp_path / "auto"))  # JPEG: separator tolerance raised to 32
    assert auto.ok and auto.lossy_sources == 3
    # ringing may eat a line or two at the band's edges, never content
    assert all(k.startswith("x:") and 12 <= int(k[2:]) <= 16 for k in auto.gutters), auto.gutters
    pinned = split_composites(config(src, tmp_path / "pinned", gutter=16))
    assert pinned.ok and pinned.gutters == {"x:16": 3}
    edit = read(tmp_path / "pinned/edit/j1.png").astype(int)
    assert edit.shape == (PANEL + 16, PANEL + 8, 3)
    assert np.abs(edit[8:-8, 8:] - panels[1][0]).mean() < 6  # the left view, not shifted
    assert (tmp_path / "pinned/edit/j1.png").is_file()  # PNG by default: no second lossy pass


def test_remainder_pixels_are_dropped_and_reported(tmp_path):
    panels = [panel(5), panel(6)]
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "r.png"), composite(panels, 2, 1, extra_x=1, color=(0, 0, 0)))
    result = split_composites(config(src, tmp_path / "o", gutter=0))
    assert result.ok
    assert result.remainders == {"x:1 at end": 1}
    np.testing.assert_array_equal(read(tmp_path / "o/edit/r.png"), panels[0])
    np.testing.assert_array_equal(read(tmp_path / "o/reference/r.png"), panels[1])


def test_explicit_gutter_that_holds_content_is_a_problem(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), composite([panel(7), panel(8)], 2, 1))
    result = split_composites(config(src, tmp_path / "o", gutter=10))
    assert not result.ok and result.failed == 1
    assert "gutter" in result.problems[0].message and result.problems[0].row == 0
    assert not (tmp_path / "o/edit/x.png").exists()


def test_unequal_panels_are_reported_with_row_numbers_never_cut(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    good = composite([panel(9), panel(10)], 2, 1, gutter=4)
    wide = np.full((PANEL, PANEL + 4 + PANEL + 20, 3), 255, np.uint8)  # 48 | gutter 4 | 68
    wide[:, :PANEL] = panel(11)
    wide[:, PANEL + 4:] = panel(12, w=PANEL + 20)
    cv2.imwrite(str(src / "0good.png"), good)
    cv2.imwrite(str(src / "1wide.png"), wide)
    result = split_composites(config(src, tmp_path / "o"))
    assert result.written == 1 and result.failed == 1
    (problem,) = result.problems
    assert problem.row == 1 and problem.name == "1wide"
    assert "unequal" in problem.message
    assert sorted(p.name for p in (tmp_path / "o/edit").iterdir()) == ["0good.png"]


def _lines(image: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-line minimum and maximum of every channel, as plan_panels computes them."""
    return image.min(axis=axis).astype(np.int16), image.max(axis=axis).astype(np.int16)


def test_remainder_goes_to_the_start_when_only_the_start_is_uniform():
    image = composite([panel(1), panel(2)], 2, 1, color=(0, 0, 0))
    image = np.concatenate([np.zeros((PANEL, 1, 3), np.uint8), image], axis=1)  # 1 px black line on the left
    plan = plan_axis(*_lines(image, 0), 2, 0, 10, "x")
    assert (plan.starts, plan.size, plan.remainder, plan.remainder_side) == ((1, 1 + PANEL), PANEL, 1, "start")


def test_grid_plans_both_axes_and_reads_16_bit_images_on_the_8_bit_scale():
    image = composite([panel(i) for i in range(4)], 2, 2, gutter=6)
    x8, y8 = plan_panels(image, 2, 2, None, 10)
    x16, y16 = plan_panels(image.astype(np.uint16) * 257, 2, 2, None, 10)
    assert (x8, y8) == (x16, y16)
    assert x8.starts == y8.starts == (0, PANEL + 6) and x8.gutter == y8.gutter == 6 and x8.size == PANEL


def test_a_gutter_wider_than_the_panels_is_a_geometry_error():
    image = composite([panel(1), panel(2)], 2, 1)
    with pytest.raises(GeometryError, match="too small for 2 panels with a 300 px gutter"):
        plan_panels(image, 2, 1, 300, 10)
