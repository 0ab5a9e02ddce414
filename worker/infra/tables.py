"""The results database: studies found in the export bucket, model runs on them, and results.

Three tables (SQLAlchemy 2 declarative, typed with ``Mapped[...]``), portable between
PostgreSQL (production) and SQLite (the embedded default):

* ``studies`` -- one row per *version* of a study folder: ``(bucket, prefix, fingerprint)``
  is unique, so a re-exported (changed) folder is a new row and an unchanged one is found
  again by the scheduler's ``INSERT ... ON CONFLICT DO NOTHING``.
* ``runs`` -- one row per (study version, model version): the idempotency key of the
  pipeline. ``state`` is a :class:`RunState` stored as its value string (a CHECK
  constraint, not a native enum, so SQLite and later states work the same way).
* ``results`` -- at most one row per run (``run_id`` is unique): the measured volume
  and the URIs of the artefacts.

Times are timezone-aware UTC ``datetime`` objects in Python and ``timestamptz`` in
PostgreSQL; SQLite stores them as UTC text and :class:`UtcDateTime` attaches UTC again
on read. Volumes are in mL, spacings in mm, durations in seconds. Patient names are
never stored.

The schema belongs to the Alembic migrations (``migrations/``); ``Base.metadata`` is
only the autogenerate target and the model tests' reference.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    CHAR,
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    Time,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Constraint and index names: stable across databases, so migrations can name what they drop.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: 64-bit ids on PostgreSQL; SQLite only auto-increments an ``INTEGER PRIMARY KEY``.
BigId = BigInteger().with_variant(Integer, "sqlite")
#: JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[dt.datetime]):
    """``timestamptz`` that always round-trips as an aware UTC ``datetime``.

    Naive values are refused on write (ambiguous); SQLite, which keeps no offset, gets
    UTC and is read back as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use an aware datetime (UTC)")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class RunState(StrEnum):
    """Life of a run: queued -> running -> succeeded | failed; dead after too many deliveries."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


def _enum_values(enum_cls: type[StrEnum]) -> list[str]:
    return [member.value for member in enum_cls]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UtcDateTime()}


class Study(Base):
    """One version of a study folder in a bucket, and its DICOM identifiers once read.

    ``fingerprint`` is the SHA-256 (hex) of the folder's sorted ``(key, etag, size)``
    list (computed by the scheduler, ``worker.infra.listing.fingerprint_of``). ``study_datetime`` is StudyDate +
    StudyTime, or the acquisition datetime when those are unusable; timezone: as the
    worker resolves it (UTC in the database).
    """

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("bucket", "prefix", "fingerprint"),
        CheckConstraint("length(fingerprint) = 64", name="fingerprint_length"),
        CheckConstraint("n_objects >= 0", name="n_objects_nonnegative"),
        CheckConstraint("total_bytes >= 0", name="total_bytes_nonnegative"),
        Index(None, "patient_id", "issuer_of_patient_id", "study_datetime"),
        Index(None, "discovered_at"),
        Index(None, "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(CHAR(64))
    n_objects: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    discovered_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    study_instance_uid: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(Text)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    study_time: Mapped[dt.time | None] = mapped_column(Time)
    study_datetime: Mapped[dt.datetime | None] = mapped_column()

    runs: Mapped[list[Run]] = relationship(back_populates="study", cascade="all, delete-orphan", passive_deletes=True)

    def __repr__(self) -> str:  # no patient data in reprs: they end up in logs
        return f"Study(id={self.id!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"


class Run(Base):
    """One model version applied to one study version: the unit of work and of retry.

    ``claim_token`` is set by the worker that claims the run (conditional update), and
    ``worker`` is its ``hostname:pid``. ``attempts`` counts deliveries.
    """

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("study_id", "model_version"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index(None, "state", "enqueued_at"),
        Index(None, "finished_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(Text)
    state: Mapped[RunState] = mapped_column(
        Enum(
            RunState,
            name="run_state",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=_enum_values,
            validate_strings=True,
        ),
        default=RunState.QUEUED,
        server_default=RunState.QUEUED.value,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    celery_task_id: Mapped[str | None] = mapped_column(Text)
    claim_token: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column()
    started_at: Mapped[dt.datetime | None] = mapped_column()
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="runs")
    result: Mapped[Result | None] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, study_id={self.study_id!r}, state={self.state!r})"


class Result(Base):
    """The measurement of a succeeded run.

    ``volume_ml``: hematoma volume from the mask, each pixel weighted by row x column
    spacing x its slab thickness (mm^3 -> mL). ``abc2_ml``: the ABC/2 estimate from the
    same mask, and ``abc2_a_mm``, ``abc2_b_mm``, ``abc2_c_mm`` its three lengths (mm;
    NULL for results recorded before they were kept). ``pixel_spacing_row_mm`` /
    ``pixel_spacing_col_mm`` are DICOM PixelSpacing[0] / [1]. ``decision_threshold`` is the
    probability above which a pixel was hematoma (the weights' calibrated threshold or
    ``ICHVOL_THRESHOLD``; NULL for results recorded before it was kept). ``timings_s`` maps stage
    names to seconds. Artefact URIs are ``s3://`` or ``file://``; those not written are NULL.
    """

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("run_id"),
        CheckConstraint("volume_ml >= 0", name="volume_ml_nonnegative"),
        CheckConstraint("n_slices > 0", name="n_slices_positive"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(BigId, ForeignKey("runs.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(Text)
    volume_ml: Mapped[float] = mapped_column(Float)
    abc2_ml: Mapped[float] = mapped_column(Float)
    abc2_a_mm: Mapped[float | None] = mapped_column(Float)
    abc2_b_mm: Mapped[float | None] = mapped_column(Float)
    abc2_c_mm: Mapped[float | None] = mapped_column(Float)
    decision_threshold: Mapped[float | None] = mapped_column(Float)
    n_slices: Mapped[int] = mapped_column(Integer)
    pixel_spacing_row_mm: Mapped[float] = mapped_column(Float)
    pixel_spacing_col_mm: Mapped[float] = mapped_column(Float)
    slab_thickness_mean_mm: Mapped[float] = mapped_column(Float)
    timings_s: Mapped[dict[str, float]] = mapped_column(JsonDocument)
    result_uri: Mapped[str] = mapped_column(Text)
    mask_npz_uri: Mapped[str | None] = mapped_column(Text)
    mask_nifti_uri: Mapped[str | None] = mapped_column(Text)
    seg_uri: Mapped[str | None] = mapped_column(Text)
    overlay_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())

    run: Mapped[Run] = relationship(back_populates="result")

    def __repr__(self) -> str:
        return f"Result(id={self.id!r}, run_id={self.run_id!r}, volume_ml={self.volume_ml!r})"


#: Default window (hours after the baseline scan) in which growth counts as expansion.
DEFAULT_WINDOW_HOURS = 72.0


class TrendConfig(Base):
    """The one configuration row the trend views read (``id = 1``).

    ``pinned_model_version``: report this model version's results only (NULL: each study
    version's most recent result). ``expansion_window_hours``: follow-ups count for
    expansion when ``0 < hours since the baseline <= this``.
    """

    __tablename__ = "trend_config"
    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint("expansion_window_hours > 0", name="window_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    pinned_model_version: Mapped[str | None] = mapped_column(Text)
    expansion_window_hours: Mapped[float] = mapped_column(Float, server_default=text(str(DEFAULT_WINDOW_HOURS)))
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


#: Scans of one night without reading every study (``expansions_since``). Declared here,
#: beside the migration that creates it, so autogenerate sees the models and the database agree.
STUDY_DATETIME_INDEX = Index("ix_studies_study_datetime", Study.__table__.c.study_datetime)


class DeliveryState(StrEnum):
    """Life of a delivery: pending -> sent | failed; ``ichvol redeliver`` makes failed ones pending."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Delivery(Base):
    """One result's DICOM objects (SR, SEG, overlay) sent to one PACS target.

    One row per (run, target): ``target`` is ``"stow"`` (DICOMweb STOW-RS) or ``"cstore"``
    (DIMSE C-STORE), ``destination`` the URL or ``AET@host:port`` (never credentials).
    ``attempts`` counts sends; ``last_error`` is the last failure's one-line reason;
    ``instances`` lists the objects of the last attempt, each ``{"kind", "sop_class_uid",
    "sop_instance_uid", "series_instance_uid"}``. When the study was measured before and
    that result's SR was sent, this delivery's SR replaces it: ``predecessor_sr_uid`` is the
    SOP Instance UID its Predecessor Documents Sequence names and ``replaces_delivery_id``
    the delivery that sent it (the same target's where there is one; NULL once that row is
    deleted). Written by :mod:`worker.delivery.deliveries`.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("run_id", "target"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index(None, "state", "updated_at"),
        Index(None, "result_id"),
        Index(None, "replaces_delivery_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(BigId, ForeignKey("runs.id", ondelete="CASCADE"))
    result_id: Mapped[int] = mapped_column(BigId, ForeignKey("results.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(
        Enum(
            DeliveryState,
            name="delivery_state",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=_enum_values,
            validate_strings=True,
        ),
        default=DeliveryState.PENDING,
        server_default=DeliveryState.PENDING.value,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[list[dict[str, str]] | None] = mapped_column(JsonDocument)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime | None] = mapped_column()
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column()
    sent_at: Mapped[dt.datetime | None] = mapped_column()
    replaces_delivery_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("deliveries.id", ondelete="SET NULL"))
    predecessor_sr_uid: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, run_id={self.run_id!r}, target={self.target!r}, state={self.state!r})"
