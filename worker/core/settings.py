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

from worker.core.errors import ConfigurationError

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


def _parse_optional_probability(raw: str) -> float | None:
    return _parse_probability(raw) if raw.strip() else None


def _default_work_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "ichvol")


@dataclass(frozen=True)
class Settings:
    """Every tunable of the system. Units are in the field names."""

    # --- model and segmentation ---------------------------------------------------------
    model_path: str | None = _setting(
        "ICHVOL_MODEL", None, "Path of a `.keras` weights file; empty: the default shipped in the package."
    )
    threshold: float | None = _setting(
        "ICHVOL_THRESHOLD",
        None,
        "Probability above which a pixel is hematoma; empty: the threshold calibrated for the model "
        "(in its metadata; 0.5 where it names none; `ichvol model-info` shows it).",
    )
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
    growth: bool = _setting(
        "ICHVOL_GROWTH",
        True,
        "Seeded growth: grow the model's confident pieces into the connected blood-density region around "
        "them, per slice, inside the skull and away from bone (worker/seeded_growth.py).",
    )
    growth_hu_low: float = _setting("ICHVOL_GROWTH_HU_LOW", 50.0, "Lowest smoothed HU seeded growth may enter.")
    growth_hu_high: float = _setting("ICHVOL_GROWTH_HU_HIGH", 90.0, "Highest smoothed HU seeded growth may enter.")
    growth_seed_probability: float = _setting(
        "ICHVOL_GROWTH_SEED_PROBABILITY",
        0.8,
        "A piece of the mask seeds growth only if its highest probability reaches this.",
    )
    growth_max_distance_mm: float = _setting(
        "ICHVOL_GROWTH_MAX_DISTANCE_MM", 15.0, "How far (mm, in the slice) growth may go from a seed."
    )
    inference_batch_size: int = _setting("ICHVOL_BATCH_SIZE", 8, "Slices per model call.")
    inference_threads: int = _setting(
        "ICHVOL_INFERENCE_THREADS", 0, "TensorFlow intra-op threads per process; 0: all cores."
    )
    inference_engine: str = _setting(
        "ICHVOL_INFERENCE_ENGINE",
        "auto",
        "`auto` (the fastest engine measured for this CPU: `folded-bf16` where it has bfloat16 units, "
        "`onnx` on AMD CPUs without them, `folded` on any other CPU and with a GPU; the rule is "
        "`worker.model.engines.resolve_engine`), `folded` (BatchNorm folded into the convolutions, float32), "
        "`folded-bf16` (bfloat16 at the coarse levels only), `onnx` (ONNX Runtime, float32; needs the `fast` "
        "extra) or `keras` (the float32 reference). Every engine keeps volumes within 1 % of `keras` (tested); "
        "the engine used is recorded in result.json; see docs/performance.md.",
    )
    read_ahead: bool = _setting(
        "ICHVOL_READ_AHEAD",
        False,
        "While a study is measured, download and decode the oldest queued run in a thread, so the next "
        "study starts at inference (pays off with one worker per queue, e.g. a GPU node).",
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
    s3_connect_timeout_s: float = _setting(
        "ICHVOL_S3_CONNECT_TIMEOUT_S", 5.0, "Seconds an S3 connection may take before the request is retried."
    )
    s3_read_timeout_s: float = _setting(
        "ICHVOL_S3_READ_TIMEOUT_S", 60.0, "Seconds S3 may stay silent on a request before it is retried."
    )
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
    lost_run_grace_s: float = _setting(
        "ICHVOL_LOST_RUN_GRACE_S",
        60.0,
        "A run still `running` this long past the hard time limit lost its worker: queued again, or dead.",
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
    # --- PACS: results as DICOM (SR, SEG, overlay) to a PACS; a PACS as the study source ---
    pacs_delivery: str = _setting(
        "ICHVOL_PACS_DELIVERY",
        "",
        "Where results are sent after they are stored: empty (nowhere), `stow` (DICOMweb STOW-RS), "
        "`cstore` (DIMSE C-STORE) or `stow,cstore`.",
    )
    pacs_stow_url: str | None = _setting(
        "ICHVOL_PACS_STOW_URL", None, "DICOMweb root of the PACS for STOW-RS; instances go to `<url>/studies`."
    )
    pacs_token: str | None = _setting(
        "ICHVOL_PACS_TOKEN",
        None,
        "Bearer token for DICOMweb (STOW-RS, QIDO-RS, WADO-RS); wins over user and password.",
        secret=True,
    )
    pacs_username: str | None = _setting(
        "ICHVOL_PACS_USERNAME", None, "User for HTTP basic authentication to DICOMweb.", secret=True
    )
    pacs_password: str | None = _setting(
        "ICHVOL_PACS_PASSWORD", None, "Password for HTTP basic authentication to DICOMweb.", secret=True
    )
    pacs_verify_tls: bool = _setting("ICHVOL_PACS_VERIFY_TLS", True, "Check the DICOMweb server's TLS certificate.")
    pacs_ca_bundle: str | None = _setting(
        "ICHVOL_PACS_CA_BUNDLE", None, "CA bundle (PEM file) for the DICOMweb server's TLS; empty: the system's."
    )
    pacs_timeout_s: float = _setting(
        "ICHVOL_PACS_TIMEOUT_S", 60.0, "Seconds a PACS connection, request or DIMSE response may take."
    )
    pacs_cstore_host: str | None = _setting("ICHVOL_PACS_CSTORE_HOST", None, "Host of the PACS's DICOM (DIMSE) port.")
    pacs_cstore_port: int = _setting("ICHVOL_PACS_CSTORE_PORT", 104, "The PACS's DICOM port.")
    pacs_cstore_called_aet: str = _setting("ICHVOL_PACS_CSTORE_CALLED_AET", "ANY-SCP", "AE title of the PACS.")
    pacs_cstore_calling_aet: str = _setting(
        "ICHVOL_PACS_CSTORE_CALLING_AET", "ICHVOL", "Our AE title (the PACS must know it to accept stores)."
    )
    pacs_send_sr: bool = _setting("ICHVOL_PACS_SEND_SR", True, "Send the volume report (DICOM SR, TID 1500).")
    pacs_send_seg: bool = _setting("ICHVOL_PACS_SEND_SEG", True, "Send the mask (DICOM SEG).")
    pacs_send_overlay: bool = _setting(
        "ICHVOL_PACS_SEND_OVERLAY", True, "Send the overlay picture as a Secondary Capture (viewers without SEG)."
    )
    pacs_max_attempts: int = _setting(
        "ICHVOL_PACS_MAX_ATTEMPTS", 24, "Attempts per delivery before it is `failed` (`ichvol redeliver` resends)."
    )
    pacs_retry_backoff_s: float = _setting(
        "ICHVOL_PACS_RETRY_BACKOFF_S", 30.0, "First delay before a delivery is retried; doubles each time."
    )
    pacs_retry_backoff_max_s: float = _setting(
        "ICHVOL_PACS_RETRY_BACKOFF_MAX_S",
        600.0,
        "Longest delay between delivery attempts (keep it below the broker's visibility timeout).",
    )
    pacs_source_url: str | None = _setting(
        "ICHVOL_PACS_SOURCE_URL",
        None,
        "DICOMweb root to find new studies (QIDO-RS) and copy them (WADO-RS) into the export bucket; empty: off.",
    )
    pacs_source_modality: str = _setting(
        "ICHVOL_PACS_SOURCE_MODALITY", "CT", "Modality a PACS study must hold to be copied."
    )
    pacs_source_description: str | None = _setting(
        "ICHVOL_PACS_SOURCE_DESCRIPTION",
        None,
        "Only studies whose description contains one of these comma-separated words (any case); empty: all.",
    )
    pacs_source_lookback_h: float = _setting(
        "ICHVOL_PACS_SOURCE_LOOKBACK_H", 24.0, "Studies dated within this many hours are looked at."
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
        self._check_pacs()

    @property
    def pacs_targets(self) -> tuple[str, ...]:
        """The delivery targets named by ``ICHVOL_PACS_DELIVERY`` (``"stow"``, ``"cstore"``), in order."""
        names = [part.strip().lower() for part in self.pacs_delivery.split(",")]
        return tuple(dict.fromkeys(name for name in names if name))

    def _check_pacs(self) -> None:
        unknown = [name for name in self.pacs_targets if name not in {"stow", "cstore"}]
        if unknown:
            raise ConfigurationError(
                f"ICHVOL_PACS_DELIVERY must list 'stow' and/or 'cstore', got {self.pacs_delivery!r}"
            )
        if "stow" in self.pacs_targets and not self.pacs_stow_url:
            raise ConfigurationError("ICHVOL_PACS_STOW_URL is required when ICHVOL_PACS_DELIVERY names 'stow'")
        if "cstore" in self.pacs_targets and not self.pacs_cstore_host:
            raise ConfigurationError("ICHVOL_PACS_CSTORE_HOST is required when ICHVOL_PACS_DELIVERY names 'cstore'")
        urls = (("ICHVOL_PACS_STOW_URL", self.pacs_stow_url), ("ICHVOL_PACS_SOURCE_URL", self.pacs_source_url))
        for name, url in urls:
            if url and not url.startswith(("http://", "https://")):
                raise ConfigurationError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if self.pacs_targets and not (self.pacs_send_sr or self.pacs_send_seg or self.pacs_send_overlay):
            raise ConfigurationError(
                "ICHVOL_PACS_DELIVERY is set but ICHVOL_PACS_SEND_SR, _SEG and _OVERLAY are all false"
            )
        if not 0 < self.pacs_cstore_port < 65536:
            raise ConfigurationError(f"ICHVOL_PACS_CSTORE_PORT must be 1..65535, got {self.pacs_cstore_port}")
        for name, aet in (
            ("ICHVOL_PACS_CSTORE_CALLED_AET", self.pacs_cstore_called_aet),
            ("ICHVOL_PACS_CSTORE_CALLING_AET", self.pacs_cstore_calling_aet),
        ):
            if not 0 < len(aet.strip()) <= 16 or not aet.isascii() or "\\" in aet:
                raise ConfigurationError(f"{name} must be 1 to 16 ASCII characters without '\\', got {aet!r}")

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
        settings = cls(**values)
        if not settings.growth_hu_high > settings.growth_hu_low:
            raise ConfigurationError(
                f"ICHVOL_GROWTH_HU_HIGH ({settings.growth_hu_high}) must be above ICHVOL_GROWTH_HU_LOW "
                f"({settings.growth_hu_low})"
            )
        return settings

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
        "threshold": _parse_optional_probability,
        "growth_seed_probability": _parse_probability,
        "growth_hu_low": float,
        "growth_hu_high": float,
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
