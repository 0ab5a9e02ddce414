"""The one settings object, built from environment variables.

Nothing else in the project reads the environment: every module takes a
:class:`Settings` (or the few values it needs) as an argument. Each field names
its variable, default and meaning in one place, and the README's settings table
is rendered from these declarations (a test keeps the two identical).

Missing or malformed values fail at start with the variable's name.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ConfigurationError

_UNSET: Any = object()


def _setting(env: str, default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "secret": secret})


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _parse_optional_str(raw: str) -> str | None:
    return raw if raw.strip() else None


def _parse_positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a positive number, got {raw!r}")
    return value


def _parse_nonnegative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a number >= 0, got {raw!r}")
    return value


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _parse_nonnegative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {raw!r}")
    return value


def _parse_probability(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value < 1.0:
        raise ValueError(f"expected a number strictly between 0 and 1, got {raw!r}")
    return value


def _default_work_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "ichvol")


@dataclass(frozen=True)
class Settings:
    """Every tunable of the system. Units are in the field names."""

    # --- model and segmentation ---------------------------------------------------------
    model_path: str | None = _setting(
        "ICHVOL_MODEL", None, "Path of a `.keras` weights file; empty: the default shipped in the package."
    )
    threshold: float = _setting("ICHVOL_THRESHOLD", 0.5, "Probability above which a pixel is hematoma.")
    min_component_ml: float = _setting(
        "ICHVOL_MIN_COMPONENT_ML",
        0.05,
        "Connected components (3-D, 26-connected) smaller than this many mL are removed.",
    )
    restrict_to_intracranial: bool = _setting(
        "ICHVOL_INTRACRANIAL_ONLY",
        True,
        "Keep predictions inside the skull-enclosed space (built from bone HU).",
    )
    inference_batch_size: int = _setting("ICHVOL_BATCH_SIZE", 8, "Slices per model call.")
    inference_threads: int = _setting(
        "ICHVOL_INFERENCE_THREADS", 0, "TensorFlow intra-op threads per process; 0: all cores."
    )
    # --- series selection ----------------------------------------------------------------
    series_max_tilt_deg: float = _setting(
        "ICHVOL_SERIES_MAX_TILT_DEG",
        30.0,
        "Largest angle between slice normal and patient z for an axial series.",
    )
    series_min_slices: int = _setting("ICHVOL_SERIES_MIN_SLICES", 5, "Series with fewer slices are rejected.")
    series_preferred_thickness_mm: float = _setting(
        "ICHVOL_SERIES_PREFERRED_THICKNESS_MM", 5.0, "Among usable series, prefer slice thickness near this."
    )
    max_slice_pixels: int = _setting(
        "ICHVOL_MAX_SLICE_PIXELS", 2048 * 2048, "Refuse slices with more pixels than this (rows x columns)."
    )
    max_slices: int = _setting("ICHVOL_MAX_SLICES", 2000, "Refuse series with more slices than this.")
    max_files: int = _setting("ICHVOL_MAX_FILES", 20000, "Refuse study folders with more files than this.")
    # --- services -------------------------------------------------------------------------
    database_url: str = _setting(
        "ICHVOL_DATABASE_URL",
        "postgresql+psycopg2://postgres@127.0.0.1:5432/ichvol",
        "SQLAlchemy URL of the results database.",
        secret=True,
    )
    broker_url: str = _setting("ICHVOL_BROKER_URL", "redis://127.0.0.1:6379/0", "Celery broker URL.", secret=True)
    queue_name: str = _setting("ICHVOL_QUEUE", "ichvol", "Celery queue the studies are sent to.")
    s3_endpoint_url: str | None = _setting(
        "ICHVOL_S3_ENDPOINT_URL", None, "S3 endpoint (MinIO, SeaweedFS, ...); empty: AWS."
    )
    s3_region: str = _setting("ICHVOL_S3_REGION", "us-east-1", "S3 region name.")
    aws_access_key_id: str | None = _setting(
        "AWS_ACCESS_KEY_ID", None, "S3 access key; empty: boto3's own chain (role, profile).", secret=True
    )
    aws_secret_access_key: str | None = _setting(
        "AWS_SECRET_ACCESS_KEY", None, "S3 secret key; empty: boto3's own chain.", secret=True
    )
    export_bucket: str = _setting("ICHVOL_EXPORT_BUCKET", "pacs-export", "Bucket the PACS exports studies to.")
    export_prefix: str = _setting(
        "ICHVOL_EXPORT_PREFIX", "", "Prefix below which each first-level folder is one study."
    )
    results_bucket: str = _setting("ICHVOL_RESULTS_BUCKET", "ichvol-results", "Bucket the artefacts go to.")
    results_prefix: str = _setting("ICHVOL_RESULTS_PREFIX", "results", "Key prefix of the artefacts.")
    # --- scheduler ------------------------------------------------------------------------
    poll_interval_s: float = _setting("ICHVOL_POLL_INTERVAL_S", 60.0, "Seconds between two polls.")
    marker_name: str = _setting(
        "ICHVOL_MARKER_NAME", "_COMPLETE", "Object name that marks an exported study as complete."
    )
    quiet_period_s: float = _setting(
        "ICHVOL_QUIET_PERIOD_S", 120.0, "Without a marker, a study is complete when unchanged this long."
    )
    queued_timeout_s: float = _setting(
        "ICHVOL_QUEUED_TIMEOUT_S", 1800.0, "A run still queued after this long is sent again (lost message)."
    )
    max_attempts: int = _setting(
        "ICHVOL_MAX_ATTEMPTS", 3, "Deliveries of one run (worker lost, transient errors) before it is dead."
    )
    # --- worker ---------------------------------------------------------------------------
    soft_time_limit_s: float = _setting(
        "ICHVOL_SOFT_TIME_LIMIT_S", 600.0, "Per-study soft time limit; the run fails with `time_limit`."
    )
    hard_time_limit_s: float = _setting(
        "ICHVOL_HARD_TIME_LIMIT_S", 720.0, "Per-study hard time limit; the process is killed."
    )
    retry_backoff_s: float = _setting(
        "ICHVOL_RETRY_BACKOFF_S", 10.0, "First retry delay for transient errors; doubles each time."
    )
    retry_backoff_max_s: float = _setting("ICHVOL_RETRY_BACKOFF_MAX_S", 600.0, "Longest retry delay.")
    work_dir: str = _setting("ICHVOL_WORK_DIR", _UNSET, "Scratch folder for downloads and outputs.")
    task_always_eager: bool = _setting(
        "ICHVOL_TASK_ALWAYS_EAGER", False, "Run tasks in process (the embedded default; no broker)."
    )
    pinned_model_version: str | None = _setting(
        "ICHVOL_PINNED_MODEL_VERSION", None, "Model version the trend views report; empty: the latest."
    )
    # --- logging --------------------------------------------------------------------------
    log_level: str = _setting("ICHVOL_LOG_LEVEL", "INFO", "Log level.")
    log_format: str = _setting("ICHVOL_LOG_FORMAT", "text", "`text` or `json` (one object per line).")

    def __post_init__(self) -> None:
        if self.work_dir is _UNSET:
            object.__setattr__(self, "work_dir", _default_work_dir())
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ConfigurationError(
                "ICHVOL_HARD_TIME_LIMIT_S must be larger than ICHVOL_SOFT_TIME_LIMIT_S "
                f"({self.hard_time_limit_s} <= {self.soft_time_limit_s})"
            )
        if self.log_format not in {"text", "json"}:
            raise ConfigurationError(f"ICHVOL_LOG_FORMAT must be 'text' or 'json', got {self.log_format!r}")

    @property
    def visibility_timeout_s(self) -> float:
        """Redis visibility timeout: above the hard limit, or long studies are delivered twice."""
        return self.hard_time_limit_s * 2 + 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default: the process environment).

        ``overrides`` (field names) win over the environment; command-line flags use them.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name in env:
                raw = env[name]
                try:
                    values[f.name] = _parser_for(f)(raw)
                except (ValueError, TypeError) as exc:
                    raise ConfigurationError(f"{name}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked (safe to log or print)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if (f.metadata.get("secret") and value) else value
        return out


def _parser_for(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    special: dict[str, Callable[[str], Any]] = {
        "threshold": _parse_probability,
        "min_component_ml": _parse_nonnegative_float,
        "inference_threads": _parse_nonnegative_int,
        "quiet_period_s": _parse_nonnegative_float,
    }
    if f.name in special:
        return special[f.name]
    type_name = str(f.type)
    if type_name == "bool":
        return _parse_bool
    if type_name == "int":
        return _parse_positive_int
    if type_name == "float":
        return _parse_positive_float
    if type_name == "str | None":
        return _parse_optional_str
    return str


def settings_fields() -> list[dict[str, Any]]:
    """One dict per setting: ``env``, ``field``, ``default``, ``help`` (the README table's rows)."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if default is _UNSET:
            default = "<system temp>/ichvol"
        rows.append({"env": f.metadata["env"], "field": f.name, "default": default, "help": f.metadata["help"]})
    return rows


def settings_table_markdown() -> str:
    """The README's settings table, rendered from the declarations above."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for row in settings_fields():
        default = row["default"]
        shown = "(empty)" if default in (None, "") else f"`{default}`"
        lines.append(f"| `{row['env']}` | {shown} | {row['help']} |")
    return "\n".join(lines)
