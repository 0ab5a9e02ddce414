"""HU window, square padding and resizing to and from the model input."""

from __future__ import annotations

import numpy as np
import pytest

from worker.model import preprocess


def test_window_maps_ends_to_minus_one_and_one_and_clips() -> None:
    hu = np.array([-1000.0, -20.0, 40.0, 100.0, 3000.0])
    out = preprocess.window_to_unit(hu, window=(-20.0, 100.0))
    np.testing.assert_allclose(out, [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_window_rejects_empty_range() -> None:
    with pytest.raises(ValueError, match="high > low"):
        preprocess.window_to_unit(np.zeros(3), window=(50.0, 50.0))


def test_uint8_matches_the_seed_scale() -> None:
    np.testing.assert_allclose(preprocess.uint8_to_unit(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def test_square_slices_resize_and_come_back() -> None:
    hu = np.full((2, 64, 64), -1000.0, np.float32)
    hu[:, 16:48, 16:48] = 100.0
    x, fit = preprocess.to_model_input(hu, size=32, window=(-20.0, 100.0))
    assert x.shape == (2, 32, 32)
    assert x[0, 16, 16] == pytest.approx(1.0) and x[0, 0, 0] == pytest.approx(-1.0)
    back = preprocess.to_native((x + 1) / 2, fit)
    assert back.shape == (2, 64, 64)
    assert back[0, 32, 32] == pytest.approx(1.0) and back[0, 2, 2] == pytest.approx(0.0)


def test_non_square_slices_are_padded_not_stretched() -> None:
    hu = np.full((1, 40, 80), 100.0, np.float32)  # wide image: 40 rows, 80 columns
    x, fit = preprocess.to_model_input(hu, size=40, window=(-20.0, 100.0))
    assert (fit.side, fit.pad_top, fit.pad_left) == (80, 20, 0)
    # the content occupies the middle half of the rows in the model input
    assert x[0, 5, 20] == pytest.approx(-1.0)  # padding (air)
    assert x[0, 20, 20] == pytest.approx(1.0)  # image
    probs = np.zeros((1, 40, 40), np.float32)
    probs[0, 10:30, 0:20] = 1.0  # left half of the image band
    native = preprocess.to_native(probs, fit)
    assert native.shape == (1, 40, 80)
    assert native[0, 20, 10] == pytest.approx(1.0) and native[0, 20, 70] == pytest.approx(0.0)


def test_mask_to_model_follows_the_same_fit() -> None:
    mask = np.zeros((1, 40, 80), np.uint8)
    mask[0, 10:30, 40:80] = 1
    fit = preprocess.Fit.for_shape(40, 80, 40)
    small = preprocess.mask_to_model(mask, fit)
    assert small.dtype == np.uint8 and set(np.unique(small)) <= {0, 1}
    assert small[0, 20, 30] == 1 and small[0, 20, 10] == 0 and small[0, 5, 30] == 0
