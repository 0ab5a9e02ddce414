"""Seeded growth: confident seeds fill their blood-density region, within limits, never from nothing."""

from __future__ import annotations

import numpy as np
import pytest

from worker.measure.seeded_growth import GrowthSettings, blood_region, grow_from_seeds

SPACING = (0.5, 0.5)


def _slice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU 128x128: skull ring (800 HU), brain 35 HU, a 70 HU bleed of radius 20 px, a bright spot far away."""
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    hu = np.full((128, 128), -1000.0, np.float32)
    hu[r < 60] = 800.0
    inside = r < 55
    hu[inside] = 35.0
    bleed = np.hypot(yy - 60, xx - 50) < 20
    hu[bleed] = 70.0
    far = np.hypot(yy - 64, xx - 100) < 5
    hu[far] = 70.0
    return hu, inside.astype(np.uint8), bleed


def test_a_confident_core_grows_to_the_whole_bleed_and_no_further() -> None:
    hu, inside, bleed = _slice()
    core = (np.hypot(*np.mgrid[:128, :128] - np.array([60, 50])[:, None, None]) < 5).astype(np.uint8)
    probabilities = core * 0.95
    settings = GrowthSettings(max_distance_mm=15.0)
    region = blood_region(hu, inside=inside, pixel_spacing_mm=SPACING, settings=settings)
    grown = grow_from_seeds(
        core, probabilities=probabilities, region=region, pixel_spacing_mm=SPACING, settings=settings
    )
    dice = 2 * (grown.astype(bool) & bleed).sum() / (grown.sum() + bleed.sum())
    assert dice > 0.95
    assert grown[64, 100] == 0  # the separate bright spot has no seed of its own


def test_growth_is_capped_in_mm_from_the_seed() -> None:
    hu, inside, bleed = _slice()
    core = np.zeros_like(inside)
    core[60, 50] = 1
    settings = GrowthSettings(max_distance_mm=3.0)  # 6 pixels of 0.5 mm
    region = blood_region(hu, inside=inside, pixel_spacing_mm=SPACING, settings=settings)
    grown = grow_from_seeds(core, probabilities=core * 1.0, region=region, pixel_spacing_mm=SPACING, settings=settings)
    rows, cols = np.nonzero(grown)
    assert np.hypot(rows - 60, cols - 50).max() <= 6 * 1.12  # an octagon: at most 12 % beyond the radius
    assert grown.sum() < bleed.sum() / 3


def test_uncertain_pieces_and_empty_masks_never_grow() -> None:
    hu, inside, _bleed = _slice()
    settings = GrowthSettings()
    region = blood_region(hu, inside=inside, pixel_spacing_mm=SPACING, settings=settings)
    core = np.zeros_like(inside)
    core[58:62, 48:52] = 1
    weak = grow_from_seeds(core, probabilities=core * 0.6, region=region, pixel_spacing_mm=SPACING, settings=settings)
    assert np.array_equal(weak, core)
    nothing = grow_from_seeds(
        np.zeros_like(core),
        probabilities=np.full(core.shape, 0.99),
        region=region,
        pixel_spacing_mm=SPACING,
        settings=settings,
    )
    assert nothing.sum() == 0
    off = GrowthSettings(enabled=False)
    assert np.array_equal(
        grow_from_seeds(core, probabilities=core * 1.0, region=region, pixel_spacing_mm=SPACING, settings=off), core
    )


def test_growth_never_reaches_bone_or_its_margin() -> None:
    hu, inside, _ = _slice()
    hu[np.hypot(*np.mgrid[:128, :128] - 64.0) >= 50] = 800.0  # thicker skull, touching blood-density brain
    hu[(np.hypot(*np.mgrid[:128, :128] - 64.0) < 50)] = 70.0  # the whole brain at blood density
    settings = GrowthSettings(max_distance_mm=100.0, bone_margin_mm=2.0)
    region = blood_region(hu, inside=np.ones_like(inside), pixel_spacing_mm=SPACING, settings=settings)
    seed = np.zeros_like(inside)
    seed[64, 64] = 1
    grown = grow_from_seeds(seed, probabilities=seed * 1.0, region=region, pixel_spacing_mm=SPACING, settings=settings)
    r = np.hypot(*np.nonzero(grown) - np.array([[64], [64]]))
    assert r.max() <= 50 - 2.0 / 0.5 + 1  # 2 mm (4 px) short of the bone, no pixel beyond


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="high > low"):
        GrowthSettings(hu_low=90, hu_high=50)
    with pytest.raises(ValueError, match="seed probability"):
        GrowthSettings(seed_probability=1.5)
    with pytest.raises(ValueError, match="max_distance_mm"):
        GrowthSettings(max_distance_mm=-1)


def test_stacks_of_slices_grow_slice_by_slice() -> None:
    hu, inside, bleed = _slice()
    settings = GrowthSettings()
    stack_hu = np.stack([hu, hu])
    region = np.stack([blood_region(h, inside=inside, pixel_spacing_mm=SPACING, settings=settings) for h in stack_hu])
    seeds = np.zeros((2, 128, 128), np.uint8)
    seeds[0, 58:62, 48:52] = 1  # a seed on slice 0 only
    grown = grow_from_seeds(
        seeds, probabilities=seeds * 0.9, region=region, pixel_spacing_mm=SPACING, settings=settings
    )
    assert grown[0].sum() > 0.9 * bleed.sum()
    assert grown[1].sum() == 0  # never added to a slice where the model found nothing
