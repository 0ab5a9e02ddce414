"""Add the deliveries table: each result's DICOM objects sent to each PACS target.

Revision ID: 5e9aa012f013
Revises: bdd4386a76ba
Create Date: 2025-01-03 00:00:00

One row per (run, target): ``target`` is ``stow`` (DICOMweb STOW-RS) or ``cstore``
(DIMSE C-STORE); ``destination`` the URL or ``AET@host:port`` it went to (never
credentials). ``state`` is ``pending`` (created, or waiting for a retry), ``sent`` or
``failed`` (permanent error or attempts exhausted; ``ichvol redeliver`` resends).
``instances`` lists the objects of the last attempt (kind, SOP class and instance UIDs)
as JSON. Names follow ``worker.infra.tables.NAMING_CONVENTION``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5e9aa012f013"
down_revision: str | Sequence[str] | None = "bdd4386a76ba"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
DELIVERY_STATES = ("pending", "sent", "failed")


def upgrade() -> None:
    states = ", ".join(f"'{state}'" for state in DELIVERY_STATES)
    op.create_table(
        "deliveries",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("result_id", BIG_ID, nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("instances", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_deliveries_run_id_runs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["result_id"], ["results.id"], name=op.f("fk_deliveries_result_id_results"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("run_id", "target", name=op.f("uq_deliveries_run_id_target")),
        sa.CheckConstraint(f"state IN ({states})", name=op.f("ck_deliveries_delivery_state")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_deliveries_attempts_nonnegative")),
    )
    op.create_index(op.f("ix_deliveries_state_updated_at"), "deliveries", ["state", "updated_at"])
    op.create_index(op.f("ix_deliveries_result_id"), "deliveries", ["result_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deliveries_result_id"), table_name="deliveries")
    op.drop_index(op.f("ix_deliveries_state_updated_at"), table_name="deliveries")
    op.drop_table("deliveries")
