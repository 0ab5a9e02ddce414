"""Credentials and database privileges.

* No credential is written into code, the compose file or the manifests: they come from
  the environment (compose: ``${VARIABLE}`` substitution) or a mounted Secret.
* The least-privilege roles documented in docs/reliability.md (the SQL block is executed
  here as written) are enough for the scheduler and the worker to do all their work, and
  nothing more: no DDL, no deletes, no writes to tables they only read.

Object keys and downloads are covered by test_hostile_input.py (every unsafe key kind
ends ``unsafe_path`` with nothing written outside the run's scratch folder).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
from sqlalchemy import select, text

from tests.helpers.dicom_builders import write_ct_series
from tests.helpers.faults import ThrowawayPostgres
from tests.helpers.hostile import MemoryStore
from tests.helpers.segmenters import HuBandSegmenter
from worker.core.errors import ErrorCode, TransientError
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.intake import poll_once
from worker.infra.tables import Result, Run, RunState
from worker.overnight.deps import WorkerDeps
from worker.overnight.processing import fail_run, process_run, record_hard_time_limit

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"

# --------------------------------------------------------------------------------------------
# credentials

#: Files that may hold credentials: throwaway ones for loopback test services.
CREDENTIAL_EXEMPT = ("tests/",)
_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"[a-z+]+://[^/\s:@'\"]+:(?!\$\{|\*\*|PASSWORD\b|<)[^/\s@'\"]+@"),
    "credential assigned a literal": re.compile(
        r"(?i)(password|passwd|secret_access_key|secret_key|api_key|token)[\"']?\s*[:=]\s*[\"'](?!\$\{)[^\"'\s]{6,}[\"']"
    ),
}


def _project_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [REPO / name for name in listed if not name.startswith(CREDENTIAL_EXEMPT) and (REPO / name).is_file()]


def test_no_credentials_in_code_compose_or_manifests() -> None:
    findings = []
    files = _project_files()
    assert any(f.name == "docker-compose.yml" for f in files) and any("k8s" in f.parts for f in files)
    for path in files:
        try:
            content = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for what, pattern in _PATTERNS.items():
            for match in pattern.finditer(content):
                findings.append(f"{path.relative_to(REPO)}: {what}: {match.group(0)[:60]}")
    assert not findings, "\n".join(findings)


def test_the_scan_finds_what_it_looks_for() -> None:
    samples = [
        "key = 'AKIAABCDEFGHIJKLMNOP'",
        "url = 'postgresql://ichvol:hunter22@db:5432/ichvol'",
        'AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMIK7MDENG"',
        "password = 'correct-horse'",
    ]
    for sample in samples:
        assert any(p.search(sample) for p in _PATTERNS.values()), sample
    allowed = ["url: postgresql://ichvol:${POSTGRES_PASSWORD}@postgres/ichvol", "redis://:**@host", "password = ''"]
    for sample in allowed:
        assert not any(p.search(sample) for p in _PATTERNS.values()), sample


def test_compose_credentials_come_from_the_environment() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env_blocks: list[dict[str, Any]] = []
    for service in compose.get("services", {}).values():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment if "=" in item)
        env_blocks.append(environment)
    secret_names = re.compile(r"(?i)(PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|DATABASE_URL|TOKEN)")
    checked = 0
    for environment in env_blocks:
        for name, value in environment.items():
            if secret_names.search(name) and value not in (None, ""):
                checked += 1
                assert "${" in str(value), f"compose: {name} is a literal, not ${{VARIABLE}} from the environment"
    assert checked > 0


def test_kubernetes_secrets_are_only_a_blank_template() -> None:
    import yaml

    for path in (REPO / "deploy" / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Secret":
                continue
            assert path.name == "secret.template.yaml", f"{path}: a Secret outside the template"
            values = {**(doc.get("data") or {}), **(doc.get("stringData") or {})}
            assert all(v in ("", None) for v in values.values()), f"{path}: the template holds values"


# --------------------------------------------------------------------------------------------
# least-privilege database roles


def documented_grants() -> str:
    """The SQL between the ``worker-roles`` markers of docs/reliability.md."""
    body = DOC.read_text()
    match = re.search(r"<!-- worker-roles:begin -->\s*```sql\n(.*?)```\s*<!-- worker-roles:end -->", body, re.S)
    assert match, "docs/reliability.md lost its worker-roles SQL block"
    return match.group(1)


def _blood_study(folder: Path) -> dict[str, bytes]:
    hu = np.full((6, 32, 32), 30.0, np.float32)
    hu[2:4, 10:20, 10:20] = 75.0
    write_ct_series(folder, hu=hu, nested=False)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def privileged_cluster() -> Any:
    try:
        cluster = ThrowawayPostgres().start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no throwaway PostgreSQL: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _role_url(owner_url: str, role: str) -> str:
    return str(sqlalchemy.make_url(owner_url).set(username=role))


@pytest.mark.integration
def test_least_privilege_roles_are_enough_and_no_more(privileged_cluster: Any, tmp_path: Path) -> None:
    owner_url = privileged_cluster.create_database("ichvol")  # migrated by the owner
    owner = sqlalchemy.create_engine(owner_url)
    with owner.begin() as connection:
        connection.execute(text(documented_grants()))
    owner.dispose()
    scheduler_url = _role_url(owner_url, "ichvol_scheduler")
    worker_url = _role_url(owner_url, "ichvol_worker")

    store = MemoryStore()
    store.put_objects("exports/good/", _blood_study(tmp_path / "good"))
    store.put_objects("exports/bad/", {"IM1.dcm": b"not dicom"})
    store.put_objects("exports/flaky/", _blood_study(tmp_path / "flaky"))
    store.put_objects("exports/slow/", _blood_study(tmp_path / "slow"))
    segmenter = HuBandSegmenter(input_size=32)
    base = Settings(
        export_bucket="memory",
        results_bucket="memory",
        export_prefix="exports",
        results_prefix="results",
        work_dir=str(tmp_path / "work"),
        restrict_to_intracranial=False,
        min_component_ml=0.0,
        queued_timeout_s=1.0,
    )

    # the scheduler: migrated-check, trend configuration, registration, recovery
    from scheduler.main import require_migrated, sync_trend_config_at_start

    scheduler_settings = base.replace(database_url=scheduler_url)
    require_migrated(scheduler_settings)
    scheduler_sessions = db.session_factory(db.make_engine(scheduler_url))
    sync_trend_config_at_start(scheduler_sessions, scheduler_settings)
    sent: list[int] = []
    report = poll_once(
        store=store,
        sessions=scheduler_sessions,
        settings=scheduler_settings,
        model=segmenter.info,
        enqueue=lambda run_id, _task: sent.append(run_id),
    )
    assert report.registered == 4

    # the worker: success, permanent failure, transient failure, retries exhausted, hard limit
    worker_sessions = db.session_factory(db.make_engine(worker_url))
    deps = WorkerDeps(
        settings=base.replace(database_url=worker_url),
        sessions=worker_sessions,
        export_store=store,
        results_store=store,
        model_info=segmenter.info,
        segmenter_factory=lambda: segmenter,
    )
    with worker_sessions() as s:
        runs = {
            prefix.split("/")[1]: run_id
            for prefix, run_id in s.execute(
                text("SELECT s.prefix, r.id FROM runs r JOIN studies s ON s.id = r.study_id")
            ).all()
        }
    assert process_run(run_id=runs["good"], deps=deps).state == "succeeded"
    assert process_run(run_id=runs["bad"], deps=deps).error_code == ErrorCode.NO_DICOM.value
    real_download = store.download

    def flaky_download(key: str, dest: Path) -> None:
        raise TransientError("S3 answered 503")

    store.download = flaky_download  # type: ignore[method-assign]
    with pytest.raises(TransientError):
        process_run(run_id=runs["flaky"], deps=deps)
    store.download = real_download  # type: ignore[method-assign]
    assert fail_run(deps, run_id=runs["flaky"], code=ErrorCode.RETRIES_EXHAUSTED, message="gave up")
    with worker_sessions.begin() as s:  # a delivery that the hard limit then kills
        s.execute(
            text("UPDATE runs SET state = 'running', celery_task_id = 't-slow' WHERE id = :id"), {"id": runs["slow"]}
        )
    assert record_hard_time_limit(deps, run_id=runs["slow"], task_id="t-slow", limit_s=1.0)

    # the scheduler's recovery with the worker's leftovers
    with worker_sessions.begin() as s:
        s.execute(
            text("UPDATE runs SET state = 'queued', enqueued_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": runs["good"]},
        )
    assert (
        poll_once(
            store=store,
            sessions=scheduler_sessions,
            settings=scheduler_settings,
            model=segmenter.info,
            enqueue=lambda *_: None,
        ).resent
        == 1
    )

    with db.transaction(worker_sessions) as s:
        states = {r.id: r.state for r in s.scalars(select(Run))}
        assert s.scalar(select(sqlalchemy.func.count()).select_from(Result)) == 1
    assert states[runs["bad"]] is RunState.FAILED and states[runs["slow"]] is RunState.FAILED

    # ... and nothing more
    denied = {
        worker_url: [
            "INSERT INTO studies (bucket, prefix, fingerprint, n_objects, total_bytes) "
            "VALUES ('b', 'p/', repeat('0', 64), 0, 0)",
            "DELETE FROM results",
            "DELETE FROM runs",
            "UPDATE studies SET prefix = 'x/'",
            "UPDATE runs SET model_version = 'x'",
            "INSERT INTO runs (study_id, model_name, model_version, model_sha256) VALUES (1, 'a', 'b', 'c')",
            "CREATE TABLE evil (id int)",
            "DROP TABLE results",
            "ALTER TABLE runs ADD COLUMN evil int",
            "TRUNCATE runs",
            "SELECT * FROM alembic_version",
            "UPDATE trend_config SET pinned_model_version = 'x'",
        ],
        scheduler_url: [
            "INSERT INTO results (run_id) VALUES (1)",
            "DELETE FROM studies",
            "UPDATE studies SET patient_id = 'x'",
            "UPDATE results SET volume_ml = 0",
            "CREATE TABLE evil (id int)",
            "DROP TABLE runs",
            "TRUNCATE studies",
            "DELETE FROM alembic_version",
        ],
    }
    for url, statements in denied.items():
        engine = sqlalchemy.create_engine(url)
        try:
            for statement in statements:
                with (
                    pytest.raises(sqlalchemy.exc.ProgrammingError, match=r"permission denied|must be owner"),
                    engine.begin() as c,
                ):
                    c.execute(text(statement))
        finally:
            engine.dispose()
    for sessions in (worker_sessions, scheduler_sessions):
        sessions.kw["bind"].dispose()
