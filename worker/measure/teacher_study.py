"""``ichvol teacher`` on one study: the BLAST-CT classes, their volumes, and the segment command's artefacts.

:func:`teacher_study` reads the study (series selection as ``ichvol segment``), runs the
teacher (:func:`worker.measure.teacher.predict_teacher`) and writes, into ``out_dir``:

* ``result.json``: per-class volumes in mL (``volumes_ml``: IPH, EAH, oedema, IVH; planimetric,
  from the DICOM geometry as ``ichvol segment``), ``hemorrhage_ml`` (IPH + EAH + IVH, also as
  ``volume_ml`` so readers of segment's result find it) and its ABC/2, the models and their
  SHA-256, the engine, per-slice hemorrhage areas, timings and the disclaimer;
* ``mask.npz``: ``mask`` (uint8 hemorrhage mask, segment's contract), ``labels`` (uint8 class
  0..4 per voxel), ``hemorrhage_probability`` (float16, P(IPH) + P(EAH) + P(IVH)) and
  ``sop_instance_uids``;
* ``mask.nii.gz``: the class label map (0 background, 1 IPH, 2 EAH, 3 oedema, 4 IVH);
* ``seg.dcm``: a DICOM SEG with one segment per class (IPH, EAH, oedema, IVH);
* ``overlay.png``: the hemorrhage mask drawn on the CT, with its volume and the disclaimer.

Unusable input raises :class:`worker.core.errors.StudyError` after ``result.json`` says why.
No post-processing (intracranial restriction, growth, small components): the teacher's own
labels, as their inference writes them.

Research use only, not for clinical use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

from worker.core.ct import CtSeries
from worker.core.errors import ErrorCode, StudyError
from worker.imaging import geometry
from worker.imaging.dicom_load import load_study, read_source_headers
from worker.imaging.series_selection import SelectionRules
from worker.measure import volume
from worker.measure.pipeline import ARTEFACT_NAMES, _common, _selection_json, failed_result, write_result_json
from worker.measure.teacher import BLAST_CT_CLASSES, BlastCtTeacher, TeacherPrediction, predict_teacher
from worker.outputs import mask_files as outputs
from worker.outputs import overlay

log = logging.getLogger(__name__)

SEG_DESCRIPTION = "BLAST-CT classes (research use only)"
NIFTI_DESCRIPTION = "BLAST-CT 0 bg 1 IPH 2 EAH 3 oedema 4 IVH; research use only"
SEGMENTS = (
    outputs.SegmentClass(1, "IPH intraparenchymal hemorrhage", codes.SCT.Hemorrhage),
    outputs.SegmentClass(2, "EAH extra-axial hemorrhage", codes.SCT.Hemorrhage),
    outputs.SegmentClass(3, "Perilesional oedema", codes.SCT.Edema),
    outputs.SegmentClass(4, "IVH intraventricular hemorrhage", codes.SCT.Hemorrhage),
)


def teacher_study(
    *,
    study_dir: Path,
    out_dir: Path,
    teacher: BlastCtTeacher | Callable[[], BlastCtTeacher],
    rules: SelectionRules | None = None,
) -> dict[str, Any]:
    """Run the teacher on the study under ``study_dir``; write the outputs; return ``result.json``'s content.

    ``teacher``: a loaded teacher, or a function that loads one (called only once the study
    is known to be usable, so bad input fails before TensorFlow loads).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    series: CtSeries | None = None
    try:
        start = time.perf_counter()
        if not Path(study_dir).is_dir():
            raise StudyError(ErrorCode.EMPTY_STUDY, f"study folder {study_dir} does not exist")
        series = load_study(Path(study_dir), rules=rules or SelectionRules())
        timings["read"] = round(time.perf_counter() - start, 3)
    except StudyError as error:
        write_result_json(out_dir, failed_result(error, series=series, timings=timings))
        raise
    start = time.perf_counter()
    loaded = teacher if isinstance(teacher, BlastCtTeacher) else teacher()
    timings["load_model"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    prediction = predict_teacher(series, loaded)
    timings["inference"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    result = _result(series, prediction, loaded, timings)
    _write_artefacts(out_dir, series, prediction, result)
    timings["write"] = round(time.perf_counter() - start, 3)
    result.update(_common(timings))
    write_result_json(out_dir, result)
    log.info("teacher: %d slices, hemorrhage %.2f mL", series.n_slices, result["hemorrhage_ml"])
    return result


def class_volumes_ml(labels: np.ndarray, series: CtSeries) -> dict[str, float]:
    """Planimetric volume (mL) of each non-background class of ``labels`` ``(slices, rows, columns)``."""
    return {
        name: round(
            volume.planimetric_volume_ml(
                (labels == value).astype(np.uint8),
                pixel_spacing_mm=series.pixel_spacing_mm,
                slab_thickness_mm=series.slab_thickness_mm,
            ),
            3,
        )
        for value, name in enumerate(BLAST_CT_CLASSES)
        if value > 0
    }


def _result(
    series: CtSeries, prediction: TeacherPrediction, teacher: BlastCtTeacher, timings: dict[str, float]
) -> dict[str, Any]:
    mask = prediction.hemorrhage_mask
    spacing, slabs = series.pixel_spacing_mm, series.slab_thickness_mm
    hemorrhage_ml = volume.planimetric_volume_ml(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
    abc = volume.abc2(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
    areas = volume.slice_areas_mm2(mask, pixel_spacing_mm=spacing)
    return {
        "status": "ok",
        "reason": None,
        "error_code": None,
        "study_instance_uid": series.study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "series": _selection_json(series.selection),
        "n_slices": series.n_slices,
        "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
        "slab_thickness_mm": [round(float(t), 4) for t in slabs],
        "volume_ml": round(float(hemorrhage_ml), 3),
        "hemorrhage_ml": round(float(hemorrhage_ml), 3),
        "abc2_ml": round(float(abc.volume_ml), 3),
        "volumes_ml": class_volumes_ml(prediction.labels, series),
        "hemorrhage_classes": ["IPH", "EAH", "IVH"],
        "model": {
            "name": "BLAST-CT",
            "models": list(prediction.model_names),
            "sha256": list(prediction.model_sha256),
            "engine": teacher.engine,
            "classes": list(BLAST_CT_CLASSES),
            "licence": "Apache-2.0 (worker/weights/blast_ct/LICENSE.txt, NOTICE)",
        },
        "slices": [
            {
                "sop_instance_uid": s.sop_instance_uid,
                "position_mm": round(float(s.position_mm), 3),
                "hemorrhage_mm2": round(float(a), 2),
            }
            for s, a in zip(series.slices, areas, strict=True)
        ],
        "warnings": list(series.warnings),
    }


def _write_artefacts(out_dir: Path, series: CtSeries, prediction: TeacherPrediction, result: dict[str, Any]) -> None:
    paths = {name: out_dir / file for name, file in ARTEFACT_NAMES.items()}
    mask = prediction.hemorrhage_mask
    outputs.write_mask_npz(
        paths["mask_npz"],
        mask=mask,
        sop_instance_uids=[s.sop_instance_uid for s in series.slices],
        extra={
            "labels": prediction.labels,
            "hemorrhage_probability": prediction.hemorrhage_probability.astype(np.float16),
        },
    )
    outputs.write_mask_nifti(
        paths["mask_nifti"],
        mask=prediction.labels,
        affine=geometry.nifti_affine(series),
        labels=True,
        description=NIFTI_DESCRIPTION,
    )
    outputs.write_class_seg(
        paths["seg"],
        labels=prediction.labels,
        classes=SEGMENTS,
        source_images=read_source_headers(series),
        model_name="BLAST-CT " + "+".join(prediction.model_names),
        model_version="blast-ct 96666a1",
        series_description=SEG_DESCRIPTION,
    )
    overlay.write_overlay_png(
        paths["overlay"],
        hu=series.hu,
        mask=mask,
        volume_ml=float(result["hemorrhage_ml"]),
        abc2_ml=float(result["abc2_ml"]),
        positions_mm=[s.position_mm for s in series.slices],
    )
