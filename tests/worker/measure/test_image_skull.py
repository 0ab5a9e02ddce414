"""The skull of an 8-bit slice from its saturated ring; saturated blood inside stays inside."""

from __future__ import annotations

import numpy as np
import pytest

from worker.measure.image_skull import HEAD_WIDTH_MM, estimate_pixel_mm, image_skull


def _screenshot(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size), np.uint8)
    image[r < 0.42 * size] = 255  # skull, saturated
    brain = r < 0.38 * size
    image[brain] = 140
    blood = np.hypot(yy - 0.45 * size, xx - 0.4 * size) < 0.06 * size
    image[blood] = 255  # dense blood saturates too
    arc = (np.abs(np.hypot(yy + 0.2 * size, xx - size / 2) - 1.15 * size) < 2) & (yy > 0.85 * size)
    image[arc] = 255  # a head-holder arc below the head
    return image, brain, blood


@pytest.mark.parametrize("size", [256, 1440])
def test_saturated_blood_inside_the_ring_is_inside_and_not_bone(size: int) -> None:
    image, brain, blood = _screenshot(size)
    skull = image_skull(image)
    inside = skull.inside > 0
    assert inside[blood].mean() > 0.95
    assert skull.bone[blood].sum() == 0
    assert inside[brain].mean() > 0.9
    assert not inside[~(np.hypot(*np.mgrid[:size, :size] - size / 2) < 0.42 * size)].any()
    assert skull.pixel_mm == pytest.approx(HEAD_WIDTH_MM / (0.84 * size), rel=0.03)


def test_pixel_size_from_the_head_width_or_the_default() -> None:
    image, _, _ = _screenshot(300)
    assert estimate_pixel_mm(image) == pytest.approx(150.0 / 252, rel=0.03)
    assert estimate_pixel_mm(np.zeros((64, 64), np.uint8)) == 0.5
    assert image_skull(np.zeros((64, 64), np.uint8)).inside.sum() == 0


def test_an_open_ring_falls_back_to_the_convex_hull_of_the_skull() -> None:
    """A craniectomy-like gap of a quarter of the ring: the enclosed space would leak away entirely."""
    image, brain, blood = _screenshot(256)
    yy, xx = np.mgrid[:256, :256]
    gap = (np.arctan2(yy - 128, xx - 128) > 0) & (np.arctan2(yy - 128, xx - 128) < np.pi / 2)
    ring = (np.hypot(yy - 128, xx - 128) >= 0.38 * 256) & (np.hypot(yy - 128, xx - 128) < 0.42 * 256)
    image[ring & gap] = 140  # the bone flap is gone: brain density up to the scalp
    skull = image_skull(image)
    assert skull.open_ring
    assert (skull.inside > 0)[blood].mean() > 0.95
    assert (skull.inside > 0)[brain & ~gap].mean() > 0.9
    closed = image_skull(_screenshot(256)[0])
    assert not closed.open_ring
