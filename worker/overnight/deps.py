"""What a run needs, built once per process: settings, database sessions, the two stores, the model.

Built after the fork (connections and the model are never shared between processes) by
:func:`build_deps`; the worker's pool processes keep theirs in :mod:`worker.overnight.runtime`,
the embedded runner and tests build their own (a tiny or fake segmenter injected).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from worker.core.settings import Settings
from worker.delivery.deliveries import DeliveryDeps
from worker.infra.object_store import ObjectStore
from worker.model.weights import ModelInfo, Segmenter, model_reference


@dataclass
class WorkerDeps:
    """What a task needs, built once per process. The segmenter loads on first use."""

    settings: Settings
    sessions: sessionmaker[Session]
    export_store: ObjectStore
    results_store: ObjectStore
    model_info: ModelInfo
    segmenter_factory: Callable[[], Segmenter]
    _segmenter: Segmenter | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            with self._lock:
                if self._segmenter is None:
                    self._segmenter = self.segmenter_factory()
        return self._segmenter

    @property
    def segmenter_loaded(self) -> bool:
        return self._segmenter is not None

    def delivery(self) -> DeliveryDeps:
        """The part delivery needs (same sessions and results store)."""
        return DeliveryDeps(settings=self.settings, sessions=self.sessions, results_store=self.results_store)


def build_deps(
    settings: Settings,
    *,
    segmenter_factory: Callable[[], Segmenter] | None = None,
    model_info: ModelInfo | None = None,
) -> WorkerDeps:
    """Engine, stores and a lazy segmenter for this process.

    ``segmenter_factory`` and ``model_info`` replace the configured weights file (the demo
    and tests inject their own segmenter).
    """
    from worker.infra import db, storage

    engine = db.make_engine(settings.database_url)
    info = model_info or model_reference(settings)

    def default_factory() -> Segmenter:
        from worker.model.engines import configured_segmenter

        return configured_segmenter(settings)

    return WorkerDeps(
        settings=settings,
        sessions=db.session_factory(engine),
        export_store=storage.open_store(settings.export_bucket, settings),
        results_store=storage.open_store(settings.results_bucket, settings),
        model_info=info,
        segmenter_factory=segmenter_factory or default_factory,
    )
