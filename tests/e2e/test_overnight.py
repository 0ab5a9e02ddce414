"""The overnight pipeline end to end: S3 bucket -> scheduler -> real Celery worker -> PostgreSQL.

Real SeaweedFS, PostgreSQL and Redis on loopback; a real ``celery -A worker worker``
subprocess loading a Keras model file (a fixed HU-band model, so that the measured
volumes can be compared with the phantoms' truth without a trained network).
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.helpers.bad_studies import BAD_STUDIES
from tests.helpers.models import save_hu_band_model
from tests.helpers.services import S3Bucket
from tests.helpers.worker_process import CeleryWorker, run_scheduler_once
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study
from worker.model.engines import resolve_engine
from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

PHANTOMS = {
    "round-18ml": LesionSpec("round", volume_ml=18.0, mean_hu=86),
    "lobes-25ml": LesionSpec("irregular", volume_ml=25.0, mean_hu=86),
}


def upload(bucket: S3Bucket, folder: Path, prefix: str, *, marker: bool = True) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "truth" not in p.parts):
        bucket.client.upload_file(str(path), bucket.name, prefix + path.relative_to(folder).as_posix())
    if marker:
        bucket.client.put_object(Bucket=bucket.name, Key=prefix + "_COMPLETE", Body=b"")


def wait_until_finished(sessions, n_runs: int, timeout_s: float = 180.0) -> list[Run]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as s:
            runs = list(s.scalars(select(Run)))
        if len(runs) == n_runs and all(r.state not in (RunState.QUEUED, RunState.RUNNING) for r in runs):
            return runs
        time.sleep(0.5)
    raise TimeoutError(f"runs not finished: {[(r.id, r.state) for r in runs]}")


def test_bucket_to_database_with_a_real_worker(
    s3_bucket: S3Bucket, pg_migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    model_path = save_hu_band_model(tmp_path / "hu-band.keras", input_size=64, band_hu=(74.0, 100.0))
    settings: Settings = s3_bucket.settings.replace(
        database_url=pg_migrated_url,
        broker_url=redis_url,
        queue_name=f"e2e-{uuid.uuid4().hex[:6]}",
        export_prefix="exports",
        results_prefix="results",
        model_path=str(model_path),
        work_dir=str(tmp_path / "work"),
        inference_threads=1,
        quiet_period_s=3600.0,  # only marked studies count as complete
    )
    truths = {}
    for i, (name, lesion) in enumerate(PHANTOMS.items()):
        spec = PhantomSpec(
            rows=64,
            columns=64,
            pixel_spacing_mm=(3.6, 3.6),
            n_slices=18,
            lesions=(lesion,),
            noise_sigma_hu=2.0,
            calcifications=False,
            patient_name="Zyxwvut^Qqqq",
            patient_id=f"E2E-{i}",
        )
        truths[name] = generate_study(tmp_path / name, spec=spec, seed=10 + i)
        upload(s3_bucket, tmp_path / name, f"exports/{name}/")
    for name in ("only_scouts", "truncated_file"):
        BAD_STUDIES[name].build(tmp_path / name)
        upload(s3_bucket, tmp_path / name, f"exports/{name}/")
    BAD_STUDIES["one_slice"].build(tmp_path / "half-exported")
    upload(s3_bucket, tmp_path / "half-exported", "exports/half-exported/", marker=False)  # never processed

    sessions = db.session_factory(db.make_engine(pg_migrated_url))
    with CeleryWorker(settings, tmp_path / "worker.log") as worker:
        line = run_scheduler_once(settings)
        assert re.search(r"\b4 enqueued\b", line), line
        runs = wait_until_finished(sessions, 4)

        with sessions() as s:
            rows = s.execute(
                select(Study, Run, Result)
                .select_from(Study)
                .join(Run, Run.study_id == Study.id)
                .outerjoin(Result, Result.run_id == Run.id)
            ).all()
        by_name = {study.prefix.split("/")[1]: (study, run, result) for study, run, result in rows}
        assert set(by_name) == {*PHANTOMS, "only_scouts", "truncated_file"}
        for name, truth in truths.items():
            study, run, result = by_name[name]
            assert run.state is RunState.SUCCEEDED, (name, run.error_code, run.error_message, worker.log_tail())
            assert study.study_instance_uid == truth.study_instance_uid and study.patient_id.startswith("E2E-")
            assert result.series_instance_uid == truth.series_instance_uid
            assert result.volume_ml == pytest.approx(truth.mask_volume_ml, rel=0.08), name
            for uri in (
                result.result_uri,
                result.mask_npz_uri,
                result.mask_nifti_uri,
                result.seg_uri,
                result.overlay_uri,
            ):
                key = uri.removeprefix(f"s3://{s3_bucket.name}/")
                assert s3_bucket.store.exists(key), uri
            mask_key = result.mask_npz_uri.removeprefix(f"s3://{s3_bucket.name}/")
            s3_bucket.store.download(mask_key, tmp_path / f"{name}-mask.npz")
            with np.load(tmp_path / f"{name}-mask.npz") as npz:
                assert list(npz["sop_instance_uids"]) == list(truth.sop_instance_uids)
                overlap = (npz["mask"] & truth.mask).sum() / truth.mask.sum()
            assert overlap > 0.9, (name, overlap)
        assert by_name["only_scouts"][1].state is RunState.FAILED
        assert by_name["only_scouts"][1].error_code == "only_localizers"
        assert by_name["truncated_file"][1].error_code == "truncated_file"
        assert all(r.attempts == 1 for r in runs)

        info = worker.inspect("model_info")
        assert info is not None
        assert info["name"] == "HU band (test)" and info["version"] == "hu-band-keras-1"
        assert len(info["sha256"]) == 64 and info["loaded"] is True and info["device"] == "CPU"
        assert info["engine_setting"] == "auto" and info["engine"] == resolve_engine("auto")  # what really runs
        assert info["studies_processed"] == 4 and info["studies_failed"] == 2

        again = run_scheduler_once(settings)
        assert re.search(r"\b0 enqueued\b", again) and re.search(r"\b0 re-sent\b", again), again
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Zyxwvut" not in log, "a patient name reached the logs"
