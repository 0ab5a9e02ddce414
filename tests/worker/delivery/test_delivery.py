"""Delivery to a PACS: STOW-RS and C-STORE against a real Orthanc, the state machine on real databases.

Orthanc comes from Debian's packages (tests/helpers/orthanc.py; skipped with the install
command where absent). Answers Orthanc never gives (bearer tokens, 503, "out of
resources") come from a small real HTTP server on loopback that records what it got.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic import command
from sqlalchemy import inspect, select

from tests.helpers.orthanc import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.helpers.pacs_results import (
    BLOOD_VOLUME_ML,
    MeasuredStudy,
    delivery_deps,
    local_deps,
    measured_study,
    orthanc_settings,
    processed_run,
)
from worker.core.errors import ConfigurationError, TransientError
from worker.core.settings import Settings
from worker.delivery.cstore import CStoreSender
from worker.delivery.deliveries import create_deliveries, deliver_run, requeue, senders_from_settings
from worker.delivery.objects import store_key
from worker.delivery.senders import DeliveryError, DicomObject
from worker.delivery.stow import StowSender
from worker.infra import db
from worker.infra.storage import LocalStore
from worker.infra.tables import Delivery, DeliveryState, Result
from worker.outputs.secondary_capture import build_overlay_sc, read_png_rgb
from worker.outputs.sr import build_volume_sr, read_volume_report
from worker.overnight.deps import WorkerDeps

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------------------------
# settings


def test_pacs_settings_parse_and_name_their_variables() -> None:
    s = Settings.from_env(
        {
            "ICHVOL_PACS_DELIVERY": "stow, CSTORE",
            "ICHVOL_PACS_STOW_URL": "https://pacs.example/dicom-web",
            "ICHVOL_PACS_CSTORE_HOST": "pacs",
            "ICHVOL_PACS_CSTORE_PORT": "11112",
            "ICHVOL_PACS_TOKEN": "t0ken",
            "ICHVOL_PACS_PASSWORD": "pw",
            "ICHVOL_PACS_SEND_OVERLAY": "false",
        }
    )
    assert s.pacs_targets == ("stow", "cstore")
    assert (s.pacs_cstore_port, s.pacs_send_overlay, s.pacs_send_sr) == (11112, False, True)
    redacted = s.redacted()
    assert redacted["pacs_token"] == "***" and redacted["pacs_password"] == "***"
    assert Settings.from_env({}).pacs_targets == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ICHVOL_PACS_DELIVERY": "ftp"}, "ICHVOL_PACS_DELIVERY"),
        ({"ICHVOL_PACS_DELIVERY": "stow"}, "ICHVOL_PACS_STOW_URL is required"),
        ({"ICHVOL_PACS_DELIVERY": "cstore"}, "ICHVOL_PACS_CSTORE_HOST is required"),
        ({"ICHVOL_PACS_STOW_URL": "pacs:8042"}, "ICHVOL_PACS_STOW_URL must be an http"),
        ({"ICHVOL_PACS_CSTORE_CALLED_AET": "A" * 17}, "ICHVOL_PACS_CSTORE_CALLED_AET"),
        ({"ICHVOL_PACS_CSTORE_PORT": "70000"}, "ICHVOL_PACS_CSTORE_PORT"),
        ({"ICHVOL_PACS_MAX_ATTEMPTS": "0"}, "ICHVOL_PACS_MAX_ATTEMPTS"),
    ],
)
def test_bad_pacs_settings_fail_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


def test_the_destination_never_shows_credentials() -> None:
    sender = StowSender(url="https://user:secret@pacs.example:8443/dicom-web/", username="u", password="p")
    assert sender.destination == "https://pacs.example:8443/dicom-web"
    settings = Settings(pacs_delivery="cstore", pacs_cstore_host="pacs", pacs_cstore_called_aet="PACS")
    (cstore,) = senders_from_settings(settings)
    assert cstore.destination == "PACS@pacs:104"


def test_store_keys_come_back_from_uris(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "results")
    uri = local.put_bytes("results/study-1/seg.dcm", b"x")
    assert store_key(local, uri) == "results/study-1/seg.dcm"

    class Bucket:
        bucket = "ichvol-results"

    assert store_key(Bucket(), "s3://ichvol-results/results/a b/seg.dcm") == "results/a b/seg.dcm"
    with pytest.raises(DeliveryError, match="not in the results store") as caught:
        store_key(Bucket(), "s3://other/results/seg.dcm")
    assert not caught.value.transient


# --------------------------------------------------------------------------------------------
# senders against a real Orthanc


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> MeasuredStudy:
    return measured_study(tmp_path_factory.mktemp("measured"))


def objects_of(measured: MeasuredStudy) -> list[DicomObject]:
    from worker.outputs.sr import VolumeReport

    seg = pydicom.dcmread(measured.seg_path)
    report = VolumeReport(
        volume_ml=BLOOD_VOLUME_ML,
        abc2_ml=0.3,
        n_slices=6,
        pixel_spacing_mm=(0.5, 0.5),
        slab_thickness_mean_mm=5.0,
        series_instance_uid=measured.written.series_instance_uid,
        model_name="DR-UNet",
        model_version="1",
    )
    return [
        DicomObject("seg", seg),
        DicomObject("sr", build_volume_sr(seg=seg, report=report)),
        DicomObject("overlay", build_overlay_sc(seg=seg, rgb=read_png_rgb(measured.overlay_path))),
    ]


def test_stow_rs_stores_seg_sr_and_overlay(orthanc: OrthancServer, measured: MeasuredStudy) -> None:  # noqa: F811
    objects = objects_of(measured)
    sender = StowSender(url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    report = sender.send(objects)
    assert set(report.stored) == {o.sop_instance_uid for o in objects} and report.warnings == ()
    assert orthanc.sop_instance_uids() == {o.sop_instance_uid for o in objects}
    # sending again is harmless: the PACS keeps one copy per SOP Instance UID
    sender.send(objects)
    assert orthanc.instance_count() == 3


def test_stow_rs_errors_are_classified(orthanc: OrthancServer, measured: MeasuredStudy) -> None:  # noqa: F811
    objects = objects_of(measured)[:1]
    wrong_password = StowSender(url=orthanc.dicomweb_url, username=orthanc.username, password="wrong")
    with pytest.raises(DeliveryError, match="HTTP 401, the PACS refused the credentials") as caught:
        wrong_password.send(objects)
    assert not caught.value.transient
    no_service = StowSender(
        url=orthanc.base_url + "/no-such-root", username=orthanc.username, password=orthanc.password
    )
    with pytest.raises(DeliveryError, match="HTTP 404") as caught:
        no_service.send(objects)
    assert not caught.value.transient
    orthanc.stop(kill=True)
    down = StowSender(url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password, timeout_s=2)
    with pytest.raises(DeliveryError, match="PACS unreachable") as caught:
        down.send(objects)
    assert caught.value.transient


def test_c_store_stores_seg_sr_and_overlay(orthanc: OrthancServer, measured: MeasuredStudy) -> None:  # noqa: F811
    objects = objects_of(measured)
    sender = CStoreSender(host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet, timeout_s=10)
    report = sender.send(objects)
    assert report.stored == tuple(o.sop_instance_uid for o in objects)
    assert orthanc.sop_instance_uids() == set(report.stored)


def test_c_store_errors_are_classified(orthanc: OrthancServer, measured: MeasuredStudy) -> None:  # noqa: F811
    objects = objects_of(measured)[:1]
    wrong_aet = CStoreSender(host="127.0.0.1", port=orthanc.dicom_port, called_aet="NOT-ORTHANC", timeout_s=10)
    with pytest.raises(DeliveryError, match="association rejected permanently") as caught:
        wrong_aet.send(objects)
    assert not caught.value.transient
    orthanc.stop(kill=True)
    down = CStoreSender(host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet, timeout_s=2)
    with pytest.raises(DeliveryError, match="PACS unreachable") as caught:
        down.send(objects)
    assert caught.value.transient


# --------------------------------------------------------------------------------------------
# answers Orthanc does not give: a recording STOW-RS server on loopback


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server: Any = self.server
        length = int(self.headers.get("Content-Length", "0"))
        server.requests.append({"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)})
        status, body = server.answer
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def stub() -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.requests = []
    server.answer = (200, {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _failed(reason: int) -> dict[str, Any]:
    return {
        "00081198": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [reason]}}],
        }
    }


def test_stow_rs_sends_a_bearer_token_and_a_multipart_body(stub: Any, measured: MeasuredStudy) -> None:
    objects = objects_of(measured)
    url = f"http://127.0.0.1:{stub.server_address[1]}/dicom-web"
    StowSender(url=url, token="tok-123", username="ignored", password="ignored").send(objects)
    (request,) = stub.requests
    assert request["path"] == "/dicom-web/studies"
    assert request["headers"]["Authorization"] == "Bearer tok-123"
    content_type = request["headers"]["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    from worker.delivery.dicomweb import split_multipart

    parts = split_multipart(request["body"], content_type)
    assert len(parts) == 3
    uids = [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p in parts]
    assert uids == [o.sop_instance_uid for o in objects]


@pytest.mark.parametrize(
    ("answer", "transient", "message"),
    [
        ((503, {}), True, "HTTP 503, retry later"),
        ((429, {}), True, "HTTP 429"),
        ((409, _failed(0xA700)), True, r"refused 1\.2\.3 \(0xA700\)"),
        ((409, _failed(0xC000)), False, r"refused 1\.2\.3 \(0xC000\)"),
        ((202, _failed(0x0110)), False, r"HTTP 202, the PACS refused 1\.2\.3 \(0x0110\)"),
        ((413, {}), False, "too large"),
        ((403, {}), False, "does not allow"),
    ],
)
def test_stow_rs_answers_map_to_transient_or_permanent(
    stub: Any, measured: MeasuredStudy, answer: tuple[int, dict[str, Any]], transient: bool, message: str
) -> None:
    stub.answer = answer
    sender = StowSender(url=f"http://127.0.0.1:{stub.server_address[1]}", timeout_s=5)
    with pytest.raises(DeliveryError, match=message) as caught:
        sender.send(objects_of(measured)[:1])
    assert caught.value.transient is transient


# --------------------------------------------------------------------------------------------
# the state machine, on PostgreSQL and SQLite


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    name = "pg_migrated_url" if request.param == "postgresql" else "sqlite_migrated_url"
    return str(request.getfixturevalue(name))


def delivery_rows(deps: WorkerDeps) -> list[Delivery]:
    with deps.sessions() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.target)))


def test_a_result_is_delivered_to_both_targets_once(
    orthanc: OrthancServer,  # noqa: F811
    database_url: str,
    tmp_path: Path,
) -> None:
    deps = local_deps(tmp_path, database_url, **orthanc_settings(orthanc, targets="stow,cstore"))
    run_id = processed_run(deps, tmp_path / "studies")
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))
    assert sorted((o.target, o.state, o.attempts) for o in outcomes) == [("cstore", "sent", 1), ("stow", "sent", 1)]
    rows = delivery_rows(deps)
    with deps.sessions() as s:
        result = s.scalars(select(Result)).one()
    for row in rows:
        assert row.result_id == result.id and row.sent_at is not None and row.last_error is None
        assert [i["kind"] for i in row.instances or []] == ["seg", "sr", "overlay"]
    stored = orthanc.sop_instance_uids()
    assert stored == {i["sop_instance_uid"] for i in rows[0].instances or []}
    assert rows[1].destination == orthanc.dicomweb_url and rows[0].destination.startswith("ORTHANC@127.0.0.1:")
    # a second call (a redelivered task message) sends nothing again
    again = deliver_run(run_id=run_id, deps=delivery_deps(deps))
    assert [o.attempts for o in again] == [1, 1]


def test_the_sr_in_the_pacs_holds_the_database_numbers(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    from worker.delivery.dicomweb import DicomwebClient

    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc, pacs_send_overlay=False))
    run_id = processed_run(deps, tmp_path / "studies")
    deliver_run(run_id=run_id, deps=delivery_deps(deps))
    with deps.sessions() as s:
        result = s.scalars(select(Result)).one()
    (row,) = delivery_rows(deps)
    sr_record = next(i for i in row.instances or [] if i["kind"] == "sr")
    client = DicomwebClient(url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
    (study,) = client.search_studies({})
    files = [pydicom.dcmread(io.BytesIO(b)) for b in client.retrieve_study(study.study_instance_uid)]
    by_modality = {ds.Modality: ds for ds in files}
    assert set(by_modality) == {"SEG", "SR"}  # the overlay was switched off
    sr = by_modality["SR"]
    assert sr.SOPInstanceUID == sr_record["sop_instance_uid"]
    numbers = read_volume_report(sr)
    assert numbers["volume_ml"] == result.volume_ml == pytest.approx(BLOOD_VOLUME_ML)
    assert numbers["abc2_ml"] == result.abc2_ml
    assert numbers["n_slices"] == result.n_slices
    assert numbers["pixel_spacing_row_mm"] == result.pixel_spacing_row_mm
    assert numbers["pixel_spacing_col_mm"] == result.pixel_spacing_col_mm
    assert numbers["slab_thickness_mean_mm"] == result.slab_thickness_mean_mm
    assert numbers["segmentation_sop_instance_uid"] == by_modality["SEG"].SOPInstanceUID


def test_an_outage_is_retried_then_failed_then_redelivered(
    orthanc: OrthancServer,  # noqa: F811
    pg_migrated_url: str,
    tmp_path: Path,
) -> None:
    deps = local_deps(tmp_path, pg_migrated_url, **orthanc_settings(orthanc, pacs_max_attempts=2, pacs_timeout_s=2))
    run_id = processed_run(deps, tmp_path / "studies")
    orthanc.stop(kill=True)
    with pytest.raises(TransientError, match="PACS unreachable"):
        deliver_run(run_id=run_id, deps=delivery_deps(deps))
    (row,) = delivery_rows(deps)
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 1) and "unreachable" in (row.last_error or "")
    # the result itself is untouched by the outage
    with deps.sessions() as s:
        assert s.scalars(select(Result)).one().volume_ml == pytest.approx(BLOOD_VOLUME_ML)
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))  # attempt 2 of 2: given up, no raise
    assert [(o.state, o.attempts) for o in outcomes] == [("failed", 2)]
    assert outcomes[0].error is not None and outcomes[0].error.startswith("gave up after 2 attempts")
    assert deliver_run(run_id=run_id, deps=delivery_deps(deps))[0].attempts == 2  # failed rows are left alone
    assert requeue(deps.sessions, states=["failed"]) == [run_id]
    orthanc.start()
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))
    assert [(o.state, o.attempts) for o in outcomes] == [("sent", 1)]
    assert len(orthanc.sop_instance_uids()) == 3


def test_a_permanent_error_fails_at_once_without_retry(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc, pacs_password="wrong"))
    run_id = processed_run(deps, tmp_path / "studies")
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))  # no TransientError: nothing to retry
    assert [(o.state, o.attempts) for o in outcomes] == [("failed", 1)]
    assert "credentials" in (outcomes[0].error or "")
    assert orthanc.instance_count() == 0


def test_a_missing_artefact_fails_every_delivery_of_the_run(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc, targets="stow,cstore"))
    run_id = processed_run(deps, tmp_path / "studies")
    with deps.sessions() as s:
        seg_uri = s.scalars(select(Result.seg_uri)).one()
    assert seg_uri is not None
    deps.results_store.delete(store_key(deps.results_store, seg_uri))
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))
    assert [o.state for o in outcomes] == ["failed", "failed"]
    assert all("cannot read the DICOM SEG" in (o.error or "") for o in outcomes)


def test_a_results_store_outage_is_a_retried_attempt(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc, pacs_max_attempts=2))
    run_id = processed_run(deps, tmp_path / "studies")

    def unavailable(key: str, dest: Path) -> None:
        raise TransientError("S3 answered 503 SlowDown")

    monkeypatch.setattr(deps.results_store, "download", unavailable)
    with pytest.raises(TransientError, match="results store unavailable: S3 answered 503"):
        deliver_run(run_id=run_id, deps=delivery_deps(deps))
    assert [(r.state, r.attempts) for r in delivery_rows(deps)] == [(DeliveryState.PENDING, 1)]
    outcomes = deliver_run(run_id=run_id, deps=delivery_deps(deps))  # the last attempt: given up, no raise
    assert [(o.state, o.attempts) for o in outcomes] == [("failed", 2)]
    assert orthanc.instance_count() == 0


def test_a_run_without_a_result_has_nothing_to_deliver(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc))
    assert deliver_run(run_id=12345, deps=delivery_deps(deps)) == []
    assert create_deliveries(deps.sessions, run_id=12345, senders=senders_from_settings(deps.settings)) == 0
    assert delivery_rows(deps) == []


# --------------------------------------------------------------------------------------------
# the Celery hook: ichvol.process_run sends ichvol.deliver after the commit


def test_the_processing_task_hands_a_succeeded_run_to_delivery(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    from worker.celery import app
    from worker.overnight import runtime
    from worker.tasks.process import process_run_task

    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc))
    run_id = _registered_run(deps, tmp_path)
    saved = (app.conf.task_always_eager, app.conf.task_eager_propagates)
    app.conf.task_always_eager = app.conf.task_eager_propagates = True  # ichvol.deliver runs in this process
    runtime.set_deps(deps)
    try:
        reply = process_run_task.apply(args=[run_id]).get()
    finally:
        runtime.set_deps(None)
        app.conf.task_always_eager, app.conf.task_eager_propagates = saved
    assert reply["state"] == "succeeded"
    (row,) = delivery_rows(deps)
    assert (row.state, row.attempts) == (DeliveryState.SENT, 1)
    assert len(orthanc.sop_instance_uids()) == 3


def test_without_pacs_settings_the_processing_task_delivers_nothing(
    sqlite_migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.overnight import runtime
    from worker.tasks import deliver as delivery_tasks
    from worker.tasks.process import process_run_task

    deps = local_deps(tmp_path, sqlite_migrated_url)
    run_id = _registered_run(deps, tmp_path)
    sent: list[int] = []
    monkeypatch.setattr(delivery_tasks, "enqueue_delivery", lambda **kw: sent.append(kw["run_id"]))
    runtime.set_deps(deps)
    try:
        assert process_run_task.apply(args=[run_id]).get()["state"] == "succeeded"
    finally:
        runtime.set_deps(None)
    assert sent == [] and delivery_rows(deps) == []


def test_a_broker_outage_leaves_a_pending_delivery_not_an_exception(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kombu.exceptions import OperationalError

    from worker.tasks.deliver import deliver_task, enqueue_delivery

    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc))
    run_id = processed_run(deps, tmp_path / "studies")

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(deliver_task, "apply_async", broker_down)
    assert enqueue_delivery(run_id=run_id, deps=deps) is False
    (row,) = delivery_rows(deps)
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)  # `ichvol redeliver --state pending` finds it


def _registered_run(deps: WorkerDeps, tmp_path: Path) -> int:
    from tests.helpers.dicom_builders import write_ct_series
    from tests.helpers.pacs_results import blood_hu
    from worker.infra.intake import poll_once

    write_ct_series(Path(deps.export_store.root) / "exports" / "blood", hu=blood_hu())
    sent: list[int] = []
    poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=deps.settings,
        model=deps.model_info,
        enqueue=lambda run_id, _t: sent.append(run_id),
    )
    assert len(sent) == 1
    return sent[0]


# --------------------------------------------------------------------------------------------
# ichvol redeliver


def _cli_env(monkeypatch: pytest.MonkeyPatch, deps: WorkerDeps) -> None:
    from tests.helpers.worker_process import settings_env

    for name, value in settings_env(deps.settings).items():
        if name.startswith("ICHVOL_"):
            monkeypatch.setenv(name, value)


def test_redeliver_resends_failed_deliveries(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli import main

    deps = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc, pacs_max_attempts=1))
    run_id = processed_run(deps, tmp_path / "studies")
    orthanc.stop(kill=True)
    assert deliver_run(run_id=run_id, deps=delivery_deps(deps))[0].state == "failed"  # 1 attempt allowed
    _cli_env(monkeypatch, deps)
    assert main(["redeliver"]) == 1  # still down: reported, not lost
    out = capsys.readouterr().out
    assert f"run {run_id}: stow -> {orthanc.dicomweb_url}: failed" in out
    orthanc.start()
    assert main(["redeliver", "--state", "failed", "--run", str(run_id)]) == 0
    assert f"run {run_id}: stow -> {orthanc.dicomweb_url}: sent" in capsys.readouterr().out
    (row,) = delivery_rows(deps)
    assert (row.state, row.attempts) == (DeliveryState.SENT, 1)
    assert len(orthanc.sop_instance_uids()) == 3
    assert main(["redeliver"]) == 0
    assert "no failed deliveries" in capsys.readouterr().out


def test_redeliver_missing_backfills_results_without_deliveries(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli import main

    deps = local_deps(tmp_path, sqlite_migrated_url)  # processed before PACS delivery was configured
    run_id = processed_run(deps, tmp_path / "studies")
    assert delivery_rows(deps) == []
    configured = local_deps(tmp_path, sqlite_migrated_url, **orthanc_settings(orthanc))
    _cli_env(monkeypatch, configured)
    assert main(["redeliver", "--missing"]) == 0
    assert f"run {run_id}: stow -> {orthanc.dicomweb_url}: sent" in capsys.readouterr().out
    assert [r.state for r in delivery_rows(configured)] == [DeliveryState.SENT]
    assert main(["redeliver", "--missing"]) == 0
    assert "no failed deliveries and none missing" in capsys.readouterr().out


def test_redeliver_without_a_pacs_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    monkeypatch.delenv("ICHVOL_PACS_DELIVERY", raising=False)
    assert main(["redeliver"]) == 2
    assert capsys.readouterr().err.strip() == "ichvol: ICHVOL_PACS_DELIVERY is empty: there is no PACS to deliver to"


# --------------------------------------------------------------------------------------------
# the migration


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_deliveries_migration_round_trips(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = str(request.getfixturevalue("pg_url")) if backend == "postgresql" else f"sqlite:///{tmp_path / 'd.db'}"
    db.upgrade_to_head(url)
    engine = db.make_engine(url)
    try:
        insp = inspect(engine)
        assert "deliveries" in insp.get_table_names()
        uniques = {(u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints("deliveries")}
        assert uniques == {("uq_deliveries_run_id_target", ("run_id", "target"))}
        checks = {c["name"] for c in insp.get_check_constraints("deliveries")}
        assert checks == {"ck_deliveries_delivery_state", "ck_deliveries_attempts_nonnegative"}
        fks = {(f["referred_table"], f["options"].get("ondelete")) for f in insp.get_foreign_keys("deliveries")}
        assert fks == {("runs", "CASCADE"), ("results", "CASCADE"), ("deliveries", "SET NULL")}
    finally:
        engine.dispose()
    command.downgrade(db.alembic_config(url), "bdd4386a76ba")
    engine = db.make_engine(url)
    try:
        assert "deliveries" not in inspect(engine).get_table_names()
        assert "results" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    db.upgrade_to_head(url)


# --------------------------------------------------------------------------------------------
# the embedded default (ichvol run / demo)


def test_the_embedded_runner_delivers_in_process(
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.helpers.dicom_builders import write_ct_series
    from tests.helpers.pacs_results import blood_hu
    from tests.helpers.segmenters import HuBandSegmenter
    from worker.overnight import runtime
    from worker.overnight.local import local_settings, run_local

    write_ct_series(tmp_path / "bucket" / "blood", hu=blood_hu())
    base = Settings(restrict_to_intracranial=False, min_component_ml=0.0, **orthanc_settings(orthanc))
    local = local_settings(base, bucket_dir=tmp_path / "bucket", state_dir=tmp_path / "state", quiet_period_s=0.0)
    try:
        _, rows = run_local(local, segmenter=HuBandSegmenter(input_size=32))
    finally:
        runtime.set_deps(None)
    assert [(r.state, r.volume_ml) for r in rows] == [("succeeded", pytest.approx(BLOOD_VOLUME_ML))]
    assert len(orthanc.sop_instance_uids()) == 3
    engine = db.make_engine(local.database_url)
    try:
        with db.session_factory(engine)() as s:
            assert [(d.state, d.attempts) for d in s.scalars(select(Delivery))] == [(DeliveryState.SENT, 1)]
    finally:
        engine.dispose()
