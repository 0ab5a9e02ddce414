"""The paper's metrics against values computed by hand on small arrays, empty cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.research import metrics


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """Truth 4 pixels, prediction 3 pixels, 2 shared, on a 4x4 slice: TP 2, FP 1, FN 2, TN 11."""
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :4] = 1
    prediction = np.zeros((4, 4), np.uint8)
    prediction[0, 2:4] = 7  # any non-zero value is hematoma
    prediction[3, 3] = 1
    return truth, prediction


def test_confusion_counts_every_pixel() -> None:
    truth, prediction = _masks()
    assert metrics.confusion(truth, prediction) == metrics.Confusion(tp=2, fp=1, fn=2, tn=11)


def test_overlap_scores_match_hand_computed_values() -> None:
    truth, prediction = _masks()
    scores = metrics.overlap_scores(metrics.confusion(truth, prediction))
    expected = {
        "sensitivity": 2 / 4,
        "specificity": 11 / 12,
        "precision": 2 / 3,
        "dice": 2 * 2 / (2 * 2 + 1 + 2),
        "jaccard": 2 / 5,
        "voe": 3 / 5,
        "rvd": (3 - 4) / 4,
        "accuracy": 13 / 16,
    }
    assert set(scores) == set(metrics.METRIC_NAMES)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value), name


def test_both_empty_is_agreement_and_ratios_without_denominator_are_undefined() -> None:
    empty = np.zeros((3, 3), np.uint8)
    scores = metrics.overlap_scores(metrics.confusion(empty, empty))
    assert scores["dice"] == 1.0 and scores["jaccard"] == 1.0 and scores["voe"] == 0.0
    assert scores["specificity"] == 1.0 and scores["accuracy"] == 1.0
    assert math.isnan(scores["sensitivity"]) and math.isnan(scores["precision"]) and math.isnan(scores["rvd"])


def test_empty_prediction_on_blood_is_a_miss() -> None:
    truth = np.zeros((3, 3), np.uint8)
    truth[1, 1:] = 1
    scores = metrics.overlap_scores(metrics.confusion(truth, np.zeros_like(truth)))
    assert scores["dice"] == 0.0 and scores["jaccard"] == 0.0 and scores["voe"] == 1.0
    assert scores["sensitivity"] == 0.0 and scores["rvd"] == -1.0 and scores["specificity"] == 1.0
    assert math.isnan(scores["precision"])  # nothing predicted: precision undefined
    assert scores["accuracy"] == pytest.approx(7 / 9)


def test_false_alarm_on_an_empty_slice() -> None:
    prediction = np.zeros((2, 5), np.uint8)
    prediction[0, 0] = 1
    scores = metrics.overlap_scores(metrics.confusion(np.zeros_like(prediction), prediction))
    assert scores["dice"] == 0.0 and scores["precision"] == 0.0
    assert scores["specificity"] == pytest.approx(9 / 10)
    assert math.isnan(scores["sensitivity"]) and math.isnan(scores["rvd"])


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion(np.zeros((2, 2)), np.zeros((2, 3)))


def _three_slices() -> tuple[np.ndarray, np.ndarray]:
    """Slice 0: the hand-computed pair; slice 1: both empty; slice 2: a false alarm."""
    truth = np.zeros((3, 4, 4), np.uint8)
    prediction = np.zeros((3, 4, 4), np.uint8)
    truth[0], prediction[0] = _masks()
    prediction[2, 1, 1] = 1
    return truth, prediction


def test_slice_table_has_one_value_per_slice() -> None:
    table = metrics.slice_table(*_three_slices())
    np.testing.assert_allclose(table["dice"], [4 / 7, 1.0, 0.0])
    np.testing.assert_array_equal(table["has_hematoma"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(table["truth_pixels"], [4, 0, 0])
    np.testing.assert_array_equal(table["predicted_pixels"], [3, 0, 1])
    assert math.isnan(table["precision"][1]) and table["precision"][2] == 0.0


def test_hematoma_view_uses_only_slices_with_blood_and_all_view_counts_empty_agreement() -> None:
    table = metrics.slice_table(*_three_slices())
    hematoma = metrics.summarize_slices(table, view="hematoma")
    assert hematoma["dice"].mean == pytest.approx(4 / 7) and hematoma["dice"].n == 1
    everything = metrics.summarize_slices(table, view="all")
    assert everything["dice"].mean == pytest.approx((4 / 7 + 1.0 + 0.0) / 3) and everything["dice"].n == 3
    # sensitivity is undefined on the two slices without blood: only one value counts
    assert everything["sensitivity"].n == 1 and everything["sensitivity"].mean == pytest.approx(0.5)
    # precision: slice 0 (2/3) and the false alarm (0); the empty slice has none
    assert everything["precision"].n == 2 and everything["precision"].mean == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="view"):
        metrics.summarize_slices(table, view="patients")


def test_summarize_skips_undefined_values_and_uses_the_sample_sd() -> None:
    summary = metrics.summarize([1.0, math.nan, 3.0, 5.0])
    assert summary.n == 3 and summary.mean == pytest.approx(3.0) and summary.sd == pytest.approx(2.0)
    assert (summary.q1, summary.median, summary.q3) == pytest.approx((2.0, 3.0, 4.0))
    assert summary.text(2) == "3.00 +- 2.00 (n=3)"
    single = metrics.summarize([0.5])
    assert single.n == 1 and math.isnan(single.sd) and single.text(1) == "0.5 +- n/a (n=1)"
    assert metrics.summarize([math.nan]).text() == "n/a (n=0)"


def test_volume_agreement_matches_hand_computed_values() -> None:
    agreement = metrics.volume_agreement(true_ml=[10.0, 20.0, 30.0], predicted_ml=[12.0, 18.0, 33.0])
    # errors 2, -2, 3
    assert agreement.n == 3
    assert agreement.rmse_ml == pytest.approx(math.sqrt(17 / 3))
    assert agreement.mae_ml == pytest.approx(7 / 3)
    assert agreement.bias_ml == pytest.approx(1.0)
    assert agreement.sd_error_ml == pytest.approx(math.sqrt(7.0))  # deviations 1, -3, 2 over n - 1
    assert agreement.loa_low_ml == pytest.approx(1 - 1.96 * math.sqrt(7.0))
    assert agreement.loa_high_ml == pytest.approx(1 + 1.96 * math.sqrt(7.0))
    assert agreement.r2 == pytest.approx(1 - 17 / 200)
    # cov 210, SS(true) 200, SS(pred) 234
    assert agreement.pearson_r2 == pytest.approx(210**2 / (200 * 234))
    assert agreement.slope == pytest.approx(1.05) and agreement.intercept_ml == pytest.approx(0.0, abs=1e-9)


def test_volume_agreement_with_one_patient_or_bad_input() -> None:
    one = metrics.volume_agreement(true_ml=[4.0], predicted_ml=[5.5])
    assert one.rmse_ml == pytest.approx(1.5) and one.bias_ml == pytest.approx(1.5)
    assert math.isnan(one.sd_error_ml) and math.isnan(one.r2) and math.isnan(one.slope)
    constant = metrics.volume_agreement(true_ml=[0.0, 0.0], predicted_ml=[0.0, 1.0])
    assert math.isnan(constant.r2) and constant.mae_ml == pytest.approx(0.5)
    with pytest.raises(ValueError, match="true volumes"):
        metrics.volume_agreement(true_ml=[1.0, 2.0], predicted_ml=[1.0])
    with pytest.raises(ValueError, match="no volumes"):
        metrics.volume_agreement(true_ml=[], predicted_ml=[])
    with pytest.raises(ValueError, match="finite"):
        metrics.volume_agreement(true_ml=[1.0], predicted_ml=[math.nan])
