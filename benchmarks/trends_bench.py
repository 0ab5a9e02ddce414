"""Benchmark of the trend views on one million results for 200,000 patients (PostgreSQL).

Not a test: run it by hand, then copy the figures and plans into docs/trends.md::

    .venv/bin/python benchmarks/trends_bench.py                       # local PostgreSQL, trust auth
    .venv/bin/python benchmarks/trends_bench.py --admin-url postgresql+psycopg2://postgres@db:5432/postgres

It creates a throwaway database (``ichvol_bench_<pid>``), migrates it to head, fills it in
SQL with ``generate_series`` (no round trips per row), runs ``ANALYZE``, times

* the timeline of one patient (``patient_timeline`` filtered by patient),
* the expansions of one night (``worker.trends.queries.expansions_statement``: a 12-hour window),
* the README's "last night's batch" pattern on result times, and, for contrast,
* the expansion view evaluated whole (what a filter the planner cannot push down costs),

as the median of ``--repeat`` warm runs each, prints ``EXPLAIN (ANALYZE, BUFFERS)`` of
each, and drops the database (``--keep`` leaves it).

The data: ``--patients`` patients (70 % with an IssuerOfPatientID, two issuers), scans
spread over one year, a patient's scans about 18 hours apart (13 to 23), 3 % of scans without a
usable time, volumes 0-60 mL varying by -15 % to +35 % between scans (so many
expansions); one succeeded run of model 1.0.0 per study, a second one (2.0.0) on ~5 %
of them, and 20,000 failed runs on studies of their own. Results = studies + second runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.infra import db
from worker.trends.queries import expansions_statement
from worker.trends.views import Definition

SECOND_VERSION_EVERY = 19  # every 19th study also has a 2.0.0 result (~5 %)
FAILED_RUNS = 20_000
YEAR_START = "2024-01-01 00:00:00+00"


def _psycopg2_dsn(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "password": parsed.password,
        "dbname": parsed.database or "postgres",
    }


def _admin(admin_url: str, sql: str) -> None:
    import psycopg2

    connection = psycopg2.connect(**_psycopg2_dsn(admin_url))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


def load(cursor: Any, *, n_studies: int, n_patients: int) -> None:
    """Fill studies, runs and results with generate_series (ids chosen here, sequences moved after)."""
    cursor.execute(
        f"""
        INSERT INTO studies (id, bucket, prefix, fingerprint, n_objects, total_bytes, discovered_at,
                             study_instance_uid, patient_id, issuer_of_patient_id, accession_number,
                             study_date, study_time, study_datetime)
        SELECT g, 'pacs-export', 'exports/S' || g || '/', lpad(to_hex(g), 64, '0'), 300, 157286400,
               t + interval '1 hour',
               '1.2.826.0.1.3680043.8.498.' || g,
               'P' || lpad(p::text, 7, '0'),
               CASE WHEN p % 10 < 4 THEN 'HOSP-A' WHEN p % 10 < 7 THEN 'HOSP-B' END,
               'ACC' || g,
               CASE WHEN g % 33 <> 0 THEN t::date END,
               CASE WHEN g % 33 <> 0 THEN t::time END,
               CASE WHEN g % 33 <> 0 THEN t END
        FROM (
            SELECT g, p,
                   timestamptz '{YEAR_START}'
                   + make_interval(days => ((p::bigint * 7919) % 365)::int, mins => ((p::bigint * 104729) % 1440)::int)
                   + k * interval '18 hours' + make_interval(mins => (g * 37) % 300) AS t
            FROM (SELECT g, (g - 1) % {n_patients} AS p, (g - 1) / {n_patients} AS k
                  FROM generate_series(1, {n_studies}) AS g) AS numbered
        ) AS scans
        """
    )
    cursor.execute(
        f"""
        INSERT INTO runs (id, study_id, model_name, model_version, model_sha256, state, attempts,
                          enqueued_at, started_at, finished_at)
        SELECT s.id + v.offset_id, s.id, 'DR-UNet', v.version, repeat('a', 64), 'succeeded', 1,
               s.discovered_at, s.discovered_at, s.discovered_at + v.delay
        FROM studies s
        JOIN (VALUES (0, '1.0.0', interval '2 hours'), ({n_studies}, '2.0.0', interval '30 days'))
             AS v (offset_id, version, delay)
          ON v.version = '1.0.0' OR s.id % {SECOND_VERSION_EVERY} = 0
        """
    )
    cursor.execute(
        f"""
        INSERT INTO results (id, run_id, series_instance_uid, volume_ml, abc2_ml, n_slices,
                             pixel_spacing_row_mm, pixel_spacing_col_mm, slab_thickness_mean_mm,
                             timings_s, result_uri, created_at)
        SELECT u.id, u.id, '1.2.3.' || u.id, vol, vol * 1.1, 32, 0.45, 0.45, 5.0,
               '{{"total": 9.5}}'::jsonb, 's3://ichvol-results/results/' || u.id || '/result.json',
               u.finished_at
        FROM (
            SELECT u.*,
                   round((((s.id - 1) % {n_patients}) * 13 % 600 / 10.0
                          * (1 + (((s.id - 1) / {n_patients} * 13 + s.id * 17) % 50 - 15) / 100.0)
                         )::numeric, 2)::double precision AS vol
            FROM runs u JOIN studies s ON s.id = u.study_id
        ) AS u
        """
    )
    failed_base = 2 * n_studies
    cursor.execute(
        f"""
        INSERT INTO studies (id, bucket, prefix, fingerprint, n_objects, total_bytes, discovered_at)
        SELECT g, 'pacs-export', 'exports/F' || g || '/', lpad(to_hex(g), 64, '0'), 3, 1000,
               timestamptz '{YEAR_START}' + make_interval(mins => (g * 263) % 525600)
        FROM generate_series({failed_base + 1}, {failed_base + FAILED_RUNS}) AS g;
        INSERT INTO runs (id, study_id, model_name, model_version, model_sha256, state, attempts,
                          finished_at, error_code, error_message)
        SELECT s.id, s.id, 'DR-UNet', '1.0.0', repeat('a', 64),
               CASE WHEN s.id % 7 = 0 THEN 'dead' ELSE 'failed' END, 1, s.discovered_at,
               (ARRAY['no_usable_series', 'only_localizers', 'too_few_slices', 'not_axial'])[s.id % 4 + 1],
               'see the run'
        FROM studies s WHERE s.id > {failed_base};
        SELECT setval(pg_get_serial_sequence('studies', 'id'), (SELECT max(id) FROM studies));
        SELECT setval(pg_get_serial_sequence('runs', 'id'), (SELECT max(id) FROM runs));
        SELECT setval(pg_get_serial_sequence('results', 'id'), (SELECT max(id) FROM results));
        """
    )


def _median_ms(run: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    run()  # warm the cache and the plan
    timings, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--studies", type=int, default=950_000, help="measured study versions")
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per query (median reported)")
    parser.add_argument("--keep", action="store_true", help="do not drop the database at the end")
    args = parser.parse_args(argv)

    name = f"ichvol_bench_{os.getpid()}"
    admin_url = args.admin_url
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    _admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        db.upgrade_to_head(url)
        import psycopg2

        connection = psycopg2.connect(**_psycopg2_dsn(url))
        connection.autocommit = True
        cursor = connection.cursor()
        cursor.execute("SELECT version()")
        print(cursor.fetchone()[0])
        for setting in ("shared_buffers", "work_mem", "effective_cache_size", "jit"):
            cursor.execute(f"SHOW {setting}")
            print(f"{setting} = {cursor.fetchone()[0]}")

        start = time.perf_counter()
        load(cursor, n_studies=args.studies, n_patients=args.patients)
        loaded_s = time.perf_counter() - start
        start = time.perf_counter()
        cursor.execute("VACUUM (ANALYZE) studies, runs, results")
        analyzed_s = time.perf_counter() - start
        counts = {}
        for table in ("studies", "runs", "results"):
            cursor.execute(f"SELECT count(*) FROM {table}")
            counts[table] = cursor.fetchone()[0]
        cursor.execute(
            "SELECT count(DISTINCT (coalesce(issuer_of_patient_id, ''), patient_id)) FROM studies"
            " WHERE patient_id IS NOT NULL"
        )
        n_patients = cursor.fetchone()[0]
        cursor.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
        size = cursor.fetchone()[0]
        print(f"loaded {counts} ({n_patients} patients, {size}) in {loaded_s:.1f} s; VACUUM ANALYZE {analyzed_s:.1f} s")

        # one patient: P0012345 of HOSP-B (p % 10 = 5)
        timeline_sql = (
            "SELECT * FROM patient_timeline WHERE patient_id = 'P0012345' AND issuer_key = 'HOSP-B'"
            " ORDER BY scan_number"
        )
        # one night: 20:00 to 08:00
        since = dt.datetime(2024, 6, 14, 20, 0, tzinfo=dt.UTC)
        until = since + dt.timedelta(hours=12)
        from sqlalchemy.dialects import postgresql

        compiled = expansions_statement(
            dialect="postgresql", since=since, until=until, definition=Definition.ANY
        ).compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        night_sql = str(compiled)
        batch_sql = """
            SELECT t.patient_id, t.study_datetime, t.volume_ml, t.change_from_baseline_ml
            FROM (SELECT DISTINCT coalesce(issuer_of_patient_id, '') AS issuer_key, patient_id
                  FROM current_results
                  WHERE measured_at >= timestamptz '2024-06-14 18:00+00'
                    AND measured_at < timestamptz '2024-06-15 08:00+00'
                    AND patient_id <> '') AS night
            CROSS JOIN LATERAL (
                SELECT * FROM patient_timeline x
                WHERE x.issuer_key = night.issuer_key AND x.patient_id = night.patient_id OFFSET 0) AS t
            WHERE t.measured_at >= timestamptz '2024-06-14 18:00+00'
              AND t.measured_at < timestamptz '2024-06-15 08:00+00'
              AND (t.meets_6ml_or_33pct OR t.meets_12_5ml_or_1_4x)
        """
        whole_sql = "SELECT count(*) FROM hematoma_expansion WHERE expansion_6ml_or_33pct"

        queries = [
            ("timeline of one patient", timeline_sql, args.repeat, "on"),
            ("expansions of one night (expansions_statement)", night_sql, args.repeat, "on"),
            ("expansions of one night, jit = off", night_sql, args.repeat, "off"),
            ("last night's batch (README example, by result time)", batch_sql, args.repeat, "on"),
            ("last night's batch, jit = off", batch_sql, args.repeat, "off"),
            ("whole expansion view (no patient filter)", whole_sql, 3, "on"),
        ]
        summary = []
        for title, sql, repeat, jit in queries:
            cursor.execute(f"SET jit = {jit}")

            def run(sql: str = sql) -> int:
                cursor.execute(sql)
                return len(cursor.fetchall())

            median, n_rows = _median_ms(run, repeat)
            summary.append((title, median, n_rows, repeat))
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            print(f"\n=== {title}: median {median:.1f} ms over {repeat} runs, {n_rows} rows\n{sql.strip()}\n\n{plan}")
            cursor.execute("RESET jit")
        print("\nsummary")
        for title, median, n_rows, repeat in summary:
            print(f"  {title}: {median:.1f} ms (median of {repeat}), {n_rows} rows")
        connection.close()
    finally:
        if not args.keep:
            _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
