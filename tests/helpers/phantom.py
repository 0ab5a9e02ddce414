"""Helpers for phantom tests: volume-error sweeps and DICOM read-back without the loader."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from worker.synth.phantom import LesionSpec, PhantomSpec, render_phantom

# A lesion centre (LPS mm, head centre at the origin) deep in the left hemisphere
# that holds lesions up to 60 mL for every seed's head.
DEEP_CENTER_MM = (24.0, 0.0, 8.0)


def ellipsoid_volume_error_pct(
    *,
    volume_ml: float,
    pixel_mm: float,
    gaps_mm: Sequence[float],
    tilt_deg: float,
    phase: float,
    seed: int,
    center_mm: tuple[float, float, float] = DEEP_CENTER_MM,
) -> float:
    """``(mask_volume - analytic_volume) / analytic_volume`` in % for one round lesion.

    The stack (``gaps_mm`` along the normal) is shifted so the lesion centre lies ``phase``
    (0..1) of the way through the middle gap, to sample every slice phase. The image
    (128 x 128 at ``pixel_mm``) is centred on the lesion; noise and blur are off (the mask
    does not depend on them).
    """
    g = np.asarray(gaps_mm, dtype=np.float64)
    t = math.radians(tilt_deg)
    s_center = center_mm[1] * math.sin(t) + center_mm[2] * math.cos(t)
    mid = len(g) // 2
    first = s_center - float(g[:mid].sum()) - phase * float(g[mid])
    spec = PhantomSpec(
        rows=128,
        columns=128,
        pixel_spacing_mm=(pixel_mm, pixel_mm),
        slice_thickness_mm=float(np.median(g)),
        gaps_mm=tuple(float(x) for x in g),
        first_position_mm=first,
        gantry_tilt_deg=tilt_deg,
        recon_center_mm=(center_mm[0], center_mm[1]),
        lesions=(LesionSpec("round", volume_ml=volume_ml, center_mm=center_mm, edema_rim_mm=0.0),),
        noise_sigma_hu=0.0,
        partial_volume_mm=0.0,
        calcifications=False,
    )
    rendered = render_phantom(spec, seed)
    return (rendered.mask_volume_ml - rendered.analytic_volume_ml) / rendered.analytic_volume_ml * 100.0


def read_series(study_dir: Path, series_instance_uid: str) -> dict[str, pydicom.Dataset]:
    """Every image of one series under ``study_dir`` (recursively), by SOP Instance UID."""
    out = {}
    for path in sorted(study_dir.rglob("*")):
        if not path.is_file() or "truth" in path.relative_to(study_dir).parts:
            continue
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == series_instance_uid:
            out[str(ds.SOPInstanceUID)] = ds
    return out


def voxel_centres_mm(ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    """Voxel centres (rows, columns, 3) in LPS mm straight from the DICOM tags."""
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r = np.arange(int(ds.Rows))[:, None, None]
    c = np.arange(int(ds.Columns))[None, :, None]
    return np.asarray(ipp + c * dc * iop[:3] + r * dr * iop[3:], dtype=np.float64)


def hu_from_dataset(ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


#: A tiny phantom study (48 x 48 pixels of 4.5 mm, 6 slices of 8 mm, one 15 mL round lesion):
#: the studies of a "site" in the adaptation and distillation tests.
TINY_SITE_STUDY = PhantomSpec(
    rows=48,
    columns=48,
    pixel_spacing_mm=(4.5, 4.5),
    slice_thickness_mm=8.0,
    n_slices=6,
    first_position_mm=-10.0,
    lesions=(LesionSpec("round", volume_ml=15.0),),
)


def write_small_site(root: Path, *, nest_first: bool = False) -> Path:
    """Six tiny phantom studies ``study-0`` .. ``study-5`` (seeds 40-45) and a ``no-images``
    folder with only a text file, under ``root``; ``nest_first`` puts study-0's files one
    folder deeper (``study-0/nested``)."""
    from worker.synth.phantom import generate_study

    for i in range(6):
        generate_study(
            root / f"study-{i}" / ("nested" if nest_first and i == 0 else ""), spec=TINY_SITE_STUDY, seed=40 + i
        )
    (root / "no-images").mkdir()
    (root / "no-images" / "notes.txt").write_text("no images here")
    return root
