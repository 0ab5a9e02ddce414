"""Research fixtures: a tiny BLAST-CT teacher (random weights: plumbing, not accuracy)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_teacher() -> Any:
    """BLAST-CT at a tenth of its width, in memory. Input patches of 140 voxels (60^3 output
    tiles): a small phantom head takes a few seconds on 2 cores, far fewer patches than at 110."""
    from worker.measure.teacher import BlastCtTeacher
    from worker.model import framework
    from worker.model.blast_ct_net import build_blast_ct

    framework.keras().utils.set_random_seed(7)
    model = build_blast_ct(0.1, input_size=140)
    sha = hashlib.sha256(b"tiny-teacher-7").hexdigest()
    return BlastCtTeacher.from_keras([model], ["tiny-blast-ct"], [sha])
