"""S3 answering 500/503/SlowDown for a share of requests, stalling some past the client's
read timeout, losing some replies after the write happened, and a short total outage.

The worker and the scheduler reach the loopback S3 server through
:class:`~tests.helpers.faults.FaultyS3Proxy`; the test's own uploads and checks go
straight to the server. boto3 retries each request (adaptive mode, 5 attempts); what
still fails becomes a :class:`~worker.core.errors.TransientError`, the task hands the run back
and retries with backoff, and a failed poll is simply repeated.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.faults import FaultPlan, FaultyS3Proxy, run_states, wait_for
from tests.reliability.conftest import MakeEnv

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(600)]

READ_TIMEOUT_S = 0.5
PLAN = FaultPlan(error_rate=0.04, stall_rate=0.008, lost_reply_rate=0.008, stall_s=READ_TIMEOUT_S + 0.3)


def test_s3_errors_stalls_and_an_outage(make_env: MakeEnv, phantom_library: dict[str, Path], s3_server) -> None:  # type: ignore[no-untyped-def]
    with FaultyS3Proxy(s3_server.endpoint_url, plan=PLAN, seed=8) as proxy:
        # Stalls and boto3's own retries can stretch one download well past the scenarios'
        # 10 s limit on a loaded machine; the limit is not what this scenario tests.
        env = make_env(
            s3_endpoint_url=proxy.endpoint_url,
            s3_read_timeout_s=READ_TIMEOUT_S,
            max_attempts=10,
            soft_time_limit_s=40.0,
            hard_time_limit_s=50.0,
        )
        prefixes = env.upload(phantom_library)  # straight to the server
        env.worker()
        env.scheduler()
        wait_for(lambda: run_states(env.sessions)["succeeded"] >= 30, timeout_s=300, what="thirty studies")
        proxy.set_plan(FaultPlan(error_rate=1.0))  # S3 down for a while: every request 5xx/SlowDown
        time.sleep(6.0)
        proxy.set_plan(PLAN)
        env.wait(prefixes, timeout_s=450)
        report = env.check(prefixes)
        print(f"S3 faults injected: {dict(proxy.counts)}")
        assert report.ok, report.problems
        assert report.succeeded == len(prefixes) == report.studies
        for fault in ("error_500", "error_503", "slowdown", "stall", "lost_reply"):
            assert proxy.counts[fault] > 0, f"no {fault} was injected: the scenario did not test it"
        logs = env.logs()
        assert "S3 is unavailable" in logs, "no S3 error outlasted boto3's retries: the task retry path went untested"
