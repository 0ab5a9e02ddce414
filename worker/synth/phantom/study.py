"""Writing a phantom as a DICOM study with its truth files (``truth.json``, ``truth_mask.npz``).

Research use only, not for clinical use. See docs/phantoms.md for the truth contract.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

import worker
from worker.synth.phantom.dicom import (
    TRANSFER_SYNTAXES,
    ImagePlane,
    SeriesHeader,
    StudyIdentity,
    build_image,
    write_image,
)
from worker.synth.phantom.geometry import PhantomGeometry, SampleGrid
from worker.synth.phantom.lesions import LesionSpec
from worker.synth.phantom.render import (
    STREAM_FILES,
    STREAM_NOISE_SCOUT,
    STREAM_NOISE_THIN,
    RenderedPhantom,
    build_geometry,
    render_phantom,
    render_series,
    slice_positions_mm,
    stream_rng,
)
from worker.synth.phantom.spec import DISCLAIMER, GENERATOR_NAME, PhantomSpec


@dataclass(frozen=True)
class PhantomTruth:
    """What ``generate_study`` wrote and the truth about it (also in ``truth_dir``)."""

    study_dir: Path
    truth_dir: Path
    study_instance_uid: str
    series_instance_uid: str
    analytic_volume_ml: float
    mask_volume_ml: float
    lesions: tuple[dict[str, Any], ...]
    mask: npt.NDArray[np.uint8] = field(repr=False)
    sop_instance_uids: tuple[str, ...] = field(repr=False)


# ---------------------------------------------------------------------------------------
# DICOM study


def _spec_digest(spec: PhantomSpec) -> str:
    return hashlib.sha256(repr(spec).encode("utf-8")).hexdigest()[:16]


def _uid(seed: int, digest: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=[GENERATOR_NAME, str(seed), digest, *(str(p) for p in parts)]))


class _FileNamer:
    """File paths for one study: random-ish or ordered names, flat or nested like real exports."""

    def __init__(self, study_dir: Path, spec: PhantomSpec, rng: np.random.Generator) -> None:
        self.study_dir = study_dir
        self.spec = spec
        self.rng = rng
        self.used: set[str] = set()

    def path(self, series_number: int, instance_number: int) -> Path:
        folder = self.study_dir
        if self.spec.nested_folders:
            folder = folder / "DICOM" / "ST000001" / f"SE{series_number:06d}"
        if self.spec.random_file_names:
            name = f"{int(self.rng.integers(0, 1 << 32)):08X}{self.spec.file_extension}"
            while name in self.used:
                name = f"{int(self.rng.integers(0, 1 << 32)):08X}{self.spec.file_extension}"
        else:
            name = f"S{series_number:04d}I{instance_number:05d}{self.spec.file_extension}"
        self.used.add(name)
        return folder / name


def _orientation(g: PhantomGeometry) -> tuple[float, float, float, float, float, float]:
    r, c = g.row_cosine, g.column_cosine
    return (r[0], r[1], r[2], c[0], c[1], c[2])


def _outside_fov(rows: int, columns: int) -> npt.NDArray[np.bool_]:
    """Pixels outside the reconstruction circle inscribed in the image."""
    r = np.arange(rows) - 0.5 * (rows - 1)
    c = np.arange(columns) - 0.5 * (columns - 1)
    radius = 0.5 * min(rows, columns)
    return np.asarray((r[:, None] ** 2 + c[None, :] ** 2) > radius**2)


def _write_series(
    *,
    hu: npt.NDArray[np.float32],
    geometry: PhantomGeometry,
    study: StudyIdentity,
    header: SeriesHeader,
    spec: PhantomSpec,
    seed: int,
    digest: str,
    namer: _FileNamer,
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """Write one axial series (slices in sorted order); returns the SOP Instance UIDs in that order."""
    fmt = spec.stored_format
    n = geometry.n_slices
    numbers = np.arange(1, n + 1)
    if spec.shuffle_instance_numbers:
        numbers = rng.permutation(numbers)
    outside = _outside_fov(geometry.rows, geometry.columns) if spec.pixel_padding_value is not None else None
    orientation = _orientation(geometry)
    uids = []
    for k in range(n):
        sop_uid = _uid(seed, digest, "sop", header.series_instance_uid, k)
        stored = fmt.to_stored(hu[k])
        if outside is not None and spec.pixel_padding_value is not None:
            stored[outside] = spec.pixel_padding_value
        plane = ImagePlane(
            image_position_mm=geometry.image_positions_mm[k],
            image_orientation=orientation,
            pixel_spacing_mm=geometry.pixel_spacing_mm,
            slice_thickness_mm=geometry.slice_thickness_mm,
            slice_location_mm=geometry.positions_mm[k],
            gantry_tilt_deg=geometry.gantry_tilt_deg,
        )
        ds = build_image(
            study=study,
            series=header,
            sop_instance_uid=sop_uid,
            instance_number=int(numbers[k]),
            plane=plane,
            stored=stored,
            fmt=fmt,
            pixel_padding_value=spec.pixel_padding_value,
        )
        write_image(ds, namer.path(header.series_number, int(numbers[k])), transfer_syntax=spec.transfer_syntax)
        uids.append(sop_uid)
    return tuple(uids)


def _scout(
    rendered: RenderedPhantom, *, spec: PhantomSpec, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], ImagePlane]:
    """A coronal localizer (256 mm square, 2 mm pixels), radiograph-like.

    Each pixel is the water-equivalent path length through the head along y,
    ``sum(max(HU + 1000, 0) / 1000) * step`` in mm, shown as ``-1000 + 12 * path`` so air
    stays -1000 and bone is bright.
    """
    size, spacing, step = 128, 2.0, 2.0
    c = rendered.head.inner_table.center_mm
    x0 = spec.recon_center_mm[0] - 0.5 * (size - 1) * spacing
    z_top = c[2] + 0.5 * (size - 1) * spacing
    xs = x0 + np.arange(size) * spacing
    zs = z_top - np.arange(size) * spacing
    ys = c[1] + np.arange(-120.0, 120.0 + step / 2, step)
    grid = SampleGrid(x=xs[None, None, :], y=ys[:, None, None], z=zs[None, :, None], shape=(len(ys), size, size))
    path_mm = np.maximum(rendered.head.render(grid) + 1000.0, 0.0).sum(axis=0) / 1000.0 * step
    image = -1000.0 + 12.0 * path_mm + rng.normal(0.0, 4.0, path_mm.shape)
    plane = ImagePlane(
        image_position_mm=(float(x0), float(c[1]), float(z_top)),
        image_orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=None,
        slice_location_mm=None,
    )
    return image.astype(np.float32), plane


def _render_thin(
    rendered: RenderedPhantom, *, spec: PhantomSpec, seed: int
) -> tuple[npt.NDArray[np.float32], PhantomGeometry]:
    """The same head and lesions as a contiguous 1-mm series over the same range (noisier)."""
    pos = rendered.geometry.positions_mm
    thin_spec = replace(
        spec,
        slice_thickness_mm=1.0,
        slice_spacing_mm=1.0,
        gaps_mm=None,
        uneven=False,
        n_slices=None,
        z_range_mm=(pos[0], pos[-1]) if len(pos) > 1 else (pos[0], pos[0] + 1.0),
    )
    positions = slice_positions_mm(
        thin_spec, head=rendered.head, tilt_rad=math.radians(spec.gantry_tilt_deg), seed=seed
    )
    geometry = build_geometry(thin_spec, positions_mm=positions)
    hu, _ = render_series(
        geometry,
        head=rendered.head,
        lesions=rendered.lesion_shapes,
        partial_volume_mm=spec.partial_volume_mm,
        noise_sigma_hu=spec.noise_sigma_hu * 2.0,
        noise_correlation_mm=spec.noise_correlation_mm,
        rng=stream_rng(seed, STREAM_NOISE_THIN),
    )
    return hu, geometry


def _write_extra_series(
    rendered: RenderedPhantom,
    *,
    spec: PhantomSpec,
    seed: int,
    digest: str,
    study: StudyIdentity,
    namer: _FileNamer,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    fmt = spec.stored_format
    for kind in spec.extra_series:
        if kind == "thin":
            hu, geometry = _render_thin(rendered, spec=spec, seed=seed)
            header = SeriesHeader(
                series_instance_uid=_uid(seed, digest, "series", "thin"),
                series_number=spec.series_number + 1,
                series_description="HEAD PHANTOM 1mm",
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            )
            _write_series(
                hu=hu,
                geometry=geometry,
                study=study,
                header=header,
                spec=spec,
                seed=seed,
                digest=digest,
                namer=namer,
                rng=stream_rng(seed, STREAM_FILES + 10),
            )
            out.append(
                {
                    "kind": kind,
                    "series_instance_uid": header.series_instance_uid,
                    "n_images": geometry.n_slices,
                }
            )
            continue
        if kind == "scout":
            image, plane = _scout(rendered, spec=spec, rng=stream_rng(seed, STREAM_NOISE_SCOUT))
            header = SeriesHeader(
                series_instance_uid=_uid(seed, digest, "series", "scout"),
                series_number=1,
                series_description="SCOUT",
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            )
            window = (40.0, 400.0)
        else:  # secondary_capture: an annotated screenshot of the middle slice ("Exam Summary")
            k = rendered.geometry.n_slices // 2
            image = rendered.hu[k].copy()
            image[4:12, 4 : max(8, image.shape[1] // 3)] = 3000.0  # burned-in "text"
            image[16:22, 4 : max(8, image.shape[1] // 4)] = 3000.0
            g = rendered.geometry
            plane = ImagePlane(
                image_position_mm=g.image_positions_mm[k],
                image_orientation=_orientation(g),
                pixel_spacing_mm=g.pixel_spacing_mm,
                slice_thickness_mm=None,
                slice_location_mm=None,
            )
            header = SeriesHeader(
                series_instance_uid=_uid(seed, digest, "series", "sc"),
                series_number=999,
                series_description="Exam Summary",
                image_type=("DERIVED", "SECONDARY"),
                sop_class_uid=SecondaryCaptureImageStorage,
            )
            window = (40.0, 80.0)
        sop_uid = _uid(seed, digest, "sop", header.series_instance_uid, 0)
        ds = build_image(
            study=study,
            series=header,
            sop_instance_uid=sop_uid,
            instance_number=1,
            plane=plane,
            stored=fmt.to_stored(image),
            fmt=fmt,
            window=window,
        )
        write_image(ds, namer.path(header.series_number, 1), transfer_syntax=spec.transfer_syntax)
        out.append({"kind": kind, "series_instance_uid": header.series_instance_uid, "n_images": 1})
    return out


def _write_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """An ``.npz`` (readable by ``np.load``) with fixed zip timestamps, so equal data give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def generate_study(study_dir: Path, *, spec: PhantomSpec, seed: int, truth_dir: Path | None = None) -> PhantomTruth:
    """Write one phantom study (DICOM) into ``study_dir`` and its truth into ``truth_dir``.

    ``study_dir`` must be new or empty. ``truth_dir`` defaults to ``study_dir / "truth"``
    (``truth.json`` and ``truth_mask.npz``; non-DICOM files that loaders skip). Raises
    ``ValueError`` with one clear line for an impossible spec.
    """
    study_dir = Path(study_dir)
    if study_dir.exists() and (not study_dir.is_dir() or any(study_dir.iterdir())):
        raise ValueError(f"{study_dir} is not an empty folder: phantoms are written into a new or empty one")
    rendered = render_phantom(spec, seed)
    digest = _spec_digest(spec)
    truth_dir = Path(truth_dir) if truth_dir is not None else study_dir / "truth"
    study = StudyIdentity(
        study_instance_uid=_uid(seed, digest, "study"),
        frame_of_reference_uid=_uid(seed, digest, "frame"),
        patient_id=spec.patient_id if spec.patient_id is not None else f"PHANTOM-{seed}",
        patient_name=spec.patient_name,
        patient_birth_date=spec.patient_birth_date,
        patient_sex=spec.patient_sex,
        study_date=spec.study_date,
        study_time=spec.study_time,
        accession_number=spec.accession_number
        if spec.accession_number is not None
        else f"PH{int(hashlib.sha256(f'{seed}{digest}'.encode()).hexdigest()[:12], 16) % 10**10:010d}",
        study_id=spec.study_id,
        study_description=spec.study_description,
    )
    header = SeriesHeader(
        series_instance_uid=_uid(seed, digest, "series", "main"),
        series_number=spec.series_number,
        series_description=spec.series_description,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    )
    study_dir.mkdir(parents=True, exist_ok=True)
    namer = _FileNamer(study_dir, spec, stream_rng(seed, STREAM_FILES))
    sop_uids = _write_series(
        hu=rendered.hu,
        geometry=rendered.geometry,
        study=study,
        header=header,
        spec=spec,
        seed=seed,
        digest=digest,
        namer=namer,
        rng=stream_rng(seed, STREAM_FILES + 1),
    )
    extra = _write_extra_series(rendered, spec=spec, seed=seed, digest=digest, study=study, namer=namer)
    g = rendered.geometry
    truth = {
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
        "patient_id": study.patient_id,
        "generator": {"name": GENERATOR_NAME, "version": worker.__version__},
        "seed": seed,
        "spec_digest": digest,
        "geometry": {
            "rows": g.rows,
            "columns": g.columns,
            "pixel_spacing_mm": list(g.pixel_spacing_mm),
            "slice_thickness_mm": g.slice_thickness_mm,
            "positions_mm": list(g.positions_mm),
            "slab_thickness_mm": list(g.slab_thickness_mm),
            "gantry_tilt_deg": g.gantry_tilt_deg,
            "rescale_intercept": float(spec.rescale_intercept),
            "rescale_slope": float(spec.rescale_slope),
            "transfer_syntax_uid": str(TRANSFER_SYNTAXES[spec.transfer_syntax]),
            "row_cosine": list(g.row_cosine),
            "column_cosine": list(g.column_cosine),
            "image_positions_mm": [list(p) for p in g.image_positions_mm],
            "pixel_padding_value": spec.pixel_padding_value,
        },
        "lesions": list(rendered.lesions),
        "analytic_volume_ml": rendered.analytic_volume_ml,
        "mask_volume_ml": rendered.mask_volume_ml,
        "extra_series": extra,
        "disclaimer": DISCLAIMER,
    }
    truth_dir.mkdir(parents=True, exist_ok=True)
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    mask = rendered.mask
    _write_npz(truth_dir / "truth_mask.npz", {"mask": mask, "sop_instance_uids": np.asarray(sop_uids, dtype=str)})
    return PhantomTruth(
        study_dir=study_dir,
        truth_dir=truth_dir,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        analytic_volume_ml=rendered.analytic_volume_ml,
        mask_volume_ml=rendered.mask_volume_ml,
        lesions=rendered.lesions,
        mask=mask,
        sop_instance_uids=sop_uids,
    )


# Lesion sets cycled by generate_batch: each kind alone, combinations, and none.
BATCH_LESION_SETS: tuple[tuple[str, ...], ...] = (
    ("round",),
    ("irregular",),
    ("intraventricular",),
    ("subdural",),
    ("epidural",),
    ("round", "intraventricular"),
    (),
    ("irregular", "subdural"),
)


def generate_batch(out_dir: Path, *, n: int, seed: int, spec: PhantomSpec | None = None) -> list[PhantomTruth]:
    """Write ``n`` studies into ``out_dir/<name>/`` cycling through :data:`BATCH_LESION_SETS`.

    ``spec`` sets everything but the lesions (and patient identifiers, derived per study).
    Study ``i`` uses a seed derived from ``(seed, i)``; its name says its lesions.
    """
    if not 1 <= n <= 100_000:
        raise ValueError(f"n must be 1 to 100000, got {n}")
    base = spec or PhantomSpec()
    out_dir = Path(out_dir)
    truths = []
    for i in range(n):
        kinds = BATCH_LESION_SETS[i % len(BATCH_LESION_SETS)]
        study_seed = int(np.random.SeedSequence([seed & 0xFFFFFFFF, i]).generate_state(1)[0])
        study_spec = replace(
            base, lesions=tuple(LesionSpec(kind=k) for k in kinds), patient_id=None, accession_number=None
        )
        name = f"phantom-{i:04d}-{'-'.join(kinds) or 'none'}"
        truths.append(generate_study(out_dir / name, spec=study_spec, seed=study_seed))
    return truths
