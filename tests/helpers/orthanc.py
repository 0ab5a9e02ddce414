"""A real Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests, on loopback.

:func:`orthanc` starts ``Orthanc`` from the Debian package with a throwaway JSON
configuration and storage folder under the test's ``tmp_path``: free loopback ports for
HTTP (REST and DICOMweb under ``/dicom-web``) and DICOM (C-STORE SCP, AE title
``ORTHANC``), HTTP basic authentication with one user, remote access off (HTTP answers
loopback clients only). The package's own system service is never used.

:class:`OrthancServer` can be stopped and started again on the same ports and storage
(what the outage tests need), and is always stopped when the test ends: no Orthanc
process is left behind. Where the binary or the DICOMweb plugin is missing the test is
skipped with the command that installs them (CI: ``apt-get install -y orthanc
orthanc-dicomweb``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers.services import free_ports

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "apt-get install -y orthanc orthanc-dicomweb"
ORTHANC_AET = "ORTHANC"
ORTHANC_USER = "ichvol"
ORTHANC_PASSWORD = "orthanc-test-secret"
START_TIMEOUT_S = 30.0


def orthanc_binary() -> Path | None:
    """The ``Orthanc`` executable of the Debian package, or None."""
    found = shutil.which("Orthanc")
    for candidate in (found, *ORTHANC_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def require_orthanc() -> Path:
    """The Orthanc binary, or skip the test saying how to install it."""
    binary = orthanc_binary()
    if binary is None:
        pytest.skip(f"Orthanc is not installed (no 'Orthanc' binary): {INSTALL_HINT}")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN} missing): {INSTALL_HINT}")
    return binary


@dataclass
class OrthancServer:
    """One Orthanc process with its own configuration, storage and ports."""

    binary: Path
    root: Path
    http_port: int
    dicom_port: int
    aet: str = ORTHANC_AET
    username: str = ORTHANC_USER
    password: str = ORTHANC_PASSWORD
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), without a trailing ``/``."""
        return f"{self.base_url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def write_config(self) -> None:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "ichvol-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "HttpThreadsCount": 8,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomThreadsCount": 2,
            "UnknownSopClassAccepted": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StableAge": 1,
            "ExecuteLuaEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> OrthancServer:
        """Start Orthanc (again) and wait until its REST API answers."""
        if self.running:
            return self
        self.write_config()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [str(self.binary), "--logdir=" + str(self.root), str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop(kill=True)
        raise TimeoutError(f"Orthanc did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            response = requests.get(f"{self.base_url}/system", auth=self.auth, timeout=1.0)
        except requests.RequestException:
            return False
        return response.status_code == 200

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        """Stop Orthanc and wait for the process to end.

        ``kill=False``: SIGTERM (Orthanc shuts down cleanly, ~3 s), SIGKILL after
        ``timeout_s``; ``kill=True``: SIGKILL at once (a crash; fast).
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.process = None

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    # --- REST helpers for assertions -------------------------------------------------------

    def get_json(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.base_url}{path}", auth=self.auth, params=params or None, timeout=10)
        response.raise_for_status()
        return response.json()

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        rows = self.get_json("/instances", expand="")
        return {row["MainDicomTags"]["SOPInstanceUID"] for row in rows}

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def upload(self, paths: list[Path]) -> None:
        """Store DICOM files through the REST API (test data for the PACS source)."""
        for path in paths:
            response = requests.post(f"{self.base_url}/instances", data=path.read_bytes(), auth=self.auth, timeout=30)
            response.raise_for_status()


def start_orthanc(root: Path) -> OrthancServer:
    """Start a new Orthanc under ``root`` on free loopback ports (retrying if a port was taken)."""
    binary = require_orthanc()
    last_error: Exception | None = None
    for attempt in range(3):
        http_port, dicom_port = free_ports(2)
        server = OrthancServer(
            binary=binary, root=root / f"orthanc{attempt}", http_port=http_port, dicom_port=dicom_port
        )
        server.root.mkdir(parents=True, exist_ok=True)
        try:
            return server.start()
        except (RuntimeError, TimeoutError) as exc:
            server.stop(kill=True)
            last_error = exc
    raise RuntimeError(f"Orthanc could not be started: {last_error}")


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc with DICOMweb for one test; stopped (never left running) afterwards."""
    server = start_orthanc(tmp_path / "pacs")
    try:
        yield server
    finally:
        server.stop(kill=True)  # throwaway storage: no need for a clean shutdown
