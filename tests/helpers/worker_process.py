"""Real worker and scheduler processes for end-to-end tests.

``settings_env`` turns a :class:`Settings` into the environment variables a subprocess
reads (the inverse of ``Settings.from_env``); ``CeleryWorker`` starts
``celery -A worker worker`` exactly as the README and the manifests do, waits until it
answers ``inspect ping`` and stops it (warm shutdown, then kill) at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from worker.core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment (PATH etc.) plus every setting as its variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICHVOL_", "AWS_"))}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        env[f.metadata["env"]] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class CeleryWorker:
    """``celery -A worker worker`` as a subprocess, logging to ``log_path``."""

    def __init__(
        self, settings: Settings, log_path: Path, *, concurrency: int = 1, extra_args: list[str] | None = None
    ):
        self.settings = settings
        self.hostname = f"e2e-{uuid.uuid4().hex[:8]}@%h"
        self.log_path = log_path
        self.concurrency = concurrency
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def node_name(self) -> str:
        import socket

        return self.hostname.replace("%h", socket.gethostname())

    def start(self, *, timeout_s: float = 90.0) -> CeleryWorker:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker",
                "worker",
                "--loglevel=INFO",
                f"--queues={self.settings.queue_name}",
                f"--concurrency={self.concurrency}",
                "--pool=prefork",
                f"--hostname={self.hostname}",
                "--without-gossip",
                "--without-mingle",
                *self.extra_args,
            ],
            cwd=REPO_ROOT,
            env=settings_env(self.settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.inspect("ping", timeout_s=2.0):
                return self
            time.sleep(0.5)
        raise TimeoutError(f"worker did not answer ping within {timeout_s} s:\n{self.log_tail()}")

    def inspect(self, command: str, *, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """``celery -A worker inspect COMMAND -d <this worker> --json``; None if no reply."""
        proc = subprocess.run(
            [
                str(BIN / "celery"),
                "-A",
                "worker",
                "inspect",
                command,
                "-d",
                self.node_name,
                "--json",
                "--timeout",
                str(timeout_s),
            ],
            cwd=REPO_ROOT,
            env=settings_env(self.settings),
            capture_output=True,
            text=True,
            timeout=timeout_s + 30,
        )
        if proc.returncode != 0:
            return None
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            return None
        reply: dict[str, Any] = json.loads(line)
        return reply.get(self.node_name)

    def pool_pids(self) -> list[int]:
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, *, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool) at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_scheduler_once(settings: Settings, *, timeout_s: float = 120.0) -> str:
    """``python -m scheduler --once`` as a subprocess; returns its stdout (the counts line)."""
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler", "--once"],
        cwd=REPO_ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scheduler exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc.stdout
