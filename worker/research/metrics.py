"""Segmentation and volume-agreement metrics of the DR-UNet paper (pure numpy).

Masks follow :mod:`worker.core.ct`: ``(slices, rows, columns)`` (or any shape, as long as
truth and prediction agree), any integer or boolean dtype, non-zero = hematoma.

Overlap metrics from the confusion counts
-----------------------------------------
With ``TP, FP, FN, TN`` pixel (voxel) counts, ``|T| = TP + FN`` (truth) and
``|P| = TP + FP`` (prediction):

============  ==================================  =============================================
metric        formula                             when the denominator is 0
============  ==================================  =============================================
sensitivity   TP / (TP + FN)                      NaN (no truth: nothing to find)
specificity   TN / (TN + FP)                      NaN (every pixel is hematoma)
precision     TP / (TP + FP)                      NaN (nothing predicted)
dice          2 TP / (2 TP + FP + FN)             1 (truth and prediction both empty: agreement)
jaccard       TP / (TP + FP + FN)                 1 (both empty)
voe           1 - jaccard  (volumetric overlap    0 (both empty)
              error)
rvd           (|P| - |T|) / |T|  (relative        NaN (no truth)
              volume difference, signed:
              > 0 over-, < 0 under-segmentation)
accuracy      (TP + TN) / (TP + FP + FN + TN)     NaN (no pixels)
============  ==================================  =============================================

So an empty prediction on a slice with blood scores Dice 0, Jaccard 0, sensitivity 0,
RVD -1 and an undefined precision; a false alarm on a slice without blood scores Dice 0,
precision 0 and an undefined sensitivity and RVD. Means and SDs are taken over the
defined (finite) values only, and every summary says how many values it used (``n``).

Per-slice views (:func:`slice_table` / :func:`summarize_slices`)
---------------------------------------------------------------
* ``hematoma`` -- only slices whose truth holds hematoma. This is the paper's table
  (its Dice is over hematoma slices): empty slices never enter.
* ``all`` -- every slice. A slice where truth and prediction are both empty counts
  Dice = Jaccard = 1 and VOE = 0 (the model was right to find nothing); its sensitivity,
  precision and RVD are undefined and left out of those means.

Per patient the same formulas are applied once to the whole 3-D mask
(:func:`overlap_scores` on the study's confusion counts).

Volume agreement (:func:`volume_agreement`)
-------------------------------------------
``error_i = predicted_i - true_i`` (mL). RMSE ``sqrt(mean(error^2))``, MAE
``mean(|error|)``, bias ``mean(error)``, SD of the error (sample SD, ``ddof=1``),
Bland-Altman limits of agreement ``bias +- 1.96 SD``, ``r2`` the coefficient of
determination of the prediction against the identity line
``1 - sum(error^2) / sum((true - mean(true))^2)`` (can be negative), and ``pearson_r2``
the squared Pearson correlation (what a regression line through the scatter shows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "METRIC_NAMES",
    "Confusion",
    "Summary",
    "VolumeAgreement",
    "confusion",
    "confusion_per_slice",
    "overlap_scores",
    "overlap_scores_arrays",
    "slice_table",
    "summarize",
    "summarize_slices",
    "volume_agreement",
]

METRIC_NAMES: tuple[str, ...] = (
    "sensitivity",
    "specificity",
    "precision",
    "dice",
    "jaccard",
    "voe",
    "rvd",
    "accuracy",
)
SLICE_VIEWS: tuple[str, ...] = ("hematoma", "all")

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Confusion:
    """Pixel (or voxel) counts of one comparison of a prediction with the truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def truth_pixels(self) -> int:
        return self.tp + self.fn

    @property
    def predicted_pixels(self) -> int:
        return self.tp + self.fp


def _check_pair(truth: np.ndarray, prediction: np.ndarray) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    t = np.asarray(truth)
    p = np.asarray(prediction)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and prediction {p.shape} must have the same shape")
    return t != 0, p != 0


def confusion(truth: np.ndarray, prediction: np.ndarray) -> Confusion:
    """Confusion counts over every element of two same-shaped masks (non-zero = hematoma)."""
    t, p = _check_pair(truth, prediction)
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(t & ~p))
    return Confusion(tp=tp, fp=fp, fn=fn, tn=int(t.size) - tp - fp - fn)


def confusion_per_slice(truth: np.ndarray, prediction: np.ndarray) -> tuple[I64, I64, I64, I64]:
    """``(tp, fp, fn, tn)``, each int64 ``(slices,)``, for masks ``(slices, rows, columns)``."""
    t, p = _check_pair(truth, prediction)
    if t.ndim != 3:
        raise ValueError(f"masks must have shape (slices, rows, columns), got {t.shape}")
    n = t.shape[0]
    t2, p2 = t.reshape(n, -1), p.reshape(n, -1)
    tp = np.count_nonzero(t2 & p2, axis=1).astype(np.int64)
    fp = np.count_nonzero(p2 & ~t2, axis=1).astype(np.int64)
    fn = np.count_nonzero(t2 & ~p2, axis=1).astype(np.int64)
    tn = (t2.shape[1] - tp - fp - fn).astype(np.int64)
    return tp, fp, fn, tn


def _ratio(num: F64, den: F64, *, empty: float) -> F64:
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def overlap_scores_arrays(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, F64]:
    """Every metric of :data:`METRIC_NAMES` for arrays of counts (conventions: module docstring)."""
    tp_, fp_, fn_, tn_ = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    jaccard = _ratio(tp_, tp_ + fp_ + fn_, empty=1.0)
    return {
        "sensitivity": _ratio(tp_, tp_ + fn_, empty=math.nan),
        "specificity": _ratio(tn_, tn_ + fp_, empty=math.nan),
        "precision": _ratio(tp_, tp_ + fp_, empty=math.nan),
        "dice": _ratio(2.0 * tp_, 2.0 * tp_ + fp_ + fn_, empty=1.0),
        "jaccard": jaccard,
        "voe": 1.0 - jaccard,
        "rvd": _ratio(fp_ - fn_, tp_ + fn_, empty=math.nan),
        "accuracy": _ratio(tp_ + tn_, tp_ + fp_ + fn_ + tn_, empty=math.nan),
    }


def overlap_scores(counts: Confusion) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for one set of counts (e.g. one patient's 3-D mask)."""
    arrays = overlap_scores_arrays(
        np.array([counts.tp]), np.array([counts.fp]), np.array([counts.fn]), np.array([counts.tn])
    )
    return {name: float(values[0]) for name, values in arrays.items()}


def slice_table(truth: np.ndarray, prediction: np.ndarray) -> dict[str, F64]:
    """Per-slice metrics of masks ``(slices, rows, columns)``.

    Returns float64 ``(slices,)`` arrays: the metrics of :data:`METRIC_NAMES` plus
    ``truth_pixels``, ``predicted_pixels`` and ``has_hematoma`` (1.0 where the truth
    holds hematoma), in slice order.
    """
    tp, fp, fn, tn = confusion_per_slice(truth, prediction)
    table = overlap_scores_arrays(tp, fp, fn, tn)
    table["truth_pixels"] = (tp + fn).astype(np.float64)
    table["predicted_pixels"] = (tp + fp).astype(np.float64)
    table["has_hematoma"] = ((tp + fn) > 0).astype(np.float64)
    return table


@dataclass(frozen=True)
class Summary:
    """Mean +- SD (sample SD) and quartiles of the finite values; ``n`` how many there were."""

    mean: float
    sd: float
    n: int
    median: float
    q1: float
    q3: float

    def text(self, digits: int = 3) -> str:
        """``"0.812 +- 0.104 (n=37)"``; ``"n/a (n=0)"`` without values."""
        if self.n == 0:
            return "n/a (n=0)"
        sd = "n/a" if math.isnan(self.sd) else f"{self.sd:.{digits}f}"
        return f"{self.mean:.{digits}f} +- {sd} (n={self.n})"


def summarize(values: Sequence[float] | np.ndarray) -> Summary:
    """Summary of the finite values (NaN, the "undefined" of the module docstring, is left out)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan, math.nan)
    sd = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    q1, median, q3 = (float(q) for q in np.percentile(v, [25, 50, 75]))
    return Summary(float(v.mean()), sd, int(v.size), median, q1, q3)


def summarize_slices(table: dict[str, F64], *, view: str) -> dict[str, Summary]:
    """Summaries of a (possibly concatenated) :func:`slice_table` over the ``hematoma`` or ``all`` view."""
    if view not in SLICE_VIEWS:
        raise ValueError(f"view must be one of {SLICE_VIEWS}, got {view!r}")
    keep = table["has_hematoma"] > 0 if view == "hematoma" else np.ones(table["dice"].shape, dtype=bool)
    return {name: summarize(table[name][keep]) for name in METRIC_NAMES}


@dataclass(frozen=True)
class VolumeAgreement:
    """Agreement of predicted with true volumes over ``n`` patients (definitions: module docstring)."""

    n: int
    rmse_ml: float
    mae_ml: float
    bias_ml: float  # mean error, predicted - true
    sd_error_ml: float
    loa_low_ml: float  # Bland-Altman: bias - 1.96 SD
    loa_high_ml: float  # bias + 1.96 SD
    r2: float  # against the identity line
    pearson_r2: float
    slope: float  # least-squares line predicted = slope * true + intercept
    intercept_ml: float


def volume_agreement(
    *, true_ml: Sequence[float] | np.ndarray, predicted_ml: Sequence[float] | np.ndarray
) -> VolumeAgreement:
    """RMSE, MAE, bias, SD of the error, R^2 and Bland-Altman limits (mL); see the module docstring.

    ``true_ml`` and ``predicted_ml``: one volume per patient, same length, finite. Values
    that need two patients (SDs, R^2, the line) are NaN with one; with no spread in the
    true volumes R^2 and the line are NaN.
    """
    t = np.asarray(true_ml, dtype=np.float64).ravel()
    p = np.asarray(predicted_ml, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true volumes but {p.size} predicted ones")
    if t.size == 0:
        raise ValueError("no volumes to compare")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
        raise ValueError("volumes must be finite numbers")
    error = p - t
    n = int(t.size)
    sd = float(np.std(error, ddof=1)) if n > 1 else math.nan
    bias = float(error.mean())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    ss_res = float((error**2).sum())
    r2 = 1.0 - ss_res / ss_tot if n > 1 and ss_tot > 0 else math.nan
    pearson_r2 = slope = intercept = math.nan
    if n > 1 and ss_tot > 0:
        slope, intercept = (float(c) for c in np.polyfit(t, p, 1))
        sp = float(((p - p.mean()) ** 2).sum())
        if sp > 0:
            r = float(((t - t.mean()) * (p - p.mean())).sum()) / math.sqrt(ss_tot * sp)
            pearson_r2 = r * r
    return VolumeAgreement(
        n=n,
        rmse_ml=float(math.sqrt(ss_res / n)),
        mae_ml=float(np.abs(error).mean()),
        bias_ml=bias,
        sd_error_ml=sd,
        loa_low_ml=bias - 1.96 * sd,
        loa_high_ml=bias + 1.96 * sd,
        r2=r2,
        pearson_r2=pearson_r2,
        slope=slope,
        intercept_ml=intercept,
    )
