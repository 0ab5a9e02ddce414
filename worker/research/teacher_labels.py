"""A site's studies labelled by the BLAST-CT teacher, cached per study (the first stage of distillation).

Research use only, not for clinical use.

Each study's series is selected exactly as ``ichvol segment`` selects it
(:func:`worker.imaging.dicom_load.load_study`), the teacher runs on it
(:func:`worker.measure.teacher.predict_teacher`) and its hemorrhage probability
(IPH + EAH + IVH, float16 ``(z, y, x)`` on the series' native grid, slices in the series'
sorted order) is stored in one ``.npz`` per study in the cache folder. The file name holds
a hash of the study folder's resolved path and the teacher models' sha256, so:

* a rerun (after an interruption, or with more studies) labels only what is missing;
* another teacher (other models, other weights) never reuses these labels;
* a study is written to a temporary name and renamed when complete: an interrupted study
  leaves no partial cache file.

Labelling is parallel over studies with ``workers`` > 1: a process pool started with
``spawn`` (a fresh interpreter: no TensorFlow state inherited), each process loading the
teacher once, after it started (the lesson of the Celery prefork pool: never build a model
in a parent that forks). The teacher's identity (names and sha256) is asked of the pool, so
the parent never loads the teacher. With one worker everything runs in this process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.errors import StudyError
from worker.imaging.series_selection import SelectionRules
from worker.research.adaptation import SkippedStudy

__all__ = [
    "CACHE_FORMAT",
    "LabelledStudy",
    "Labelling",
    "TeacherIdentity",
    "TeacherSource",
    "cache_path",
    "label_studies",
    "read_label",
]

F32 = npt.NDArray[np.float32]

CACHE_FORMAT = "ichvol-teacher-labels/1"

#: Anything with ``names`` and ``sha256`` tuples and usable by ``predict_teacher``: a
#: :class:`worker.measure.teacher.BlastCtTeacher`.
Teacher = Any
TeacherLoader = Callable[[], Teacher]


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher labelled: its model names and their weights' sha256, in ensemble order."""

    names: tuple[str, ...]
    sha256: tuple[str, ...]

    @classmethod
    def of(cls, teacher: Teacher) -> TeacherIdentity:
        return cls(tuple(str(n) for n in teacher.names), tuple(str(h) for h in teacher.sha256))


@dataclass(frozen=True)
class TeacherSource:
    """The shipped BLAST-CT teacher as a picklable loader: ``models`` (None: the default
    ensemble), ``engine`` and ``threads`` as :func:`worker.measure.teacher.load_teacher` takes them."""

    models: tuple[str, ...] | None = None
    engine: str = "auto"
    threads: int = 0  # per labelling process; 0: the engine's default (every core)

    def __call__(self) -> Teacher:
        from worker.measure.teacher import load_teacher

        return load_teacher(list(self.models) if self.models else None, engine=self.engine, threads=self.threads)


@dataclass(frozen=True)
class LabelledStudy:
    name: str
    path: Path  # the study folder
    cache_file: Path
    reused: bool  # True: the label came from the cache, the teacher did not run


@dataclass(frozen=True)
class Labelling:
    teacher: TeacherIdentity
    labelled: tuple[LabelledStudy, ...]
    skipped: tuple[SkippedStudy, ...]

    @property
    def n_reused(self) -> int:
        return sum(1 for s in self.labelled if s.reused)


@dataclass(frozen=True)
class TeacherLabel:
    """One cached label: the teacher's hemorrhage probability ``(z, y, x)`` float32 in [0, 1]."""

    hemorrhage: F32
    series_uid: str


def cache_path(cache_dir: Path, study: Path, teacher: TeacherIdentity) -> Path:
    """``<cache_dir>/<study name>-<16 hex>.npz``; the hex hashes the study's resolved path and the teacher."""
    text = "\n".join([CACHE_FORMAT, str(Path(study).resolve()), *teacher.names, *teacher.sha256])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(study).name)[:60] or "study"
    return Path(cache_dir) / f"{safe}-{key}.npz"


def read_label(path: Path) -> TeacherLabel:
    with np.load(path) as data:
        return TeacherLabel(data["hemorrhage"].astype(np.float32), str(data["series_uid"]))


# --- per process: the teacher, loaded once, after the process started ----------------------------

_loader: TeacherLoader | None = None
_teacher: Teacher | None = None


def _init(loader: TeacherLoader) -> None:
    global _loader, _teacher
    _loader, _teacher = loader, None


def _this_teacher() -> Teacher:
    global _teacher
    if _teacher is None:
        assert _loader is not None, "the labelling process was not initialised"
        _teacher = _loader()
    return _teacher


def _identity() -> TeacherIdentity:
    return TeacherIdentity.of(_this_teacher())


def _label(study: Path, rules: SelectionRules, target: Path) -> SkippedStudy | None:
    """Label one study into ``target`` (temporary file, then rename); a StudyError skips it."""
    from worker.imaging.dicom_load import load_study
    from worker.measure import teacher as teacher_module

    try:
        series = load_study(study, rules=rules)
        prediction = teacher_module.predict_teacher(series, _this_teacher())
    except StudyError as error:
        return SkippedStudy(study.name, error.code.value, error.message)
    hemorrhage = np.clip(np.asarray(prediction.hemorrhage_probability, dtype=np.float32), 0.0, 1.0)
    if hemorrhage.shape != series.hu.shape:
        raise RuntimeError(f"the teacher returned {hemorrhage.shape} for a series of shape {series.hu.shape}")
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(
            tmp,
            hemorrhage=hemorrhage.astype(np.float16),
            series_uid=np.asarray(series.series_instance_uid),
            format=np.asarray(CACHE_FORMAT),
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return None


# --- the stage -----------------------------------------------------------------------------------


def label_studies(
    studies: Sequence[Path],
    *,
    loader: TeacherLoader,
    cache_dir: Path,
    rules: SelectionRules,
    workers: int = 1,
    progress: bool = False,
) -> Labelling:
    """Label every study not yet in ``cache_dir`` (module docstring); returns what was labelled or skipped.

    ``loader`` builds the teacher (picklable when ``workers`` > 1, e.g. :class:`TeacherSource`).
    A study whose series selection or teacher run raises :class:`StudyError` is skipped;
    other errors propagate (what was labelled before stays cached).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    labelled: dict[Path, LabelledStudy] = {}
    skipped: list[SkippedStudy] = []
    bar = _progress(len(studies), enabled=progress)
    pool = (
        ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(loader,),
        )
        if workers > 1
        else None
    )
    if pool is None:
        _init(loader)
    try:
        identity = pool.submit(_identity).result() if pool is not None else _identity()
        todo: list[tuple[Path, Path]] = []
        for study in studies:
            target = cache_path(cache_dir, study, identity)
            if target.is_file():
                labelled[study] = LabelledStudy(study.name, study, target, reused=True)
                _advance(bar)
            else:
                todo.append((study, target))
        if pool is None:
            results: Iterable[tuple[Path, Path, SkippedStudy | None]] = (
                (study, target, _label(study, rules, target)) for study, target in todo
            )
        else:
            futures: dict[Future[SkippedStudy | None], tuple[Path, Path]] = {
                pool.submit(_label, study, rules, target): (study, target) for study, target in todo
            }
            results = ((*futures[future], future.result()) for future in as_completed(futures))
        for study, target, skip in results:
            if skip is None:
                labelled[study] = LabelledStudy(study.name, study, target, reused=False)
            else:
                skipped.append(skip)
            _advance(bar)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        else:
            _init(loader)  # drop this process' teacher: the student needs the memory
    ordered = tuple(labelled[s] for s in studies if s in labelled)
    return Labelling(identity, ordered, tuple(skipped))


def _progress(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: drawn on a terminal only, so a log or a pipe gets just the summary line
    return tqdm(total=total, desc="teacher labels", unit="study", dynamic_ncols=True, disable=None)


def _advance(bar: Any) -> None:
    if bar is not None:
        bar.update(1)
