"""The options of a phantom study (:class:`PhantomSpec`) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.synth.phantom.dicom import (
    TRANSFER_SYNTAXES,
    StoredFormat,
    stored_format,
)
from worker.synth.phantom.lesions import LesionSpec

DISCLAIMER = "Synthetic phantom. Research use only, not for clinical use."
GENERATOR_NAME = "ichvol-phantom"
EXTRA_SERIES = ("scout", "secondary_capture", "thin")
MAX_VOXELS = 64_000_000  # per series (256 MB of float32 HU); refuse before allocating
DEFAULT_SLICES = 28


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that shapes a phantom study except the seed. All lengths in mm.

    Slice positions along the normal: ``gaps_mm`` (explicit gaps, ``n_slices`` then is
    ``len(gaps_mm) + 1``), or ``uneven=True`` (random gaps within ``uneven_gap_range_mm``),
    or even spacing ``slice_spacing_mm`` (default: ``slice_thickness_mm``, contiguous).
    ``first_position_mm`` places the first slice along the normal (any spacing);
    ``z_range_mm`` (first, last position along the normal; even spacing only) fixes the
    start and the count. Without either, the stack is centred on the head.
    """

    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: tuple[float, float] = (0.9, 0.9)  # (between rows, between columns)
    slice_thickness_mm: float = 5.0
    n_slices: int | None = None  # default 28
    slice_spacing_mm: float | None = None
    z_range_mm: tuple[float, float] | None = None
    first_position_mm: float | None = None  # position of the first slice along the normal
    gaps_mm: tuple[float, ...] | None = None
    uneven: bool = False
    uneven_gap_range_mm: tuple[float, float] = (1.0, 7.0)
    gantry_tilt_deg: float = 0.0
    recon_center_mm: tuple[float, float] = (0.0, 0.0)  # (x, y) LPS of the image centre
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0
    pixel_padding_value: int | None = None  # stored value outside the reconstruction circle
    transfer_syntax: str = "explicit"  # explicit, implicit, rle, jpegls, j2k
    lesions: tuple[LesionSpec, ...] = (LesionSpec("random"),)
    calcifications: bool = True
    noise_sigma_hu: float = 5.0
    noise_correlation_mm: float = 0.6
    partial_volume_mm: float = 0.45  # in-plane Gaussian sigma applied before noise
    skull_base: bool = True  # skull base, posterior fossa, face and neck (False: the first, bowl-shaped head)
    slab_samples: int = 1  # HU averaged over this many planes across the slice thickness (partial volume in z)
    beam_hardening: float = 0.0  # strength of beam-hardening streaks and cupping (0 off, 1 typical)
    mass_effect: float = 0.0  # 0..1: how far hematomas push the brain (ventricles, midline) aside
    patient_id: str | None = None  # default derived from the seed
    patient_name: str = "Phantom^Head"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_date: str = "20240115"
    study_time: str = "031500"
    accession_number: str | None = None  # default derived from the seed
    study_id: str = "1"
    study_description: str = "CT HEAD WO CONTRAST (PHANTOM)"
    series_number: int = 2
    series_description: str = "HEAD PHANTOM AXIAL"
    extra_series: tuple[str, ...] = ()  # scout, secondary_capture, thin
    random_file_names: bool = True
    nested_folders: bool = False
    shuffle_instance_numbers: bool = False
    file_extension: str = ".dcm"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        unbounded = (*self.recon_center_mm, self.rescale_intercept, self.first_position_mm or 0.0)
        need(
            all(math.isfinite(v) for v in unbounded),
            "recon_center_mm, rescale_intercept and first_position_mm must be finite numbers",
        )
        need(16 <= self.rows <= 2048 and 16 <= self.columns <= 2048, "rows and columns must be 16 to 2048")
        need(
            len(self.pixel_spacing_mm) == 2 and all(0.05 <= s <= 10.0 for s in self.pixel_spacing_mm),
            "pixel_spacing_mm must be two values from 0.05 to 10 mm",
        )
        need(0.1 <= self.slice_thickness_mm <= 20.0, "slice_thickness_mm must be 0.1 to 20 mm")
        need(self.n_slices is None or 1 <= self.n_slices <= 2000, "n_slices must be 1 to 2000")
        need(
            self.slice_spacing_mm is None or 0.1 <= self.slice_spacing_mm <= 20.0,
            "slice_spacing_mm must be 0.1 to 20",
        )
        if self.gaps_mm is not None:
            need(1 <= len(self.gaps_mm) <= 1999, "gaps_mm needs 1 to 1999 gaps")
            need(all(0.05 <= g <= 50.0 for g in self.gaps_mm), "every gap in gaps_mm must be 0.05 to 50 mm")
            need(not self.uneven, "give gaps_mm or uneven=True, not both")
            need(
                self.n_slices is None or self.n_slices == len(self.gaps_mm) + 1,
                f"n_slices={self.n_slices} disagrees with {len(self.gaps_mm)} gaps",
            )
        lo, hi = self.uneven_gap_range_mm
        need(0.05 <= lo <= hi <= 50.0, "uneven_gap_range_mm must be (low, high) with 0.05 <= low <= high <= 50")
        if self.z_range_mm is not None:
            need(self.z_range_mm[1] > self.z_range_mm[0], "z_range_mm must be (first, last) with last > first")
            need(self.gaps_mm is None and not self.uneven, "z_range_mm only works with even spacing")
            need(self.first_position_mm is None, "give z_range_mm or first_position_mm, not both")
        need(abs(self.gantry_tilt_deg) <= 40.0, "gantry_tilt_deg must be within +-40 degrees")
        need(
            self.transfer_syntax in TRANSFER_SYNTAXES,
            f"transfer_syntax must be one of {', '.join(TRANSFER_SYNTAXES)}",
        )
        need(all(e in EXTRA_SERIES for e in self.extra_series), f"extra_series items must be in {EXTRA_SERIES}")
        need(0.0 <= self.noise_sigma_hu <= 100.0, "noise_sigma_hu must be 0 to 100")
        need(0.0 <= self.noise_correlation_mm <= 5.0, "noise_correlation_mm must be 0 to 5")
        need(0.0 <= self.partial_volume_mm <= 5.0, "partial_volume_mm must be 0 to 5")
        need(1 <= self.slab_samples <= 9, "slab_samples must be 1 to 9")
        need(0.0 <= self.beam_hardening <= 3.0, "beam_hardening must be 0 to 3")
        need(0.0 <= self.mass_effect <= 1.0, "mass_effect must be 0 to 1")
        need(self.patient_sex in ("M", "F", "O"), "patient_sex must be M, F or O")
        for name in ("patient_birth_date", "study_date"):
            value = getattr(self, name)
            need(len(value) == 8 and value.isdigit(), f"{name} must be YYYYMMDD")
        need(len(self.study_time) >= 6 and self.study_time[:6].isdigit(), "study_time must be HHMMSS")
        need(1 <= self.series_number <= 9999, "series_number must be 1 to 9999")
        need(self.file_extension in ("", ".dcm", ".DCM", ".ima", ".IMA"), "file_extension: '', .dcm or .ima")
        fmt = stored_format(intercept=self.rescale_intercept, slope=self.rescale_slope)
        if self.pixel_padding_value is not None:
            lo_s, hi_s = fmt.stored_range
            need(
                lo_s <= self.pixel_padding_value <= hi_s,
                f"pixel_padding_value {self.pixel_padding_value} does not fit the stored range {lo_s}..{hi_s}",
            )
        for lesion in self.lesions:
            need(isinstance(lesion, LesionSpec), "lesions must be LesionSpec values")

    @property
    def stored_format(self) -> StoredFormat:
        return stored_format(intercept=self.rescale_intercept, slope=self.rescale_slope)
