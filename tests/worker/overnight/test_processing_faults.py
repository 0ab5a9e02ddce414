"""Run processing under faults: take-overs, hard time limits, oversized studies (real PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.helpers.dicom_builders import write_ct_series
from tests.helpers.hostile import MemoryStore
from tests.helpers.segmenters import HuBandSegmenter
from worker.core.errors import SoftTimeLimitReached
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.tables import Result, Run, RunState, Study
from worker.overnight.deps import WorkerDeps
from worker.overnight.processing import (
    _process_claimed,
    artefact_prefix,
    claim_run,
    process_run,
    record_hard_time_limit,
)

pytestmark = pytest.mark.integration


def blood_study(folder: Path) -> dict[str, bytes]:
    hu = np.full((6, 32, 32), 30.0, np.float32)
    hu[2:4, 10:20, 10:20] = 70.0
    write_ct_series(folder, hu=hu, nested=False)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.downloads = 0

    def download(self, key: str, dest: Path) -> None:
        self.downloads += 1
        super().download(key, dest)


def make_deps(url: str, store: MemoryStore, tmp_path: Path, **overrides: object) -> WorkerDeps:
    settings = Settings(
        database_url=url,
        export_bucket="memory",
        results_bucket="memory",
        export_prefix="exports",
        results_prefix="results",
        work_dir=str(tmp_path / "work"),
        restrict_to_intracranial=False,
        min_component_ml=0.0,
        **overrides,  # type: ignore[arg-type]
    )
    segmenter = HuBandSegmenter(input_size=32)
    return WorkerDeps(
        settings=settings,
        sessions=db.session_factory(db.make_engine(url)),
        export_store=store,
        results_store=store,
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


def artefacts(store: MemoryStore) -> list[str]:
    return sorted(k for k in store.objects if k.startswith("results/"))


def test_a_taken_over_delivery_that_fails_keeps_the_winners_artefacts(pg_migrated_url: str, tmp_path: Path) -> None:
    store = MemoryStore()
    store.put_objects("exports/s/", blood_study(tmp_path / "s"))
    deps = make_deps(pg_migrated_url, store, tmp_path)
    (run_id,) = register(deps)
    first = claim_run(deps, run_id=run_id, task_id="t")
    second = claim_run(deps, run_id=run_id, task_id="t")  # a duplicate message takes the run over
    assert first is not None and second is not None
    assert _process_claimed(deps, second).state == "succeeded"
    kept = artefacts(store)
    assert len(kept) == 5
    # the first delivery now fails permanently (the export changed under it)
    store.objects["exports/s/extra.dcm"] = b"late"
    outcome = _process_claimed(deps, first)
    assert outcome.error_code == "study_changed"
    assert artefacts(store) == kept, "the losing delivery deleted the artefacts of the succeeded run"
    with deps.sessions() as s:
        run = s.get(Run, run_id)
        assert run is not None and run.state is RunState.SUCCEEDED
        assert s.scalar(select(Result.run_id)) == run_id


def test_a_failure_under_the_claim_deletes_its_artefacts(pg_migrated_url: str, tmp_path: Path) -> None:
    store = MemoryStore()
    store.put_objects("exports/s/", blood_study(tmp_path / "s"))
    deps = make_deps(pg_migrated_url, store, tmp_path)
    (run_id,) = register(deps)
    claim = claim_run(deps, run_id=run_id, task_id="t")
    assert claim is not None
    # a killed earlier delivery left artefacts at the run's keys
    prefix = "results/study-1/" + claim.fingerprint[:16] + "/hu-band-1/"
    store.objects[prefix + "mask.npz"] = b"partial"
    store.objects["exports/s/extra.dcm"] = b"late"
    assert _process_claimed(deps, claim).error_code == "study_changed"
    assert artefacts(store) == []


def test_too_many_files_are_refused_before_any_download(pg_migrated_url: str, tmp_path: Path) -> None:
    store = CountingStore()
    store.put_objects("exports/s/", {f"IM{i}.dcm": b"x" for i in range(12)})
    deps = make_deps(pg_migrated_url, store, tmp_path, max_files=10)
    (run_id,) = register(deps)
    outcome = process_run(run_id=run_id, deps=deps)
    assert outcome.error_code == "too_many_files" and "12 files, more than 10" in (outcome.error_message or "")
    assert store.downloads == 0


def test_the_hard_time_limit_is_recorded_once_for_the_killed_delivery(pg_migrated_url: str, tmp_path: Path) -> None:
    store = MemoryStore()
    store.put_objects("exports/a/", blood_study(tmp_path / "a"))
    store.put_objects("exports/b/", blood_study(tmp_path / "b"))
    deps = make_deps(pg_migrated_url, store, tmp_path)
    run_a, run_b = sorted(register(deps))
    claim = claim_run(deps, run_id=run_a, task_id="task-a")
    assert claim is not None
    prefix = "results/study-1/" + claim.fingerprint[:16] + "/hu-band-1/"
    store.objects[prefix + "overlay.png"] = b"uploaded before the kill"
    assert not record_hard_time_limit(deps, run_id=run_a, task_id="another-task", limit_s=720)
    assert record_hard_time_limit(deps, run_id=run_a, task_id="task-a", limit_s=720)
    assert not record_hard_time_limit(deps, run_id=run_a, task_id="task-a", limit_s=720)  # already failed
    assert artefacts(store) == []
    with deps.sessions() as s:
        run = s.get(Run, run_a)
        assert run is not None and run.state is RunState.FAILED and run.error_code == "time_limit"
        assert "hard time limit of 720 s" in (run.error_message or "")
    # a succeeded run is never touched
    assert process_run(run_id=run_b, deps=deps).state == "succeeded"
    with db.transaction(deps.sessions) as s:
        s.execute(update(Run).where(Run.id == run_b).values(celery_task_id="task-b"))
    assert not record_hard_time_limit(deps, run_id=run_b, task_id="task-b", limit_s=720)
    assert len(artefacts(store)) == 5


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    ("attempts", "claimer", "buried"),
    [
        (3, "dead-here", True),
        (2, "dead-here", False),  # deliveries left: take over
        (3, "alive-here", False),  # a live claimer may still be working: take over
        (3, "elsewhere", False),  # another host: cannot know
    ],
)
def test_a_run_whose_every_delivery_died_is_buried(
    pg_migrated_url: str, tmp_path: Path, attempts: int, claimer: str, buried: bool
) -> None:
    import os
    import socket

    store = MemoryStore()
    store.put_objects("exports/s/", blood_study(tmp_path / "s"))
    deps = make_deps(pg_migrated_url, store, tmp_path, max_attempts=3)
    (run_id,) = register(deps)
    worker = {
        "dead-here": f"{socket.gethostname()}:{_dead_pid()}",
        "alive-here": f"{socket.gethostname()}:{os.getpid()}",
        "elsewhere": "another-host:1",
    }[claimer]
    with db.transaction(deps.sessions) as s:
        s.execute(update(Run).values(state=RunState.RUNNING, attempts=attempts, worker=worker))
    with deps.sessions() as s:
        study = s.scalars(select(Study)).one()
    prefix = artefact_prefix(
        results_prefix="results", study_id=study.id, fingerprint=study.fingerprint, model_version="hu-band-1"
    )
    store.objects[prefix + "mask.npz"] = b"left by a crashed delivery"
    claim = claim_run(deps, run_id=run_id, task_id="t")
    with deps.sessions() as s:
        run = s.get(Run, run_id)
        assert run is not None
    if buried:
        assert claim is None and run.state is RunState.DEAD and run.error_code == "worker_lost"
        assert run.attempts == 3 and "died on each of 3 deliveries" in (run.error_message or "")
        assert artefacts(store) == []
    else:
        assert claim is not None and run.state is RunState.RUNNING and run.attempts == attempts + 1


class OutOfTimeSegmenter(HuBandSegmenter):
    """Runs out of time in the model call, as the task's soft time limit interrupts it there."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise SoftTimeLimitReached("the soft time limit was reached")


def test_the_soft_time_limit_fails_the_run_with_time_limit(pg_migrated_url: str, tmp_path: Path) -> None:
    store = MemoryStore()
    store.put_objects("exports/s/", blood_study(tmp_path / "s"))
    deps = make_deps(pg_migrated_url, store, tmp_path, soft_time_limit_s=30.0, hard_time_limit_s=60.0)
    slow = OutOfTimeSegmenter(input_size=32)
    deps.segmenter_factory = lambda: slow
    (run_id,) = register(deps)
    outcome = process_run(run_id=run_id, deps=deps, task_id="t")
    assert (outcome.state, outcome.error_code) == ("failed", "time_limit")
    assert "soft time limit of 30 s" in (outcome.error_message or "")
    assert artefacts(store) == []
    with deps.sessions() as s:
        run = s.get(Run, run_id)
        assert run is not None and run.state is RunState.FAILED and run.error_code == "time_limit"
