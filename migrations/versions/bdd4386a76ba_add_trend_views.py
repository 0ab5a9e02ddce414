"""Add the trend views: current result per study, patient timeline, hematoma expansion.

Revision ID: bdd4386a76ba
Revises: fbbca015efff
Create Date: 2025-01-02 00:00:00

* ``trend_config``: one row (``id = 1``) the views read: ``pinned_model_version``
  (NULL: the latest result of each study) and ``expansion_window_hours`` (default 72).
  Views cannot read the environment; ``worker.infra.trend_config.sync_trend_config`` copies
  ``ICHVOL_PINNED_MODEL_VERSION`` into it when the scheduler starts.
* ``ix_studies_study_datetime``: finds the scans of one night without reading every study.
* Views ``current_results``, ``patient_timeline``, ``hematoma_expansion`` (documented
  column by column in docs/trends.md). The same SQL on PostgreSQL and SQLite except
  the hours between two timestamps; window functions need SQLite 3.28 or newer.

The SQL is spelled out here, not imported from ``worker``: a migration is a snapshot, and
changing a view later is a new migration that drops and re-creates it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "bdd4386a76ba"
down_revision: str | Sequence[str] | None = "fbbca015efff"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Default follow-up window of the expansion definitions, in hours after the baseline scan.
DEFAULT_WINDOW_HOURS = 72.0
#: Tolerance (mL, and mL of the relative thresholds) for the expansion comparisons: volumes
#: are sums of floating-point voxel volumes, so 30 -> 39.9 mL must count as 33 %. One
#: voxel is ~5e-4 mL, so 1e-6 mL changes no real decision.
EPS_ML = "1e-6"
#: Views, in creation order (dropped in reverse).
VIEWS = ("current_results", "patient_timeline", "hematoma_expansion")


def _hours_between(later: str, earlier: str, dialect: str) -> str:
    """SQL for ``later - earlier`` in hours, rounded to 1e-6 h (3.6 ms) so boundaries are exact."""
    if dialect == "sqlite":
        return f"round((julianday({later}) - julianday({earlier})) * 24.0, 6)"
    return f"round((extract(epoch FROM ({later} - {earlier})) / 3600.0)::numeric, 6)::double precision"


_PIN = "(SELECT pinned_model_version FROM trend_config WHERE id = 1)"
_WINDOW = f"coalesce((SELECT expansion_window_hours FROM trend_config WHERE id = 1), {DEFAULT_WINDOW_HOURS})"

CURRENT_RESULTS = f"""
CREATE VIEW current_results AS
SELECT
    s.id AS study_id,
    u.id AS run_id,
    r.id AS result_id,
    s.bucket,
    s.prefix,
    s.study_instance_uid,
    s.patient_id,
    s.issuer_of_patient_id,
    s.accession_number,
    s.study_date,
    s.study_time,
    s.study_datetime,
    u.model_name,
    u.model_version,
    r.series_instance_uid,
    r.volume_ml,
    r.abc2_ml,
    r.n_slices,
    r.slab_thickness_mean_mm,
    r.result_uri,
    r.overlay_uri,
    r.created_at AS measured_at
FROM studies s
JOIN runs u ON u.study_id = s.id
JOIN results r ON r.run_id = u.id
WHERE u.state = 'succeeded'
  AND ({_PIN} IS NULL OR u.model_version = {_PIN})
  AND NOT EXISTS (
      SELECT 1
      FROM runs u2
      JOIN results r2 ON r2.run_id = u2.id
      WHERE u2.study_id = u.study_id
        AND u2.state = 'succeeded'
        AND ({_PIN} IS NULL OR u2.model_version = {_PIN})
        AND (r2.created_at > r.created_at OR (r2.created_at = r.created_at AND r2.id > r.id))
  )
"""


def _patient_timeline(dialect: str) -> str:
    hours = _hours_between("w.study_datetime", "w.first_datetime", dialect)
    growth = "(d.volume_ml - d.baseline_volume_ml)"
    return f"""
CREATE VIEW patient_timeline AS
SELECT
    d.issuer_key,
    d.patient_id,
    d.issuer_of_patient_id,
    d.scan_number,
    d.study_id,
    d.study_instance_uid,
    d.accession_number,
    d.study_datetime,
    d.hours_since_first,
    d.volume_ml,
    d.abc2_ml,
    d.model_version,
    d.result_id,
    d.measured_at,
    d.baseline_study_id,
    CASE WHEN d.study_id = d.baseline_study_id THEN TRUE ELSE FALSE END AS is_baseline,
    d.baseline_volume_ml,
    d.previous_study_id,
    d.volume_ml - d.previous_volume_ml AS change_from_previous_ml,
    CASE WHEN d.previous_volume_ml > 0
         THEN (d.volume_ml - d.previous_volume_ml) / d.previous_volume_ml * 100.0 END
        AS change_from_previous_pct,
    {growth} AS change_from_baseline_ml,
    CASE WHEN d.baseline_volume_ml > 0 THEN {growth} / d.baseline_volume_ml * 100.0 END
        AS change_from_baseline_pct,
    CASE WHEN d.baseline_volume_ml > 0 THEN d.volume_ml / d.baseline_volume_ml END AS ratio_to_baseline,
    d.window_hours,
    d.in_expansion_window,
    CASE WHEN d.in_expansion_window
              AND ({growth} >= 6.0 - {EPS_ML}
                   OR (d.baseline_volume_ml > 0 AND {growth} >= 0.33 * d.baseline_volume_ml - {EPS_ML}))
         THEN TRUE ELSE FALSE END AS meets_6ml_or_33pct,
    CASE WHEN d.in_expansion_window
              AND ({growth} >= 12.5 - {EPS_ML}
                   OR (d.baseline_volume_ml > 0 AND {growth} >= 0.4 * d.baseline_volume_ml - {EPS_ML}))
         THEN TRUE ELSE FALSE END AS meets_12_5ml_or_1_4x
FROM (
    SELECT
        c.*,
        CASE WHEN c.hours_since_first > 0 AND c.hours_since_first <= c.window_hours
             THEN TRUE ELSE FALSE END AS in_expansion_window
    FROM (
        SELECT
            w.issuer_key,
            w.patient_id,
            w.issuer_of_patient_id,
            w.scan_number,
            w.study_id,
            w.study_instance_uid,
            w.accession_number,
            w.study_datetime,
            w.volume_ml,
            w.abc2_ml,
            w.model_version,
            w.result_id,
            w.measured_at,
            {hours} AS hours_since_first,
            w.baseline_study_id,
            CASE WHEN w.study_datetime IS NOT NULL THEN w.baseline_volume_ml END AS baseline_volume_ml,
            CASE WHEN w.study_datetime IS NOT NULL THEN w.previous_study_id END AS previous_study_id,
            CASE WHEN w.study_datetime IS NOT NULL THEN w.previous_volume_ml END AS previous_volume_ml,
            {_WINDOW} AS window_hours
        FROM (
            SELECT
                v.*,
                row_number() OVER chronological AS scan_number,
                min(v.study_datetime) OVER patient AS first_datetime,
                first_value(CASE WHEN v.study_datetime IS NOT NULL THEN v.study_id END)
                    OVER chronological AS baseline_study_id,
                first_value(CASE WHEN v.study_datetime IS NOT NULL THEN v.volume_ml END)
                    OVER chronological AS baseline_volume_ml,
                lag(v.study_id) OVER timed AS previous_study_id,
                lag(v.volume_ml) OVER timed AS previous_volume_ml
            FROM (
                SELECT
                    coalesce(cr.issuer_of_patient_id, '') AS issuer_key,
                    cr.patient_id,
                    cr.issuer_of_patient_id,
                    cr.study_id,
                    cr.study_instance_uid,
                    cr.accession_number,
                    cr.study_datetime,
                    cr.volume_ml,
                    cr.abc2_ml,
                    cr.model_version,
                    cr.result_id,
                    cr.measured_at,
                    row_number() OVER (
                        PARTITION BY coalesce(cr.issuer_of_patient_id, ''), cr.patient_id,
                                     coalesce(cr.study_instance_uid, 'study-version:' || cr.study_id)
                        ORDER BY cr.study_id DESC
                    ) AS version_rank
                FROM current_results cr
                WHERE cr.patient_id IS NOT NULL AND cr.patient_id <> ''
            ) v
            WHERE v.version_rank = 1
            WINDOW
                patient AS (PARTITION BY v.issuer_key, v.patient_id),
                chronological AS (
                    PARTITION BY v.issuer_key, v.patient_id
                    ORDER BY CASE WHEN v.study_datetime IS NULL THEN 1 ELSE 0 END, v.study_datetime, v.study_id
                ),
                timed AS (
                    PARTITION BY v.issuer_key, v.patient_id, CASE WHEN v.study_datetime IS NULL THEN 1 ELSE 0 END
                    ORDER BY v.study_datetime, v.study_id
                )
        ) w
    ) c
) d
"""


HEMATOMA_EXPANSION = """
CREATE VIEW hematoma_expansion AS
SELECT
    t.issuer_key,
    t.patient_id,
    max(t.issuer_of_patient_id) AS issuer_of_patient_id,
    max(t.baseline_study_id) AS baseline_study_id,
    max(CASE WHEN t.is_baseline THEN t.study_instance_uid END) AS baseline_study_instance_uid,
    max(CASE WHEN t.is_baseline THEN t.accession_number END) AS baseline_accession_number,
    min(t.study_datetime) AS baseline_datetime,
    max(t.baseline_volume_ml) AS baseline_volume_ml,
    max(t.window_hours) AS window_hours,
    count(*) AS n_scans,
    sum(CASE WHEN t.study_datetime IS NULL THEN 1 ELSE 0 END) AS n_scans_without_time,
    sum(CASE WHEN t.in_expansion_window THEN 1 ELSE 0 END) AS n_followups_in_window,
    max(CASE WHEN t.in_expansion_window THEN t.volume_ml END) AS max_followup_volume_ml,
    max(CASE WHEN t.in_expansion_window THEN t.change_from_baseline_ml END) AS max_growth_ml,
    max(CASE WHEN t.in_expansion_window THEN t.change_from_baseline_pct END) AS max_growth_pct,
    max(CASE WHEN t.in_expansion_window THEN t.ratio_to_baseline END) AS max_ratio_to_baseline,
    CASE WHEN sum(CASE WHEN t.meets_6ml_or_33pct THEN 1 ELSE 0 END) > 0 THEN TRUE ELSE FALSE END
        AS expansion_6ml_or_33pct,
    min(CASE WHEN t.meets_6ml_or_33pct THEN t.study_datetime END) AS expansion_6ml_or_33pct_first_at,
    CASE WHEN sum(CASE WHEN t.meets_12_5ml_or_1_4x THEN 1 ELSE 0 END) > 0 THEN TRUE ELSE FALSE END
        AS expansion_12_5ml_or_1_4x,
    min(CASE WHEN t.meets_12_5ml_or_1_4x THEN t.study_datetime END) AS expansion_12_5ml_or_1_4x_first_at
FROM patient_timeline t
GROUP BY t.issuer_key, t.patient_id
HAVING max(t.baseline_study_id) IS NOT NULL
"""


def upgrade() -> None:
    dialect = op.get_context().dialect.name  # works offline (--sql) too
    op.create_table(
        "trend_config",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("pinned_model_version", sa.Text(), nullable=True),
        sa.Column(
            "expansion_window_hours",
            sa.Float(),
            server_default=sa.text(str(DEFAULT_WINDOW_HOURS)),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trend_config")),
        sa.CheckConstraint("id = 1", name=op.f("ck_trend_config_single_row")),
        sa.CheckConstraint("expansion_window_hours > 0", name=op.f("ck_trend_config_window_positive")),
    )
    op.execute("INSERT INTO trend_config (id) VALUES (1)")
    op.create_index(op.f("ix_studies_study_datetime"), "studies", ["study_datetime"])
    op.execute(CURRENT_RESULTS)
    op.execute(_patient_timeline(dialect))
    op.execute(HEMATOMA_EXPANSION)


def downgrade() -> None:
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_index(op.f("ix_studies_study_datetime"), table_name="studies")
    op.drop_table("trend_config")
