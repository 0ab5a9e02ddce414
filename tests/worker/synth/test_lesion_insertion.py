"""Synthetic hematomas blended into a slice: where they go, their density, the mask, the mass effect."""

from __future__ import annotations

import numpy as np
import pytest

from worker.synth.lesion_insertion import (
    ACUTE_HU,
    DARK_HU,
    brain_regions,
    brain_space,
    insert_lesions,
    smooth_noise,
)

SPACING = (1.0, 1.0)


def _head(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A disc of brain (32 HU) with two ventricles (5 HU) in a 5-pixel skull ring (1200 HU)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[r < 44] = 1200.0
    hu[r < 39] = 32.0
    for cx in (size / 2 - 9, size / 2 + 9):
        hu[(np.abs(xx - cx) < 4) & (np.abs(yy - size / 2) < 12)] = 5.0
    intracranial = (r < 38).astype(np.uint8)
    return hu, intracranial


@pytest.mark.parametrize("kind", ["round", "irregular", "intraventricular", "subdural", "epidural"])
def test_each_kind_is_painted_inside_the_brain_with_blood_density(kind: str) -> None:
    hu, inside = _head()
    for seed in range(4):
        out, mask, records = insert_lesions(
            hu=hu,
            intracranial=inside,
            pixel_spacing_mm=SPACING,
            rng=np.random.default_rng(seed),
            kinds=(kind,),
            dark_fraction=0.0,
        )
        if not records:
            continue
        assert records[0].kind == kind
        assert mask.any()
        assert not (mask.astype(bool) & (inside == 0)).any()  # never in bone or outside
        core = mask.astype(bool) & (np.abs(out - records[0].mean_hu) < 30)
        # Blood density where blood was painted (heterogeneous, partial volume at the edge).
        assert ACUTE_HU[0] - 15 <= float(np.median(out[mask > 0])) <= ACUTE_HU[1] + 15
        assert core.sum() >= 0.5 * mask.sum()
        assert records[0].area_mm2 == pytest.approx(float(mask.sum()) * SPACING[0] * SPACING[1], rel=0.01)
        return
    pytest.fail(f"no {kind} lesion was placed in four tries")


def test_extra_axial_blood_hugs_the_inner_table_and_parenchymal_blood_does_not() -> None:
    hu, inside = _head()
    distance, _ = brain_regions(hu, inside, pixel_spacing_mm=SPACING)
    for kind, touches in (("subdural", True), ("epidural", True), ("round", False)):
        for seed in range(6):
            _, mask, records = insert_lesions(
                hu=hu,
                intracranial=inside,
                pixel_spacing_mm=SPACING,
                rng=np.random.default_rng(seed),
                kinds=(kind,),
                mass_effect=False,
            )
            if records:
                break
        assert records
        assert (float(distance[mask > 0].min()) <= 1.5) is touches, kind


def test_ventricles_are_found_and_intraventricular_blood_stays_in_them() -> None:
    hu, inside = _head()
    _, ventricles = brain_regions(hu, inside, pixel_spacing_mm=SPACING)
    assert ventricles.sum() == pytest.approx(2 * 7 * 23, rel=0.25)
    _, mask, records = insert_lesions(
        hu=hu,
        intracranial=inside,
        pixel_spacing_mm=SPACING,
        rng=np.random.default_rng(3),
        kinds=("intraventricular",),
    )
    assert records and mask.any()
    assert not (mask.astype(bool) & ~ventricles.astype(bool)).any()


def test_nothing_is_painted_outside_brain_like_space() -> None:
    """Orbits, sinuses and bone enclosed by the skull ring are not brain: no blood there."""
    hu, inside = _head()
    hu[inside > 0] = -900.0  # an air-filled enclosure (a sinus)
    _, mask, records = insert_lesions(
        hu=hu, intracranial=inside, pixel_spacing_mm=SPACING, rng=np.random.default_rng(0), n_lesions=3
    )
    assert records == () and not mask.any()
    assert not brain_space(hu, inside, pixel_spacing_mm=SPACING).any()


def test_dark_collections_are_drawn_when_asked() -> None:
    hu, inside = _head()
    means = []
    for seed in range(10):
        _, _, records = insert_lesions(
            hu=hu,
            intracranial=inside,
            pixel_spacing_mm=SPACING,
            rng=np.random.default_rng(seed),
            kinds=("subdural",),
            dark_fraction=1.0,
        )
        means += [r.mean_hu for r in records]
    assert means and all(DARK_HU[0] <= m <= DARK_HU[1] for m in means)


def test_mass_effect_moves_the_ventricles_away_from_a_large_bleed_but_not_the_skull() -> None:
    hu, inside = _head()
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    kwargs = {"hu": hu, "intracranial": inside, "pixel_spacing_mm": SPACING, "kinds": ("round",)}
    pushed, mask, records = insert_lesions(rng=rng_a, mass_effect=True, **kwargs)  # type: ignore[arg-type]
    still, _, _ = insert_lesions(rng=rng_b, mass_effect=False, **kwargs)  # type: ignore[arg-type]
    assert records
    skull = hu > 1000
    np.testing.assert_allclose(pushed[skull], hu[skull], atol=1.0)
    away = (mask == 0) & (inside > 0)
    assert np.abs(pushed - still)[away].max() > 5.0  # brain content moved


def test_existing_mask_is_kept_and_inputs_are_not_modified() -> None:
    hu, inside = _head()
    hu_before = hu.copy()
    existing = np.zeros_like(inside)
    existing[20:24, 44:50] = 1
    _, mask, _ = insert_lesions(
        hu=hu,
        intracranial=inside,
        pixel_spacing_mm=SPACING,
        rng=np.random.default_rng(5),
        existing_mask=existing,
        mass_effect=False,
    )
    assert (mask[existing > 0] == 1).all()
    np.testing.assert_array_equal(hu, hu_before)


def test_smooth_noise_is_normalised_and_correlated() -> None:
    noise = smooth_noise((128, 128), scale_px=4.0, rng=np.random.default_rng(0))
    assert float(noise.std()) == pytest.approx(1.0, rel=1e-3)
    neighbour = float(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1])
    assert neighbour > 0.9


def test_measured_appearance_is_acute_homogeneous_and_dark_only_outside_the_brain() -> None:
    from worker.synth.lesion_insertion import LesionAppearance

    hu, inside = _head()
    appearance = LesionAppearance.measured()
    parenchymal, extra_axial = [], []
    for seed in range(24):
        _, _, records = insert_lesions(
            hu=hu,
            intracranial=inside,
            pixel_spacing_mm=SPACING,
            rng=np.random.default_rng(seed),
            dark_fraction=1.0,  # every kind that may be dark is
            appearance=appearance,
            mass_effect=False,
        )
        for record in records:
            (parenchymal if record.kind in ("round", "irregular", "intraventricular") else extra_axial).append(
                record.mean_hu
            )
    assert parenchymal and all(55.0 <= m <= 85.0 for m in parenchymal)
    assert extra_axial and all(DARK_HU[0] <= m <= DARK_HU[1] for m in extra_axial)


def test_real_outlines_are_used_for_parenchymal_lesions_when_given() -> None:
    from worker.synth.lesion_shapes import ShapeBank

    hu, inside = _head()
    square = np.zeros((12, 12), bool)
    square[2:10, 2:10] = True  # a shape no ellipse would draw
    bank = ShapeBank(shapes=(square,), share=1.0, scale=(1.0, 1.0))
    for seed in range(6):
        _, mask, records = insert_lesions(
            hu=hu,
            intracranial=inside,
            pixel_spacing_mm=SPACING,
            rng=np.random.default_rng(seed),
            kinds=("round",),
            shapes=bank,
            mass_effect=False,
        )
        if records:
            rows, cols = np.nonzero(mask)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert mask.sum() / box > 0.6  # a (rotated) square fills most of its box; a disc 0.785 at best...
            assert 40 <= mask.sum() <= 90  # ...and it has the square's 64 mm^2 area
            return
    pytest.fail("no lesion placed")
