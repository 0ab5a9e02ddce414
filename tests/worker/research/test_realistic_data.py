"""The realistic synthetic training bank: real backgrounds with inserted blood, phantoms, caching, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.research import realistic_data
from worker.research.realistic_data import (
    BackgroundSlice,
    SyntheticConfig,
    UInt8Slices,
    add_calcifications,
    generate_bank,
    load_or_generate_bank,
    random_phantom_spec,
    real_background_sample,
    validation_slices,
)
from worker.synth.phantom import LesionSpec, PhantomSpec


def _background(size: int = 128, spacing: float = 1.6) -> BackgroundSlice:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) * spacing
    r = np.hypot(yy, xx)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[r < 80] = 1300.0
    hu[r < 73] = 33.0
    hu[(np.abs(xx) < 6) & (np.abs(yy) < 20)] = 6.0
    return BackgroundSlice(hu=hu, intracranial=(r < 72).astype(np.uint8), pixel_spacing_mm=(spacing, spacing))


@pytest.fixture()
def small_phantoms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random phantom studies at 48 x 48 pixels and 6 slices, so bank tests stay fast."""

    def spec(rng: np.random.Generator) -> PhantomSpec:
        return PhantomSpec(
            rows=48,
            columns=48,
            pixel_spacing_mm=(5.0, 5.0),
            slice_thickness_mm=8.0,
            n_slices=6,
            first_position_mm=-20.0,
            lesions=(LesionSpec("round", volume_ml=float(rng.uniform(10, 30))),),
            slab_samples=3,
            beam_hardening=0.5,
            mass_effect=0.5,
        )

    monkeypatch.setattr(realistic_data, "random_phantom_spec", spec)


def test_real_background_samples_are_uint8_images_with_binary_masks() -> None:
    config = SyntheticConfig(size=48, empty_fraction_real=0.0)
    found_blood = brighter = 0
    for seed in range(8):
        image, mask = real_background_sample(_background(), config=config, rng=np.random.default_rng(seed))
        assert image.shape == mask.shape == (48, 48)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        if mask.any():
            found_blood += 1
            brain = (image > 40) & (image < 230) & (mask == 0)
            brighter += int(float(image[mask > 0].mean()) > float(np.median(image[brain])))
    assert found_blood >= 6
    # Acute blood is brighter than brain; a share of darker (30-50 HU) collections may not be.
    assert brighter >= found_blood - 2


def test_calcifications_are_bright_and_stay_inside() -> None:
    bg = _background()
    out = add_calcifications(bg.hu, bg.intracranial, pixel_mm=1.6, rng=np.random.default_rng(2))
    changed = np.abs(out - bg.hu) > 1.0
    assert changed.any() and not (changed & (bg.intracranial == 0)).any()
    assert float(out.max()) >= 100.0 or float(out[changed].max()) > 90.0


def test_random_phantom_specs_cover_the_neck_and_every_kind() -> None:
    specs = [random_phantom_spec(np.random.default_rng(s)) for s in range(60)]
    kinds = {lesion.kind for spec in specs for lesion in spec.lesions}
    assert kinds == {"round", "irregular", "intraventricular", "subdural", "epidural"}
    assert any(not spec.lesions for spec in specs)
    assert min(spec.first_position_mm or 0.0 for spec in specs) < -150.0  # shoulders
    assert all(spec.skull_base and spec.slab_samples == 3 for spec in specs)
    volumes = [lesion.volume_ml or 0.0 for spec in specs for lesion in spec.lesions]
    assert min(volumes) < 2.0 and max(volumes) > 60.0


def test_bank_mixes_sources_in_the_asked_shares_and_is_reproducible(small_phantoms: None) -> None:
    config = SyntheticConfig(size=32, n_samples=80, seed=3, background_share=0.5)
    bank = generate_bank(config=config, backgrounds=(_background(),))
    assert len(bank) == 80 and bank.images.shape == (80, 32, 32)
    assert sum(p.startswith("real-") for p in bank.patients) == 40
    assert sum(p.startswith("phantom-") for p in bank.patients) == 40
    assert bank.masks.reshape(80, -1).any(axis=1).sum() >= 10
    again = generate_bank(config=config, backgrounds=(_background(),))
    np.testing.assert_array_equal(bank.images, again.images)
    np.testing.assert_array_equal(bank.masks, again.masks)


def test_bank_is_cached_and_reloaded(tmp_path: Path, small_phantoms: None, monkeypatch: pytest.MonkeyPatch) -> None:
    config = SyntheticConfig(size=32, n_samples=70, seed=1, background_share=1.0)
    first = load_or_generate_bank(config=config, backgrounds=(_background(),), cache_dir=tmp_path, workers=1)
    assert len(list(tmp_path.glob("synthetic-*.npz"))) == 1

    def fail(**_: object) -> UInt8Slices:
        raise AssertionError("the cached bank should have been used")

    monkeypatch.setattr(realistic_data, "generate_bank", fail)
    second = load_or_generate_bank(config=config, backgrounds=(_background(),), cache_dir=tmp_path, workers=1)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.patients == second.patients


def test_validation_holds_phantoms_with_blood_and_the_real_scan_without(small_phantoms: None) -> None:
    config = SyntheticConfig(size=32, n_val_phantoms=2)
    data, counts = validation_slices(config=config, backgrounds=(_background(), _background()))
    assert counts == {"phantom": 12, "real_background": 2}
    assert data.images.shape == (14, 32, 32) and data.images.dtype == np.float32
    assert data.masks[:12].any() and not data.masks[12:].any()
    assert data.patients[-1] == "real-background"


def test_uint8_slices_stream_model_inputs() -> None:
    images = np.array([[[0, 255], [128, 64]]] * 4, dtype=np.uint8)
    masks = np.array([[[0, 1], [1, 0]]] * 4, dtype=np.uint8)
    source = UInt8Slices(images, masks, ("a",) * 4)
    arrays = source.load_arrays()
    np.testing.assert_allclose(arrays.images[0], [[-1.0, 1.0], [128 / 127.5 - 1, 64 / 127.5 - 1]], atol=1e-6)
    x, y = next(iter(source.tf_dataset(batch_size=4, shuffle=False, augment=False, seed=0)))
    assert tuple(x.shape) == (4, 2, 2, 1) and str(x.dtype) == "<dtype: 'float32'>"
    np.testing.assert_allclose(x.numpy()[..., 0], arrays.images, atol=1e-6)
    np.testing.assert_array_equal(y.numpy()[..., 0], masks)


def test_the_physical_recipe_changes_the_bank_key_and_the_hard_negatives() -> None:
    v3, physical = SyntheticConfig(size=48), SyntheticConfig(size=48, recipe="physical")
    assert v3.key("bg") != physical.key("bg")
    assert v3.calcification_hu == (100.0, 400.0)
    assert physical.calcification_hu[0] >= 150.0  # never the density of blood
    assert physical.randomization().screenshot_calibration and physical.randomization().gain == (1.0, 1.0)
    assert not v3.randomization().screenshot_calibration
    with pytest.raises(ValueError, match="recipe must be one of"):
        SyntheticConfig(recipe="wide")
    bg = _background()
    out = add_calcifications(bg.hu, bg.intracranial, pixel_mm=1.6, rng=np.random.default_rng(2), hu_range=(300, 301))
    inside = bg.intracranial > 0
    assert 250.0 < float(out[inside].max()) <= 301.0


def test_physical_samples_are_valid_training_pairs() -> None:
    config = SyntheticConfig(size=48, empty_fraction_real=0.0, recipe="physical")
    blood = 0
    for seed in range(6):
        image, mask = real_background_sample(_background(), config=config, rng=np.random.default_rng(seed))
        assert image.dtype == np.uint8 and image.shape == (48, 48) and set(np.unique(mask)) <= {0, 1}
        if mask.any():
            blood += 1
            assert float(image[mask > 0].mean()) > float(image[mask == 0].mean())
    assert blood >= 3
