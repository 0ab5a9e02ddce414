"""One study from DICOM files on local disk to a volume, a mask and pictures.

:func:`segment_study` is the plain function behind ``ichvol segment``, the Celery task
and the embedded demo. Stages, each timed (seconds, in ``result.json``):

1. ``read``        -- find and select the series, sort it, decode pixels to HU
2. ``preprocess``  -- HU window to [-1, 1], pad to square, resize to the model input
3. ``inference``   -- the segmenter, in fixed-size batches
4. ``postprocess`` -- probabilities back to the native grid, threshold, intracranial
                      restriction, seeded growth, small-component removal, volume and ABC/2
5. ``write``       -- result.json, mask.npz, mask.nii.gz, seg.dcm, overlay.png

Unusable input (:class:`worker.core.errors.StudyError`) does not raise: the outcome has
status ``"failed"`` with the code and message, and ``result.json`` says the same.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from worker import __version__
from worker.core.ct import CtSeries, SeriesSelection
from worker.core.errors import ErrorCode, StudyError
from worker.core.logs import DICOM_LIBRARIES, CaughtWarnings, collect_warnings, redact_quoted
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings
from worker.imaging import geometry
from worker.imaging.dicom_load import load_study, read_source_headers
from worker.imaging.series_selection import SelectionRules
from worker.measure import postprocess, volume
from worker.measure.seeded_growth import GrowthSettings
from worker.model import preprocess
from worker.model.weights import ModelInfo, Segmenter
from worker.outputs import mask_files as outputs
from worker.outputs import overlay

log = logging.getLogger(__name__)

RESULT_JSON = "result.json"
ARTEFACT_NAMES = {
    "result": RESULT_JSON,
    "mask_npz": "mask.npz",
    "mask_nifti": "mask.nii.gz",
    "seg": "seg.dcm",
    "overlay": "overlay.png",
}
STAGES = ("read", "preprocess", "inference", "postprocess", "write")


@dataclass(frozen=True)
class SegmentationOptions:
    """Post-processing choices (from :class:`Settings` or the command line).

    ``threshold`` None: the decision threshold calibrated for the model (its metadata);
    :meth:`for_model` makes it a number before a mask is made.
    """

    threshold: float | None = None
    min_component_ml: float = 0.05
    intracranial_only: bool = True
    rules: SelectionRules = field(default_factory=SelectionRules)
    growth: GrowthSettings = field(default_factory=GrowthSettings)

    @classmethod
    def from_settings(cls, settings: Settings) -> SegmentationOptions:
        return cls(
            threshold=settings.threshold,
            min_component_ml=settings.min_component_ml,
            intracranial_only=settings.restrict_to_intracranial,
            rules=SelectionRules.from_settings(settings),
            growth=growth_settings(settings),
        )

    def for_model(self, info: ModelInfo) -> SegmentationOptions:
        """These options with the threshold the model's own where none was asked for."""
        return replace(self, threshold=info.decision_threshold(self.threshold))


def final_mask(probabilities: np.ndarray, series: CtSeries, options: SegmentationOptions) -> np.ndarray:
    """The pipeline's post-processing (:func:`worker.measure.postprocess.postprocess`) with
    ``options``: the final uint8 mask ``(z, y, x)`` from native-grid probabilities of ``series``.
    The threshold must be a number: :meth:`SegmentationOptions.for_model` resolves a model's own."""
    if options.threshold is None:
        raise ValueError("no threshold: resolve the model's own with SegmentationOptions.for_model(info) first")
    return postprocess.postprocess(
        probabilities,
        hu=series.hu,
        pixel_spacing_mm=series.pixel_spacing_mm,
        slab_thickness_mm=series.slab_thickness_mm,
        threshold=options.threshold,
        min_component_ml=options.min_component_ml,
        restrict_to_intracranial=options.intracranial_only,
        growth=options.growth,
    )


def growth_settings(settings: Settings) -> GrowthSettings:
    """The seeded-growth rule as :class:`Settings` configure it (``ICHVOL_GROWTH*``)."""
    return GrowthSettings(
        enabled=settings.growth,
        hu_low=settings.growth_hu_low,
        hu_high=settings.growth_hu_high,
        seed_probability=settings.growth_seed_probability,
        max_distance_mm=settings.growth_max_distance_mm,
    )


@dataclass
class StudyOutcome:
    """What happened to one study. ``result`` is exactly what ``result.json`` holds."""

    status: str  # "ok" or "failed"
    result: dict[str, Any]
    out_dir: Path
    artefacts: dict[str, Path]
    series: CtSeries | None = None
    error: StudyError | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def volume_ml(self) -> float | None:
        value = self.result.get("volume_ml")
        return None if value is None else float(value)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def segment_study(
    *,
    study_dir: Path,
    out_dir: Path,
    segmenter: Segmenter,
    options: SegmentationOptions | None = None,
    series: CtSeries | None = None,
) -> StudyOutcome:
    """Measure the hematoma in the study under ``study_dir``; write the outputs to ``out_dir``.

    ``series`` may be given when the study was already loaded (the worker decodes the
    next study while the current one is in inference); ``study_dir`` is then only named.
    """
    options = options or SegmentationOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    with collect_warnings() as caught:  # third-party warnings: logged once each, facts into result.json
        try:
            with timer.stage("read"):
                if series is None:
                    if not Path(study_dir).is_dir():
                        raise StudyError(ErrorCode.EMPTY_STUDY, f"study folder {study_dir} does not exist")
                    series = load_study(Path(study_dir), rules=options.rules)
            return _measure(
                series=series, out_dir=out_dir, segmenter=segmenter, options=options, timer=timer, caught=caught
            )
        except StudyError as error:
            log.info("study not measurable: %s", error.code.value)
            result = failed_result(error, series=series, timings=timer.seconds)
            path = write_result_json(out_dir, result)
            return StudyOutcome("failed", result, out_dir, {"result": path}, series=series, error=error)


#: pydicom's value-validation warning; for UIDs the series' own check says more (worker.imaging.dicom_files).
_UID_VALIDATION = "Invalid value for VR UI"
_MAX_LIBRARY_WARNINGS = 5


def library_warnings(caught: CaughtWarnings) -> list[str]:
    """The DICOM libraries' warnings met while measuring, as ``result.json`` lines (quoted values removed).

    One line per distinct warning, at most five; pydicom's invalid-UID warnings are left out,
    since the series' own check (:func:`worker.imaging.dicom_files.invalid_uid_warning`) names
    the UIDs.
    """
    lines = []
    for library, _category, message in caught.items:
        if library in DICOM_LIBRARIES and not message.startswith(_UID_VALIDATION):
            lines.append(f"{library}: {redact_quoted(message.strip().splitlines()[0])[:200]}")
    if len(lines) > _MAX_LIBRARY_WARNINGS:
        more = len(lines) - _MAX_LIBRARY_WARNINGS
        lines = [*lines[:_MAX_LIBRARY_WARNINGS], f"and {more} more warnings from the DICOM libraries (in the log)"]
    return lines


def _measure(
    *,
    series: CtSeries,
    out_dir: Path,
    segmenter: Segmenter,
    options: SegmentationOptions,
    timer: _Timer,
    caught: CaughtWarnings,
) -> StudyOutcome:
    info = segmenter.info
    load = getattr(segmenter, "load", None)
    if callable(load):  # a lazily loaded model: time the loading apart from inference
        with timer.stage("load_model"):
            load()
    with timer.stage("preprocess"):
        images, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
    with timer.stage("inference"):
        try:
            probabilities_small = segmenter.predict(images)
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise StudyError(ErrorCode.MODEL_ERROR, f"the model failed on this series: {exc}") from exc
    with timer.stage("postprocess"):
        probabilities = preprocess.to_native(probabilities_small, fit)
        mask = final_mask(probabilities, series, options.for_model(info))
        volume_ml = volume.planimetric_volume_ml(
            mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm
        )
        abc = volume.abc2(mask, pixel_spacing_mm=series.pixel_spacing_mm, slab_thickness_mm=series.slab_thickness_mm)
        areas_mm2 = volume.slice_areas_mm2(mask, pixel_spacing_mm=series.pixel_spacing_mm)
    with timer.stage("write"):
        artefacts = write_artefacts(
            out_dir=out_dir,
            series=series,
            mask=mask,
            volume_ml=volume_ml,
            abc2_ml=abc.volume_ml,
            segmenter=segmenter,
        )
    result = ok_result(
        series=series,
        options=options,
        segmenter=segmenter,
        volume_ml=volume_ml,
        abc=abc,
        areas_mm2=areas_mm2,
        timings=timer.seconds,
    )
    result["warnings"] += library_warnings(caught)
    artefacts["result"] = write_result_json(out_dir, result)
    log.info("measured study: %d slices, %.2f mL", series.n_slices, volume_ml)
    return StudyOutcome("ok", result, out_dir, artefacts, series=series)


def write_artefacts(
    *,
    out_dir: Path,
    series: CtSeries,
    mask: np.ndarray,
    volume_ml: float,
    abc2_ml: float,
    segmenter: Segmenter,
) -> dict[str, Path]:
    """mask.npz, mask.nii.gz, seg.dcm and overlay.png for one measured series.

    The four writers are independent and spend their time in compression and encoding
    code that releases the GIL, so they run side by side; the first error is raised.
    """
    paths = {name: out_dir / file for name, file in ARTEFACT_NAMES.items() if name != "result"}
    uids = [s.sop_instance_uid for s in series.slices]
    writers: list[Callable[[], None]] = [
        lambda: outputs.write_mask_npz(paths["mask_npz"], mask=mask, sop_instance_uids=uids),
        lambda: outputs.write_mask_nifti(paths["mask_nifti"], mask=mask, affine=geometry.nifti_affine(series)),
        lambda: outputs.write_seg(
            paths["seg"],
            mask=mask,
            source_images=read_source_headers(series),
            model_name=segmenter.info.name,
            model_version=segmenter.info.version,
        ),
        lambda: overlay.write_overlay_png(
            paths["overlay"],
            hu=series.hu,
            mask=mask,
            volume_ml=volume_ml,
            abc2_ml=abc2_ml,
            positions_mm=[s.position_mm for s in series.slices],
        ),
    ]
    with ThreadPoolExecutor(max_workers=len(writers), thread_name_prefix="ichvol-write") as pool:
        # each in a copy of this context: log identifiers and the study's warnings follow them
        for future in [pool.submit(contextvars.copy_context().run, write) for write in writers]:
            future.result()
    return paths


def _selection_json(selection: SeriesSelection | None) -> dict[str, Any]:
    if selection is None:
        return {"chosen": None, "rejected": []}
    chosen = selection.chosen
    return {
        "chosen": None
        if chosen is None
        else {
            "series_instance_uid": chosen.series_instance_uid,
            "series_description": chosen.series_description,
            "series_number": chosen.series_number,
            "n_files": chosen.n_files,
            "slice_thickness_mm": chosen.slice_thickness_mm,
        },
        "rejected": [
            {
                "series_instance_uid": r.series.series_instance_uid,
                "series_description": r.series.series_description,
                "modality": r.series.modality,
                "n_files": r.series.n_files,
                "code": r.code,
                "reason": r.reason,
            }
            for r in selection.rejected
        ],
    }


def _model_json(segmenter: Segmenter) -> dict[str, Any]:
    """The weights' identity and the engine that ran them (the concrete one: ``auto`` resolved)."""
    info = segmenter.info
    return {
        "name": info.name,
        "version": info.version,
        "sha256": info.sha256,
        "architecture": info.architecture,
        "dims": info.dims,
        "input_size": info.input_size,
        "hu_window": list(info.hu_window),
        "engine": str(getattr(segmenter, "engine", "keras")),
    }


def _common(timings: dict[str, float]) -> dict[str, Any]:
    return {
        "disclaimer": DISCLAIMER,
        "ichvol_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings_s": {stage: float(timings.get(stage, 0.0)) for stage in STAGES}
        | {stage: float(value) for stage, value in timings.items() if stage not in STAGES},
    }


def ok_result(
    *,
    series: CtSeries,
    options: SegmentationOptions,
    segmenter: Segmenter,
    volume_ml: float,
    abc: volume.Abc2,
    areas_mm2: np.ndarray,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The ``result.json`` of a measured study (the documented contract)."""
    return {
        "status": "ok",
        "reason": None,
        "error_code": None,
        "study_instance_uid": series.study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "series": _selection_json(series.selection),
        "n_slices": series.n_slices,
        "pixel_spacing_mm": [float(series.pixel_spacing_mm[0]), float(series.pixel_spacing_mm[1])],
        "slab_thickness_mm": [round(float(t), 4) for t in series.slab_thickness_mm],
        "volume_ml": round(float(volume_ml), 3),
        "abc2_ml": round(float(abc.volume_ml), 3),
        "abc2": {
            "a_mm": round(abc.a_mm, 2),
            "b_mm": round(abc.b_mm, 2),
            "c_mm": round(abc.c_mm, 2),
            "reference_slice": abc.reference_slice,
        },
        "model": _model_json(segmenter),
        "postprocessing": {
            "threshold": segmenter.info.decision_threshold(options.threshold),
            "threshold_source": "model" if options.threshold is None else "setting",
            "min_component_ml": options.min_component_ml,
            "intracranial_only": options.intracranial_only,
            "growth": options.growth.as_json(),
        },
        "slices": [
            {
                "sop_instance_uid": s.sop_instance_uid,
                "position_mm": round(float(s.position_mm), 3),
                "hematoma_mm2": round(float(a), 2),
            }
            for s, a in zip(series.slices, areas_mm2, strict=True)
        ],
        "warnings": list(series.warnings),
        **_common(timings),
    }


def failed_result(
    error: StudyError, *, series: CtSeries | None = None, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """The ``result.json`` of a study that could not be measured."""
    return {
        "status": "failed",
        "reason": error.message,
        "error_code": error.code.value,
        "study_instance_uid": series.study.study_instance_uid if series else None,
        "series_instance_uid": series.series_instance_uid if series else None,
        "series": _selection_json(series.selection if series else None),
        "n_slices": series.n_slices if series else None,
        "volume_ml": None,
        "abc2_ml": None,
        **_common(timings or {}),
    }


def write_result_json(out_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``result.json`` atomically (a reader never sees half a file)."""
    path = Path(out_dir) / RESULT_JSON
    tmp = path.with_name(f".{RESULT_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
