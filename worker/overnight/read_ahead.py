"""Read ahead: download and decode the next queued study while the current one is measured.

A worker process runs one study at a time (Celery prefetch 1, late acknowledgement), so
by default the model waits while the next study downloads and decodes. With
``ICHVOL_READ_AHEAD`` on, :func:`start_next` (called once the current study is on
disk) starts one background thread that picks the oldest run still ``queued`` for this
model version, downloads its objects and decodes its series (:func:`worker.imaging.dicom_load.load_study`);
when that run's task arrives here, :func:`take` hands over the folder and the decoded
series, and the study goes straight to inference. The model is never loaded twice:
the thread only does I/O and decoding.

It is a guess: the run a thread reads ahead may be delivered to another worker. Then
the work is thrown away, and nothing else changes: the run is neither claimed nor
touched in the database, and a task always falls back to the normal download. So it
pays off where one worker process serves a queue (a GPU node), and costs a wasted
download per study where many compete. Safety is the same as without it:

* the listing is checked against the run's registered fingerprint before the download,
  and again when the task takes it (a study that changed meanwhile is downloaded anew
  by the normal path, which then fails it with ``study_changed``);
* a read-ahead that fails in any way (an unusable study, S3 trouble) is dropped
  silently: the task's own path meets the same problem and records it properly;
* at most one study is held per process (its files under ``work_dir/read-ahead/<pid>``,
  its HU in memory, 64 MB for 64 slices of 512 x 512).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import or_, select

from worker.core.ct import CtSeries
from worker.infra.tables import Run, RunState, Study
from worker.overnight.deps import WorkerDeps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextRun:
    """The run a read-ahead prepares: ids, where its study lies, its registered fingerprint."""

    run_id: int
    prefix: str
    fingerprint: str


@dataclass(frozen=True)
class Prepared:
    """A study read ahead: its files moved to the task's folder and its decoded series."""

    study_dir: Path
    series: CtSeries


def next_queued_run(deps: WorkerDeps, *, exclude_run_id: int) -> NextRun | None:
    """The oldest run ``queued`` for this worker's model version and due now (not ``exclude_run_id``)."""
    now = datetime.now(UTC)
    with deps.sessions() as session:
        row = session.execute(
            select(Run.id, Study.prefix, Study.fingerprint)
            .join(Study, Study.id == Run.study_id)
            .where(
                Run.state == RunState.QUEUED,
                Run.id != exclude_run_id,
                Run.model_version == deps.model_info.version,
                or_(Run.enqueued_at.is_(None), Run.enqueued_at <= now),
            )
            .order_by(Run.enqueued_at, Run.id)
            .limit(1)
        ).first()
    if row is None:
        return None
    return NextRun(run_id=int(row.id), prefix=str(row.prefix), fingerprint=str(row.fingerprint))


def _listing_fingerprint(deps: WorkerDeps, prefix: str) -> tuple[str, list[str]]:
    from worker.infra.listing import fingerprint_of, study_objects

    objects = study_objects(deps.export_store.iter_objects(prefix), marker_name=deps.settings.marker_name)
    return fingerprint_of(objects), [o.key for o in objects]


class ReadAhead:
    """One process's read-ahead: at most one study in flight or ready."""

    def __init__(self, deps: WorkerDeps) -> None:
        self._deps = deps
        self._root = Path(deps.settings.work_dir) / "read-ahead" / str(os.getpid())
        self._lock = threading.Lock()
        self._target: NextRun | None = None
        self._thread: threading.Thread | None = None
        self._ready: Prepared | None = None
        self._abandoned = False
        _remove_stale(self._root.parent)

    @property
    def busy(self) -> bool:
        return self._target is not None

    def start(self, *, exclude_run_id: int) -> NextRun | None:
        """Start reading ahead the next queued run, unless one is already held; returns it."""
        with self._lock:
            if self._target is not None:
                return None
        try:
            target = next_queued_run(self._deps, exclude_run_id=exclude_run_id)
        except Exception as exc:  # the database is the task's business; a read-ahead just gives up
            log.debug("read-ahead: no next run (%s)", exc)
            return None
        if target is None:
            return None
        with self._lock:
            if self._target is not None:
                return None
            self._target, self._ready, self._abandoned = target, None, False
            folder = self._root / str(target.run_id)
            self._thread = threading.Thread(
                target=self._prepare, args=(target, folder), name=f"read-ahead-{target.run_id}", daemon=True
            )
            self._thread.start()
        log.info("read-ahead: preparing run %s", target.run_id)
        return target

    def _prepare(self, target: NextRun, folder: Path) -> None:
        from worker.imaging.dicom_load import load_study
        from worker.imaging.series_selection import SelectionRules

        prepared: Prepared | None = None
        try:
            shutil.rmtree(folder, ignore_errors=True)
            fingerprint, keys = _listing_fingerprint(self._deps, target.prefix)
            if fingerprint == target.fingerprint and len(keys) <= self._deps.settings.max_files:
                study_dir = folder / "study"
                self._deps.export_store.download_prefix(target.prefix, study_dir, keys=keys)
                series = load_study(study_dir, rules=SelectionRules.from_settings(self._deps.settings))
                prepared = Prepared(study_dir=study_dir, series=series)
        except Exception as exc:  # the task's own path meets it again and records it
            log.info("read-ahead of run %s dropped: %s", target.run_id, getattr(exc, "message", exc))
        with self._lock:
            if self._abandoned or prepared is None:
                shutil.rmtree(folder, ignore_errors=True)
                if self._target is target:
                    self._target, self._thread = None, None
                return
            self._ready = prepared

    def take(self, *, run_id: int, fingerprint: str, dest: Path) -> CtSeries | None:
        """The decoded series of ``run_id`` if it was read ahead, its files moved to ``dest``; else None.

        Waits for a read-ahead of this very run still in flight (cheaper than starting
        over). A read-ahead of another run is abandoned (its files removed when it ends).
        """
        with self._lock:
            target, thread = self._target, self._thread
        if target is None:
            return None
        if target.run_id != run_id or target.fingerprint != fingerprint:
            self._discard()
            return None
        if thread is not None:
            thread.join()
        with self._lock:
            prepared, self._ready = self._ready, None
            self._target, self._thread = None, None
        if prepared is None:
            return None
        try:
            unchanged = _listing_fingerprint(self._deps, target.prefix)[0] == fingerprint
        except Exception:
            unchanged = False
        if not unchanged:
            shutil.rmtree(prepared.study_dir.parent, ignore_errors=True)
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(prepared.study_dir), str(dest))
        shutil.rmtree(prepared.study_dir.parent, ignore_errors=True)
        log.info("read-ahead: run %s starts decoded", run_id)
        return _moved(prepared.series, source=prepared.study_dir, dest=dest)

    def _discard(self) -> None:
        with self._lock:
            target, ready = self._target, self._ready
            if target is None:
                return
            if self._thread is not None and self._thread.is_alive():
                self._abandoned = True  # the thread cleans up when it ends
            elif ready is not None:
                shutil.rmtree(ready.study_dir.parent, ignore_errors=True)
            self._target, self._thread, self._ready = None, None, None

    def close(self) -> None:
        self._discard()


def _moved(series: CtSeries, *, source: Path, dest: Path) -> CtSeries:
    """``series`` with its slice file paths moved from ``source`` to ``dest`` (SEG writing reads them)."""
    slices = tuple(replace(ref, path=dest / ref.path.relative_to(source)) for ref in series.slices)
    return replace(series, slices=slices)


def _remove_stale(parent: Path) -> None:
    """Folders of processes that are gone (a pool process killed at the hard time limit)."""
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        if not child.name.isdigit() or int(child.name) == os.getpid():
            continue
        try:
            os.kill(int(child.name), 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except PermissionError:
            continue


_per_process: dict[int, ReadAhead] = {}


def for_process(deps: WorkerDeps) -> ReadAhead | None:
    """This process's read-ahead when ``ICHVOL_READ_AHEAD`` is on (rebuilt after a fork), else None."""
    if not getattr(deps.settings, "read_ahead", False):
        return None
    pid = os.getpid()
    current = _per_process.get(pid)
    if current is None or current._deps is not deps:
        if current is not None:
            current.close()
        current = ReadAhead(deps)
        _per_process.clear()
        _per_process[pid] = current
    return current


def take(deps: WorkerDeps, *, run_id: int, fingerprint: str, dest: Path) -> CtSeries | None:
    """:meth:`ReadAhead.take` for this process; None when read-ahead is off or missed."""
    read_ahead = for_process(deps)
    if read_ahead is None:
        return None
    with contextlib.suppress(OSError):
        return read_ahead.take(run_id=run_id, fingerprint=fingerprint, dest=dest)
    return None


def start_next(deps: WorkerDeps, *, current_run_id: int) -> None:
    """Start reading ahead the run after ``current_run_id`` (no-op when off or already busy)."""
    read_ahead = for_process(deps)
    if read_ahead is not None:
        read_ahead.start(exclude_run_id=current_run_id)
