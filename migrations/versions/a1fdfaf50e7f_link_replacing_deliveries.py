"""Link a delivery whose SR replaces an earlier one: the delivery it replaces and the SR's UID.

Revision ID: a1fdfaf50e7f
Revises: 4973e45f4b21
Create Date: 2026-12-02 00:00:01

When a study is measured again (a new model version, an adapted model) and the earlier
result's SR was sent, the new SR names it in its Predecessor Documents Sequence, so a PACS
reader sees which report is current. ``predecessor_sr_uid`` is that SOP Instance UID;
``replaces_delivery_id`` the delivery that sent it (``ON DELETE SET NULL``: deleting the
old study keeps the new delivery and the UID it named).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a1fdfaf50e7f"
down_revision: str | Sequence[str] | None = "4973e45f4b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("replaces_delivery_id", BIG_ID, nullable=True))
        batch.add_column(sa.Column("predecessor_sr_uid", sa.Text(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_deliveries_replaces_delivery_id_deliveries"),
            "deliveries",
            ["replaces_delivery_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index(op.f("ix_deliveries_replaces_delivery_id"), ["replaces_delivery_id"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index(op.f("ix_deliveries_replaces_delivery_id"))
        batch.drop_constraint(op.f("fk_deliveries_replaces_delivery_id_deliveries"), type_="foreignkey")
        batch.drop_column("predecessor_sr_uid")
        batch.drop_column("replaces_delivery_id")
