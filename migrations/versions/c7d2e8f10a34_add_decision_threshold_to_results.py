"""Add the decision threshold to results: the probability above which a pixel was hematoma.

Revision ID: c7d2e8f10a34
Revises: a1fdfaf50e7f
Create Date: 2026-12-03 00:00:00

``decision_threshold``, as ``result.json`` ``postprocessing.threshold`` holds it: the weights'
calibrated threshold or the ``ICHVOL_THRESHOLD`` in force. Two results of one model version
measured under different settings can then be told apart in SQL. NULL for results recorded
before (they were measured at the setting then in force, 0.5 by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c7d2e8f10a34"
down_revision: str | Sequence[str] | None = "a1fdfaf50e7f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("results", sa.Column("decision_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), as the ABC/2 lengths' migration does.
    op.drop_column("results", "decision_threshold")
