"""8-bit slice images to estimated HU: the parenchyma anchor, a known window, the seed's convention."""

from __future__ import annotations

import numpy as np
import pytest

from worker.imaging.slice_calibration import PARENCHYMA_HU, calibrate_image, parenchyma_level

MODEL_WINDOW = (-20.0, 100.0)


def _head(*, parenchyma: int, size: int = 256, blood: int | None = None) -> np.ndarray:
    """A dark frame, a saturated skull ring and brain at ``parenchyma`` (+-6 levels of noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.zeros((size, size), np.float32)
    image[r < 0.42 * size] = 255
    brain = r < 0.38 * size
    image[brain] = parenchyma + rng.normal(0, 3, size=(size, size))[brain]
    if blood is not None:
        image[np.hypot(yy - size / 2 + 20, xx - size / 2 - 15) < 12] = blood
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("level", [90, 130, 160])
def test_the_parenchyma_level_is_the_brain_not_the_skull_or_the_air(level: int) -> None:
    found = parenchyma_level(_head(parenchyma=level, blood=230))
    assert found is not None and abs(found - level) <= 2


def test_parenchyma_calibration_reads_the_brain_as_33_hu_and_keeps_the_model_width() -> None:
    image = _head(parenchyma=147, blood=230)
    cal = calibrate_image(image, model_window=MODEL_WINDOW)
    assert cal.method == "parenchyma"
    assert cal.high_hu - cal.low_hu == pytest.approx(120.0)
    hu = cal.to_hu(np.array([147, 230], np.uint8))
    assert hu[0] == pytest.approx(PARENCHYMA_HU, abs=1.0)
    # 83 levels above the brain at 120 HU per 255 levels: blood at about 72 HU.
    assert hu[1] == pytest.approx(PARENCHYMA_HU + 83 * 120 / 255, abs=1.0)


def test_a_known_display_window_is_used_exactly() -> None:
    cal = calibrate_image(_head(parenchyma=120), method="window", model_window=MODEL_WINDOW, display_window=(0, 80))
    assert cal.to_hu(np.array([0, 255, 102], np.uint8)).tolist() == pytest.approx([0.0, 80.0, 32.0], abs=1e-4)
    with pytest.raises(ValueError, match="display window"):
        calibrate_image(_head(parenchyma=120), method="window", model_window=MODEL_WINDOW)


def test_none_is_the_seeds_convention_and_a_blank_image_falls_back_to_it() -> None:
    cal = calibrate_image(_head(parenchyma=120), method="none", model_window=MODEL_WINDOW)
    assert (cal.low_hu, cal.high_hu) == MODEL_WINDOW
    blank = calibrate_image(np.zeros((64, 64), np.uint8), model_window=MODEL_WINDOW)
    assert blank.method == "none" and "no head" in blank.note
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibrate_image(blank_image := np.zeros((8, 8), np.uint8), method="gamma", model_window=MODEL_WINDOW)
    assert blank_image.sum() == 0


def test_a_screenshot_of_real_hu_comes_back_near_its_hu() -> None:
    """An export of HU through W80/L40 re-anchored on its parenchyma: blood back within 15 HU."""
    rng = np.random.default_rng(1)
    size = 256
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < 0.42 * size] = 1000.0
    brain = r < 0.38 * size
    hu[brain] = 33.0 + rng.normal(0, 3, (size, size))[brain]
    blood = np.hypot(yy - 110, xx - 140) < 14
    hu[blood] = 70.0
    pixels = np.clip(np.rint((hu - 0.0) * 255 / 80), 0, 255).astype(np.uint8)
    cal = calibrate_image(pixels, model_window=MODEL_WINDOW)
    estimate = cal.to_hu(pixels)
    assert abs(float(np.median(estimate[brain & ~blood])) - 33.0) < 2.0
    # The width is assumed (120 HU, the model's), not known (80): blood reads 33 + 37 * 1.5.
    assert 70.0 - 15 < float(np.median(estimate[blood])) < 33 + 37 * 1.5 + 2
