"""``ichvol evaluate``: the paper's evaluation of DR-UNet against UNet, ABC/2, FCM and an active contour.

Research use only, not for clinical use.

Input: a folder of study folders, each in the layout ``ichvol segment`` reads (DICOM files,
any nesting) with its ground truth inside (:mod:`worker.ground_truth`: the phantom's
``truth/truth_mask.npz``, a ``mask.npz``, a NIfTI label volume or a DICOM SEG).

Methods, all run on the same series of every study (the one series selection chooses):

``drunet``
    The deployed pipeline itself: :func:`worker.pipeline.segment_study` with the given
    weights (reading, selection, windowing, inference, threshold, intracranial
    restriction, small-component removal), its ``mask.npz`` compared with the truth. Its
    outputs stay in ``cases/<study>/drunet/``.
``unet``
    The same pipeline with the UNet weights (``--unet-model``), in ``cases/<study>/unet/``.
``abc2``
    :func:`worker.volume.abc2` on the DR-UNet mask: a volume only (no overlap metrics).
    ``abc2_truth``, ABC/2 on the truth mask, is reported beside it: the error of the
    formula itself, whatever the segmentation.
``fcm`` and ``active_contour``
    :func:`worker.baselines.fcm_segment` and :func:`worker.baselines.active_contour_segment`
    on the series' HU, followed by the pipeline's small-component removal.

Seconds per scan: DR-UNet and UNet, the wall time of ``segment_study`` without loading the
model (each model is loaded and warmed up once before the first study: TensorFlow traces
its graph on the first call); ABC/2, the DR-UNet time plus the formula (it needs the
mask); FCM and the active contour, the pipeline's reading time plus their own (the
intracranial mask included).

A study that cannot be evaluated (unusable series, missing or misaligned truth, a method
failing) is listed in ``failures.csv`` and left out of every table; the others go on.

Output folder (new or empty): ``report.html`` and the figures of :mod:`worker.report`,
``cases.csv`` (per patient and method), ``slices.csv`` (per slice and method),
``metrics.csv`` (mean, SD, quartiles, n per method, level and metric), ``volumes.csv``
(volume agreement and seconds per method), ``failures.csv``, ``summary.json`` and
``cases/<study>/`` (pipeline outputs and one overlay per case). Metric definitions and the
empty-slice conventions are those of :mod:`worker.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import worker
from worker.core.ct import CtSeries
from worker.core.errors import ConfigurationError, ErrorCode, StudyError
from worker.core.notices import DISCLAIMER
from worker.measure import postprocess, volume
from worker.measure.pipeline import SegmentationOptions, segment_study
from worker.model.weights import Segmenter
from worker.research import baselines, metrics, report

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHODS",
    "METHOD_NAMES",
    "CaseResult",
    "EvaluationResult",
    "MethodResult",
    "evaluate",
]

METHOD_NAMES = {
    "drunet": "DR-UNet",
    "unet": "UNet",
    "abc2": "ABC/2",
    "fcm": "FCM",
    "active_contour": "Active contour",
    "abc2_truth": "ABC/2 on truth",
}
MASK_METHODS = ("drunet", "unet", "fcm", "active_contour")
DEFAULT_METHODS = ("drunet", "unet", "abc2", "fcm", "active_contour")
LEVELS = {
    "slices_hematoma": "hematoma slices",
    "slices_all": "all slices",
    "patients_hematoma": "patients with hematoma",
    "patients_all": "all patients",
}
NOTES = (
    "Hematoma slices: slices whose truth holds hematoma (the paper's Dice). All slices: a slice where truth and "
    "prediction are both empty counts Dice = Jaccard = 1 and VOE = 0.",
    "Undefined values are left out of means and SDs, and n counts what was used: sensitivity and RVD without truth, "
    "precision without prediction, specificity without background.",
    "RVD = (predicted - true) / true, signed. VOE = 1 - Jaccard. Patients: the same formulas on the whole 3-D mask.",
    "Volume error = predicted - true planimetric volume of the ground-truth mask (mL); R² (identity) = "
    "1 - SS(error) / SS(true - mean true); limits of agreement = bias ± 1.96 SD of the error.",
    "ABC/2 is computed from the DR-UNet mask; 'ABC/2 on truth' from the ground-truth mask.",
)

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MethodResult:
    """One method on one study: volume (mL), seconds, and its overlap metrics (none for ABC/2)."""

    volume_ml: float
    seconds: float
    patient: Mapping[str, float] = field(default_factory=dict)  # metrics.METRIC_NAMES on the 3-D mask
    slices: Mapping[str, F64] | None = None  # metrics.slice_table


@dataclass(frozen=True)
class CaseResult:
    """Every method on one study, compared with its truth."""

    study: str
    truth_ml: float
    n_slices: int
    results: Mapping[str, MethodResult]
    overlay: str  # relative to the report folder


@dataclass
class EvaluationResult:
    out_dir: Path
    cases: list[CaseResult]
    failures: list[tuple[str, str, str]]  # (study, code, reason)
    agreement: dict[str, metrics.VolumeAgreement]
    files: dict[str, Path]


def _mask_result(truth: np.ndarray, mask: np.ndarray, series: CtSeries, seconds: float) -> MethodResult:
    volume_ml = volume.planimetric_volume_ml(
        mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm
    )
    return MethodResult(
        volume_ml=volume_ml,
        seconds=seconds,
        patient=metrics.overlap_scores(metrics.confusion(truth, mask)),
        slices=metrics.slice_table(truth, mask),
    )


def _pipeline_mask(
    study_dir: Path, out_dir: Path, segmenter: Segmenter, options: SegmentationOptions, name: str
) -> tuple[np.ndarray, float, Any]:
    started = time.perf_counter()
    outcome = segment_study(study_dir=study_dir, out_dir=out_dir, segmenter=segmenter, options=options)
    seconds = time.perf_counter() - started - float(outcome.result.get("timings_s", {}).get("load_model", 0.0))
    if not outcome.ok:
        assert outcome.error is not None
        raise StudyError(outcome.error.code, f"{name}: {outcome.error.message}")
    with np.load(outcome.artefacts["mask_npz"], allow_pickle=False) as data:
        mask = np.asarray(data["mask"])
    return mask, seconds, outcome


def _clean(mask: np.ndarray, series: CtSeries, options: SegmentationOptions) -> np.ndarray:
    return postprocess.remove_small_components(
        mask,
        pixel_spacing_mm=series.pixel_spacing_mm,
        slab_thickness_mm=series.slab_thickness_mm,
        min_volume_ml=options.min_component_ml,
    )


def _evaluate_case(
    study_dir: Path,
    *,
    case_dir: Path,
    report_dir: Path,
    drunet: Segmenter,
    unet: Segmenter | None,
    methods: Sequence[str],
    options: SegmentationOptions,
    labels: Sequence[int] | None,
) -> CaseResult:
    from worker.imaging.ground_truth import load_truth_mask

    name = study_dir.name
    drunet_mask, drunet_s, outcome = _pipeline_mask(study_dir, case_dir / "drunet", drunet, options, "DR-UNet")
    series: CtSeries = outcome.series
    truth = load_truth_mask(study_dir, series, labels=labels)
    spacing, slabs = series.pixel_spacing_mm, series.slab_thickness_mm
    truth_ml = volume.planimetric_volume_ml(truth, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
    results: dict[str, MethodResult] = {"drunet": _mask_result(truth, drunet_mask, series, drunet_s)}
    masks: dict[str, np.ndarray] = {"drunet": drunet_mask}
    if "unet" in methods:
        if unet is None:
            raise ValueError("the unet method needs a UNet segmenter")
        unet_mask, unet_s, _ = _pipeline_mask(study_dir, case_dir / "unet", unet, options, "UNet")
        results["unet"] = _mask_result(truth, unet_mask, series, unet_s)
        masks["unet"] = unet_mask
    if "abc2" in methods:
        started = time.perf_counter()
        estimate = volume.abc2(drunet_mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
        results["abc2"] = MethodResult(estimate.volume_ml, drunet_s + time.perf_counter() - started)
        started = time.perf_counter()
        on_truth = volume.abc2(truth, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
        results["abc2_truth"] = MethodResult(on_truth.volume_ml, time.perf_counter() - started)
    read_s = float(outcome.result.get("timings_s", {}).get("read", 0.0))
    for key, segment in (("fcm", baselines.fcm_segment), ("active_contour", baselines.active_contour_segment)):
        if key not in methods:
            continue
        started = time.perf_counter()
        raw = segment(series.hu, pixel_spacing_mm=spacing)
        mask = _clean(raw, series, options)
        results[key] = _mask_result(truth, mask, series, read_s + time.perf_counter() - started)
        masks[key] = mask
    overlay = _write_overlay(case_dir / "overlay.png", series=series, truth=truth, masks=masks, name=name)
    return CaseResult(
        study=name,
        truth_ml=truth_ml,
        n_slices=series.n_slices,
        results=results,
        overlay=overlay.relative_to(report_dir).as_posix(),
    )


def _write_overlay(
    path: Path, *, series: CtSeries, truth: np.ndarray, masks: Mapping[str, np.ndarray], name: str
) -> Path:
    """The slice with the most truth (else the most DR-UNet, else the middle one), every outline on it."""
    truth_area = truth.reshape(truth.shape[0], -1).sum(axis=1)
    drunet_area = masks["drunet"].reshape(truth.shape[0], -1).sum(axis=1)
    if truth_area.any():
        k = int(np.argmax(truth_area))
    elif drunet_area.any():
        k = int(np.argmax(drunet_area))
    else:
        k = truth.shape[0] // 2
    scores = metrics.overlap_scores(metrics.confusion(truth, masks["drunet"]))
    title = f"{name}, slice {k + 1}/{truth.shape[0]}: DR-UNet Dice {scores['dice']:.2f} (whole scan)"
    return report.write_case_overlay(
        path,
        hu=series.hu[k],
        truth=truth[k],
        predictions={key: m[k] for key, m in masks.items()},
        names=METHOD_NAMES,
        title=title,
    )


def _warm_up(segmenter: Segmenter) -> float:
    """Load the model and trace its graph once, so that no study pays for it; returns seconds."""
    started = time.perf_counter()
    load = getattr(segmenter, "load", None)
    if callable(load):
        load()
    size = segmenter.info.input_size
    segmenter.predict(np.zeros((1, size, size), dtype=np.float32))
    return time.perf_counter() - started


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigurationError(f"{out_dir} already exists and is not empty: choose a new report folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _progress(items: Sequence[Path], enabled: bool) -> Iterable[Path]:
    if not enabled:
        return items
    from tqdm import tqdm

    wrapped: Iterable[Path] = tqdm(items, desc="evaluating", unit="study", dynamic_ncols=True)
    return wrapped


def evaluate(
    *,
    studies_dir: Path,
    out_dir: Path,
    drunet: Segmenter,
    unet: Segmenter | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    options: SegmentationOptions | None = None,
    labels: Sequence[int] | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate every study under ``studies_dir`` and write the report into ``out_dir`` (module docstring).

    ``methods`` is a subset of :data:`DEFAULT_METHODS` (``drunet`` always runs: ABC/2 and the
    overlays need it; ``unet`` needs ``unet``). Raises :class:`StudyError` when no study at
    all could be evaluated.
    """
    from worker.research.datasets import find_studies

    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown:
        raise ConfigurationError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_METHODS)}")
    if "unet" in methods and unet is None:
        raise ConfigurationError("the UNet baseline needs its weights: --unet-model FILE (or leave unet out)")
    methods = ["drunet", *[m for m in DEFAULT_METHODS if m in methods and m != "drunet"]]
    options = options or SegmentationOptions()
    out_dir = Path(out_dir)
    studies = find_studies(Path(studies_dir))
    _check_out_dir(out_dir)
    warm = {"drunet": _warm_up(drunet)}
    if unet is not None and "unet" in methods:
        warm["unet"] = _warm_up(unet)
    cases: list[CaseResult] = []
    failures: list[tuple[str, str, str]] = []
    for study in _progress(studies, progress):
        try:
            cases.append(
                _evaluate_case(
                    study,
                    case_dir=out_dir / "cases" / study.name,
                    report_dir=out_dir,
                    drunet=drunet,
                    unet=unet,
                    methods=methods,
                    options=options,
                    labels=labels,
                )
            )
        except StudyError as error:
            log.info("study not evaluated: %s", error.code.value)
            failures.append((study.name, error.code.value, error.message))
    files = _write_tables(out_dir, cases, failures)
    if not cases:
        reasons = "; ".join(f"{s}: {r}" for s, _, r in failures[:3])
        raise StudyError(ErrorCode.NO_USABLE_SERIES, f"no study could be evaluated ({reasons})")
    agreement = _agreements(cases)
    data = _report_data(cases, failures, agreement, drunet=drunet, unet=unet, warm=warm, studies_dir=studies_dir)
    # each model measures at its own calibrated threshold unless one was asked for; the summary
    # records DR-UNet's
    files |= _write_summaries(out_dir, cases, failures, agreement, data, options=options.for_model(drunet.info))
    figures = report.write_figures(out_dir, data)
    files |= {f"figure_{k}": v for k, v in figures.items()}
    files["html"] = report.write_html(out_dir, data, figures=figures, title="ichvol evaluation: DR-UNet and baselines")
    return EvaluationResult(out_dir=out_dir, cases=cases, failures=failures, agreement=agreement, files=files)


# --- aggregation -----------------------------------------------------------------------------------


def _methods_of(cases: Sequence[CaseResult]) -> list[str]:
    present = {k for c in cases for k in c.results}
    return [m for m in (*DEFAULT_METHODS, "abc2_truth") if m in present]


def _agreements(cases: Sequence[CaseResult]) -> dict[str, metrics.VolumeAgreement]:
    truth = np.array([c.truth_ml for c in cases])
    return {
        m: metrics.volume_agreement(true_ml=truth, predicted_ml=[c.results[m].volume_ml for c in cases])
        for m in _methods_of(cases)
    }


def _level_summaries(cases: Sequence[CaseResult], method: str) -> dict[str, dict[str, metrics.Summary]]:
    tables = [c.results[method].slices for c in cases]
    joined = {key: np.concatenate([t[key] for t in tables if t is not None]) for key in (tables[0] or {})}
    with_blood = [c for c in cases if c.truth_ml > 0]
    return {
        "slices_hematoma": metrics.summarize_slices(joined, view="hematoma"),
        "slices_all": metrics.summarize_slices(joined, view="all"),
        "patients_hematoma": {
            name: metrics.summarize([c.results[method].patient[name] for c in with_blood])
            for name in metrics.METRIC_NAMES
        },
        "patients_all": {
            name: metrics.summarize([c.results[method].patient[name] for c in cases]) for name in metrics.METRIC_NAMES
        },
    }


def _report_data(
    cases: Sequence[CaseResult],
    failures: Sequence[tuple[str, str, str]],
    agreement: Mapping[str, metrics.VolumeAgreement],
    *,
    drunet: Segmenter,
    unet: Segmenter | None,
    warm: Mapping[str, float],
    studies_dir: Path,
) -> report.ReportData:
    present = _methods_of(cases)
    mask_methods = [m for m in MASK_METHODS if m in present]
    table = []
    hematoma_values: dict[str, dict[str, F64]] = {}
    for m in mask_methods:
        for level, summaries in _level_summaries(cases, m).items():
            table.append(report.TableRow(METHOD_NAMES[m], LEVELS[level], summaries))
        tables = [t for t in (c.results[m].slices for c in cases) if t is not None]
        keep = np.concatenate([t["has_hematoma"] for t in tables]) > 0
        hematoma_values[m] = {k: np.concatenate([t[k] for t in tables])[keep] for k in report.BOX_METRICS}
    details = {
        "studies": f"{len(cases)} evaluated from {Path(studies_dir).name}/, {len(failures)} not evaluated",
        "DR-UNet weights": f"{drunet.info.name} {drunet.info.version} (sha256 {drunet.info.sha256[:12]}...)",
        "DR-UNet engine": str(getattr(drunet, "engine", "keras")),
        "model loading and warm-up (s)": ", ".join(f"{METHOD_NAMES[k]} {v:.1f}" for k, v in warm.items()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "ichvol": worker.__version__,
    }
    if unet is not None and "unet" in present:
        details["UNet weights"] = f"{unet.info.name} {unet.info.version} (sha256 {unet.info.sha256[:12]}...)"
        details["UNet engine"] = str(getattr(unet, "engine", "keras"))
    return report.ReportData(
        methods=mask_methods,
        names=METHOD_NAMES,
        hematoma_slice_values=hematoma_values,
        true_ml=np.array([c.truth_ml for c in cases], dtype=np.float64),
        predicted_ml={m: np.array([c.results[m].volume_ml for c in cases], dtype=np.float64) for m in present},
        agreement=agreement,
        seconds={m: metrics.summarize([c.results[m].seconds for c in cases]) for m in present if m != "abc2_truth"},
        table=table,
        examples=_examples(cases),
        failures=[(s, f"{r} [{c}]") for s, c, r in failures],
        details=details,
        csv_files=("cases.csv", "slices.csv", "metrics.csv", "volumes.csv", "failures.csv", "summary.json"),
        notes=NOTES,
    )


def _examples(cases: Sequence[CaseResult]) -> list[report.CaseExample]:
    with_blood = [c for c in cases if c.truth_ml > 0]
    if not with_blood:
        return []
    ranked = sorted(with_blood, key=lambda c: (c.results["drunet"].patient["dice"], c.study))
    picks = [("Best case", ranked[-1])] + ([("Worst case", ranked[0])] if len(ranked) > 1 else [])
    return [
        report.CaseExample(
            title=f"{label}: {case.study}",
            image=case.overlay,
            caption=(
                f"DR-UNet Dice {case.results['drunet'].patient['dice']:.3f}, true volume {case.truth_ml:.1f} mL, "
                f"DR-UNet {case.results['drunet'].volume_ml:.1f} mL"
            ),
        )
        for label, case in picks
    ]


# --- files -----------------------------------------------------------------------------------------


def _cell(value: object) -> object:
    if isinstance(value, float | np.floating):
        return "" if not math.isfinite(float(value)) else round(float(value), 6)
    return value


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(v) for v in row])
    return path


def _write_tables(
    out_dir: Path, cases: Sequence[CaseResult], failures: Sequence[tuple[str, str, str]]
) -> dict[str, Path]:
    names = list(metrics.METRIC_NAMES)
    files = {}
    files["cases"] = _write_csv(
        out_dir / "cases.csv",
        ["study", "method", "truth_ml", "volume_ml", "error_ml", "seconds", *names],
        (
            [
                c.study,
                m,
                c.truth_ml,
                r.volume_ml,
                r.volume_ml - c.truth_ml,
                r.seconds,
                *[r.patient.get(n, math.nan) for n in names],
            ]
            for c in cases
            for m, r in c.results.items()
        ),
    )
    rows = []
    for c in cases:
        for m, r in c.results.items():
            if r.slices is None:
                continue
            for k in range(c.n_slices):
                rows.append(
                    [
                        c.study,
                        k,
                        m,
                        int(r.slices["truth_pixels"][k]),
                        int(r.slices["predicted_pixels"][k]),
                        *[r.slices[n][k] for n in names],
                    ]
                )
    files["slices"] = _write_csv(
        out_dir / "slices.csv", ["study", "slice", "method", "truth_pixels", "predicted_pixels", *names], rows
    )
    files["failures"] = _write_csv(out_dir / "failures.csv", ["study", "code", "reason"], failures)
    return files


def _write_summaries(
    out_dir: Path,
    cases: Sequence[CaseResult],
    failures: Sequence[tuple[str, str, str]],
    agreement: Mapping[str, metrics.VolumeAgreement],
    data: report.ReportData,
    *,
    options: SegmentationOptions,
) -> dict[str, Path]:
    files = {}
    level_of = {v: k for k, v in LEVELS.items()}
    method_of = {v: k for k, v in METHOD_NAMES.items()}
    metric_rows = [
        [method_of[row.method], level_of[row.level], name, s.mean, s.sd, s.n, s.median, s.q1, s.q3]
        for row in data.table
        for name, s in row.summaries.items()
    ]
    files["metrics"] = _write_csv(
        out_dir / "metrics.csv", ["method", "level", "metric", "mean", "sd", "n", "median", "q1", "q3"], metric_rows
    )
    fields = [f for f in metrics.VolumeAgreement.__dataclass_fields__]
    volume_rows = []
    for m, a in agreement.items():
        seconds = data.seconds.get(m)
        volume_rows.append(
            [
                m,
                *[getattr(a, f) for f in fields],
                seconds.mean if seconds else math.nan,
                seconds.sd if seconds else math.nan,
            ]
        )
    files["volumes"] = _write_csv(
        out_dir / "volumes.csv", ["method", *fields, "seconds_mean", "seconds_sd"], volume_rows
    )

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if not math.isfinite(value) else round(value, 6)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    summary = {
        "disclaimer": DISCLAIMER,
        "ichvol_version": worker.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "details": dict(data.details),
        "postprocessing": {
            "threshold": options.threshold,
            "min_component_ml": options.min_component_ml,
            "intracranial_only": options.intracranial_only,
        },
        "n_cases": len(cases),
        "failures": [{"study": s, "code": c, "reason": r} for s, c, r in failures],
        "metrics": {
            f"{method_of[row.method]}/{level_of[row.level]}": {n: clean(asdict(s)) for n, s in row.summaries.items()}
            for row in data.table
        },
        "volume_agreement": {m: clean(asdict(a)) for m, a in agreement.items()},
        "seconds_per_scan": {m: clean(asdict(s)) for m, s in data.seconds.items()},
        "definitions": list(NOTES),
    }
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files["summary"] = path
    return files
