"""A PACS as the study source: QIDO-RS/WADO-RS from a real Orthanc into the export bucket, then the scheduler."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.helpers.dicom_builders import WrittenSeries, write_ct_series
from tests.helpers.orthanc import OrthancServer, orthanc  # noqa: F401 - the fixture
from tests.helpers.pacs_results import blood_hu, local_deps, measured_study
from worker.core.errors import TransientError
from worker.core.settings import Settings
from worker.delivery.dicomweb import DicomwebClient, DicomwebError, split_multipart
from worker.delivery.pacs_source import pacs_poll_once, study_folder, study_query
from worker.infra.intake import poll_once
from worker.infra.storage import LocalStore
from worker.overnight.processing import process_run

pytestmark = pytest.mark.integration

#: write_ct_series dates every study 2024-01-02.
STUDY_DAY = datetime(2024, 1, 2, 18, 0, tzinfo=UTC)


def test_split_multipart_returns_the_part_bodies() -> None:
    body = (
        b"preamble\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n\x00\x01--b0und\r\n\r\n"
        b"\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\nsecond\r\n--b0undary--\r\nepilogue"
    )
    parts = split_multipart(body, 'multipart/related; type="application/dicom"; boundary="b0undary"')
    assert parts == [b"\x00\x01--b0und\r\n\r\n", b"second"]
    with pytest.raises(DicomwebError, match="expected a multipart response"):
        split_multipart(b"{}", "application/json")


def test_the_query_covers_the_lookback_in_whole_days() -> None:
    settings = Settings(pacs_source_lookback_h=30.0)
    assert study_query(settings, now=STUDY_DAY) == {"ModalitiesInStudy": "CT", "StudyDate": "20240101-"}
    assert study_folder(export_prefix="/exports/", study_instance_uid="1.2.3") == "exports/pacs-1.2.3/"
    assert study_folder(export_prefix="", study_instance_uid="1.2.3") == "pacs-1.2.3/"


def _described(description: str) -> Any:
    def edit(ds: pydicom.Dataset, _index: int) -> None:
        ds.StudyDescription = description

    return edit


def _head_ct(folder: Path, *, study_uid: str | None = None, description: str = "CT HEAD WO CONTRAST") -> WrittenSeries:
    return write_ct_series(folder, hu=blood_hu(), study_instance_uid=study_uid, edit=_described(description))


def _client(orthanc: OrthancServer, **kwargs: Any) -> DicomwebClient:  # noqa: F811
    values = {"username": orthanc.username, "password": orthanc.password, "timeout_s": 5.0, **kwargs}
    return DicomwebClient(url=orthanc.dicomweb_url, **values)


def _keys(store: LocalStore) -> set[str]:
    return {o.key for o in store.iter_objects("")}


def test_new_ct_instances_are_copied_once_and_results_are_not(
    orthanc: OrthancServer,  # noqa: F811
    sqlite_migrated_url: str,
    tmp_path: Path,
) -> None:
    measured = measured_study(tmp_path / "measured")  # a CT series and its SEG, in one study
    orthanc.upload([*measured.written.paths, measured.seg_path])
    deps = local_deps(tmp_path, sqlite_migrated_url)
    settings, store = deps.settings, deps.export_store
    study_uid = measured.written.study_instance_uid
    client = _client(orthanc)

    first = pacs_poll_once(client=client, store=store, settings=settings, now=STUDY_DAY)
    assert (first.studies, first.copied, first.already_present, first.skipped_series, first.errors) == (1, 6, 0, 1, 0)
    folder = f"exports/pacs-{study_uid}/"
    series = measured.written.series_instance_uid
    assert _keys(store) == {f"{folder}{series}/{uid}.dcm" for uid in measured.written.sop_instance_uids}
    for path in measured.written.paths:
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(Path(store.root) / folder / series / f"{original.SOPInstanceUID}.dcm")
        assert copy.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(copy.pixel_array, original.pixel_array)

    again = pacs_poll_once(client=client, store=store, settings=settings, now=STUDY_DAY)
    assert (again.copied, again.already_present) == (0, 6)

    # the scheduler sees one complete study version and registers it once
    sent: list[int] = []
    for _ in range(2):
        poll_once(
            store=store,
            sessions=deps.sessions,
            settings=settings,
            model=deps.model_info,
            enqueue=lambda run_id, _t: sent.append(run_id),
        )
    assert len(sent) == 1
    # ... and the worker measures it like any export
    outcome = process_run(run_id=sent[0], deps=deps)
    assert outcome.state == "succeeded" and outcome.volume_ml == pytest.approx(0.25, rel=1e-3)

    # a series added later in the PACS is a new version of the study
    late = _head_ct(tmp_path / "late", study_uid=study_uid)
    orthanc.upload(list(late.paths))
    assert pacs_poll_once(client=client, store=store, settings=settings, now=STUDY_DAY).copied == 6
    poll_once(
        store=store,
        sessions=deps.sessions,
        settings=settings,
        model=deps.model_info,
        enqueue=lambda run_id, _t: sent.append(run_id),
    )
    assert len(sent) == 2


def test_studies_outside_the_lookback_or_description_are_left(
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    head = _head_ct(tmp_path / "head")
    chest = _head_ct(tmp_path / "chest", description="CT CHEST")
    orthanc.upload([*head.paths, *chest.paths])
    (tmp_path / "export").mkdir()
    store = LocalStore(tmp_path / "export")
    client = _client(orthanc)
    filtered = Settings(export_bucket=str(tmp_path / "export"), pacs_source_description="head, brain")
    report = pacs_poll_once(client=client, store=store, settings=filtered, now=STUDY_DAY)
    assert (report.studies, report.copied) == (1, 6)
    assert {k.split("/")[0] for k in _keys(store)} == {f"pacs-{head.study_instance_uid}"}
    much_later = datetime(2024, 3, 1, tzinfo=UTC)
    assert pacs_poll_once(client=client, store=store, settings=Settings(), now=much_later).studies == 0


def test_pacs_trouble_is_transient_or_permanent(
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "export")
    with pytest.raises(DicomwebError, match="HTTP 401") as caught:
        pacs_poll_once(client=_client(orthanc, password="wrong"), store=store, settings=Settings(), now=STUDY_DAY)
    assert not caught.value.transient
    orthanc.stop(kill=True)
    with pytest.raises(TransientError, match="PACS unreachable"):
        pacs_poll_once(client=_client(orthanc), store=store, settings=Settings(), now=STUDY_DAY)


def test_pacs_poll_command_reports_counts(
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli import main

    head = _head_ct(tmp_path / "head")
    orthanc.upload(list(head.paths))
    (tmp_path / "export").mkdir()
    monkeypatch.setenv("ICHVOL_PACS_SOURCE_URL", orthanc.dicomweb_url)
    monkeypatch.setenv("ICHVOL_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("ICHVOL_PACS_PASSWORD", orthanc.password)
    monkeypatch.setenv("ICHVOL_EXPORT_BUCKET", str(tmp_path / "export"))
    monkeypatch.setenv("ICHVOL_EXPORT_PREFIX", "")
    monkeypatch.setenv("ICHVOL_PACS_SOURCE_LOOKBACK_H", str(1e6))  # the study is dated 2024-01-02
    assert main(["pacs-poll", "--once"]) == 0
    assert "pacs-poll: 1 studies, 6 instances copied" in capsys.readouterr().out
    assert len(_keys(LocalStore(tmp_path / "export"))) == 6
    monkeypatch.setenv("ICHVOL_PACS_PASSWORD", "wrong")
    assert main(["pacs-poll", "--once"]) == 1
    assert "HTTP 401" in capsys.readouterr().out
    monkeypatch.delenv("ICHVOL_PACS_SOURCE_URL")
    assert main(["pacs-poll", "--once"]) == 2
    assert "ICHVOL_PACS_SOURCE_URL is empty" in capsys.readouterr().err


def test_a_study_retrieved_by_wado_rs_is_the_uploaded_one(orthanc: OrthancServer, tmp_path: Path) -> None:  # noqa: F811
    head = _head_ct(tmp_path / "head")
    orthanc.upload(list(head.paths))
    files = [pydicom.dcmread(io.BytesIO(b)) for b in _client(orthanc).retrieve_study(head.study_instance_uid)]
    assert sorted(ds.SOPInstanceUID for ds in files) == sorted(head.sop_instance_uids)
