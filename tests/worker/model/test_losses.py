"""The BCE + Dice loss against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.model import losses


def _t(values: list[list[float]]) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(1, 2, 2, 1)


def test_soft_dice_per_image_uses_sums() -> None:
    y = _t([[1, 1], [0, 0]])
    p = _t([[1.0, 0.5], [0.5, 0.0]])
    # intersection 1.5, sum(y) 2, sum(p) 2 -> (2*1.5 + 1) / (4 + 1) = 0.8
    assert float(np.asarray(losses.soft_dice_per_image(y, p))[0]) == pytest.approx(0.8)


def test_dice_loss_is_one_minus_batch_mean() -> None:
    y = np.concatenate([_t([[1, 1], [0, 0]]), _t([[0, 0], [0, 0]])])
    p = np.concatenate([_t([[1, 1], [0, 0]]), _t([[0.5, 0.5], [0, 0]])])
    # image 1: (4+1)/(4+1) = 1; image 2 (empty truth): (0+1)/(0+1+1) = 0.5
    assert float(losses.dice_loss(y, p)) == pytest.approx(1 - (1.0 + 0.5) / 2)


def test_dice_term_still_has_weight_for_small_lesions() -> None:
    """The seed's mean-based Dice stays near 0 for a 1% lesion; the sum-based one does not."""
    y = np.zeros((1, 100, 100, 1), np.float32)
    y[0, :10, :10] = 1.0  # 1% of the image
    p = np.zeros_like(y)  # the model predicts nothing
    assert float(losses.dice_loss(y, p)) == pytest.approx(1 - 1 / 101, rel=1e-6)


def test_bce_matches_the_formula() -> None:
    y = _t([[1, 0], [1, 0]])
    p = _t([[0.9, 0.2], [0.6, 0.1]])
    expected = -np.mean([math.log(0.9), math.log(0.8), math.log(0.6), math.log(0.9)])
    assert float(losses.bce_loss(y, p)) == pytest.approx(expected, rel=1e-5)


def test_bce_dice_is_the_sum_and_zero_for_a_perfect_prediction() -> None:
    y = _t([[1, 0], [1, 0]])
    p = _t([[0.9, 0.2], [0.6, 0.1]])
    total = float(losses.bce_dice_loss(y, p))
    assert total == pytest.approx(float(losses.bce_loss(y, p)) + float(losses.dice_loss(y, p)), rel=1e-6)
    assert float(losses.bce_dice_loss(y, y)) == pytest.approx(0.0, abs=1e-5)


def test_hard_dice_thresholds_at_half() -> None:
    y = _t([[1, 1], [0, 0]])
    p = _t([[0.6, 0.4], [0.7, 0.0]])  # predicted mask {0, 2}: intersection 1
    assert float(losses.hard_dice(y, p)) == pytest.approx(2 * 1 / (2 + 2), abs=1e-5)
