"""One run from the bucket to a result row, against real PostgreSQL and S3 on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from tests.helpers.bad_studies import BAD_STUDIES
from tests.helpers.dicom_builders import write_ct_series
from tests.helpers.segmenters import HuBandSegmenter
from tests.helpers.services import S3Bucket
from worker.core.errors import TransientError
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.tables import Result, Run, RunState, Study
from worker.overnight.deps import WorkerDeps
from worker.overnight.processing import claim_run, process_run

pytestmark = pytest.mark.integration


def upload_folder(bucket: S3Bucket, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        bucket.client.upload_file(str(path), bucket.name, prefix + path.relative_to(folder).as_posix())


def blood_hu(n: int = 6, rows: int = 32, cols: int = 32) -> np.ndarray:
    hu = np.full((n, rows, cols), 30.0, np.float32)
    hu[2:4, 10:20, 10:20] = 70.0  # 2 slices x 10 x 10 pixels of "blood"
    return hu


def make_deps(bucket: S3Bucket, url: str, tmp_path: Path, **overrides: Any) -> WorkerDeps:
    settings = bucket.settings.replace(
        database_url=url,
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
        sessions=db.session_factory(db.make_engine(url)),
        export_store=bucket.store,
        results_store=bucket.store,
        model_info=segmenter.info,
        segmenter_factory=lambda: segmenter,
    )


def register(deps: WorkerDeps) -> list[int]:
    sent: list[int] = []
    poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=deps.settings,
        model=deps.model_info,
        enqueue=lambda run_id, _t: sent.append(run_id),
    )
    return sent


def test_good_study_succeeds_with_artefacts_and_identifiers(
    s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path
) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    written = write_ct_series(tmp_path / "good", hu=blood_hu(), intercept=-1024.0)
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    (run_id,) = register(deps)
    outcome = process_run(run_id=run_id, deps=deps, task_id="t-1")
    assert outcome.state == "succeeded"
    # 2 slices x 100 pixels x 0.25 mm^2 x 5 mm slab = 250 mm^3
    assert outcome.volume_ml == pytest.approx(0.25, rel=1e-3)
    with deps.sessions() as s:
        run = s.get(Run, run_id)
        result = s.scalars(select(Result)).one()
        study = s.scalars(select(Study)).one()
    assert run is not None and run.state is RunState.SUCCEEDED and run.attempts == 1 and run.celery_task_id == "t-1"
    assert result.series_instance_uid == written.series_instance_uid and result.n_slices == 6
    assert result.decision_threshold == deps.model_info.threshold == 0.5  # the model's own, recorded
    assert study.study_instance_uid == written.study_instance_uid and study.patient_id == "PHANTOM-1"
    uris = [result.result_uri, result.mask_npz_uri, result.mask_nifti_uri, result.seg_uri, result.overlay_uri]
    for uri in uris:
        assert uri is not None and uri.startswith(f"s3://{s3_bucket.name}/results/study-{study.id}/")
        assert s3_bucket.store.exists(uri.split("/", 3)[3])
    # a redelivery after success does nothing
    again = process_run(run_id=run_id, deps=deps)
    assert again.skipped
    with deps.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 1


def test_bad_studies_fail_with_codes_while_good_ones_succeed(
    s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path
) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    write_ct_series(tmp_path / "good", hu=blood_hu())
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    names = ["no_dicom", "only_scouts", "one_slice", "truncated_file", "absurd_dimensions"]
    for name in names:
        BAD_STUDIES[name].build(tmp_path / name)
        upload_folder(s3_bucket, tmp_path / name, f"exports/{name}/")
    run_ids = register(deps)
    assert len(run_ids) == len(names) + 1
    for run_id in run_ids:
        process_run(run_id=run_id, deps=deps)
    with deps.sessions() as s:
        rows = s.execute(select(Study.prefix, Run.state, Run.error_code, Run.error_message).join(Run)).all()
    by_name = {r.prefix.split("/")[1]: r for r in rows}
    assert by_name["good"].state is RunState.SUCCEEDED
    for name in names:
        row = by_name[name]
        assert row.state is RunState.FAILED and row.error_code == BAD_STUDIES[name].code.value, name
        assert BAD_STUDIES[name].message_part in row.error_message
    # failed runs leave no artefacts behind
    keys = [o.key for o in s3_bucket.store.iter_objects("results/")]
    assert keys and all("/study-" in k for k in keys)
    with deps.sessions() as s:
        good_id = s.scalar(select(Study.id).where(Study.prefix == "exports/good/"))
    assert {k.split("/")[1] for k in keys} == {f"study-{good_id}"}


def test_transient_storage_error_hands_the_run_back(
    s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    write_ct_series(tmp_path / "good", hu=blood_hu())
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    (run_id,) = register(deps)
    real_upload = deps.results_store.upload_file

    def flaky(*args: Any, **kwargs: Any) -> str:
        raise TransientError("S3 answered 503 SlowDown")

    monkeypatch.setattr(deps.results_store, "upload_file", flaky)
    with pytest.raises(TransientError):
        process_run(run_id=run_id, deps=deps)
    with deps.sessions() as s:
        run = s.get(Run, run_id)
    assert run is not None and run.state is RunState.QUEUED and "SlowDown" in (run.error_message or "")
    monkeypatch.setattr(deps.results_store, "upload_file", real_upload)
    assert process_run(run_id=run_id, deps=deps).state == "succeeded"
    with deps.sessions() as s:
        run = s.get(Run, run_id)
    assert run is not None and run.attempts == 2


def test_a_study_changed_after_registration_fails_cleanly(
    s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path
) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    write_ct_series(tmp_path / "good", hu=blood_hu())
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    (run_id,) = register(deps)
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="exports/good/late.dcm", Body=b"more")
    outcome = process_run(run_id=run_id, deps=deps)
    assert outcome.state == "failed" and outcome.error_code == "study_changed"
    # the next poll registers the changed export as a new version
    assert len(register(deps)) == 1


def test_a_takeover_leaves_exactly_one_result(s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    write_ct_series(tmp_path / "good", hu=blood_hu())
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    (run_id,) = register(deps)
    stale = claim_run(deps, run_id=run_id, task_id="first")  # a delivery whose worker then vanished
    assert stale is not None
    assert process_run(run_id=run_id, deps=deps, task_id="second").state == "succeeded"
    from worker.overnight.processing import RunState as _RS
    from worker.overnight.processing import _finish

    assert _finish(deps, stale, state=_RS.FAILED, error_code="x") is False  # the stale claim writes nothing
    with deps.sessions() as s:
        run = s.get(Run, run_id)
        assert s.scalar(select(func.count()).select_from(Result)) == 1
    assert run is not None and run.state is RunState.SUCCEEDED and run.celery_task_id == "second"


def test_a_worker_with_another_model_version_does_not_process(
    s3_bucket: S3Bucket, pg_migrated_url: str, tmp_path: Path
) -> None:
    deps = make_deps(s3_bucket, pg_migrated_url, tmp_path)
    write_ct_series(tmp_path / "good", hu=blood_hu())
    upload_folder(s3_bucket, tmp_path / "good", "exports/good/")
    (run_id,) = register(deps)
    other = HuBandSegmenter(input_size=32, version="other")
    deps.model_info = other.info
    with pytest.raises(TransientError, match="needs hu-band-1"):
        process_run(run_id=run_id, deps=deps)
