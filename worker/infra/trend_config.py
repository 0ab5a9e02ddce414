"""The ``trend_config`` row: the model version the trend views pin and the expansion window.

Views cannot read settings: :func:`sync_trend_config` copies ``ICHVOL_PINNED_MODEL_VERSION``
into the row (the scheduler calls it at start), ``ichvol trends --set-window`` sets the
window with :func:`set_expansion_window`. Hours are hours after the baseline scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from worker.core.settings import Settings
from worker.infra import db
from worker.infra.tables import DEFAULT_WINDOW_HOURS, TrendConfig

#: The largest window ``--set-window`` accepts (hours): a year; beyond that it is a typo.
MAX_WINDOW_HOURS = 24.0 * 366


@dataclass(frozen=True)
class TrendSettings:
    """What the views are configured with (the ``trend_config`` row)."""

    pinned_model_version: str | None
    expansion_window_hours: float


def read_trend_config(session: Session) -> TrendSettings:
    """The ``trend_config`` row (the defaults if the row is missing)."""
    with db.map_db_errors():
        row = session.execute(
            select(TrendConfig.pinned_model_version, TrendConfig.expansion_window_hours).where(TrendConfig.id == 1)
        ).first()
    if row is None:
        return TrendSettings(pinned_model_version=None, expansion_window_hours=DEFAULT_WINDOW_HOURS)
    return TrendSettings(pinned_model_version=row[0], expansion_window_hours=float(row[1]))


def _write_config(session: Session, values: dict[str, Any]) -> TrendSettings:
    with db.map_db_errors():
        changed = db.rowcount(
            session.execute(update(TrendConfig).where(TrendConfig.id == 1).values(**values, updated_at=func.now()))
        )
        if not changed:
            session.add(TrendConfig(id=1, **values))
        session.flush()
    return read_trend_config(session)


def sync_trend_config(session: Session, settings: Settings) -> TrendSettings:
    """Copy ``ICHVOL_PINNED_MODEL_VERSION`` into ``trend_config`` (the scheduler calls this at start).

    The settings are the source of truth for the pin: an empty setting removes it. The
    window is left as it is (``ichvol trends --set-window``). Runs in the caller's
    transaction; returns the configuration now in force.
    """
    return _write_config(session, {"pinned_model_version": settings.pinned_model_version})


def set_expansion_window(session: Session, *, hours: float) -> TrendSettings:
    """Set the follow-up window of the expansion definitions (hours after the baseline scan)."""
    if not math.isfinite(hours) or not 0 < hours <= MAX_WINDOW_HOURS:
        raise ValueError(f"the expansion window must be more than 0 and at most {MAX_WINDOW_HOURS:g} hours")
    return _write_config(session, {"expansion_window_hours": float(hours)})
