"""The fault-injection tools themselves: the S3 proxy forwards faithfully and injects what
it is told, and the invariant checker catches each kind of violation it is meant to."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers.faults import FaultPlan, FaultyS3Proxy, check_invariants
from tests.helpers.services import S3Bucket
from worker.core.errors import TransientError
from worker.infra import db
from worker.infra.storage import S3Store, make_s3_client
from worker.infra.tables import Result, Run, RunState, Study
from worker.overnight.processing import artefact_prefix

pytestmark = [pytest.mark.integration]


def proxied_store(bucket: S3Bucket, proxy: FaultyS3Proxy, *, read_timeout_s: float = 0.5) -> S3Store:
    settings = bucket.settings.replace(s3_endpoint_url=proxy.endpoint_url, s3_read_timeout_s=read_timeout_s)
    return S3Store(bucket=bucket.name, client=make_s3_client(settings))


def test_the_proxy_forwards_every_operation_unchanged(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    with FaultyS3Proxy(s3_bucket.settings.s3_endpoint_url) as proxy:
        store = proxied_store(s3_bucket, proxy)
        payload = bytes(range(256)) * 4000  # 1 MB, binary
        (tmp_path / "in.bin").write_bytes(payload)
        store.upload_file("p/in.bin", tmp_path / "in.bin")
        store.put_bytes("p/small.txt", b"hello")
        assert [o.key for o in store.iter_objects("p/")] == ["p/in.bin", "p/small.txt"]
        store.download("p/in.bin", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == payload
        assert store.exists("p/small.txt") and not store.exists("p/missing")
        store.delete("p/small.txt")
        assert not s3_bucket.store.exists("p/small.txt")  # the delete reached the server
        assert proxy.faults == 0 and proxy.counts["forwarded"] >= 7


@pytest.mark.parametrize(
    "plan", [FaultPlan(error_rate=1.0), FaultPlan(stall_rate=1.0, stall_s=0.8)], ids=["5xx", "stall"]
)
def test_injected_faults_become_transient_errors(s3_bucket: S3Bucket, plan: FaultPlan) -> None:
    with FaultyS3Proxy(s3_bucket.settings.s3_endpoint_url, plan=plan) as proxy:
        store = proxied_store(s3_bucket, proxy)
        started = time.monotonic()
        with pytest.raises(TransientError):
            store.put_bytes("p/x", b"x")
        assert time.monotonic() - started < 60
        assert proxy.faults >= 5  # boto3 tried five times
        assert not s3_bucket.store.exists("p/x")  # errors and stalls are never forwarded


def test_a_lost_reply_still_writes(s3_bucket: S3Bucket) -> None:
    with FaultyS3Proxy(s3_bucket.settings.s3_endpoint_url, plan=FaultPlan(lost_reply_rate=1.0, stall_s=0.8)) as proxy:
        store = proxied_store(s3_bucket, proxy)
        with pytest.raises(TransientError):
            store.put_bytes("p/lost", b"x")
        assert s3_bucket.store.exists("p/lost")
        assert proxy.counts["lost_reply"] >= 1


def test_fault_choice_follows_the_plan() -> None:
    proxy = FaultyS3Proxy(
        "http://127.0.0.1:9", plan=FaultPlan(error_rate=0.3, stall_rate=0.1, lost_reply_rate=0.1), seed=1
    )
    fates = [proxy.choose("GET") for _ in range(20000)]
    share = {fate: fates.count(fate) / len(fates) for fate in set(fates)}
    assert share["forward"] == pytest.approx(0.5, abs=0.02)
    assert share["stall"] == pytest.approx(0.1, abs=0.02) and share["lost_reply"] == pytest.approx(0.1, abs=0.02)
    for error in ("error_500", "error_503", "slowdown"):
        assert share[error] == pytest.approx(0.1, abs=0.02)
    assert (
        FaultyS3Proxy("http://127.0.0.1:9", plan=FaultPlan(error_rate=1.0, methods=frozenset({"PUT"}))).choose("GET")
        == "forward"
    )
    with pytest.raises(ValueError):
        FaultPlan(error_rate=0.8, stall_rate=0.3)


def _study(session, prefix: str) -> Study:  # type: ignore[no-untyped-def]
    study = Study(
        bucket="b", prefix=prefix, fingerprint="f" * 64, n_objects=1, total_bytes=1, discovered_at=datetime.now(UTC)
    )
    session.add(study)
    session.flush()
    return study


def _run(session, study: Study, state: RunState, **values) -> Run:  # type: ignore[no-untyped-def]
    run = Run(study_id=study.id, model_name="m", model_version="v1", model_sha256="0", state=state, **values)
    session.add(run)
    session.flush()
    return run


def _result(session, run: Run, uri: str) -> None:  # type: ignore[no-untyped-def]
    session.add(
        Result(
            run_id=run.id,
            series_instance_uid="1.2",
            volume_ml=1.0,
            abc2_ml=1.0,
            n_slices=6,
            pixel_spacing_row_mm=1.0,
            pixel_spacing_col_mm=1.0,
            slab_thickness_mean_mm=5.0,
            timings_s={},
            result_uri=uri,
        )
    )


def test_the_invariant_checker_catches_each_violation(s3_bucket: S3Bucket, pg_migrated_url: str) -> None:
    sessions = db.session_factory(db.make_engine(pg_migrated_url))
    bucket = s3_bucket.name
    with db.transaction(sessions) as s:
        good = _study(s, "exports/good/")
        prefix = artefact_prefix(results_prefix="results", study_id=good.id, fingerprint="f" * 64, model_version="v1")
        _result(s, _run(s, good, RunState.SUCCEEDED), f"s3://{bucket}/{prefix}result.json")
        missing = _study(s, "exports/missing/")
        _result(s, _run(s, missing, RunState.SUCCEEDED), f"s3://{bucket}/results/nowhere/result.json")
        _run(s, _study(s, "exports/silent/"), RunState.FAILED)  # no code, no message
        _run(s, _study(s, "exports/stuck/"), RunState.RUNNING)
        _run(s, _study(s, "exports/noresult/"), RunState.SUCCEEDED)
        _study(s, "exports/norun/")
    s3_bucket.store.put_bytes(prefix + "result.json", b"{}")
    s3_bucket.store.put_bytes("results/study-999/orphan/v1/mask.npz", b"x")

    report = check_invariants(
        sessions, s3_bucket.store, results_prefix="results", expected_prefixes=["exports/good/", "exports/lost/"]
    )
    text = "\n".join(report.problems)
    assert "exports/lost/ was never registered" in text
    assert "(exports/norun/) has no run" in text
    assert "nowhere/result.json is not in the bucket" in text and report.missing_artefacts == 1
    assert "without an error code and message" in text
    assert "is still running" in text and report.unfinished == 1
    assert "succeeded with 0 result rows" in text
    assert report.orphans == 1 and "orphan" in text
    assert not report.ok
    assert report.line().startswith("reliability: 6 studies, 3 succeeded, 1 failed, 0 dead, 0 duplicates, 1 missing")

    # and a clean state passes
    with db.transaction(sessions) as s:
        for table in (Result, Run, Study):
            s.query(table).delete()
    s3_bucket.store.delete("results/study-999/orphan/v1/mask.npz")
    s3_bucket.store.delete(prefix + "result.json")
    clean = check_invariants(sessions, s3_bucket.store, results_prefix="results")
    assert clean.ok and clean.line().startswith("reliability: 0 studies")
    sessions.kw["bind"].dispose()
