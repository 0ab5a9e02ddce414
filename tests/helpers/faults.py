"""Breaking things on purpose: a fault-injecting S3 proxy, restartable throwaway PostgreSQL and
Redis servers, the scheduler as a killable process, and the batch invariant checker.

Used by tests/reliability/ and benchmarks/reliability_bench.py. Everything runs on loopback
and is started by the test that needs it (never the machine's shared services: restarting
those would disturb other test sessions).

* :class:`FaultyS3Proxy` -- a small threaded HTTP proxy in front of the S3 server. For a
  configurable share of requests it answers ``500 InternalError``, ``503 ServiceUnavailable``
  or ``503 SlowDown`` (S3's XML error bodies), stalls past the client's read timeout without
  forwarding, or forwards and then withholds the reply (the write happened, the client
  never learns). Requests are forwarded byte for byte with their ``Host`` header, so SigV4
  signatures stay valid.
* :class:`ThrowawayPostgres` / :class:`ThrowawayRedis` -- servers of our own on free ports,
  in temporary folders, that a test may restart or kill.
* :class:`SchedulerProcess` -- ``python -m scheduler`` (the polling loop) as a subprocess.
* :func:`check_invariants` -- after a batch: every study version has exactly one succeeded
  run per model version or a failed/dead run with a reason; no duplicate results; every
  artefact URI exists; no orphan artefacts. :meth:`InvariantReport.line` is the one-line
  summary the issue asks for.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select

from tests.helpers.worker_process import REPO_ROOT, settings_env
from worker.core.errors import TransientError
from worker.core.settings import Settings
from worker.infra import db
from worker.infra.tables import Result, Run, RunState, Study
from worker.overnight.processing import artefact_prefix

# --------------------------------------------------------------------------------------------
# S3 fault proxy

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
_ERRORS = {
    "error_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "error_503": (503, "Service Unavailable", "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class FaultPlan:
    """Shares (0..1) of requests that go wrong, decided per request with a seeded RNG.

    ``error_rate`` is split evenly between 500 InternalError, 503 ServiceUnavailable and
    503 SlowDown. ``stall_rate``: the request is held ``stall_s`` seconds (set it above the
    client's read timeout) and the connection closed without an answer, never forwarded.
    ``lost_reply_rate``: the request is forwarded (its write happens) and then handled like
    a stall. ``methods``: only these HTTP methods are faulted (None: all).
    """

    error_rate: float = 0.0
    stall_rate: float = 0.0
    lost_reply_rate: float = 0.0
    stall_s: float = 3.0
    methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        total = self.error_rate + self.stall_rate + self.lost_reply_rate
        if not 0.0 <= total <= 1.0:
            raise ValueError(f"fault rates must add up to at most 1, got {total}")


class FaultyS3Proxy:
    """A fault-injecting HTTP proxy for an S3 endpoint on loopback (see the module docstring).

    ``counts`` tallies what happened: ``forwarded``, ``error_500``, ``error_503``,
    ``slowdown``, ``stall``, ``lost_reply``.
    """

    def __init__(self, upstream_url: str, *, plan: FaultPlan | None = None, seed: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"expected http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan

    def choose(self, method: str) -> str:
        """The fate of one request: ``forward`` or one of the fault names."""
        with self._lock:
            plan = self.plan
            if plan.methods is not None and method not in plan.methods:
                return "forward"
            draw = self._rng.random()
        if draw < plan.error_rate:
            return ("error_500", "error_503", "slowdown")[int(draw / plan.error_rate * 3) % 3]
        draw -= plan.error_rate
        if draw < plan.stall_rate:
            return "stall"
        draw -= plan.stall_rate
        if draw < plan.lost_reply_rate:
            return "lost_reply"
        return "forward"

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    @property
    def faults(self) -> int:
        with self._lock:
            return sum(n for k, n in self.counts.items() if k != "forwarded")

    def start(self) -> FaultyS3Proxy:
        handler = type("_BoundHandler", (_ProxyHandler,), {"proxy": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: FaultyS3Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: thousands of requests per batch

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        body = self._read_body()
        fate = self.proxy.choose(self.command)
        self.proxy.count("forwarded" if fate == "forward" else fate)
        if fate in _ERRORS:
            self._send_error(*_ERRORS[fate])
            return
        if fate == "stall":
            time.sleep(self.proxy.plan.stall_s)
            self.close_connection = True
            return
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            self._send_error(502, "Bad Gateway", "InternalError", "upstream unreachable")
            return
        if fate == "lost_reply":
            time.sleep(self.proxy.plan.stall_s)
            self.close_connection = True
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.proxy.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()

    def _send_error(self, status: int, reason: str, code: str, message: str) -> None:
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>ichvol-fault-{random.getrandbits(32):08x}</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


# --------------------------------------------------------------------------------------------
# throwaway servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1, what: str = "condition") -> None:
    """Poll ``check`` until it is true; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    if not check():
        raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``, if any."""
    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for path in reversed(candidates):
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own (``initdb`` in a temporary folder, trust auth, a free
    port, fsync off), for tests that restart or stop the database.

    As root the server programs run as the ``postgres`` user (``runuser``), as PostgreSQL
    refuses to run as root. :meth:`stop` removes everything.
    """

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server programs not found under /usr/lib/postgresql/*/bin")
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ichvol-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._as_root else list(args)

    def _run(self, *args: str, timeout_s: float = 60.0) -> None:
        done = subprocess.run(self._command(*args), capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> ThrowawayPostgres:
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "start",
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database (migrated to head) and its URL."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        url = self.url(name)
        db.upgrade_to_head(url)
        return url

    def restart(self, *, mode: str = "fast") -> None:
        """Stop (``fast``: disconnect clients; ``immediate``: like a crash) and start again."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self._pg_ctl_start()

    def stop(self) -> None:
        if self.data_dir.is_dir() and (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThrowawayRedis:
    """A ``redis-server`` of our own on a free port, without persistence (a restart loses
    every queued message, the harshest case for the broker)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server not found")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ichvol-redis-"))
        self.log_path = self.root / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def start(self) -> ThrowawayRedis:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: _port_open(self.port), timeout_s=30, what=f"redis on port {self.port}")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, *, down_s: float = 0.0) -> None:
        """SIGKILL the server (every message it held is gone), wait ``down_s``, start again."""
        self.kill()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# the scheduler as a process


class SchedulerProcess:
    """``python -m scheduler`` (the polling loop) with ``settings``, logging to ``log_path``."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SchedulerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scheduler"],
                cwd=REPO_ROOT,
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to finish the poll in progress."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, *, timeout_s: float = 20.0) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> SchedulerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# batches


def upload_study(client: Any, bucket: str, folder: Path, prefix: str, *, marker: str | None = "_COMPLETE") -> int:
    """Upload every file under ``folder`` (its ``truth/`` excluded) below ``prefix``, then the marker."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "truth" not in p.relative_to(folder).parts)
    for path in files:
        client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    if marker:
        client.put_object(Bucket=bucket, Key=prefix + marker, Body=b"")
    return len(files)


def upload_studies(
    client: Any, bucket: str, studies: Mapping[str, Path], *, export_prefix: str = "exports", threads: int = 8
) -> list[str]:
    """Upload ``{name: folder}`` as ``<export_prefix>/<name>/`` (with markers); returns the prefixes."""
    prefixes = {name: f"{export_prefix.strip('/')}/{name}/" for name in studies}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda n: upload_study(client, bucket, studies[n], prefixes[n]), studies))
    return [prefixes[n] for n in studies]


def run_states(sessions: Any) -> Counter[str]:
    """How many runs are in each state now (``Counter`` keyed by state value)."""
    with db.transaction(sessions) as session:
        rows = session.execute(select(Run.state, func.count()).group_by(Run.state)).all()
    return Counter({str(state.value if hasattr(state, "value") else state): int(n) for state, n in rows})


def registered_prefixes(sessions: Any) -> set[str]:
    with db.transaction(sessions) as session:
        return set(session.scalars(select(Study.prefix)))


def wait_for_batch(
    sessions: Any,
    *,
    prefixes: Iterable[str],
    timeout_s: float,
    poll_s: float = 0.5,
    on_tick: Callable[[Counter[str]], None] | None = None,
) -> Counter[str]:
    """Until every prefix is registered and no run is queued or running; database outages
    (a restart under test) are waited out. Returns the final state counts."""
    wanted = set(prefixes)
    deadline = time.monotonic() + timeout_s
    states: Counter[str] = Counter()
    while time.monotonic() < deadline:
        try:
            states = run_states(sessions)
            if on_tick is not None:
                on_tick(states)
            done = wanted <= registered_prefixes(sessions)
            if done and states and not (states["queued"] or states["running"]):
                return states
        except TransientError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"batch not finished within {timeout_s:.0f} s: run states {dict(states)}")


@dataclass
class InvariantReport:
    """What :func:`check_invariants` found. ``problems`` lists each violation in words."""

    studies: int
    succeeded: int
    failed: int
    dead: int
    unfinished: int
    duplicates: int
    missing_artefacts: int
    orphans: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    error_codes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return (
            f"reliability: {self.studies} studies, {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.dead} dead, {self.duplicates} duplicates, {self.missing_artefacts} missing artefacts, "
            f"{self.orphans} orphans, {self.seconds:.1f} s"
        )


def _key_of(uri: str, bucket: str) -> str | None:
    head = f"s3://{bucket}/"
    return uri[len(head) :] if uri.startswith(head) else None


def check_invariants(
    sessions: Any,
    store: Any,
    *,
    results_prefix: str,
    expected_prefixes: Iterable[str] = (),
    seconds: float = 0.0,
) -> InvariantReport:
    """Check the batch guarantees against the database and the results bucket.

    ``store`` is an :class:`worker.infra.storage.S3Store` on the results bucket, reached
    directly (not through a fault proxy). ``expected_prefixes``: export folders that must
    each have been registered (nothing lost).
    """
    problems: list[str] = []
    with db.transaction(sessions) as session:
        studies = list(session.scalars(select(Study)))
        runs = list(session.scalars(select(Run)))
        results = list(session.scalars(select(Result)))
    runs_by_key: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        runs_by_key.setdefault((run.study_id, run.model_version), []).append(run)
    results_by_run: Counter[int] = Counter(r.run_id for r in results)
    run_by_id = {run.id: run for run in runs}
    study_by_id = {study.id: study for study in studies}

    registered = {s.prefix for s in studies}
    for prefix in sorted(set(expected_prefixes) - registered):
        problems.append(f"export {prefix} was never registered")
    for study in studies:
        if not any(key[0] == study.id for key in runs_by_key):
            problems.append(f"study {study.id} ({study.prefix}) has no run")

    duplicates = sum(n - 1 for n in results_by_run.values() if n > 1)
    duplicates += sum(len(v) - 1 for v in runs_by_key.values() if len(v) > 1)
    succeeded = failed = dead = unfinished = 0
    codes: Counter[str] = Counter()
    allowed: list[str] = []
    for run in runs:
        state = run.state
        if state is RunState.SUCCEEDED:
            succeeded += 1
            if results_by_run[run.id] != 1:
                problems.append(f"run {run.id} succeeded with {results_by_run[run.id]} result rows")
            study = study_by_id[run.study_id]
            allowed.append(
                artefact_prefix(
                    results_prefix=results_prefix,
                    study_id=study.id,
                    fingerprint=study.fingerprint,
                    model_version=run.model_version,
                )
            )
        elif state in (RunState.FAILED, RunState.DEAD):
            failed += state is RunState.FAILED
            dead += state is RunState.DEAD
            codes[run.error_code or "(none)"] += 1
            if not run.error_code or not run.error_message:
                problems.append(f"run {run.id} is {state.value} without an error code and message")
            if results_by_run[run.id]:
                problems.append(f"run {run.id} is {state.value} but has a result row")
        else:
            unfinished += 1
            problems.append(f"run {run.id} is still {state.value}")
    if duplicates:
        problems.append(f"{duplicates} duplicate runs or result rows")

    bucket = getattr(store, "bucket", "")
    listed = {info.key for info in store.iter_objects(results_prefix.strip("/") + "/")}
    missing = 0
    for result in results:
        if result.run_id not in run_by_id:
            problems.append(f"result {result.id} belongs to no run")
        uris = (result.result_uri, result.mask_npz_uri, result.mask_nifti_uri, result.seg_uri, result.overlay_uri)
        for uri in uris:
            if uri is None:
                continue
            key = _key_of(uri, bucket)
            if key is None or key not in listed:
                missing += 1
                problems.append(f"result of run {result.run_id}: {uri} is not in the bucket")
    allowed_set = tuple(allowed)
    orphans = sorted(key for key in listed if not key.startswith(allowed_set))
    if orphans:
        problems.append(f"{len(orphans)} orphan artefacts, e.g. {orphans[:3]}")
    return InvariantReport(
        studies=len(studies),
        succeeded=succeeded,
        failed=failed,
        dead=dead,
        unfinished=unfinished,
        duplicates=duplicates,
        missing_artefacts=missing,
        orphans=len(orphans),
        seconds=seconds,
        problems=problems,
        error_codes=codes,
    )


@contextlib.contextmanager
def stopping(*processes: Any) -> Iterator[None]:
    """Stop every process (``.stop()``) when the block ends, whatever happens inside it."""
    try:
        yield
    finally:
        for process in reversed(processes):
            with contextlib.suppress(Exception):
                process.stop()


# --------------------------------------------------------------------------------------------
# phantom batches and the environment a scenario runs in

#: Patient names and birth dates the PHI test looks for in logs and the database.
PHI_NAMES = (
    "Zyxwvut^Qqqq",
    "山田^太郎",
    "Robert'); DROP TABLE studies;--^<script>alert(1)</script>",
    "Иванов^Иван",
    "O'Brien^Seán Ölüm",
)
PHI_BIRTH_DATES = ("19230417", "19311129", "19470302", "19580813", "19690925")


def phantom_spec(index: int, *, n_slices: int = 6, **overrides: Any) -> Any:
    """A tiny phantom (32x32 pixels of 7 mm, ``n_slices`` slices of 7 mm) with one acute
    hematoma; patient name and birth date cycle through :data:`PHI_NAMES`/:data:`PHI_BIRTH_DATES`."""
    from worker.synth.phantom import LesionSpec, PhantomSpec

    values: dict[str, Any] = {
        "rows": 32,
        "columns": 32,
        "pixel_spacing_mm": (7.0, 7.0),
        "slice_thickness_mm": 7.0,
        "n_slices": n_slices,
        "lesions": (LesionSpec("round", volume_ml=12.0 + index % 7 * 3.0, mean_hu=86),),
        "noise_sigma_hu": 2.0,
        "calcifications": False,
        "patient_name": PHI_NAMES[index % len(PHI_NAMES)],
        "patient_birth_date": PHI_BIRTH_DATES[index % len(PHI_BIRTH_DATES)],
        "patient_id": f"RELI-{index:05d}",
    }
    values.update(overrides)
    return PhantomSpec(**values)


def generate_phantoms(out_dir: Path, n: int, *, first: int = 0, **spec_overrides: Any) -> dict[str, Path]:
    """``n`` phantom studies ``study-<i>`` in ``out_dir`` (truth files beside, not inside)."""
    from worker.synth.phantom import generate_study

    studies: dict[str, Path] = {}
    for i in range(first, first + n):
        name = f"study-{i:05d}"
        generate_study(
            out_dir / name, spec=phantom_spec(i, **spec_overrides), seed=i, truth_dir=out_dir / "_truth" / name
        )
        studies[name] = out_dir / name
    return studies


@dataclass
class BatchEnv:
    """One scenario's world: the settings the worker and scheduler processes get (possibly
    pointing at a fault proxy), direct access to the bucket and database for checks, and
    every process it started (stopped by :meth:`close`, whatever happened)."""

    settings: Settings
    bucket: str
    client: Any  # boto3 client straight to the S3 server
    store: Any  # S3Store straight to the S3 server
    sessions: Any
    logs_dir: Path
    processes: list[Any] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def worker(
        self, *, concurrency: int = 1, settings: Settings | None = None, extra_args: list[str] | None = None
    ) -> Any:
        from tests.helpers.worker_process import CeleryWorker

        index = sum(1 for p in self.processes if type(p).__name__ == "CeleryWorker")
        worker = CeleryWorker(
            settings or self.settings,
            self.logs_dir / f"worker-{index}.log",
            concurrency=concurrency,
            extra_args=extra_args,
        )
        self.processes.append(worker)
        return worker.start(timeout_s=180.0)

    def scheduler(self, *, settings: Settings | None = None) -> SchedulerProcess:
        index = sum(1 for p in self.processes if isinstance(p, SchedulerProcess))
        scheduler = SchedulerProcess(settings or self.settings, self.logs_dir / f"scheduler-{index}.log")
        self.processes.append(scheduler)
        return scheduler.start()

    def upload(self, studies: Mapping[str, Path]) -> list[str]:
        return upload_studies(self.client, self.bucket, studies, export_prefix=self.settings.export_prefix)

    def wait(self, prefixes: Iterable[str], *, timeout_s: float = 300.0, **kwargs: Any) -> Counter[str]:
        return wait_for_batch(self.sessions, prefixes=prefixes, timeout_s=timeout_s, **kwargs)

    def check(self, prefixes: Iterable[str] = ()) -> InvariantReport:
        report = check_invariants(
            self.sessions,
            self.store,
            results_prefix=self.settings.results_prefix,
            expected_prefixes=prefixes,
            seconds=time.monotonic() - self.started,
        )
        print(report.line())
        return report

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs_dir.glob("*.log")))

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
