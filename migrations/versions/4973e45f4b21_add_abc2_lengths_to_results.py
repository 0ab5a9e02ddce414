"""Add the ABC/2 lengths to results: A, B and C in mm, for the SR's measurement group.

Revision ID: 4973e45f4b21
Revises: 5e9aa012f013
Create Date: 2026-12-02 00:00:00

``abc2_a_mm`` (the longest diameter on the slice with the most hematoma), ``abc2_b_mm``
(the longest chord perpendicular to it) and ``abc2_c_mm`` (the weighted slab thicknesses
of the hematoma slices), as ``result.json`` ``abc2`` holds them. NULL for results recorded
before: their SR carries the ABC/2 volume without its lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4973e45f4b21"
down_revision: str | Sequence[str] | None = "5e9aa012f013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("abc2_a_mm", "abc2_b_mm", "abc2_c_mm")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("results", sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of ``results`` would
    # trip over the trend views that read it.
    for name in reversed(COLUMNS):
        op.drop_column("results", name)
