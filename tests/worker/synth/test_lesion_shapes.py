"""Real hemorrhage outlines: cross-sections of a label volume, placed inside the allowed brain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.synth.lesion_shapes import ShapeBank, cross_sections, load_shape_bank


def _sphere(radius: float = 12.0) -> np.ndarray:
    zz, yy, xx = np.mgrid[:40, :40, :40]
    return np.hypot(np.hypot(zz - 20, yy - 20), xx - 20) <= radius


def test_cross_sections_of_a_sphere_are_discs_no_larger_than_its_equator() -> None:
    shapes = cross_sections(_sphere(), n=20, seed=1)
    assert len(shapes) == 20
    for shape in shapes:
        area = float(shape.sum())
        assert 20 <= area <= np.pi * 12.5**2
        assert abs(shape.shape[0] - shape.shape[1]) <= 2  # round, whatever the angle


def test_place_puts_a_shape_inside_the_allowed_region_at_the_asked_scale() -> None:
    bank = ShapeBank(shapes=cross_sections(_sphere(), n=10, seed=2), share=1.0, scale=(1.0, 1.0))
    allowed = np.zeros((200, 200), bool)
    allowed[40:160, 40:160] = True
    distance = np.zeros((200, 200), np.float32)
    distance[allowed] = 30.0
    placed = bank.place(distance=distance, allowed=allowed, pixel_mm=0.5, rng=np.random.default_rng(3))
    assert placed is not None
    mask, (cy, cx), radius_px = placed
    assert mask.sum() > 0 and not mask[~allowed].any()
    # 1 mm shapes on a 0.5 mm grid: four times the pixels of the 1 mm cut.
    assert 4 * 20 < mask.sum() <= 4 * np.pi * 12.5**2 * 1.1
    assert radius_px == pytest.approx(np.sqrt(mask.sum() / np.pi))
    assert allowed[int(cy), int(cx)]


def test_no_room_no_shape() -> None:
    bank = ShapeBank(shapes=cross_sections(_sphere(), n=3, seed=2), share=1.0)
    allowed = np.zeros((50, 50), bool)
    assert (
        bank.place(distance=np.zeros((50, 50), np.float32), allowed=allowed, pixel_mm=1.0, rng=np.random.default_rng(0))
        is None
    )


@pytest.mark.realdata
def test_the_blast_ct_label_map_gives_hundreds_of_real_outlines(blast_ct_assets: Path) -> None:
    bank = load_shape_bank(blast_ct_assets / "scan_0_segmentation.nii.gz", n=50)
    areas = np.array([s.sum() for s in bank.shapes])
    assert len(bank.shapes) == 50
    assert areas.max() > 500 and areas.min() >= 20  # from small cuts to cuts of several cm^2
    with pytest.raises(ValueError, match="no voxel of label 9"):
        load_shape_bank(blast_ct_assets / "scan_0_segmentation.nii.gz", label=9)
