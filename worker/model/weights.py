"""Weights files and their metadata, readable without TensorFlow.

A weights file is a Keras 3 ``.keras`` archive (a zip) to which the project adds one
member, ``ichvol.json``, holding :class:`ModelInfo`: architecture, dims, input size,
the HU window used for input normalisation, version, the training data description and
the decision threshold calibrated for these weights (``threshold``; 0.5 where a file
names none).
Because it is plain zip + JSON, the scheduler and a worker's parent process can read
the model name and version without importing TensorFlow.

The default weights ship inside the package (``worker/weights/``) with their SHA-256 in
a sidecar file; :func:`resolve_model_path` checks it before anything loads them.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from worker.core.errors import ModelFileError

if TYPE_CHECKING:
    from worker.core.settings import Settings

METADATA_MEMBER = "ichvol.json"
DEFAULT_WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
DEFAULT_WEIGHTS_NAME = "drunet_default.keras"
#: The decision threshold of weights whose metadata names none (a sigmoid's natural 0.5).
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ModelInfo:
    """What a weights file is. ``hu_window`` is (low, high) in HU; inputs map it to [-1, 1]."""

    name: str  # e.g. "DR-UNet"
    architecture: str  # "drunet" or "unet"
    dims: int
    input_size: int  # square input, pixels
    hu_window: tuple[float, float]
    version: str
    training_data: str = ""
    validation: dict[str, float] = field(default_factory=dict)
    created: str = ""
    sha256: str = ""  # of the whole file; filled when read from disk, never stored inside
    # Where the weights came from when they were derived from others (site adaptation,
    # distillation): the base model's version and sha256, the method, the data counts, the date.
    provenance: dict[str, Any] = field(default_factory=dict)
    # The decision threshold calibrated for these weights (probability; a pixel is hematoma
    # where the probability exceeds it). Used unless ICHVOL_THRESHOLD or --threshold says
    # otherwise; scripts/calibrate_threshold.py chooses and writes it.
    threshold: float = DEFAULT_THRESHOLD

    def decision_threshold(self, requested: float | None) -> float:
        """``requested`` (a setting or option) if given, else the threshold calibrated for these weights."""
        return self.threshold if requested is None else float(requested)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("sha256")
        data["hu_window"] = list(self.hu_window)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, sha256: str = "") -> ModelInfo:
        try:
            window = data["hu_window"]
            return cls(
                name=str(data["name"]),
                architecture=str(data["architecture"]),
                dims=int(data["dims"]),
                input_size=int(data["input_size"]),
                hu_window=(float(window[0]), float(window[1])),
                version=str(data["version"]),
                training_data=str(data.get("training_data", "")),
                validation={str(k): float(v) for k, v in dict(data.get("validation", {})).items()},
                created=str(data.get("created", "")),
                sha256=sha256,
                provenance=dict(data.get("provenance", {})),
                threshold=_probability(data.get("threshold", DEFAULT_THRESHOLD)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelFileError(f"weights metadata is incomplete or malformed: {exc}") from None


def _probability(value: Any) -> float:
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {value!r}")
    return number


class Segmenter(Protocol):
    """A loaded model: windowed slices in, hematoma probabilities out.

    ``predict`` takes ``(n, S, S)`` float32 images already windowed to [-1, 1] at the
    model's input size ``S`` and returns ``(n, S, S)`` float32 probabilities in [0, 1].
    """

    @property
    def info(self) -> ModelInfo: ...

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_path() -> Path:
    return DEFAULT_WEIGHTS_DIR / DEFAULT_WEIGHTS_NAME


def expected_default_sha256() -> str:
    sidecar = default_model_path().with_suffix(".sha256")
    try:
        return sidecar.read_text().split()[0].strip()
    except (OSError, IndexError):
        raise ModelFileError(f"the default weights checksum file {sidecar} is missing") from None


def resolve_model_path(model_path: str | Path | None) -> tuple[Path, bool]:
    """The weights file to use and whether it is the shipped default.

    ``model_path`` comes from ``--model`` or ``ICHVOL_MODEL``; ``None`` means the default,
    whose SHA-256 is verified against the sidecar file.
    """
    if model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        return path, False
    path = default_model_path()
    if not path.is_file():
        raise ModelFileError(f"the default weights {path} are missing from the installation")
    expected = expected_default_sha256()
    actual = sha256_of(path)
    if actual != expected:
        raise ModelFileError(
            f"the default weights {path.name} fail their checksum (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...): reinstall the package"
        )
    return path, True


def read_model_info(path: Path, *, sha256: str | None = None) -> ModelInfo:
    """Read the metadata of a weights file without loading the model (no TensorFlow)."""
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(METADATA_MEMBER)
    except KeyError:
        raise ModelFileError(f"{path.name} carries no {METADATA_MEMBER}: not an ichvol weights file") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path.name} is not a readable .keras file: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path.name}: metadata is not valid JSON: {exc}") from None
    return ModelInfo.from_json(data, sha256=sha256 if sha256 is not None else sha256_of(path))


def model_reference(settings: Settings) -> ModelInfo:
    """The configured model's metadata and checksum (``ICHVOL_MODEL``), read without TensorFlow."""
    path, _ = resolve_model_path(settings.model_path)
    return read_model_info(path)


def write_model_info(path: Path, info: ModelInfo) -> None:
    """Add (or replace) the metadata member of a saved ``.keras`` archive."""
    with zipfile.ZipFile(path) as archive:
        members = [(item, archive.read(item.filename)) for item in archive.infolist()]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w") as out:
        for item, data in members:
            if item.filename != METADATA_MEMBER:
                out.writestr(item, data)
        out.writestr(METADATA_MEMBER, json.dumps(info.to_json(), indent=2, sort_keys=True))
    tmp.replace(path)
