"""The error hierarchy: permanent study errors with codes, transient infrastructure errors.

* :class:`StudyError` -- the study itself cannot be measured (bad or unusable input).
  It carries a stable :class:`ErrorCode` and one line a radiographer can act on.
  It is recorded and never retried; the CLI exits with code 2 and prints only the line.
* :class:`TransientError` -- S3, database or broker trouble. The worker retries with
  exponential backoff, then gives up with the run marked failed or dead.
* :class:`ConfigurationError` -- a setting is missing or malformed; fails at start.
* :class:`SoftTimeLimitReached` -- the task ran out of time; the run is recorded as failed
  (``time_limit``) and never retried. The task runner's own signal is turned into it by
  :mod:`worker.tasks.base`, so nothing below the tasks knows the task runner.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable reasons a study could not be measured (stored in the database)."""

    EMPTY_STUDY = "empty_study"
    NO_DICOM = "no_dicom"
    NO_CT_SERIES = "no_ct_series"
    NO_USABLE_SERIES = "no_usable_series"
    ONLY_LOCALIZERS = "only_localizers"
    ONLY_DERIVED = "only_derived"
    TOO_FEW_SLICES = "too_few_slices"
    INCONSISTENT_GEOMETRY = "inconsistent_geometry"
    MISSING_GEOMETRY = "missing_geometry"
    INVALID_GEOMETRY = "invalid_geometry"
    NOT_AXIAL = "not_axial"
    MISSING_PIXEL_DATA = "missing_pixel_data"
    TRUNCATED_FILE = "truncated_file"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    UNSUPPORTED_COMPRESSION = "unsupported_compression"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    MULTIFRAME_UNSUPPORTED = "multiframe_unsupported"
    TOO_LARGE = "too_large"
    TOO_MANY_FILES = "too_many_files"
    UNSAFE_PATH = "unsafe_path"
    TIME_LIMIT = "time_limit"
    MODEL_ERROR = "model_error"
    WORKER_LOST = "worker_lost"
    RETRIES_EXHAUSTED = "retries_exhausted"
    STUDY_CHANGED = "study_changed"
    MISSING_TRUTH = "missing_truth"
    INTERNAL = "internal"


class IchvolError(Exception):
    """Base of every error the project raises on purpose."""

    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StudyError(IchvolError):
    """A permanent problem with the study: recorded with its code, never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class TransientError(IchvolError):
    """Infrastructure trouble (S3, database, broker) that may pass: retried with backoff."""

    transient = True


class ConfigurationError(IchvolError):
    """A setting is missing or malformed (names the environment variable)."""


class ModelFileError(IchvolError):
    """A weights file is missing, unreadable, of the wrong format or fails its checksum."""


class SoftTimeLimitReached(IchvolError):
    """The task's soft time limit (``ICHVOL_SOFT_TIME_LIMIT_S``) was reached while it ran.

    Raised wherever the code happens to be, like an interrupt: broad "bad input"
    handlers must let it pass (:func:`worker.imaging.dicom_files.must_propagate`).
    """
