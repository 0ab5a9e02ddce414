"""One queued run from the bucket to a result row: the plain function behind the processing task.

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
* permanent failures delete whatever artefacts this run uploaded (no orphans), but only
  after the failure was recorded under this delivery's claim: a delivery that was taken
  over never deletes the artefacts of the delivery that replaced it.
* the hard time limit kills the pool process: the worker's parent process records the
  run as failed (``time_limit``) and deletes its artefacts (:func:`record_hard_time_limit`).
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

from sqlalchemy import update
from sqlalchemy.orm import Session

from worker.core.ct import CtSeries, StudyInfo
from worker.core.errors import ErrorCode, ModelFileError, SoftTimeLimitReached, StudyError, TransientError
from worker.core.logs import log_context
from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study
from worker.measure.pipeline import ARTEFACT_NAMES, SegmentationOptions, StudyOutcome, segment_study
from worker.overnight import read_ahead
from worker.overnight.deps import WorkerDeps

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


def _claimer_is_gone(worker: str | None) -> bool:
    """Whether the process that last claimed a run (``hostname:pid``) is known to be dead:
    it ran on this host and no process has its pid. Elsewhere, or alive: not known."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _bury_if_lost_every_time(deps: WorkerDeps, session: Session, run_id: int) -> str | None:
    """Mark the run ``dead`` if every one of its deliveries lost its process; its artefact prefix.

    A study that kills the pool process (a decoder crash, out of memory) is redelivered at
    once by ``reject_on_worker_lost``, each delivery restarting the scheduler's clock: it
    would loop for ever. A redelivery that finds the run ``running`` after
    ``ICHVOL_MAX_ATTEMPTS`` deliveries, claimed by a process of this host that no longer
    exists, buries it instead. A claimer alive, or on another host, may still be working.
    """
    run = session.get(Run, run_id)
    max_attempts = deps.settings.max_attempts
    if run is None or run.state is not RunState.RUNNING or run.attempts < max_attempts:
        return None
    if not _claimer_is_gone(run.worker):
        return None
    buried = db.rowcount(
        session.execute(
            update(Run)
            .where(Run.id == run_id, Run.state == RunState.RUNNING, Run.attempts == run.attempts)
            .values(
                state=RunState.DEAD,
                finished_at=now_utc(),
                error_code=ErrorCode.WORKER_LOST.value,
                error_message=(
                    f"the worker process died on each of {run.attempts} deliveries (a crash or out of memory "
                    "while reading or measuring this study); it is not delivered again"
                ),
            )
        )
    )
    if not buried:
        return None
    study = session.get(Study, run.study_id)
    return artefact_prefix(
        results_prefix=deps.settings.results_prefix,
        study_id=run.study_id,
        fingerprint=study.fingerprint if study is not None else "",
        model_version=run.model_version,
    )


def claim_run(deps: WorkerDeps, *, run_id: int, task_id: str | None) -> _Claim | None:
    """Move the run to ``running`` with a fresh token, or return None if it is finished
    (or was just buried after its deliveries kept losing their process)."""
    token = uuid.uuid4().hex
    with db.transaction(deps.sessions) as session:
        buried = _bury_if_lost_every_time(deps, session, run_id)
    if buried is not None:
        _delete_artefacts(deps, buried)
        log.error("run %s lost its worker process on every delivery; marked dead", run_id)
        return None
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


def record_hard_time_limit(deps: WorkerDeps, *, run_id: int, task_id: str | None, limit_s: float) -> bool:
    """Record a run whose pool process the hard time limit killed: failed, ``time_limit``.

    Runs in the worker's parent process (the killed process cannot). Only a run still
    ``running`` under this task id is touched, so a run another delivery finished is left
    alone. The run's artefacts are deleted (the killed process may have uploaded some).
    Returns whether the run was marked failed.
    """
    message = f"the study took longer than the hard time limit of {limit_s:.0f} s and its worker process was stopped"
    conditions = [Run.id == run_id, Run.state == RunState.RUNNING]
    if task_id:
        conditions.append(Run.celery_task_id == task_id)
    with db.transaction(deps.sessions) as session:
        row = session.execute(
            update(Run)
            .where(*conditions)
            .values(
                state=RunState.FAILED,
                finished_at=now_utc(),
                error_code=ErrorCode.TIME_LIMIT.value,
                error_message=message,
            )
            .returning(Run.study_id, Run.model_version)
        ).first()
        if row is None:
            return False
        study = session.get(Study, row.study_id)
        fingerprint = study.fingerprint if study is not None else ""
    _delete_artefacts(
        deps,
        artefact_prefix(
            results_prefix=deps.settings.results_prefix,
            study_id=int(row.study_id),
            fingerprint=fingerprint,
            model_version=row.model_version,
        ),
    )
    log.warning("run %s hit the hard time limit; recorded as failed", run_id)
    return True


def _update_study_identifiers(session: Session, study_id: int, info: StudyInfo) -> None:
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
    from worker.infra.listing import fingerprint_of, study_objects

    objects = study_objects(deps.export_store.iter_objects(claim.prefix), marker_name=deps.settings.marker_name)
    if fingerprint_of(objects) != claim.fingerprint:
        raise StudyError(
            ErrorCode.STUDY_CHANGED,
            "the exported study changed after it was registered; the new export is measured as a new version",
        )
    # Refuse before downloading: the same limit the loader applies to the folder.
    if len(objects) > deps.settings.max_files:
        raise StudyError(
            ErrorCode.TOO_MANY_FILES,
            f"the study folder holds {len(objects)} files, more than {deps.settings.max_files}; "
            "split the export or raise ICHVOL_MAX_FILES",
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
        abc2_a_mm=float(r["abc2"]["a_mm"]),
        abc2_b_mm=float(r["abc2"]["b_mm"]),
        abc2_c_mm=float(r["abc2"]["c_mm"]),
        decision_threshold=float(r["postprocessing"]["threshold"]),
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
            # A study read ahead while the previous one was measured starts decoded (worker.overnight.read_ahead).
            series = read_ahead.take(deps, run_id=claim.run_id, fingerprint=claim.fingerprint, dest=scratch / "study")
            if series is None:
                _download_study(deps, claim, scratch / "study")
            read_ahead.start_next(deps, current_run_id=claim.run_id)
            outcome = segment_study(
                study_dir=scratch / "study",
                out_dir=scratch / "out",
                segmenter=segmenter,
                options=SegmentationOptions.from_settings(settings),
                series=series,
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
            if _finish(deps, claim, state=RunState.FAILED, error_code=error.code.value, error_message=error.message):
                _delete_artefacts(deps, prefix)
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
        except SoftTimeLimitReached:
            message = f"the study took longer than the soft time limit of {settings.soft_time_limit_s:.0f} s"
            if _finish(
                deps,
                claim,
                state=RunState.FAILED,
                error_code=ErrorCode.TIME_LIMIT.value,
                error_message=message,
            ):
                _delete_artefacts(deps, prefix)
            log.warning("run hit the soft time limit")
            return RunOutcome(
                run_id=claim.run_id,
                state=RunState.FAILED.value,
                error_code=ErrorCode.TIME_LIMIT.value,
                error_message=message,
            )
        except Exception as error:  # a bug or an input no check foresaw: recorded, never retried
            log.exception("run failed with an internal error")
            message = f"internal error ({type(error).__name__}): {error}"
            if _finish(deps, claim, state=RunState.FAILED, error_code=ErrorCode.INTERNAL.value, error_message=message):
                _delete_artefacts(deps, prefix)
            return RunOutcome(
                run_id=claim.run_id,
                state=RunState.FAILED.value,
                error_code=ErrorCode.INTERNAL.value,
                error_message=message,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
