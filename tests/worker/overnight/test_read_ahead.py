"""Read-ahead: the next queued study downloads and decodes while the current one is measured.

Against the embedded services (a folder as the bucket, SQLite), with a segmenter that
needs no TensorFlow: what matters here is the hand-over, not the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from tests.helpers.dicom_builders import write_ct_series
from tests.helpers.segmenters import HuBandSegmenter
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.tables import Result
from worker.overnight import processing, read_ahead
from worker.overnight.deps import WorkerDeps, build_deps
from worker.overnight.local import local_settings
from worker.overnight.processing import process_run


def _blood_hu() -> np.ndarray:
    hu = np.full((6, 32, 32), 30.0, np.float32)
    hu[2:4, 10:20, 10:20] = 70.0
    return hu


def _setup(tmp_path: Path, *, studies: int, read_ahead_on: bool = True) -> tuple[WorkerDeps, list[int]]:
    bucket = tmp_path / "bucket"
    for index in range(studies):
        write_ct_series(bucket / f"study{index}", hu=_blood_hu())
    settings = local_settings(
        Settings.from_env({}), bucket_dir=bucket, state_dir=tmp_path / "state", quiet_period_s=0.0
    )
    settings = settings.replace(read_ahead=read_ahead_on, restrict_to_intracranial=False, min_component_ml=0.0)
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    db.upgrade_to_head(settings.database_url)
    segmenter = HuBandSegmenter(input_size=32)
    deps = build_deps(settings, segmenter_factory=lambda: segmenter, model_info=segmenter.info)
    queued: list[int] = []
    poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=settings,
        model=deps.model_info,
        enqueue=lambda run_id, _task: queued.append(run_id),
    )
    return deps, sorted(queued)


def _wait(deps: WorkerDeps) -> read_ahead.ReadAhead:
    current = read_ahead.for_process(deps)
    assert current is not None
    thread = current._thread
    if thread is not None:
        thread.join(timeout=60)
    return current


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = processing._download_study

    def counting(deps: Any, claim: Any, dest: Path) -> None:
        calls.append(claim.run_id)
        original(deps, claim, dest)

    monkeypatch.setattr(processing, "_download_study", counting)
    return calls


def _volumes(deps: WorkerDeps) -> dict[int, float]:
    with deps.sessions() as session:
        return {r.run_id: r.volume_ml for r in session.scalars(select(Result))}


def test_the_next_study_starts_decoded_and_measures_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deps, (first, second, third) = _setup(tmp_path, studies=3)
    downloads = _count_downloads(monkeypatch)
    assert process_run(run_id=first, deps=deps).state == "succeeded"
    current = _wait(deps)
    assert current._target is not None and current._target.run_id == second and current._ready is not None
    outcome = process_run(run_id=second, deps=deps)  # its task arrives: no download, decoded already
    assert outcome.state == "succeeded"
    assert downloads == [first]
    _wait(deps)
    assert process_run(run_id=third, deps=deps).state == "succeeded"
    assert downloads == [first]
    volumes = _volumes(deps)
    assert volumes[first] > 0 and volumes[first] == volumes[second] == volumes[third]
    with deps.sessions() as session:  # the SEG of a read-ahead study (it reads the moved source files)
        seg = session.scalars(select(Result.seg_uri).where(Result.run_id == second)).one()
    assert seg is not None and Path(seg.removeprefix("file://")).stat().st_size > 0
    leftovers = [p for p in (Path(deps.settings.work_dir) / "read-ahead").rglob("*") if p.is_file()]
    assert leftovers == []


def test_a_study_changed_after_its_read_ahead_fails_as_changed(tmp_path: Path) -> None:
    deps, (first, second) = _setup(tmp_path, studies=2)
    assert process_run(run_id=first, deps=deps).state == "succeeded"
    _wait(deps)
    study = tmp_path / "bucket" / "study1"
    shutil.copy(next(p for p in study.rglob("*") if p.is_file()), study / "late.dcm")
    outcome = process_run(run_id=second, deps=deps)
    assert outcome.state == "failed" and outcome.error_code == "study_changed"
    assert not any(p.is_file() for p in (Path(deps.settings.work_dir) / "read-ahead").rglob("*"))


def test_a_read_ahead_of_another_run_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deps, (first, second, third) = _setup(tmp_path, studies=3)
    assert process_run(run_id=first, deps=deps).state == "succeeded"
    current = _wait(deps)
    assert current._target is not None and current._target.run_id == second
    downloads = _count_downloads(monkeypatch)
    assert process_run(run_id=third, deps=deps).state == "succeeded"  # another worker took `second`
    assert downloads == [third]
    reader = _wait(deps)
    # the read-ahead of `second` was dropped; the next guess is `second` again (still queued)
    assert reader._target is not None and reader._target.run_id == second
    held = [p for p in (Path(deps.settings.work_dir) / "read-ahead").rglob("*") if p.is_file()]
    assert len(held) == 6 and all(f"/{second}/" in p.as_posix() for p in held)


def test_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env({}).read_ahead is False
    deps, (first, second) = _setup(tmp_path, studies=2, read_ahead_on=False)
    downloads = _count_downloads(monkeypatch)
    assert read_ahead.for_process(deps) is None
    assert process_run(run_id=first, deps=deps).state == "succeeded"
    assert process_run(run_id=second, deps=deps).state == "succeeded"
    assert downloads == [first, second]
    assert not (Path(deps.settings.work_dir) / "read-ahead").exists()
