"""Results back in the reading room: bucket -> real worker -> PostgreSQL -> a real Orthanc PACS.

Real SeaweedFS, PostgreSQL, Redis, a ``celery -A worker worker`` subprocess with a Keras
model file (the fixed HU-band model), and Orthanc from Debian's packages with its
DICOMweb plugin. Deliveries go by STOW-RS (basic auth) and by C-STORE. The SR Orthanc
returns over DICOMweb must hold the database row's numbers; with Orthanc stopped, the
deliveries must be retried (attempts recorded) and arrive once it is back.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests.helpers.models import save_hu_band_model
from tests.helpers.orthanc import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.helpers.pacs_results import orthanc_settings
from tests.helpers.services import S3Bucket
from tests.helpers.worker_process import CeleryWorker, run_scheduler_once
from worker.core.settings import Settings
from worker.delivery.dicomweb import DicomwebClient
from worker.infra import db
from worker.infra.tables import Delivery, DeliveryState, Result, Run, RunState, Study
from worker.outputs.sr import read_volume_report
from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def upload(bucket: S3Bucket, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "truth" not in p.parts):
        bucket.client.upload_file(str(path), bucket.name, prefix + path.relative_to(folder).as_posix())
    bucket.client.put_object(Bucket=bucket.name, Key=prefix + "_COMPLETE", Body=b"")


def phantom(folder: Path, *, volume_ml: float, patient_id: str, seed: int) -> Any:
    spec = PhantomSpec(
        rows=64,
        columns=64,
        pixel_spacing_mm=(3.6, 3.6),
        n_slices=18,
        lesions=(LesionSpec("round", volume_ml=volume_ml, mean_hu=86),),
        noise_sigma_hu=2.0,
        calcifications=False,
        patient_name="Qwertz^Yxcv",
        patient_id=patient_id,
    )
    return generate_study(folder, spec=spec, seed=seed)


def wait_for(check: Callable[[], Any], *, what: str, timeout_s: float = 180.0, log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s\n{log()}")


def rows_of(sessions: Any, study_uid: str) -> tuple[Run, Result | None, list[Delivery]]:
    with sessions() as s:
        run = s.scalars(select(Run).join(Study).where(Study.study_instance_uid == study_uid)).one()
        result = s.scalars(select(Result).where(Result.run_id == run.id)).one_or_none()
        deliveries = list(s.scalars(select(Delivery).where(Delivery.run_id == run.id).order_by(Delivery.target)))
    return run, result, deliveries


def run_of(sessions: Any, study_uid: str) -> Run | None:
    with sessions() as s:
        return s.scalars(select(Run).join(Study).where(Study.study_instance_uid == study_uid)).one_or_none()


def sr_matches_row(client: DicomwebClient, study_uid: str, result: Result) -> dict[str, pydicom.Dataset]:
    """Retrieve the study from the PACS by WADO-RS; check the SR's numbers against ``result``."""
    files = [pydicom.dcmread(io.BytesIO(b)) for b in client.retrieve_study(study_uid)]
    by_modality = {ds.Modality: ds for ds in files}
    assert sorted(ds.Modality for ds in files) == ["OT", "SEG", "SR"], [ds.Modality for ds in files]
    numbers = read_volume_report(by_modality["SR"])
    assert numbers["volume_ml"] == result.volume_ml
    assert numbers["abc2_ml"] == result.abc2_ml
    assert numbers["n_slices"] == result.n_slices
    assert numbers["pixel_spacing_row_mm"] == result.pixel_spacing_row_mm
    assert numbers["pixel_spacing_col_mm"] == result.pixel_spacing_col_mm
    assert numbers["slab_thickness_mean_mm"] == result.slab_thickness_mean_mm
    assert numbers["source_series_instance_uid"] == result.series_instance_uid
    assert numbers["segmentation_sop_instance_uid"] == by_modality["SEG"].SOPInstanceUID
    assert by_modality["OT"].BurnedInAnnotation == "YES"
    return by_modality


def test_results_reach_orthanc_and_survive_an_outage(
    orthanc: OrthancServer,  # noqa: F811
    s3_bucket: S3Bucket,
    pg_migrated_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    model_path = save_hu_band_model(tmp_path / "hu-band.keras", input_size=64, band_hu=(74.0, 100.0))
    settings: Settings = s3_bucket.settings.replace(
        database_url=pg_migrated_url,
        broker_url=redis_url,
        queue_name=f"e2e-pacs-{uuid.uuid4().hex[:6]}",
        export_prefix="exports",
        results_prefix="results",
        model_path=str(model_path),
        work_dir=str(tmp_path / "work"),
        inference_threads=1,
        quiet_period_s=3600.0,
        **orthanc_settings(
            orthanc,
            targets="stow,cstore",
            pacs_timeout_s=3.0,
            pacs_retry_backoff_s=1.0,
            pacs_retry_backoff_max_s=2.0,
            pacs_max_attempts=50,
        ),
    )
    first = phantom(tmp_path / "first", volume_ml=18.0, patient_id="PACS-E2E-1", seed=21)
    upload(s3_bucket, tmp_path / "first", "exports/first/")
    sessions = db.session_factory(db.make_engine(pg_migrated_url))
    client = DicomwebClient(url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)

    with CeleryWorker(settings, tmp_path / "worker.log") as worker:
        assert re.search(r"\b1 enqueued\b", run_scheduler_once(settings))

        def delivered(study_uid: str) -> bool:
            run = run_of(sessions, study_uid)
            if run is None or run.state is not RunState.SUCCEEDED:
                return False
            _, _, deliveries = rows_of(sessions, study_uid)
            return len(deliveries) == 2 and all(d.state is DeliveryState.SENT for d in deliveries)

        wait_for(lambda: delivered(first.study_instance_uid), what="first study not delivered", log=worker.log_tail)
        _, result, deliveries = rows_of(sessions, first.study_instance_uid)
        assert result is not None and result.volume_ml == pytest.approx(first.mask_volume_ml, rel=0.08)
        assert [(d.target, d.attempts) for d in deliveries] == [("cstore", 1), ("stow", 1)]
        stored = sr_matches_row(client, first.study_instance_uid, result)
        assert {i["sop_instance_uid"] for i in deliveries[1].instances or []} == {
            ds.SOPInstanceUID for ds in stored.values()
        }

        # --- the PACS goes down: the result is committed, deliveries are retried, not lost ---
        orthanc.stop(kill=True)
        second = phantom(tmp_path / "second", volume_ml=25.0, patient_id="PACS-E2E-2", seed=22)
        upload(s3_bucket, tmp_path / "second", "exports/second/")
        assert re.search(r"\b1 enqueued\b", run_scheduler_once(settings))

        def retried() -> bool:
            run = run_of(sessions, second.study_instance_uid)
            if run is None or run.state is not RunState.SUCCEEDED:
                return False
            _, _, deliveries = rows_of(sessions, second.study_instance_uid)
            return len(deliveries) == 2 and all(
                d.state is DeliveryState.PENDING and d.attempts >= 2 for d in deliveries
            )

        wait_for(retried, what="deliveries not retried during the outage", log=worker.log_tail)
        _, result_during_outage, deliveries = rows_of(sessions, second.study_instance_uid)
        assert result_during_outage is not None  # the result is safe in the database
        assert all("unreachable" in (d.last_error or "") for d in deliveries), [d.last_error for d in deliveries]

        orthanc.start()
        wait_for(lambda: delivered(second.study_instance_uid), what="not delivered after restart", log=worker.log_tail)
        _, result, deliveries = rows_of(sessions, second.study_instance_uid)
        assert result is not None and all(d.attempts >= 3 and d.sent_at is not None for d in deliveries)
        sr_matches_row(client, second.study_instance_uid, result)
        sr_matches_row(client, first.study_instance_uid, rows_of(sessions, first.study_instance_uid)[1])  # type: ignore[arg-type]
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Qwertz" not in log_text, "a patient name reached the logs"
