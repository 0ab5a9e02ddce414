"""A study measured again: the new SR names the one it replaces, and the deliveries table links them.

The first model's result is delivered (its SR sent), then the same study is measured by a
second model version and delivered: its SR carries a Predecessor Documents Sequence naming
the first SR, its delivery rows record that SR's UID and the delivery that sent it, and
both SRs pass ``dciodvfy`` without an error. Real databases (PostgreSQL and SQLite at the
newest migration), the production processing and delivery code, a recording sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.helpers.dciodvfy import dciodvfy
from tests.helpers.pacs_results import delivery_deps, local_deps, processed_run
from tests.helpers.segmenters import HuBandSegmenter
from worker.delivery.deliveries import deliver_run, requeue
from worker.delivery.senders import TARGET_CSTORE, TARGET_STOW, DicomObject, SendReport
from worker.infra import db
from worker.infra.tables import Delivery, Result, Run, RunState
from worker.outputs.sr import read_volume_report
from worker.overnight.deps import WorkerDeps
from worker.overnight.processing import process_run

pytestmark = pytest.mark.integration


@dataclass
class RecordingSender:
    """A PACS that stores whatever it is sent."""

    target: str
    destination: str
    sent: list[list[DicomObject]] = field(default_factory=list)

    def send(self, objects: Sequence[DicomObject]) -> SendReport:
        self.sent.append(list(objects))
        return SendReport(stored=tuple(o.sop_instance_uid for o in objects))

    def last_sr(self) -> pydicom.Dataset:
        return next(o.dataset for o in self.sent[-1] if o.kind == "sr")


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    name = "pg_migrated_url" if request.param == "postgresql" else "sqlite_migrated_url"
    return str(request.getfixturevalue(name))


def _measure_again(deps: WorkerDeps, first_run_id: int, *, version: str) -> int:
    """The first run's study measured by another model version (as a new model's run would be)."""
    model = HuBandSegmenter(input_size=32, version=version)
    with db.transaction(deps.sessions) as session:
        first = session.get(Run, first_run_id)
        assert first is not None
        run = Run(
            study_id=first.study_id,
            model_name=model.info.name,
            model_version=model.info.version,
            model_sha256=model.info.sha256,
            state=RunState.QUEUED,
            attempts=0,
            celery_task_id=f"again-{version}",
            enqueued_at=datetime.now(UTC),
        )
        session.add(run)
        session.flush()
        run_id = int(run.id)
    deps.model_info = model.info
    deps.segmenter_factory = lambda: model
    deps._segmenter = None
    outcome = process_run(run_id=run_id, deps=deps)
    assert outcome.state == "succeeded", outcome
    return run_id


def _rows(deps: WorkerDeps, run_id: int) -> dict[str, Delivery]:
    with deps.sessions() as session:
        return {d.target: d for d in session.scalars(select(Delivery).where(Delivery.run_id == run_id))}


def test_a_remeasured_study_gets_an_sr_that_replaces_the_first(database_url: str, tmp_path: Path) -> None:
    deps = local_deps(tmp_path, database_url)
    pacs = [RecordingSender(TARGET_STOW, "https://pacs.invalid/dicom-web"), RecordingSender(TARGET_CSTORE, "PACS@h")]
    first_run = processed_run(deps, tmp_path / "studies")
    deliver_run(run_id=first_run, deps=delivery_deps(deps), senders=pacs)
    first_sr = pacs[0].last_sr()
    assert "PredecessorDocumentsSequence" not in first_sr
    assert all(d.predecessor_sr_uid is None and d.replaces_delivery_id is None for d in _rows(deps, first_run).values())

    second_run = _measure_again(deps, first_run, version="hu-band-2")
    deliver_run(run_id=second_run, deps=delivery_deps(deps), senders=pacs)
    second_sr = pacs[0].last_sr()
    assert second_sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert pacs[1].last_sr().SOPInstanceUID == second_sr.SOPInstanceUID  # one SR for every target
    numbers = read_volume_report(second_sr)
    assert numbers["replaces_sop_instance_uid"] == first_sr.SOPInstanceUID
    (study,) = second_sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first_sr.StudyInstanceUID
    assert study.ReferencedSeriesSequence[0].SeriesInstanceUID == first_sr.SeriesInstanceUID

    before, after = _rows(deps, first_run), _rows(deps, second_run)
    for target in (TARGET_STOW, TARGET_CSTORE):
        assert after[target].predecessor_sr_uid == first_sr.SOPInstanceUID
        assert after[target].replaces_delivery_id == before[target].id  # the same target's delivery

    # the lengths ABC/2 is made of, from the results row, in the SR
    with deps.sessions() as session:
        result = session.scalars(select(Result).where(Result.run_id == second_run)).one()
    assert result.abc2_a_mm is not None and result.abc2_b_mm is not None and result.abc2_c_mm is not None
    assert (numbers["abc2_a_mm"], numbers["abc2_b_mm"], numbers["abc2_c_mm"]) == (
        result.abc2_a_mm,
        result.abc2_b_mm,
        result.abc2_c_mm,
    )
    abc = result.abc2_a_mm * result.abc2_b_mm * result.abc2_c_mm / 2000  # mm^3 / 2 -> mL
    assert numbers["abc2_ml"] == pytest.approx(abc, abs=1e-3)  # result.json keeps 0.01 mm and 0.001 mL

    for name, sr in (("first", first_sr), ("second", second_sr)):
        sr.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        verdict = dciodvfy(tmp_path / f"{name}.dcm")
        assert verdict.errors == (), f"{name} SR:\n{verdict.text}"

    # resending the first result later does not make it claim to replace the newer one
    requeue(deps.sessions, states=("sent",), run_id=first_run)
    deliver_run(run_id=first_run, deps=delivery_deps(deps), senders=pacs)
    assert pacs[0].last_sr().SOPInstanceUID == first_sr.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in pacs[0].last_sr()
    assert all(d.predecessor_sr_uid is None for d in _rows(deps, first_run).values())


def test_without_a_sent_sr_nothing_is_replaced(database_url: str, tmp_path: Path) -> None:
    """The first result was never sent (no PACS then): the second SR replaces nothing."""
    deps = local_deps(tmp_path, database_url)
    first_run = processed_run(deps, tmp_path / "studies")
    second_run = _measure_again(deps, first_run, version="hu-band-2")
    pacs = [RecordingSender(TARGET_STOW, "https://pacs.invalid/dicom-web")]
    deliver_run(run_id=second_run, deps=delivery_deps(deps), senders=pacs)
    assert "PredecessorDocumentsSequence" not in pacs[0].last_sr()
    assert _rows(deps, second_run)[TARGET_STOW].replaces_delivery_id is None
