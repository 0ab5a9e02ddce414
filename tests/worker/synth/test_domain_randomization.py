"""Random views and appearance for training slices; beam-hardening streaks."""

from __future__ import annotations

import numpy as np
import pytest

from worker.synth.ct_artifacts import beam_hardening_streaks
from worker.synth.domain_randomization import RandomizationConfig, View, random_view, randomize_appearance


def _slice(size: int = 128, spacing: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head of radius 70 mm (brain 30 HU, skull 1200 HU) with a 12 mm 'bleed' (70 HU) off centre."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) * spacing
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[r < 75] = 1200.0
    hu[r < 70] = 30.0
    bleed = np.hypot(yy - 20, xx + 25) < 12
    hu[bleed] = 70.0
    return hu, bleed.astype(np.uint8), (r < 70).astype(np.uint8)


def test_view_resamples_hu_and_mask_together() -> None:
    hu, mask, inside = _slice()
    area_mm2 = float(mask.sum()) * 1.5 * 1.5
    for seed in range(5):
        view = random_view(
            hu=hu, mask=mask, intracranial=inside, pixel_spacing_mm=(1.5, 1.5), size=64, rng=np.random.default_rng(seed)
        )
        assert view.hu.shape == view.mask.shape == view.intracranial.shape == (64, 64)
        assert view.hu.dtype == np.float32 and view.mask.dtype == np.uint8
        # The mask follows the blood: the view's mask pixels hold blood-like HU.
        assert float(np.median(view.hu[view.mask > 0])) == pytest.approx(70.0, abs=12.0)
        # Area is kept within resampling and elastic error (mm^2 on the output grid).
        assert float(view.mask.sum()) * view.pixel_mm**2 == pytest.approx(area_mm2, rel=0.3)
        # The head fills the configured share of the frame.
        cols = np.flatnonzero((view.hu > -300).any(axis=0))
        width_px = cols[-1] - cols[0] + 1
        assert 0.35 * 64 <= width_px <= 1.0 * 64


def test_appearance_stays_in_model_range_and_varies() -> None:
    hu, mask, inside = _slice(64, 3.0)
    view = View(hu=hu, mask=mask, intracranial=inside, pixel_mm=3.0)
    images = [randomize_appearance(view, rng=np.random.default_rng(s)) for s in range(12)]
    for image in images:
        assert image.shape == (64, 64) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        # Blood stays brighter than brain whatever the window, noise and export.
        assert float(image[mask > 0].mean()) > float(image[(inside > 0) & (mask == 0)].mean())
    brain_levels = [float(np.median(image[(inside > 0) & (mask == 0)])) for image in images]
    assert max(brain_levels) - min(brain_levels) > 0.1  # windows and gains differ


def test_model_window_without_randomisation_is_the_inference_mapping() -> None:
    hu, mask, inside = _slice(64, 3.0)
    fixed = RandomizationConfig(
        offset_hu=0.0,
        gain=(1.0, 1.0),
        noise_hu=(0.0, 0.0),
        random_window_fraction=0.0,
        export_8bit_fraction=0.0,
        arc_fraction=0.0,
        streak_fraction=0.0,
    )
    from worker.model.preprocess import window_to_unit

    for seed in range(6):
        image = randomize_appearance(
            View(hu=hu, mask=mask, intracranial=inside, pixel_mm=3.0), rng=np.random.default_rng(seed), config=fixed
        )
        expected = window_to_unit(hu, window=(-20.0, 100.0))
        # Only the kernel (blur or sharpening) and gamma may differ; far from edges, nothing.
        assert float(np.median(np.abs(image - expected))) < 0.05


def test_beam_hardening_darkens_between_dense_bones_and_spares_a_slice_without_bone() -> None:
    size, pixel_mm = 128, 1.5
    hu = np.full((size, size), 35.0, dtype=np.float32)
    hu[60:68, 20:34] = 2000.0  # two petrous-like bones
    hu[60:68, 94:108] = 2000.0
    out = beam_hardening_streaks(hu, pixel_mm=pixel_mm, strength=1.0, rng=np.random.default_rng(0))
    between = (out - hu)[61:67, 45:83]
    above = (out - hu)[10:20, 45:83]
    assert float(between.mean()) < -5.0  # the dark band between them
    assert float(between.mean()) < float(above.mean()) - 3.0
    plain = np.full((size, size), 35.0, dtype=np.float32)
    np.testing.assert_array_equal(
        beam_hardening_streaks(plain, pixel_mm=pixel_mm, strength=1.0, rng=np.random.default_rng(0)), plain
    )


def _head_slice(size: int = 160, spacing: float = 1.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head filling most of the frame (brain 33 HU, skull 1200 HU) with a 70 HU bleed."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) * spacing
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[r < 80] = 1200.0
    hu[r < 74] = 33.0
    bleed = np.hypot(yy - 20, xx + 25) < 15
    hu[bleed] = 70.0
    return hu, bleed.astype(np.uint8), (r < 74).astype(np.uint8)


def test_the_physical_hu_path_keeps_hu_calibrated() -> None:
    """No gain, gamma or random window: brain and blood stay within the offset and noise of their HU."""
    hu, mask, inside = _head_slice()
    config = RandomizationConfig.physical(screenshot_fraction=0.0)
    from worker.model.preprocess import window_to_unit

    for seed in range(8):
        image = randomize_appearance(
            View(hu=hu, mask=mask, intracranial=inside, pixel_mm=1.2), rng=np.random.default_rng(seed), config=config
        )
        expected = window_to_unit(hu, window=(-20.0, 100.0))
        brain = (inside > 0) & (mask == 0)
        for region in (brain, mask > 0):
            shift_hu = (float(np.median(image[region])) - float(np.median(expected[region]))) * 60.0
            assert abs(shift_hu) <= 4.0 + 1.5  # the calibration offset, plus the noise's median wobble


def test_the_screenshot_path_reads_back_through_the_inference_calibration() -> None:
    """Any brain display window: after re-anchoring the brain sits at 33 HU and blood clearly above it."""
    hu, mask, inside = _head_slice()
    config = RandomizationConfig.physical(screenshot_fraction=1.0)
    brain = (inside > 0) & (mask == 0)
    levels = []
    for seed in range(10):
        image = randomize_appearance(
            View(hu=hu, mask=mask, intracranial=inside, pixel_mm=1.2), rng=np.random.default_rng(seed), config=config
        )
        brain_hu = (float(np.median(image[brain])) + 1.0) * 60.0 - 20.0
        blood_hu = (float(np.median(image[mask > 0])) + 1.0) * 60.0 - 20.0
        assert brain_hu == pytest.approx(33.0, abs=4.0)
        assert blood_hu > brain_hu + 20.0
        levels.append(blood_hu)
    assert max(levels) - min(levels) > 10.0  # the display width varies what blood reads
