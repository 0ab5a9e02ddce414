"""The embedded default: the same scheduler and worker code with no services.

``ichvol demo`` and ``ichvol run --bucket DIR`` use a local folder as the export bucket,
another as the results bucket, SQLite as the database and run each task in this
process, right after the poll that enqueued it. The code path is the production one
(:func:`worker.infra.intake.poll_once`, :func:`worker.overnight.processing.process_run`); only the
transport differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker.core.errors import TransientError
from worker.core.settings import Settings
from worker.infra.intake import PollReport
from worker.model.weights import Segmenter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRow:
    """One line of the summary table, read back from the database."""

    study: str
    state: str
    volume_ml: float | None
    abc2_ml: float | None
    n_slices: int | None
    error_code: str | None
    error_message: str | None
    overlay_uri: str | None


def local_settings(settings: Settings, *, bucket_dir: Path, state_dir: Path, quiet_period_s: float) -> Settings:
    """Settings pointing every service at local folders and SQLite under ``state_dir``."""
    state_dir = state_dir.resolve()
    return settings.replace(
        export_bucket=str(bucket_dir.resolve()),
        export_prefix="",
        results_bucket=str(state_dir / "results"),
        results_prefix="results",
        database_url=f"sqlite:///{state_dir / 'ichvol.db'}",
        quiet_period_s=quiet_period_s,
        task_always_eager=True,
        work_dir=str(state_dir / "scratch"),
    )


def run_local(settings: Settings, *, segmenter: Segmenter | None = None) -> tuple[PollReport, list[LocalRow]]:
    """Migrate the SQLite database, poll once, process every enqueued run in process.

    ``segmenter`` defaults to the configured weights. Returns the poll report and one row per
    study version in the database.
    """
    from worker.infra import db
    from worker.infra.intake import poll_once
    from worker.overnight import runtime
    from worker.overnight.deps import build_deps
    from worker.overnight.processing import process_run

    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    db.upgrade_to_head(settings.database_url)
    if segmenter is None:
        deps = build_deps(settings)
    else:
        chosen = segmenter
        deps = build_deps(settings, segmenter_factory=lambda: chosen, model_info=chosen.info)
    runtime.set_deps(deps)
    queue: list[int] = []
    report = poll_once(
        store=deps.export_store,
        sessions=deps.sessions,
        settings=settings,
        model=deps.model_info,
        enqueue=lambda run_id, _task_id: queue.append(run_id),
    )
    for run_id in queue:
        for _attempt in range(settings.max_attempts):
            try:
                process_run(run_id=run_id, deps=deps)
                break
            except TransientError as exc:
                log.warning("run %s: %s; retrying", run_id, exc.message)
    if settings.pacs_targets:  # results to the PACS in process (one attempt each; see worker/delivery/deliveries.py)
        from worker.delivery.deliveries import deliver_in_process

        deliver_in_process(deps.delivery(), run_ids=queue)
    return report, summary_rows(deps.sessions, model_version=deps.model_info.version)


def summary_rows(sessions: sessionmaker[Session], *, model_version: str) -> list[LocalRow]:
    from worker.infra.tables import Result, Run, Study

    with sessions() as session:
        rows = session.execute(
            select(
                Study.prefix,
                Run.state,
                Result.volume_ml,
                Result.abc2_ml,
                Result.n_slices,
                Run.error_code,
                Run.error_message,
                Result.overlay_uri,
            )
            .join(Run, Run.study_id == Study.id)
            .outerjoin(Result, Result.run_id == Run.id)
            .where(Run.model_version == model_version)
            .order_by(Study.prefix, Study.id)
        ).all()
    return [
        LocalRow(
            study=r.prefix.rstrip("/"),
            state=str(getattr(r.state, "value", r.state)),
            volume_ml=r.volume_ml,
            abc2_ml=r.abc2_ml,
            n_slices=r.n_slices,
            error_code=r.error_code,
            error_message=r.error_message,
            overlay_uri=r.overlay_uri,
        )
        for r in rows
    ]


def format_table(rows: list[LocalRow], *, truth_ml: dict[str, float] | None = None) -> str:
    """A plain-text table of the results (with the phantom truth when known)."""
    truth_ml = truth_ml or {}
    header = ["study", "state", "volume mL", "ABC/2 mL"] + (["true mL"] if truth_ml else []) + ["slices", "note"]
    lines = [header]
    for r in rows:
        note = f"{r.error_code}: {r.error_message}" if r.error_code else ""
        line = [
            r.study,
            r.state,
            "" if r.volume_ml is None else f"{r.volume_ml:.2f}",
            "" if r.abc2_ml is None else f"{r.abc2_ml:.2f}",
        ]
        if truth_ml:
            t = truth_ml.get(r.study)
            line.append("" if t is None else f"{t:.2f}")
        line += ["" if r.n_slices is None else str(r.n_slices), note]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    out = []
    for row in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(out)
