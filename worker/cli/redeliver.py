"""``ichvol redeliver``: send stored results to the PACS again (failed, stuck or missing deliveries).

Deliveries that ``failed`` (a permanent error, or every retry used during an outage) are
made ``pending`` with their attempts reset, then sent: in this process by default (one
attempt each, the outcome printed per run), or as ``ichvol.deliver`` tasks for the
workers with ``--enqueue`` (which then retry with backoff). ``--state pending`` picks up
deliveries whose task message was lost; ``--missing`` creates deliveries for results
that have none (computed before PACS delivery was configured, or whose trigger was lost
with the broker), optionally only those created in the last ``--since-days`` days.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

from worker.core.errors import ConfigurationError, TransientError
from worker.core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        choices=("failed", "pending", "sent"),
        default="failed",
        help="which deliveries to send again (default: failed)",
    )
    parser.add_argument("--run", type=int, dest="run_id", help="only this run id")
    parser.add_argument(
        "--missing", action="store_true", help="also create deliveries for results that have none, and send them"
    )
    parser.add_argument("--since-days", type=float, help="with --missing: only results of the last N days")
    parser.add_argument(
        "--enqueue", action="store_true", help="send ichvol.deliver tasks to the workers instead of sending here"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.delivery.deliveries import (
        DeliveryDeps,
        create_deliveries,
        deliver_run,
        requeue,
        runs_without_deliveries,
        senders_from_settings,
    )

    senders = senders_from_settings(settings)
    if not senders:
        raise ConfigurationError("ICHVOL_PACS_DELIVERY is empty: there is no PACS to deliver to")
    deps = DeliveryDeps.from_settings(settings)
    run_ids = set(requeue(deps.sessions, states=[args.state], run_id=args.run_id))
    if args.missing:
        since = datetime.now(UTC) - timedelta(days=args.since_days) if args.since_days else None
        for run_id in runs_without_deliveries(
            deps.sessions, targets=[s.target for s in senders], run_id=args.run_id, since=since
        ):
            if create_deliveries(deps.sessions, run_id=run_id, senders=senders):
                run_ids.add(run_id)
    if not run_ids:
        print(f"redeliver: no {args.state} deliveries" + (" and none missing" if args.missing else ""))
        return 0
    if args.enqueue:
        return _enqueue(sorted(run_ids), settings)
    undelivered = 0
    for run_id in sorted(run_ids):
        try:
            outcomes = deliver_run(run_id=run_id, deps=deps, senders=senders)
        except TransientError as exc:
            undelivered += 1
            print(f"run {run_id}: still pending ({exc.message}); retry with `ichvol redeliver --state pending`")
            continue
        for outcome in outcomes:
            line = f"run {run_id}: {outcome.target} -> {outcome.destination}: {outcome.state}"
            if outcome.state != "sent":
                undelivered += 1
                line += f" ({outcome.error})"
            print(line)
    print(f"redeliver: {len(run_ids)} runs, {undelivered} not delivered")
    return 0 if undelivered == 0 else 1


def _enqueue(run_ids: list[int], settings: Settings) -> int:
    from worker.tasks.send import send_deliveries

    try:
        send_deliveries(run_ids, settings)
    except TransientError as exc:
        print(f"redeliver: broker unavailable ({exc.message}); deliveries stay pending")
        return 1
    print(f"redeliver: {len(run_ids)} runs sent to the workers")
    return 0
