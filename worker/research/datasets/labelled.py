"""Labelled inputs of a dataset: 2-D image/mask folders and CT study folders with truth, by patient.

Images are windowed exactly as inference windows them (:mod:`worker.model.preprocess`); see
:mod:`worker.research.datasets.prepared` for the mappings. A patient is pseudonymised
(:func:`pseudonym`) before anything is stored, and splits are by patient, never by slice
(:func:`assign_splits`). Bad input raises :class:`worker.core.errors.StudyError` naming the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.core.errors import ErrorCode, StudyError
from worker.imaging.image_io import IMAGE_SUFFIXES, read_grey_uint8
from worker.model import preprocess

PATIENT_SALT = "ichvol-dataset:"
DEFAULT_PATIENT_PATTERN = r"^(?P<patient>.+?)[_\-. ]+\d+$"
MIN_IMAGE_SIDE = 16
UINT8_WINDOW = (0.0, 255.0)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# --- patients and splits -------------------------------------------------------------------


def pseudonym(patient: str) -> str:
    """The key stored for a patient: ``sha256("ichvol-dataset:" + patient)[:16]`` (hex)."""
    return hashlib.sha256((PATIENT_SALT + patient).encode("utf-8")).hexdigest()[:16]


def assign_splits(patients: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Map every distinct patient to ``"train"``, ``"val"`` or ``"test"``.

    Patients are sorted, shuffled with ``seed`` and cut by the fractions (rounded, at least
    one patient for a fraction above 0, and at least one patient left for training).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must leave patients for training")
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]

    def count(fraction: float) -> int:
        return 0 if fraction == 0 else max(1, round(len(unique) * fraction))

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n_val + n_test >= len(unique):
        raise StudyError(
            ErrorCode.TOO_FEW_SLICES,
            f"{len(unique)} patient(s) cannot be split into training, validation ({n_val}) and test ({n_test}) "
            "sets: add patients or lower the fractions",
        )
    split = {p: "val" for p in order[:n_val]}
    split |= {p: "test" for p in order[n_val : n_val + n_test]}
    split |= {p: "train" for p in order[n_val + n_test :]}
    return split


# --- 2-D image folders ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePair:
    """One labelled 2-D slice: the image, its mask, the patient it belongs to."""

    image: Path
    mask: Path
    key: str  # relative path without suffix, e.g. "P012/07"
    patient: str


def _image_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            raise StudyError(
                ErrorCode.INCONSISTENT_GEOMETRY,
                f"{found[key].relative_to(folder)} and {path.relative_to(folder)} have the same name: "
                "keep one file per slice",
            )
        found[key] = path
    return found


def _patient_of(key: str, pattern: re.Pattern[str]) -> str:
    parts = key.split("/")
    if len(parts) > 1:
        return parts[0]
    match = pattern.match(parts[0])
    if match and match.groupdict().get("patient"):
        return str(match.group("patient"))
    return parts[0]


def find_image_pairs(
    images_dir: Path, masks_dir: Path, *, patient_pattern: str = DEFAULT_PATIENT_PATTERN
) -> list[ImagePair]:
    """Pair every image with the mask of the same relative name (any image extension on either side).

    Raises :class:`StudyError` naming the files when a folder is missing or empty, or when
    an image has no mask or a mask no image. ``patient_pattern`` is a regular expression
    with a group ``patient`` applied to the file name (without extension) of images in a
    flat folder; see the module docstring.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for label, folder in (("images", images_dir), ("masks", masks_dir)):
        if not folder.is_dir():
            raise StudyError(ErrorCode.EMPTY_STUDY, f"the {label} folder {folder} does not exist")
    try:
        pattern = re.compile(patient_pattern)
    except re.error as exc:
        raise StudyError(ErrorCode.INTERNAL, f"the patient pattern {patient_pattern!r} is not valid: {exc}") from None
    images, masks = _image_files(images_dir), _image_files(masks_dir)
    if not images:
        raise StudyError(ErrorCode.EMPTY_STUDY, f"no PNG, JPEG or BMP images in {images_dir}")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        problems = []
        if no_mask:
            names = ", ".join(str(images[k].relative_to(images_dir)) for k in no_mask[:3])
            problems.append(f"{len(no_mask)} image(s) without a mask in {masks_dir.name}/ (e.g. {names})")
        if no_image:
            names = ", ".join(str(masks[k].relative_to(masks_dir)) for k in no_image[:3])
            problems.append(f"{len(no_image)} mask(s) without an image in {images_dir.name}/ (e.g. {names})")
        raise StudyError(
            ErrorCode.INCONSISTENT_GEOMETRY,
            "; ".join(problems) + ": images and masks must have matching names",
        )
    return [ImagePair(images[k], masks[k], k, _patient_of(k, pattern)) for k in sorted(images)]


def load_image_pair(pair: ImagePair, *, input_size: int) -> tuple[F32, U8]:
    """One pair at model input size: image ``(1, S, S)`` float32 in [-1, 1], mask ``(1, S, S)`` uint8 0/1.

    The mask must be binary: only 0 and one other value (1 or 255). Raises
    :class:`StudyError` naming the file otherwise, or when the sizes differ.
    """
    image = read_grey_uint8(pair.image, label=f"image {pair.key}").pixels
    mask = read_grey_uint8(pair.mask, label=f"mask {pair.key}").pixels
    if image.shape != mask.shape:
        raise StudyError(
            ErrorCode.INCONSISTENT_GEOMETRY,
            f"{pair.key}: the image is {image.shape[0]}x{image.shape[1]} pixels but its mask "
            f"{mask.shape[0]}x{mask.shape[1]}",
        )
    if min(image.shape) < MIN_IMAGE_SIDE:
        raise StudyError(
            ErrorCode.INCONSISTENT_GEOMETRY,
            f"{pair.key}: {image.shape[0]}x{image.shape[1]} pixels is too small (at least {MIN_IMAGE_SIDE})",
        )
    values = np.unique(mask)
    present = {int(v) for v in values}
    if not (present <= {0, 1} or present <= {0, 255}):
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise StudyError(
            ErrorCode.CORRUPT_PIXEL_DATA,
            f"mask {pair.key} is not binary (values {shown}); masks hold 0 and 255 (or 0 and 1) only: "
            "save them as PNG, JPEG compression blurs their edges",
        )
    x, fit = preprocess.to_model_input(image[None].astype(np.float32), size=input_size, window=UINT8_WINDOW)
    y = preprocess.mask_to_model((mask[None] > 0).astype(np.uint8), fit)
    return x, y


# --- study folders -------------------------------------------------------------------------


def find_studies(root: Path) -> list[Path]:
    """The study folders of a dataset: the first-level sub-folders of ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise StudyError(ErrorCode.EMPTY_STUDY, f"the studies folder {root} does not exist")
    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not studies:
        raise StudyError(ErrorCode.EMPTY_STUDY, f"{root} holds no study folders (one sub-folder per study)")
    return studies


def study_patient(study_dir: Path, *, patient_key: str = "patient-id", max_files: int = 20000) -> str:
    """The patient key of a study folder: its DICOM PatientID (+ issuer), else the folder's name."""
    if patient_key == "folder":
        return Path(study_dir).name
    if patient_key != "patient-id":
        raise ValueError(f"patient_key must be 'patient-id' or 'folder', got {patient_key!r}")
    from worker.imaging.dicom_files import read_dataset, scan_study

    files = scan_study(Path(study_dir), max_files=max_files)
    ds = read_dataset(files.headers[0].path, forced=files.headers[0].forced, stop_before_pixels=True)
    patient_id = str(getattr(ds, "PatientID", "") or "").strip()
    issuer = str(getattr(ds, "IssuerOfPatientID", "") or "").strip()
    if not patient_id:
        return Path(study_dir).name
    return f"{issuer}/{patient_id}" if issuer else patient_id


def load_study_slices(
    study_dir: Path,
    *,
    input_size: int,
    window: tuple[float, float],
    labels: Sequence[int] | None = None,
    max_files: int = 20000,
) -> tuple[F32, U8]:
    """A study's slices at model input size and its truth, as inference would see them.

    Returns images ``(n, S, S)`` float32 in [-1, 1] and masks ``(n, S, S)`` uint8 0/1 in the
    series' sorted order. Raises :class:`StudyError` for an unusable study or truth.
    """
    from worker.imaging.dicom_load import load_study
    from worker.imaging.ground_truth import load_truth_mask
    from worker.imaging.series_selection import SelectionRules

    series = load_study(Path(study_dir), rules=SelectionRules(max_files=max_files))
    truth = load_truth_mask(Path(study_dir), series, labels=labels)
    x, fit = preprocess.to_model_input(series.hu, size=input_size, window=window)
    return x, preprocess.mask_to_model(truth, fit)
