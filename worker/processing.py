"""One queued run from the bucket to a result row: the plain function behind the Celery task.

Idempotency and exactly-one-result rules:

* **claim**: a conditional update moves the run to ``running`` only from ``queued`` or
  ``running`` (a redelivery after a lost worker) and stamps a fresh ``claim_token``;
  a run already ``succeeded``, ``failed`` or ``dead`` is left alone (the task acks).
* **fingerprint**: the study's objects are listed again; if they no longer match the
  registered fingerprint the run fails with ``study_changed`` (the scheduler registers
  the new export as a new study version).
* **artefacts** go to keys fixed by study version and model version, so a retry
  overwrites and never duplicates.
* **finish**: the result row and the run state are written in one transaction,
  conditional on the claim token: if another delivery took the run over meanwhile,
  this one writes nothing. ``results.run_id`` is unique.
* permanent failures delete whatever artefacts this run uploaded (no orphans).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from worker import db
from worker.ct import CtSeries, StudyInfo
from worker.errors import ErrorCode, ModelFileError, StudyError, TransientError
from worker.logs import log_context
from worker.pipeline import ARTEFACT_NAMES, SegmentationOptions, StudyOutcome, segment_study
from worker.runtime import WorkerDeps
from worker.tables import Result, Run, RunState, Study

log = logging.getLogger(__name__)

CLAIMABLE = (RunState.QUEUED, RunState.RUNNING)


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`process_run` did. ``state`` is the run's state afterwards."""

    run_id: int
    state: str
    skipped: bool = False
    volume_ml: float | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class _Claim:
    run_id: int
    token: str
    study_id: int
    bucket: str
    prefix: str
    fingerprint: str
    model_version: str
    attempts: int


def now_utc() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def artefact_prefix(*, results_prefix: str, study_id: int, fingerprint: str, model_version: str) -> str:
    """Key prefix of one run's artefacts: fixed per (study version, model version)."""
    base = results_prefix.strip("/")
    parts = [p for p in (base, f"study-{study_id}", fingerprint[:16], _safe_key_part(model_version)) if p]
    return "/".join(parts) + "/"


def _safe_key_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"


def claim_run(deps: WorkerDeps, *, run_id: int, task_id: str | None) -> _Claim | None:
    """Move the run to ``running`` with a fresh token, or return None if it is finished."""
    token = uuid.uuid4().hex
    with db.transaction(deps.sessions) as session:
        row = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.state.in_(CLAIMABLE))
            .values(
                state=RunState.RUNNING,
                attempts=Run.attempts + 1,
                claim_token=token,
                worker=worker_name(),
                started_at=now_utc(),
                heartbeat_at=now_utc(),
                **({"celery_task_id": task_id} if task_id else {}),
            )
            .returning(Run.study_id, Run.model_version, Run.attempts)
        ).first()
        if row is None:
            return None
        study = session.get(Study, row.study_id)
        assert study is not None
        return _Claim(
            run_id=run_id,
            token=token,
            study_id=study.id,
            bucket=study.bucket,
            prefix=study.prefix,
            fingerprint=study.fingerprint,
            model_version=row.model_version,
            attempts=int(row.attempts),
        )


def _finish(
    deps: WorkerDeps,
    claim: _Claim,
    *,
    state: RunState,
    error_code: str | None = None,
    error_message: str | None = None,
    result: Result | None = None,
    study_info: StudyInfo | None = None,
) -> bool:
    """Write the final state (and result) if this delivery still holds the claim."""
    with db.transaction(deps.sessions) as session:
        updated = db.rowcount(
            session.execute(
                update(Run)
                .where(Run.id == claim.run_id, Run.claim_token == claim.token, Run.state == RunState.RUNNING)
                .values(
                    state=state,
                    finished_at=now_utc(),
                    error_code=error_code,
                    error_message=(error_message or "")[:2000] or None,
                )
            )
        )
        if not updated:
            return False
        if result is not None:
            session.add(result)
        if study_info is not None:
            _update_study_identifiers(session, claim.study_id, study_info)
    return True


def release_for_retry(deps: WorkerDeps, claim: _Claim, *, message: str, delay_s: float) -> bool:
    """Hand a run back to the queue after a transient error (the task retries it)."""
    with db.transaction(deps.sessions) as session:
        return bool(
            db.rowcount(
                session.execute(
                    update(Run)
                    .where(Run.id == claim.run_id, Run.claim_token == claim.token)
                    .values(
                        state=RunState.QUEUED,
                        enqueued_at=datetime.fromtimestamp(time.time() + delay_s, UTC),
                        error_message=message[:2000],
                    )
                )
            )
        )


def fail_run(deps: WorkerDeps, *, run_id: int, code: ErrorCode, message: str) -> bool:
    """Mark a run failed whatever its claim (time limits, exhausted retries)."""
    with db.transaction(deps.sessions) as session:
        return bool(
            db.rowcount(
                session.execute(
                    update(Run)
                    .where(Run.id == run_id, Run.state.in_(CLAIMABLE))
                    .values(
                        state=RunState.FAILED,
                        finished_at=now_utc(),
                        error_code=code.value,
                        error_message=message[:2000],
                    )
                )
            )
        )


def _update_study_identifiers(session: Any, study_id: int, info: StudyInfo) -> None:
    study = session.get(Study, study_id)
    if study is None:
        return
    study.study_instance_uid = info.study_instance_uid
    study.patient_id = info.patient_id
    study.issuer_of_patient_id = info.issuer_of_patient_id
    study.accession_number = info.accession_number
    study.study_date = _parse_da(info.study_date)
    study.study_time = _parse_tm(info.study_time)
    study.study_datetime = _study_datetime(info)


def _parse_da(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _parse_tm(value: str | None) -> dtime | None:
    if not value:
        return None
    text = value.strip().replace(":", "")
    digits = text.split(".")[0]
    if not digits.isdigit() or len(digits) < 2:
        return None
    try:
        hour = int(digits[0:2])
        minute = int(digits[2:4]) if len(digits) >= 4 else 0
        second = int(digits[4:6]) if len(digits) >= 6 else 0
        micro = int((text.split(".")[1] + "000000")[:6]) if "." in text else 0
        return dtime(hour, minute, min(second, 59), micro)
    except (ValueError, IndexError):
        return None


def _study_datetime(info: StudyInfo) -> datetime | None:
    """Acquisition date-time of the measured series if usable, else study date + time (UTC assumed)."""
    if info.acquisition_datetime:
        text = info.acquisition_datetime.strip()
        parsed_date, parsed_time = _parse_da(text[:8]), _parse_tm(text[8:].split("+")[0].split("-")[0])
        if parsed_date and parsed_time:
            return datetime.combine(parsed_date, parsed_time, tzinfo=UTC)
    d, t = _parse_da(info.study_date), _parse_tm(info.study_time)
    if d and t:
        return datetime.combine(d, t, tzinfo=UTC)
    return None


def _download_study(deps: WorkerDeps, claim: _Claim, dest: Path) -> None:
    """Download every object of the study version into ``dest``; fail if it changed."""
    from scheduler.listing import fingerprint_of, study_objects

    objects = study_objects(deps.export_store.iter_objects(claim.prefix), marker_name=deps.settings.marker_name)
    if fingerprint_of(objects) != claim.fingerprint:
        raise StudyError(
            ErrorCode.STUDY_CHANGED,
            "the exported study changed after it was registered; the new export is measured as a new version",
        )
    deps.export_store.download_prefix(claim.prefix, dest, keys=[o.key for o in objects])


def _upload(deps: WorkerDeps, outcome: StudyOutcome, prefix: str) -> dict[str, str]:
    uris = {}
    for name, path in outcome.artefacts.items():
        uris[name] = deps.results_store.upload_file(prefix + ARTEFACT_NAMES[name], path, content_type=_ctype(path))
    return uris


def _ctype(path: Path) -> str:
    suffixes = {
        ".json": "application/json",
        ".png": "image/png",
        ".dcm": "application/dicom",
        ".gz": "application/gzip",
        ".npz": "application/octet-stream",
    }
    return suffixes.get(path.suffix, "application/octet-stream")


def _delete_artefacts(deps: WorkerDeps, prefix: str) -> None:
    for file in ARTEFACT_NAMES.values():
        try:
            deps.results_store.delete(prefix + file)
        except Exception:
            log.warning("could not delete artefact %s", prefix + file)


def _result_row(claim: _Claim, series: CtSeries, outcome: StudyOutcome, uris: dict[str, str]) -> Result:
    r = outcome.result
    slabs = series.slab_thickness_mm
    return Result(
        run_id=claim.run_id,
        series_instance_uid=series.series_instance_uid,
        volume_ml=float(r["volume_ml"]),
        abc2_ml=float(r["abc2_ml"]),
        n_slices=int(r["n_slices"]),
        pixel_spacing_row_mm=float(series.pixel_spacing_mm[0]),
        pixel_spacing_col_mm=float(series.pixel_spacing_mm[1]),
        slab_thickness_mean_mm=float(slabs.mean()) if len(slabs) else 0.0,
        timings_s=dict(r["timings_s"]),
        result_uri=uris.get("result"),
        mask_npz_uri=uris.get("mask_npz"),
        mask_nifti_uri=uris.get("mask_nifti"),
        seg_uri=uris.get("seg"),
        overlay_uri=uris.get("overlay"),
    )


def process_run(*, run_id: int, deps: WorkerDeps, task_id: str | None = None) -> RunOutcome:
    """Claim, download, segment, upload and record one run.

    Raises :class:`TransientError` (after handing the run back to the queue) for S3,
    database or model-loading trouble; the caller retries with backoff. Every other
    outcome is recorded in the database and returned.
    """
    with log_context(run_id=run_id, task_id=task_id):
        claim = claim_run(deps, run_id=run_id, task_id=task_id)
        if claim is None:
            log.info("run already finished; nothing to do")
            return RunOutcome(run_id=run_id, state="finished", skipped=True)
        with log_context(study_id=claim.study_id, attempt=claim.attempts):
            return _process_claimed(deps, claim)


def _process_claimed(deps: WorkerDeps, claim: _Claim) -> RunOutcome:
    settings = deps.settings
    prefix = artefact_prefix(
        results_prefix=settings.results_prefix,
        study_id=claim.study_id,
        fingerprint=claim.fingerprint,
        model_version=claim.model_version,
    )
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"run-{claim.run_id}-", dir=settings.work_dir))
    try:
        try:
            if deps.model_info.version != claim.model_version:
                raise TransientError(
                    f"this worker runs model {deps.model_info.version}, the run needs {claim.model_version}"
                )
            try:
                segmenter = deps.segmenter
            except ModelFileError as exc:
                raise TransientError(f"model not available on this worker: {exc.message}") from exc
            _download_study(deps, claim, scratch / "study")
            outcome = segment_study(
                study_dir=scratch / "study",
                out_dir=scratch / "out",
                segmenter=segmenter,
                options=SegmentationOptions.from_settings(settings),
            )
            if not outcome.ok:
                assert outcome.error is not None
                raise outcome.error
            assert outcome.series is not None
            uris = _upload(deps, outcome, prefix)
            row = _result_row(claim, outcome.series, outcome, uris)
            if not _finish(deps, claim, state=RunState.SUCCEEDED, result=row, study_info=outcome.series.study):
                log.warning("run was taken over by another delivery; result discarded")
                return RunOutcome(run_id=claim.run_id, state="taken_over", skipped=True)
            log.info("run succeeded: %.2f mL", row.volume_ml)
            return RunOutcome(run_id=claim.run_id, state=RunState.SUCCEEDED.value, volume_ml=row.volume_ml)
        except StudyError as error:
            _delete_artefacts(deps, prefix)
            _finish(deps, claim, state=RunState.FAILED, error_code=error.code.value, error_message=error.message)
            log.info("run failed permanently: %s", error.code.value)
            return RunOutcome(
                run_id=claim.run_id,
                state=RunState.FAILED.value,
                error_code=error.code.value,
                error_message=error.message,
            )
        except TransientError as error:
            release_for_retry(deps, claim, message=error.message, delay_s=settings.retry_backoff_s)
            raise
        except SoftTimeLimitExceeded:
            _delete_artefacts(deps, prefix)
            message = f"the study took longer than the soft time limit of {settings.soft_time_limit_s:.0f} s"
            _finish(
                deps,
                claim,
                state=RunState.FAILED,
                error_code=ErrorCode.TIME_LIMIT.value,
                error_message=message,
            )
            log.warning("run hit the soft time limit")
            return RunOutcome(
                run_id=claim.run_id,
                state=RunState.FAILED.value,
                error_code=ErrorCode.TIME_LIMIT.value,
                error_message=message,
            )
        except Exception as error:  # a bug or an input no check foresaw: recorded, never retried
            log.exception("run failed with an internal error")
            _delete_artefacts(deps, prefix)
            message = f"internal error ({type(error).__name__}): {error}"
            _finish(deps, claim, state=RunState.FAILED, error_code=ErrorCode.INTERNAL.value, error_message=message)
            return RunOutcome(
                run_id=claim.run_id,
                state=RunState.FAILED.value,
                error_code=ErrorCode.INTERNAL.value,
                error_message=message,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
