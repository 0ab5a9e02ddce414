"""``ichvol trends``: a patient's volume timeline and plot, the expansions of a period, the window.

Exit codes: 0 success; 2 with one line on stderr for unusable input (no trend views,
an unknown patient, a bad date). Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.core.settings import Settings
from worker.infra import db
from worker.infra.trend_config import read_trend_config, set_expansion_window
from worker.trends.formatting import format_expansions, format_timeline
from worker.trends.queries import (
    expansions_since,
    patient_expansion,
    patient_issuers,
    patient_timeline,
    trend_views_missing,
)
from worker.trends.views import Definition


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ichvol trends``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--patient", metavar="ID", help="print this PatientID's timeline and plot it")
    what.add_argument("--expansions", action="store_true", help="list patients whose expansion appeared since --since")
    what.add_argument(
        "--set-window", type=float, metavar="HOURS", help="set the follow-up window of the expansion views"
    )
    parser.add_argument(
        "--issuer",
        metavar="ISSUER",
        help="IssuerOfPatientID of --patient ('' for none); needed when the ID exists under several issuers",
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("ichvol-trend.png"), help="PNG of the timeline (default ./ichvol-trend.png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="print the timeline only")
    parser.add_argument(
        "--since", metavar="DATE", help="with --expansions: YYYY-MM-DD or an ISO date-time (UTC if no offset)"
    )
    parser.add_argument("--until", metavar="DATE", help="with --expansions: end of the period, exclusive")
    parser.add_argument(
        "--definition",
        choices=[d.value for d in Definition],
        default=Definition.ANY.value,
        help="which expansion definition (default: any)",
    )
    parser.add_argument("--database-url", dest="database_url", help="override ICHVOL_DATABASE_URL")


def parse_since(value: str) -> dt.datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


class _UsageError(Exception):
    """Bad input to ``ichvol trends``: printed as one line, exit code 2."""


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``ichvol trends``: 0 on success, 2 with one line on stderr for unusable input."""
    engine = db.make_engine(settings.database_url)
    try:
        sessions = db.session_factory(engine)
        with db.transaction(sessions) as session:
            missing = trend_views_missing(session)
            if missing:
                raise _UsageError(
                    f"the database has no trend views ({', '.join(missing)} missing): "
                    "migrate it with `alembic upgrade head`"
                )
            if not args.expansions and (args.since or args.until):
                raise _UsageError("--since and --until go with --expansions")
            if args.set_window is not None:
                try:
                    config = set_expansion_window(session, hours=args.set_window)
                except ValueError as error:
                    raise _UsageError(f"--set-window: {error}") from None
                print(f"expansion window set to {config.expansion_window_hours:g} h after the baseline scan")
                return 0
            if session.get_bind().dialect.name == "postgresql":
                # These plans cost just above jit_above_cost; compiling them takes longer
                # (~70 ms on one night of the benchmark) than the query saves.
                session.execute(text("SET LOCAL jit = off"))
            if args.expansions:
                return _print_expansions(session, args)
            return _print_patient(session, args)
    except _UsageError as error:
        print(f"ichvol: {error}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _print_expansions(session: Session, args: argparse.Namespace) -> int:
    if not args.since:
        raise _UsageError("--expansions needs --since DATE (YYYY-MM-DD)")
    try:
        since = parse_since(args.since)
        until = parse_since(args.until) if args.until else None
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if until is not None and until <= since:
        raise _UsageError("--until must be after --since")
    definition = Definition(args.definition)
    found = expansions_since(session, since=since, until=until, definition=definition)
    print(format_expansions(found, definition=definition, since=since))
    return 0


def _print_patient(session: Session, args: argparse.Namespace) -> int:
    patient_id = str(args.patient).strip()
    if not patient_id:
        raise _UsageError("--patient needs a non-empty PatientID")
    issuers = patient_issuers(session, patient_id=patient_id)
    if args.issuer is not None:
        issuer_key = args.issuer.strip()
        if issuer_key not in issuers:
            raise _UsageError(f"no measured study for PatientID {patient_id!r} with issuer {issuer_key!r}")
    elif not issuers:
        raise _UsageError(f"no measured study for PatientID {patient_id!r}")
    elif len(issuers) > 1:
        shown = ", ".join(repr(key) if key else "(none)" for key in issuers)
        raise _UsageError(f"PatientID {patient_id!r} exists under several issuers ({shown}): pass --issuer")
    else:
        issuer_key = issuers[0]
    rows = patient_timeline(session, patient_id=patient_id, issuer_of_patient_id=issuer_key)
    expansion = patient_expansion(session, patient_id=patient_id, issuer_of_patient_id=issuer_key)
    config = read_trend_config(session)
    print(format_timeline(rows, expansion=expansion, config=config))
    if args.no_plot:
        return 0
    if expansion is None:
        print("no plot: no scan has a usable time")
        return 0
    from worker.trends.plot import plot_timeline

    try:
        path = plot_timeline(rows=rows, window_hours=expansion.window_hours, out_path=args.plot)
    except OSError as error:
        raise _UsageError(f"cannot write the plot to {args.plot}: {error.strerror or error}") from None
    print(f"plot: {path}")
    return 0
