"""Create the studies, runs and results tables.

Revision ID: fbbca015efff
Revises:
Create Date: 2025-01-01 00:00:00

Names of constraints and indexes follow ``worker.infra.tables.NAMING_CONVENTION`` and are
spelled out here (``op.f``), so later migrations can drop them by name on every database.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "fbbca015efff"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids; SQLite auto-increments only an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
RUN_STATES = ("queued", "running", "succeeded", "failed", "dead")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("bucket", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.CHAR(64), nullable=False),
        sa.Column("n_objects", sa.Integer(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("discovered_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=True),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column("issuer_of_patient_id", sa.Text(), nullable=True),
        sa.Column("accession_number", sa.Text(), nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("study_time", sa.Time(), nullable=True),
        sa.Column("study_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("bucket", "prefix", "fingerprint", name=op.f("uq_studies_bucket_prefix_fingerprint")),
        sa.CheckConstraint("length(fingerprint) = 64", name=op.f("ck_studies_fingerprint_length")),
        sa.CheckConstraint("n_objects >= 0", name=op.f("ck_studies_n_objects_nonnegative")),
        sa.CheckConstraint("total_bytes >= 0", name=op.f("ck_studies_total_bytes_nonnegative")),
    )
    op.create_index(
        op.f("ix_studies_patient_id_issuer_of_patient_id_study_datetime"),
        "studies",
        ["patient_id", "issuer_of_patient_id", "study_datetime"],
    )
    op.create_index(op.f("ix_studies_discovered_at"), "studies", ["discovered_at"])
    op.create_index(op.f("ix_studies_study_instance_uid"), "studies", ["study_instance_uid"])

    states = ", ".join(f"'{state}'" for state in RUN_STATES)
    op.create_table(
        "runs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", BIG_ID, nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=False),
        sa.Column("model_sha256", sa.Text(), nullable=False),
        # A string with a CHECK constraint, not a native enum: SQLite, and new states later.
        sa.Column("state", sa.String(16), server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("celery_task_id", sa.Text(), nullable=True),
        sa.Column("claim_token", sa.Text(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_runs_study_id_studies"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("study_id", "model_version", name=op.f("uq_runs_study_id_model_version")),
        sa.CheckConstraint(f"state IN ({states})", name=op.f("ck_runs_run_state")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_runs_attempts_nonnegative")),
    )
    op.create_index(op.f("ix_runs_state_enqueued_at"), "runs", ["state", "enqueued_at"])
    op.create_index(op.f("ix_runs_finished_at"), "runs", ["finished_at"])

    op.create_table(
        "results",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("series_instance_uid", sa.Text(), nullable=False),
        sa.Column("volume_ml", sa.Float(), nullable=False),
        sa.Column("abc2_ml", sa.Float(), nullable=False),
        sa.Column("n_slices", sa.Integer(), nullable=False),
        sa.Column("pixel_spacing_row_mm", sa.Float(), nullable=False),
        sa.Column("pixel_spacing_col_mm", sa.Float(), nullable=False),
        sa.Column("slab_thickness_mean_mm", sa.Float(), nullable=False),
        sa.Column("timings_s", JSON_DOCUMENT, nullable=False),
        sa.Column("result_uri", sa.Text(), nullable=False),
        sa.Column("mask_npz_uri", sa.Text(), nullable=True),
        sa.Column("mask_nifti_uri", sa.Text(), nullable=True),
        sa.Column("seg_uri", sa.Text(), nullable=True),
        sa.Column("overlay_uri", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_results_run_id_runs"), ondelete="CASCADE"),
        sa.UniqueConstraint("run_id", name=op.f("uq_results_run_id")),
        sa.CheckConstraint("volume_ml >= 0", name=op.f("ck_results_volume_ml_nonnegative")),
        sa.CheckConstraint("n_slices > 0", name=op.f("ck_results_n_slices_positive")),
    )
    op.create_index(op.f("ix_results_created_at"), "results", ["created_at"])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("runs")
    op.drop_table("studies")
