"""``dciodvfy`` (David Clunie's DICOM validator, Debian package ``dicom3tools``) on a written object.

``scripts/test.sh`` installs it when run as root; elsewhere the tests that need it skip
with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Verdict:
    """What ``dciodvfy`` said: its ``Error`` lines and its ``Warning`` lines."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    text: str


def dciodvfy(path: Path) -> Verdict:
    """Validate ``path`` against its IOD and modules; skip the test where the tool is absent."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (Debian: apt-get install dicom3tools; scripts/test.sh does it as root)")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    text = done.stdout + done.stderr
    lines = text.splitlines()
    return Verdict(
        errors=tuple(line for line in lines if line.startswith("Error")),
        warnings=tuple(line for line in lines if line.startswith("Warning")),
        text=text,
    )
