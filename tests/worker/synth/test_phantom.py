"""Tests of the synthetic head-CT phantom (worker/phantom*.py).

Small grids throughout (64-128 pixels, few slices) so the file runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers.phantom import ellipsoid_volume_error_pct, hu_from_dataset, read_series, voxel_centres_mm
from worker.cli.research import phantom as phantom_command
from worker.core.settings import Settings
from worker.synth.phantom import (
    DISCLAIMER,
    LesionSpec,
    PhantomSpec,
    generate_batch,
    generate_study,
    render_hu,
    render_phantom,
)
from worker.synth.phantom.anatomy import HeadModel
from worker.synth.phantom.geometry import (
    Ellipsoid,
    SampleGrid,
    ellipsoid_union_volume_mm3,
    rotation_from_angles,
    slab_thickness_mm,
)
from worker.synth.phantom.lesions import (
    BLOOD_HU_RANGE,
    RIM_HU_RANGE,
    ExtraAxialLesion,
    Lesion,
    LobulatedLesion,
    VentricularLesion,
)
from worker.synth.phantom.placement import build_lesion

GE_GAPS_MM = (4.0,) * 13 + (1.08,) + (7.0,) * 13  # the real GE head CT's spacing along the normal

# A small, whole-head study: 96 x 96 pixels of 2.4 mm, 8 slices of 8 mm.
SMALL = PhantomSpec(
    rows=96,
    columns=96,
    pixel_spacing_mm=(2.4, 2.4),
    slice_thickness_mm=8.0,
    n_slices=8,
    lesions=(LesionSpec("round", volume_ml=20.0),),
)
CLEAN = {"noise_sigma_hu": 0.0, "partial_volume_mm": 0.0}


# ---------------------------------------------------------------------------------------
# Geometry and truth volumes (grid-independent)


def test_slab_thickness_is_half_gaps_and_single_gap_at_the_ends() -> None:
    slab = slab_thickness_mm([0.0, 4.0, 5.08, 12.08], single_slice_mm=5.0)
    np.testing.assert_allclose(slab, [4.0, 2.54, 4.04, 7.0])
    np.testing.assert_allclose(slab_thickness_mm([3.0], single_slice_mm=5.0), [5.0])


@pytest.mark.parametrize("volume_ml", [1.0, 20.0, 100.0])
def test_line_integration_matches_closed_form_for_rotated_ellipsoids(volume_ml: float) -> None:
    r = (volume_ml * 1000.0 * 3.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    e = Ellipsoid((3.3, -7.1, 12.0), (1.3 * r, r, r / 1.3), rotation_from_angles(0.4, 0.7, 1.1))
    assert ellipsoid_union_volume_mm3([e], step_mm=0.1) == pytest.approx(e.volume_mm3, rel=2e-4)


def test_line_integration_of_a_union_and_a_difference_matches_closed_form() -> None:
    r, d = 10.0, 12.0
    a = Ellipsoid((0.0, 0.0, 0.0), (r, r, r))
    b = Ellipsoid((d * 0.6, d * 0.8, 0.0), (r, r, r))  # centres d apart, not along an axis
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12.0  # volume of the overlap of two spheres
    sphere = 4.0 / 3.0 * math.pi * r**3
    assert ellipsoid_union_volume_mm3([a, b], step_mm=0.1) == pytest.approx(2 * sphere - lens, rel=3e-4)
    inner = Ellipsoid((1.0, 2.0, -1.0), (4.0, 5.0, 3.0))
    assert ellipsoid_union_volume_mm3([a], excluded=[inner], step_mm=0.1) == pytest.approx(
        sphere - inner.volume_mm3, rel=3e-4
    )
    # A cut at y >= 0 through the centre halves the sphere.
    assert ellipsoid_union_volume_mm3([a], y_min_mm=0.0, step_mm=0.1) == pytest.approx(sphere / 2, rel=3e-4)


def _monte_carlo_ml(lesion: Lesion, *, n: int, seed: int) -> tuple[float, float]:
    """Volume (mL) and its standard error by uniform sampling of a box around the lesion.

    The box is the extent of the lesion's surface points plus 3 mm; if it cut the shape,
    the estimate would fall short and the test fail, never pass wrongly.
    """
    pts = lesion.surface_points()
    lo, hi = pts.min(axis=0) - 3.0, pts.max(axis=0) + 3.0
    if isinstance(lesion, VentricularLesion):
        lo[1] = lesion.level_y_mm - 1.0  # blood only behind the fluid level
    rng = np.random.default_rng(seed)
    p = float(np.mean(lesion.contains(SampleGrid.from_points(rng.uniform(lo, hi, size=(n, 3))))))
    box_ml = float(np.prod(hi - lo)) / 1000.0
    return p * box_ml, math.sqrt(p * (1 - p) / n) * box_ml


@pytest.mark.parametrize(
    ("kind", "volume_ml", "side"),
    [
        ("subdural", 40.0, "left"),
        ("epidural", 25.0, "right"),
        ("irregular", 30.0, None),
        ("intraventricular", 6.0, "both"),
    ],
)
def test_analytic_volume_matches_monte_carlo_of_the_shape(kind: str, volume_ml: float, side: str | None) -> None:
    head = HeadModel.from_rng(np.random.default_rng(4))
    lesion = build_lesion(LesionSpec(kind, volume_ml=volume_ml, side=side), head=head, rng=np.random.default_rng(9))
    mc, se = _monte_carlo_ml(lesion, n=2_000_000, seed=1)
    assert lesion.analytic_volume_ml == pytest.approx(volume_ml, rel=0.01)  # the target is reached
    assert abs(mc - lesion.analytic_volume_ml) < 4 * se + 1e-3 * volume_ml
    assert 4 * se < 0.01 * volume_ml  # the check itself is tight enough to mean something


def test_same_seed_gives_the_same_head_and_lesions_on_any_grid() -> None:
    a = render_phantom(SMALL, 5)
    b = render_phantom(replace(SMALL, rows=64, columns=64, pixel_spacing_mm=(3.5, 3.5), gantry_tilt_deg=12.0), 5)
    assert a.lesions[0]["ellipsoids"] == b.lesions[0]["ellipsoids"]
    assert a.analytic_volume_ml == b.analytic_volume_ml
    assert a.head == b.head


# ---------------------------------------------------------------------------------------
# Mask volume against the truth


@pytest.mark.parametrize(
    ("volume_ml", "pixel_mm", "gaps_mm", "tilt_deg"),
    [
        (5.0, 0.5, (2.5,) * 30, 0.0),
        (5.0, 0.5, (2.5,) * 30, 18.5),
        (5.0, 0.7, tuple(np.random.default_rng(1).uniform(1.0, 3.0, 40)), 18.5),
        (20.0, 0.9, (5.0,) * 20, 0.0),
        (20.0, 0.5, (5.0,) * 20, 18.5),
        (20.0, 0.488, GE_GAPS_MM, 18.5),
        (20.0, 0.7, tuple(np.random.default_rng(0).uniform(1.0, 7.0, 30)), 18.5),
        (60.0, 0.9, (7.0,) * 16, 18.5),
    ],
)
def test_mask_volume_matches_analytic_volume_within_3_percent(
    volume_ml: float, pixel_mm: float, gaps_mm: tuple[float, ...], tilt_deg: float
) -> None:
    errors = [
        ellipsoid_volume_error_pct(
            volume_ml=volume_ml, pixel_mm=pixel_mm, gaps_mm=gaps_mm, tilt_deg=tilt_deg, phase=phase, seed=seed
        )
        for seed in (1, 2)
        for phase in (0.0, 0.25, 0.5, 0.75)
    ]
    assert max(abs(e) for e in errors) <= 3.0, errors


def test_mask_volume_error_vanishes_with_thin_slices() -> None:
    """The voxel mask samples the continuous shape: with 1-mm slices even 1 mL is within 2 %."""
    errors = [
        ellipsoid_volume_error_pct(volume_ml=1.0, pixel_mm=0.4, gaps_mm=(1.0,) * 40, tilt_deg=18.5, phase=p, seed=3)
        for p in (0.0, 0.5)
    ]
    assert max(abs(e) for e in errors) < 2.0, errors


@pytest.fixture(scope="module")
def tilted_uneven_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A written study: 18.5 degree tilt, GE-like uneven gaps, two lesions."""
    spec = replace(
        SMALL,
        rows=80,
        columns=80,
        pixel_spacing_mm=(2.6, 2.6),
        gaps_mm=(4.0, 4.0, 4.0, 1.08, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0),
        n_slices=None,
        first_position_mm=-30.0,
        gantry_tilt_deg=18.5,
        lesions=(LesionSpec("round", volume_ml=15.0, edema_rim_mm=3.0), LesionSpec("subdural", volume_ml=30.0)),
        shuffle_instance_numbers=True,
        nested_folders=True,
    )
    study_dir = tmp_path_factory.mktemp("tilted") / "study"
    return study_dir, generate_study(study_dir, spec=spec, seed=21)


def test_mask_is_exactly_the_voxel_centres_inside_the_recorded_ellipsoid(tilted_uneven_study: tuple) -> None:
    """Voxel centres from the written DICOM tags, tested against the ellipsoid in truth.json."""
    study_dir, truth = tilted_uneven_study
    series = read_series(study_dir, truth.series_instance_uid)
    record = json.loads((truth.truth_dir / "truth.json").read_text())["lesions"][0]
    assert record["kind"] == "round"
    (e,) = record["ellipsoids"]
    rot = np.asarray(e["rotation"])
    form = rot @ np.diag(1.0 / np.asarray(e["semi_axes_mm"]) ** 2) @ rot.T
    mask = np.load(truth.truth_dir / "truth_mask.npz")["mask"]
    slabs = json.loads((truth.truth_dir / "truth.json").read_text())["geometry"]["slab_thickness_mm"]
    volume_mm3 = 0.0
    for k, uid in enumerate(truth.sop_instance_uids):
        ds = series[uid]
        d = voxel_centres_mm(ds) - np.asarray(e["center_mm"])
        inside = np.einsum("rci,ij,rcj->rc", d, form, d) <= 1.0
        assert not (inside & (mask[k] == 0)).any()  # every voxel centre inside is in the mask
        volume_mm3 += float(inside.sum()) * float(np.prod([float(v) for v in ds.PixelSpacing])) * slabs[k]
    # ... and no other voxel belongs to this lesion: its own mask volume is exactly these voxels.
    assert volume_mm3 / 1000.0 == pytest.approx(record["mask_volume_ml"], rel=1e-9)
    assert record["mask_volume_ml"] > 5.0
    assert truth.mask_volume_ml > record["mask_volume_ml"]  # the subdural voxels are in the mask too


def test_independent_voxel_count_matches_mask_volume(tilted_uneven_study: tuple) -> None:
    """Slabs from IPP differences and the determinant of the direction matrix, not from truth."""
    study_dir, truth = tilted_uneven_study
    series = read_series(study_dir, truth.series_instance_uid)
    mask = np.load(truth.truth_dir / "truth_mask.npz")["mask"]
    by_uid = dict(zip(truth.sop_instance_uids, mask, strict=True))
    datasets = list(series.values())
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    # Sort by the third coordinate of IPP in the (row, column, normal) frame: solve, don't project.
    frame = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
    coords = [np.linalg.solve(frame, np.asarray([float(v) for v in ds.ImagePositionPatient])) for ds in datasets]
    order = np.argsort([c[2] for c in coords])
    ipps = np.asarray([[float(v) for v in datasets[i].ImagePositionPatient] for i in order])
    gaps = np.abs([np.linalg.det(np.stack([iop[:3], iop[3:], ipps[i + 1] - ipps[i]])) for i in range(len(ipps) - 1)])
    slabs = np.concatenate([[gaps[0]], 0.5 * (gaps[:-1] + gaps[1:]), [gaps[-1]]])
    area = float(np.prod([float(v) for v in datasets[0].PixelSpacing]))
    counts = [int(by_uid[str(datasets[i].SOPInstanceUID)].sum()) for i in order]
    volume_ml = float(np.dot(counts, slabs)) * area / 1000.0
    assert volume_ml == pytest.approx(truth.mask_volume_ml, rel=5e-3)
    assert volume_ml == pytest.approx(truth.mask_volume_ml, rel=1e-9)  # in fact exact
    assert sorted(set(np.round(gaps, 3))) == [1.08, 4.0, 7.0]


# ---------------------------------------------------------------------------------------
# Intensities, calcifications, rims


def test_blood_hu_rim_hu_and_calcifications_never_in_mask() -> None:
    spec = replace(
        SMALL,
        rows=96,
        columns=96,
        pixel_spacing_mm=(2.0, 2.0),
        slice_thickness_mm=3.0,
        n_slices=30,
        lesions=(
            LesionSpec("round", volume_ml=12.0, edema_rim_mm=4.0),
            LesionSpec("intraventricular", volume_ml=9.0, side="both"),
        ),
        **CLEAN,
    )
    r = render_phantom(spec, 8)
    grid = r.geometry.grid()
    mask = r.labels > 0
    assert mask.any()
    blood = r.hu[mask]
    assert blood.min() >= BLOOD_HU_RANGE[0]
    assert blood.max() <= BLOOD_HU_RANGE[1]
    # Calcifications: inside the blood-filled ventricle region yet never hematoma.
    calc = r.head.calcification_mask(grid)
    assert calc.any()
    assert not (calc & mask).any()
    ivh = r.lesion_shapes[1]
    filled = np.zeros(r.hu.shape, dtype=bool)
    for e in ivh.ventricle:  # type: ignore[attr-defined]
        filled |= e.contains(grid)
    filled &= np.broadcast_to(grid.y >= ivh.level_y_mm, r.hu.shape)  # type: ignore[attr-defined]
    assert (calc & filled).sum() > 0  # the choroid glomus sits in the blood, and stays out
    assert r.hu[calc].min() > 100.0
    # Edema rim: 15-25 HU where the rim shell meets brain tissue, never hematoma.
    shape = r.lesion_shapes[0]
    rim = shape.rim_contains(grid)
    assert rim is not None
    depth = np.broadcast_to(r.head.intracranial_depth_mm(grid), mask.shape)
    tissue = (depth > r.head.csf_mm) & ~r.head.ventricle_mask(grid) & ~calc
    rim_region = rim & ~mask & tissue
    assert rim_region.sum() > 20
    assert RIM_HU_RANGE[0] <= shape.rim_hu <= RIM_HU_RANGE[1]
    np.testing.assert_array_equal(r.hu[rim_region], np.float32(shape.rim_hu))
    # Painting order: blood covers the rim shell, so no hematoma voxel carries rim density.
    assert (rim & mask).any()
    assert not (mask & (r.hu == np.float32(shape.rim_hu))).any()


def test_noise_has_the_requested_sigma_and_blood_stays_in_range_on_average() -> None:
    spec = replace(SMALL, noise_sigma_hu=6.0, partial_volume_mm=0.0)
    noisy = render_phantom(spec, 3)
    clean = render_phantom(replace(spec, noise_sigma_hu=0.0), 3)
    inside_head = clean.hu > -500  # no clipping at -1024 there
    assert float(np.std((noisy.hu - clean.hu)[inside_head])) == pytest.approx(6.0, rel=0.05)
    assert BLOOD_HU_RANGE[0] <= float(noisy.hu[noisy.labels > 0].mean()) <= BLOOD_HU_RANGE[1]


def test_lesions_stay_inside_the_intracranial_space() -> None:
    spec = replace(
        SMALL, rows=64, columns=64, pixel_spacing_mm=(3.5, 3.5), n_slices=12, slice_thickness_mm=10.0, **CLEAN
    )
    kinds = ("subdural", "epidural", "round", "irregular", "intraventricular")
    for seed in range(5):
        lesions = tuple(LesionSpec(k) for k in (kinds[seed], "random"))
        r = render_phantom(replace(spec, lesions=lesions), seed)
        for shape in r.lesion_shapes:
            depth = r.head.intracranial_depth_mm(SampleGrid.from_points(shape.surface_points()))
            assert depth.min() >= -1e-6
        mask = r.labels > 0
        depth = r.head.intracranial_depth_mm(r.geometry.grid())
        assert np.broadcast_to(depth, mask.shape)[mask].min() >= 0.0
        assert r.hu[mask].max() <= BLOOD_HU_RANGE[1]  # no bone in the mask
        assert r.analytic_volume_ml == pytest.approx(sum(le["analytic_volume_ml"] for le in r.lesions))


def test_overlapping_lesions_and_impossible_sizes_are_refused() -> None:
    here = (28.0, 0.0, 10.0)
    spec = replace(
        SMALL, lesions=(LesionSpec("round", 10.0, center_mm=here), LesionSpec("round", 10.0, center_mm=here))
    )
    with pytest.raises(ValueError, match="overlaps another lesion"):
        render_hu(spec, 1)
    with pytest.raises(ValueError, match="outside the intracranial space"):
        render_hu(replace(SMALL, lesions=(LesionSpec("round", 10.0, center_mm=(64.0, 0.0, 0.0)),)), 1)
    with pytest.raises(ValueError, match="does not fit"):
        render_hu(replace(SMALL, lesions=(LesionSpec("intraventricular", 60.0, side="left"),)), 1)


@pytest.mark.parametrize("kind", ["round", "irregular", "intraventricular", "subdural", "epidural"])
def test_each_kind_reaches_its_target_volume(kind: str) -> None:
    volume = 4.0 if kind == "intraventricular" else 25.0
    r = render_phantom(replace(SMALL, lesions=(LesionSpec(kind, volume_ml=volume),), **CLEAN), 2)
    (record,) = r.lesions
    assert record["kind"] == kind
    assert record["analytic_volume_ml"] == pytest.approx(volume, rel=0.01)
    assert record["mask_volume_ml"] > 0
    assert isinstance(r.lesion_shapes[0], LobulatedLesion | ExtraAxialLesion) or kind == "intraventricular"


def test_no_lesion_gives_an_empty_mask() -> None:
    hu, mask, geometry = render_hu(replace(SMALL, lesions=()), 1)
    assert hu.shape == mask.shape == geometry.shape
    assert hu.dtype == np.float32
    assert mask.dtype == np.uint8
    assert not mask.any()


# ---------------------------------------------------------------------------------------
# DICOM


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    spec = replace(SMALL, n_slices=4, extra_series=("scout",), transfer_syntax="rle")
    a = generate_study(tmp_path / "a", spec=spec, seed=11)
    b = generate_study(tmp_path / "b", spec=spec, seed=11)
    c = generate_study(tmp_path / "c", spec=spec, seed=12)
    tree_a, tree_b, tree_c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert tree_a == tree_b
    assert len(tree_a) == 4 + 1 + 2
    assert a.study_instance_uid == b.study_instance_uid != c.study_instance_uid
    assert not np.array_equal(a.mask, c.mask) or a.analytic_volume_ml != c.analytic_volume_ml
    hu_a, _, _ = render_hu(spec, 11)
    hu_c, _, _ = render_hu(spec, 12)
    assert not np.array_equal(hu_a, hu_c)
    assert set(tree_a) != set(tree_c)  # file names come from the seed too


@pytest.mark.parametrize(
    ("syntax", "intercept", "slope", "padding"),
    [
        ("explicit", -1024.0, 1.0, None),
        ("implicit", 0.0, 1.0, -2000),
        ("rle", 0.0, 1.0, -2000),
        ("jpegls", -1024.0, 1.0, 0),
        ("j2k", -1024.0, 1.0, None),
        ("j2k", 0.0, 1.0, None),
        ("explicit", -1024.0, 0.5, None),
    ],
)
def test_written_pixels_decode_to_the_generated_hu(
    tmp_path: Path, syntax: str, intercept: float, slope: float, padding: int | None
) -> None:
    spec = replace(
        SMALL,
        rows=64,
        columns=64,
        pixel_spacing_mm=(3.4, 3.4),
        n_slices=3,
        slice_thickness_mm=20.0,
        transfer_syntax=syntax,
        rescale_intercept=intercept,
        rescale_slope=slope,
        pixel_padding_value=padding,
    )
    truth = generate_study(tmp_path / "s", spec=spec, seed=4)
    hu, _, _ = render_hu(spec, 4)
    series = read_series(tmp_path / "s", truth.series_instance_uid)
    for k, uid in enumerate(truth.sop_instance_uids):
        ds = series[uid]
        assert (
            ds.file_meta.TransferSyntaxUID
            == json.loads((truth.truth_dir / "truth.json").read_text())["geometry"]["transfer_syntax_uid"]
        )
        assert int(ds.PixelRepresentation) == (1 if intercept == 0.0 else 0)
        assert int(ds.BitsStored) == (12 if intercept == -1024.0 and slope == 1.0 else 16)
        stored = ds.pixel_array
        back = hu_from_dataset(ds)
        valid = np.ones(stored.shape, dtype=bool) if padding is None else stored != padding
        if padding is not None:
            assert int(ds.PixelPaddingValue) == padding
            assert (~valid).sum() > 0  # the corners outside the reconstruction circle
        assert np.abs(back - hu[k])[valid].max() <= slope / 2 + 1e-3


def test_series_has_what_highdicom_needs_for_a_seg(tilted_uneven_study: tuple) -> None:
    highdicom = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    study_dir, truth = tilted_uneven_study
    series = read_series(study_dir, truth.series_instance_uid)
    sources = [series[uid] for uid in truth.sop_instance_uids]
    first = sources[0]
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "SeriesNumber",
        "InstanceNumber",
        "FrameOfReferenceUID",
        "PixelSpacing",
        "SliceThickness",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "GantryDetectorTilt",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
    ):
        assert keyword in first, keyword
    assert first.Modality == "CT"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.Manufacturer == "ichvol phantom"
    assert float(first.GantryDetectorTilt) == pytest.approx(18.5)
    assert sorted(int(ds.InstanceNumber) for ds in sources) == list(range(1, len(sources) + 1))
    description = highdicom.seg.SegmentDescription(
        segment_number=1,
        segment_label="hematoma",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=truth.mask.astype(bool),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=highdicom.UID(),
        series_number=100,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer="ichvol",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert seg.StudyInstanceUID == truth.study_instance_uid


def test_truth_files_follow_the_contract(tilted_uneven_study: tuple) -> None:
    study_dir, truth = tilted_uneven_study
    assert truth.truth_dir == study_dir / "truth"
    data = json.loads((truth.truth_dir / "truth.json").read_text())
    assert data["study_instance_uid"] == truth.study_instance_uid
    assert data["series_instance_uid"] == truth.series_instance_uid
    assert data["generator"]["name"] == "ichvol-phantom"
    assert data["seed"] == 21
    assert data["disclaimer"] == DISCLAIMER == "Synthetic phantom. Research use only, not for clinical use."
    g = data["geometry"]
    for key in (
        "rows",
        "columns",
        "pixel_spacing_mm",
        "slice_thickness_mm",
        "positions_mm",
        "slab_thickness_mm",
        "gantry_tilt_deg",
        "rescale_intercept",
        "rescale_slope",
        "transfer_syntax_uid",
    ):
        assert key in g, key
    assert g["positions_mm"] == sorted(g["positions_mm"])
    assert len(g["slab_thickness_mm"]) == len(g["positions_mm"]) == 13
    assert [le["kind"] for le in data["lesions"]] == ["round", "subdural"]
    for le in data["lesions"]:
        assert {"kind", "analytic_volume_ml", "mask_volume_ml", "center_mm", "volume_method"} <= set(le)
    assert data["analytic_volume_ml"] == pytest.approx(sum(le["analytic_volume_ml"] for le in data["lesions"]))
    assert data["mask_volume_ml"] == pytest.approx(sum(le["mask_volume_ml"] for le in data["lesions"]))
    npz = np.load(truth.truth_dir / "truth_mask.npz")
    assert npz["mask"].dtype == np.uint8
    assert npz["mask"].shape == (13, 80, 80)
    assert tuple(str(u) for u in npz["sop_instance_uids"]) == truth.sop_instance_uids
    # Sorted along the normal, ascending, like the DICOM positions say.
    series = read_series(study_dir, truth.series_instance_uid)
    normal = np.cross(
        *np.reshape([float(v) for v in series[truth.sop_instance_uids[0]].ImageOrientationPatient], (2, 3))
    )
    pos = [float(np.dot(normal, [float(v) for v in series[u].ImagePositionPatient])) for u in truth.sop_instance_uids]
    np.testing.assert_allclose(pos, g["positions_mm"], atol=1e-4)


def test_extra_series_and_messy_layout(tmp_path: Path) -> None:
    spec = replace(SMALL, n_slices=4, extra_series=("scout", "secondary_capture", "thin"), nested_folders=True)
    truth = generate_study(tmp_path / "s", spec=spec, seed=2, truth_dir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "truth.json").is_file()
    assert not (tmp_path / "s" / "truth").exists()
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert all(p.parts[-4:-2] == ("DICOM", "ST000001") for p in files)
    datasets = [pydicom.dcmread(p) for p in files]
    assert {ds.StudyInstanceUID for ds in datasets} == {truth.study_instance_uid}
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    kinds = {tuple(ds.ImageType): ds for ds in datasets if ds.SeriesInstanceUID != truth.series_instance_uid}
    scout = kinds[("ORIGINAL", "PRIMARY", "LOCALIZER")]
    assert [float(v) for v in scout.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    sc = kinds[("DERIVED", "SECONDARY")]
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.Modality == "CT"  # like real "Exam Summary" screenshots
    thin = [ds for ds in datasets if ds.get("SeriesDescription") == "HEAD PHANTOM 1mm"]
    assert float(thin[0].SliceThickness) == 1.0
    assert len(thin) == 3 * 8 + 1  # 3 gaps of 8 mm at 1-mm spacing
    extra = json.loads((tmp_path / "elsewhere" / "truth.json").read_text())["extra_series"]
    assert sorted(e["kind"] for e in extra) == ["scout", "secondary_capture", "thin"]


def test_generate_study_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "old.dcm").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an empty folder"):
        generate_study(tmp_path / "s", spec=SMALL, seed=1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rows": 5000}, "rows and columns"),
        ({"transfer_syntax": "jpeg-lossy"}, "transfer_syntax"),
        ({"rescale_intercept": -1024.0, "pixel_padding_value": -2000}, "does not fit the stored range"),
        ({"gaps_mm": (4.0, 4.0), "n_slices": 8}, "disagrees"),
        ({"rescale_slope": 0.01}, "cannot store"),
        ({"gantry_tilt_deg": 60.0}, "gantry_tilt_deg"),
        ({"extra_series": ("mip",)}, "extra_series"),
    ],
)
def test_bad_specs_fail_with_one_clear_line(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **changes)


def test_bad_lesion_specs_fail_with_one_clear_line() -> None:
    with pytest.raises(ValueError, match="unknown lesion kind"):
        LesionSpec("hemangioma")
    with pytest.raises(ValueError, match="50 to 90 HU"):
        LesionSpec("round", mean_hu=120.0)
    with pytest.raises(ValueError, match="source_path"):
        LesionSpec("blast")


def test_generate_batch_varies_kinds(tmp_path: Path) -> None:
    spec = replace(SMALL, rows=64, columns=64, pixel_spacing_mm=(3.5, 3.5), n_slices=5, slice_thickness_mm=15.0)
    truths = generate_batch(tmp_path, n=3, seed=7, spec=spec)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["phantom-0000-round", "phantom-0001-irregular", "phantom-0002-intraventricular"]
    assert [t.lesions[0]["kind"] for t in truths] == ["round", "irregular", "intraventricular"]
    assert len({t.study_instance_uid for t in truths}) == 3
    assert all((t.truth_dir / "truth_mask.npz").is_file() for t in truths)


# ---------------------------------------------------------------------------------------
# Command line


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ichvol phantom")
    phantom_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_a_study_and_prints_the_true_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(
        [
            str(tmp_path / "out"),
            "--seed",
            "3",
            "--rows",
            "64",
            "--columns",
            "64",
            "--pixel-spacing",
            "3.5",
            "--slices",
            "5",
            "--slice-thickness",
            "15",
            "--lesion",
            "round:12",
            "--tilt",
            "18.5",
            "--patient-name",
            "Zzyzx^Quixotic",
            "--transfer-syntax",
            "jpegls",
        ]
    )
    assert phantom_command.run(args, Settings()) == 0
    out = capsys.readouterr().out
    truth = json.loads((tmp_path / "out" / "truth" / "truth.json").read_text())
    assert out.count("\n") == 1
    assert f"true hematoma volume {truth['analytic_volume_ml']:.2f} mL" in out
    assert "Research use only, not for clinical use." in out
    assert "Zzyzx" not in out  # no patient data in output
    assert truth["analytic_volume_ml"] == pytest.approx(12.0, rel=1e-6)


def test_cli_bad_option_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse([str(tmp_path / "out"), "--rows", "8"])
    assert phantom_command.run(args, Settings()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "rows and columns" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------
# Real data (skipped where ../shared/data is absent)


@pytest.mark.realdata
def test_blast_lesion_uses_the_real_shape_with_exact_volume(blast_ct_assets: Path) -> None:
    source = blast_ct_assets / "scan_0_segmentation.nii.gz"
    spec = replace(
        SMALL,
        rows=128,
        columns=128,
        pixel_spacing_mm=(0.9, 0.9),
        slice_thickness_mm=2.0,
        n_slices=40,
        first_position_mm=-30.0,
        recon_center_mm=(30.0, 0.0),
        lesions=(LesionSpec("blast", volume_ml=20.0, center_mm=(30.0, 0.0, 8.0), source_path=source),),
        **CLEAN,
    )
    r = render_phantom(spec, 1)
    (record,) = r.lesions
    assert record["kind"] == "blast"
    assert record["analytic_volume_ml"] == pytest.approx(20.0, rel=1e-9)
    assert record["mask_volume_ml"] == pytest.approx(20.0, rel=0.03)
    assert "scan_0_segmentation" in record["source"]


@pytest.mark.realdata
def test_phantom_hu_and_head_size_are_like_the_real_ge_head(real_ge_ct: Path) -> None:
    real = [pydicom.dcmread(p) for p in sorted(real_ge_ct.glob("*.dcm"))[10:18]]
    real_hu = np.stack([hu_from_dataset(ds) for ds in real])
    spec = replace(
        SMALL,
        rows=128,
        columns=128,
        pixel_spacing_mm=(1.9, 1.9),
        n_slices=8,
        slice_thickness_mm=6.0,
        gantry_tilt_deg=18.5,
        lesions=(),
    )
    hu, _, _ = render_hu(spec, 1)
    for volume, spacing in ((real_hu, float(real[0].PixelSpacing[0])), (hu, 1.9)):
        brain = volume[(volume > 15) & (volume < 50)]
        bone = volume[volume > 600]
        assert 28.0 <= float(np.median(brain)) <= 42.0
        assert 1000.0 <= float(np.percentile(bone, 90)) <= 2000.0
        head = volume[len(volume) // 2] > -300
        rows = np.nonzero(head.any(axis=1))[0]
        assert 170.0 <= (rows.max() - rows.min()) * spacing <= 230.0  # front-to-back extent, mm


# ---------------------------------------------------------------------------------------
# Skull base, neck, partial volume across the slice, beam hardening, mass effect


def _axial(head: HeadModel, z_mm: float, *, size: int = 96, spacing: float = 2.5) -> np.ndarray:
    axis = (np.arange(size) - size / 2) * spacing
    grid = SampleGrid(x=axis[None, :], y=axis[:, None], z=np.full((1, 1), z_mm), shape=(size, size))
    return head.render(grid)


def test_skull_base_closes_the_intracranial_space_and_the_neck_is_soft_tissue() -> None:
    head = HeadModel.from_rng(np.random.default_rng(3))
    assert head.skull_base is not None
    # Below the cranial floor nothing is intracranial, though it is inside the inner-table ellipsoid.
    low = SampleGrid.from_points([[0.0, -40.0, -55.0], [35.0, 0.0, -58.0]])
    assert (head.inner_table.depth_mm(low) > 0).all()
    assert (head.intracranial_depth_mm(low) < 0).all()
    # The neck: muscle-density tissue (40-60 HU, the classic false "blood") around the spine.
    neck = _axial(head, -120.0)
    body = neck > -500
    assert 0.25 < float(((neck > 40) & (neck < 62))[body].mean()) < 0.95
    assert (neck > 600).any()  # vertebra
    # The posterior fossa: brain between the dense petrous bone and the occipital bone.
    fossa = _axial(head, head.skull_base.petrous_top_mm - 12.0)
    assert (fossa > 1600).any() and ((fossa > 25) & (fossa < 45)).sum() > 200
    # The upper head is unchanged by the skull base: same seed, same brain and skull values.
    plain = HeadModel.from_rng(np.random.default_rng(3), skull_base=False)
    assert plain.skull_base is None and plain.grey_hu == head.grey_hu and plain.skull_mm == head.skull_mm
    np.testing.assert_array_equal(_axial(plain, 40.0), _axial(head, 40.0))


def test_lesions_stay_above_the_cranial_floor() -> None:
    spec = replace(SMALL, rows=64, columns=64, pixel_spacing_mm=(3.5, 3.5), n_slices=14, slice_thickness_mm=9.0)
    for seed in range(4):
        r = render_phantom(replace(spec, lesions=(LesionSpec("epidural", 30.0), LesionSpec("irregular", 35.0))), seed)
        depth = np.broadcast_to(r.head.intracranial_depth_mm(r.geometry.grid()), r.mask.shape)
        assert r.mask.any() and depth[r.mask > 0].min() >= 0.0


def test_realistic_options_change_the_image_never_the_truth() -> None:
    base = replace(SMALL, lesions=(LesionSpec("round", volume_ml=30.0, center_mm=(30.0, 0.0, 20.0)),), **CLEAN)
    plain = render_phantom(base, 4)
    for changes in ({"slab_samples": 3}, {"beam_hardening": 1.0}, {"mass_effect": 1.0}):
        other = render_phantom(replace(base, **changes), 4)  # type: ignore[arg-type]
        np.testing.assert_array_equal(other.labels, plain.labels)
        assert other.analytic_volume_ml == plain.analytic_volume_ml
        assert float(np.abs(other.hu - plain.hu).max()) > 20.0, changes
    # Mass effect pushes the ventricles away from the bleed: CSF moves to the other side.
    pushed = render_phantom(replace(base, mass_effect=1.0), 4)
    grid = plain.geometry.grid()
    x = np.broadcast_to(grid.x, plain.hu.shape)
    csf = lambda hu: (hu < 15) & (hu > -20) & (np.abs(x) < 40)  # noqa: E731
    assert float(x[csf(pushed.hu)].mean()) < float(x[csf(plain.hu)].mean()) - 0.5
    # Blood stays blood density with partial volume in z; its mean is unchanged within noise.
    thick = render_phantom(replace(base, slab_samples=3), 4)
    assert abs(float(thick.hu[thick.labels > 0].mean()) - float(plain.hu[plain.labels > 0].mean())) < 15.0


def test_bad_realistic_options_fail_with_one_clear_line() -> None:
    for changes, message in (
        ({"slab_samples": 0}, "slab_samples"),
        ({"beam_hardening": -1.0}, "beam_hardening"),
        ({"mass_effect": 2.0}, "mass_effect"),
    ):
        with pytest.raises(ValueError, match=message):
            replace(SMALL, **changes)  # type: ignore[arg-type]
