"""Run a script of ``scripts/`` as a user runs it: a subprocess of this interpreter, from the repository root."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``scripts/<script> args...``; output captured as text, the exit status left to the caller."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
