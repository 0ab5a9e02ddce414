"""Real results to deliver: a small CT study measured by the production code path.

:func:`measured_study` runs :func:`worker.measure.pipeline.segment_study` on a synthetic CT series
(6 slices of 32 x 32, 0.5 mm pixels, 5 mm apart; a 2-slice block of 70 HU "blood") with
the deterministic :class:`HuBandSegmenter`: its ``seg.dcm`` and ``overlay.png`` are what
the worker writes. :func:`processed_run` goes further: local-folder export and results
buckets, the scheduler's :func:`poll_once` and :func:`process_run`, so the database holds
a real ``results`` row (SQLite or PostgreSQL, at the newest migration).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers.dicom_builders import WrittenSeries, write_ct_series
from tests.helpers.orthanc import OrthancServer
from tests.helpers.segmenters import HuBandSegmenter
from worker.core.settings import Settings
from worker.delivery.deliveries import DeliveryDeps
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.storage import LocalStore
from worker.measure.pipeline import SegmentationOptions, StudyOutcome, segment_study
from worker.overnight.deps import WorkerDeps
from worker.overnight.processing import process_run

#: 2 slices x 10 x 10 pixels x 0.25 mm^2 x 5 mm = 250 mm^3.
BLOOD_VOLUME_ML = 0.25


def blood_hu(n: int = 6, rows: int = 32, cols: int = 32) -> np.ndarray:
    hu = np.full((n, rows, cols), 30.0, np.float32)
    hu[2:4, 10:20, 10:20] = 70.0
    return hu


OPTIONS = SegmentationOptions(intracranial_only=False, min_component_ml=0.0)


@dataclass(frozen=True)
class MeasuredStudy:
    written: WrittenSeries
    outcome: StudyOutcome

    @property
    def seg_path(self) -> Path:
        return self.outcome.artefacts["seg"]

    @property
    def overlay_path(self) -> Path:
        return self.outcome.artefacts["overlay"]


def measured_study(folder: Path, *, patient_id: str = "PACS-1") -> MeasuredStudy:
    """Write the CT series under ``folder/ct`` and measure it into ``folder/out``."""
    written = write_ct_series(folder / "ct", hu=blood_hu(), patient_id=patient_id)
    outcome = segment_study(
        study_dir=folder / "ct", out_dir=folder / "out", segmenter=HuBandSegmenter(input_size=32), options=OPTIONS
    )
    assert outcome.ok, outcome.result
    return MeasuredStudy(written=written, outcome=outcome)


def local_deps(tmp_path: Path, database_url: str, **overrides: Any) -> WorkerDeps:
    """Worker dependencies on local folders (export ``tmp/export``, results ``tmp/results``, both created)."""
    for bucket in ("export", "results"):
        (tmp_path / bucket).mkdir(parents=True, exist_ok=True)
    settings = Settings(
        database_url=database_url,
        export_bucket=str(tmp_path / "export"),
        results_bucket=str(tmp_path / "results"),
        export_prefix="exports",
        results_prefix="results",
        quiet_period_s=0.0,
        work_dir=str(tmp_path / "scratch"),
        restrict_to_intracranial=False,
        min_component_ml=0.0,
        **overrides,
    )
    segmenter = HuBandSegmenter(input_size=32)
    return WorkerDeps(
        settings=settings,
        sessions=db.session_factory(db.make_engine(database_url)),
        export_store=LocalStore(tmp_path / "export"),
        results_store=LocalStore(tmp_path / "results"),
        model_info=segmenter.info,
        segmenter_factory=lambda: segmenter,
    )


def processed_run(deps: WorkerDeps, folder: Path, *, name: str = "blood", patient_id: str = "PACS-1") -> int:
    """Export one blood study into the export folder, register it and process it; returns the run id."""
    write_ct_series(folder / name, hu=blood_hu(), patient_id=patient_id)
    export = Path(deps.export_store.root)
    for path in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
        target = export / "exports" / name / path.relative_to(folder / name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    sent: list[int] = []
    poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=deps.settings,
        model=deps.model_info,
        enqueue=lambda run_id, _task: sent.append(run_id),
    )
    assert len(sent) == 1, sent
    outcome = process_run(run_id=sent[0], deps=deps)
    assert outcome.state == "succeeded", outcome
    return sent[0]


def delivery_deps(deps: WorkerDeps, **overrides: Any) -> DeliveryDeps:
    return DeliveryDeps(
        settings=deps.settings.replace(**overrides), sessions=deps.sessions, results_store=deps.results_store
    )


def orthanc_settings(orthanc: OrthancServer, *, targets: str = "stow", **overrides: Any) -> dict[str, Any]:
    """Settings fields (for ``Settings.replace``) that deliver to ``orthanc``."""
    values: dict[str, Any] = {
        "pacs_delivery": targets,
        "pacs_stow_url": orthanc.dicomweb_url,
        "pacs_username": orthanc.username,
        "pacs_password": orthanc.password,
        "pacs_cstore_host": "127.0.0.1",
        "pacs_cstore_port": orthanc.dicom_port,
        "pacs_cstore_called_aet": orthanc.aet,
        "pacs_timeout_s": 10.0,
    }
    values.update(overrides)
    return values
