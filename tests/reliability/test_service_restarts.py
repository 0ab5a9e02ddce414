"""Redis and PostgreSQL restarted in the middle of a batch.

Each scenario starts its own server (never the machine's shared ones, which other test
sessions use): a throwaway ``redis-server`` without persistence, whose restart loses
every queued and unacknowledged message, and a throwaway PostgreSQL cluster restarted
with ``pg_ctl restart -m fast`` and then ``-m immediate`` (a crash).

Redis: the worker and the scheduler reconnect; the runs whose messages were lost stay
``queued`` in the database and the scheduler sends them again after
``ICHVOL_QUEUED_TIMEOUT_S``. PostgreSQL: the worker's database calls fail with
:class:`~worker.core.errors.TransientError`, the task retries with backoff, polls fail and the
next one succeeds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.faults import ThrowawayPostgres, ThrowawayRedis, run_states, wait_for
from tests.reliability.conftest import MakeEnv
from worker.core.errors import TransientError

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]


def processed(env) -> int:  # type: ignore[no-untyped-def]
    try:
        states = run_states(env.sessions)
    except TransientError:
        return -1
    return states["succeeded"] + states["failed"]


def test_redis_restarted_during_the_batch(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    try:
        redis = ThrowawayRedis().start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    env = make_env(broker_url=redis.url(0), queued_timeout_s=15.0)
    try:
        prefixes = env.upload(phantom_library)
        env.worker()
        env.scheduler()
        wait_for(lambda: processed(env) >= 10, timeout_s=180, what="ten studies processed")
        before = processed(env)
        redis.restart(down_s=2.0)  # every message in the queue is gone
        print(f"redis restarted after {before} of {len(prefixes)} studies")
        resent_before = resent(env)
        env.wait(prefixes, timeout_s=400)
        report = env.check(prefixes)
        assert report.ok, report.problems
        assert report.succeeded == len(prefixes) == report.studies
        assert before < len(prefixes) - 10, "the restart came too late to lose messages"
        assert resent(env) > resent_before, "nothing was sent again after the restart"
    finally:
        env.close()  # the worker and scheduler before their broker
        redis.stop()


def resent(env) -> int:  # type: ignore[no-untyped-def]
    """Runs the scheduler's polls sent again so far (from its log lines)."""
    return sum(int(n) for n in re.findall(r"(\d+) re-sent", env.logs()))


def clients(env) -> int:  # type: ignore[no-untyped-def]
    """Connections open on the scenario's database right now other than this test's own pool
    (those of the worker and the scheduler)."""
    import sqlalchemy as sa

    from worker.infra import db

    pool = env.sessions.kw["bind"].pool
    with db.transaction(env.sessions) as session:
        total = int(
            session.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            ).scalar_one()
        )
        own = pool.checkedin() + pool.checkedout()
    return max(total - own, 0)


def test_postgres_restarted_during_the_batch(make_env: MakeEnv, phantom_library: dict[str, Path]) -> None:
    try:
        postgres = ThrowawayPostgres().start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no throwaway PostgreSQL: {exc}")
    env = None
    try:
        env = make_env(database_url=postgres.create_database("ichvol"))
        prefixes = env.upload(phantom_library)
        env.worker()
        env.scheduler()
        wait_for(lambda: processed(env) >= 10, timeout_s=180, what="ten studies processed")
        cut = clients(env)
        postgres.restart(mode="fast")
        print(f"postgres restarted (fast) after {processed(env)} studies")
        wait_for(lambda: processed(env) >= 40, timeout_s=240, what="forty studies processed")
        cut += clients(env)
        postgres.restart(mode="immediate")  # like a crash: no checkpoint, clients cut off
        print(f"postgres restarted (immediate) after {processed(env)} studies")
        env.wait(prefixes, timeout_s=400)
        report = env.check(prefixes)
        assert report.ok, report.problems
        assert report.succeeded == len(prefixes) == report.studies
        logs = env.logs()
        # Either a component saw the outage, or the restarts cut live connections that the
        # pool then replaced (pre-ping reconnects without a word): never a restart into the void.
        noticed = "database unavailable" in logs or "poll failed" in logs
        assert noticed or cut > 0, "the restarts cut no connection: the scenario did not test anything"
    finally:
        if env is not None:
            env.close()
        postgres.stop()
