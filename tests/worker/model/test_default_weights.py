"""The shipped default weights: loaded by default, intact, and finding hematomas (not normal anatomy).

The real-data test reads ``../shared/data/real-head-ct-ge`` (a real head CT without
hemorrhage) and skips where it is absent. The phantom tests are small held-out studies
(seeds no training study used), so a model that only learned its training set, or one
that calls every dense pixel blood, fails them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.core.settings import Settings
from worker.measure.pipeline import SegmentationOptions, segment_study
from worker.model.weights import (
    default_model_path,
    expected_default_sha256,
    read_model_info,
    resolve_model_path,
    sha256_of,
)
from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

MAX_WEIGHTS_BYTES = 25 * 1024 * 1024
DEFAULT_VERSION_PREFIX = "drunet-d8-s160-physical"


@pytest.fixture(scope="module")
def default_segmenter():  # type: ignore[no-untyped-def]
    from worker.model.engines import load_segmenter

    return load_segmenter(None, batch_size=8)


def test_default_weights_are_intact_small_and_described() -> None:
    path, is_default = resolve_model_path(None)
    assert is_default and path == default_model_path()
    assert path.stat().st_size <= MAX_WEIGHTS_BYTES
    assert sha256_of(path) == expected_default_sha256()
    info = read_model_info(path)
    assert info.architecture == "drunet"
    assert info.version.startswith(DEFAULT_VERSION_PREFIX)
    assert info.hu_window == (-20.0, 100.0)
    assert "realistic synthetic data" in info.training_data


def test_a_tampered_default_fails_its_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.core.errors import ModelFileError
    from worker.model import weights

    copy = tmp_path / weights.DEFAULT_WEIGHTS_NAME
    data = bytearray(default_model_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    copy.with_suffix(".sha256").write_text(expected_default_sha256() + "\n")
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", tmp_path)
    with pytest.raises(ModelFileError, match="fail their checksum"):
        resolve_model_path(None)


def test_segment_and_demo_use_the_default_weights_when_no_model_is_set() -> None:
    from worker.model.engines import configured_segmenter

    settings = Settings.from_env({})
    assert settings.model_path in (None, "")
    segmenter = configured_segmenter(settings, lazy=True)  # what `ichvol segment` and `ichvol demo` load
    assert segmenter.info.version == read_model_info(default_model_path()).version
    assert segmenter.info.sha256 == expected_default_sha256()


def _phantom_study(tmp_path: Path, name: str, lesions: tuple[LesionSpec, ...], seed: int) -> tuple[Path, object]:
    spec = PhantomSpec(
        rows=128,
        columns=128,
        pixel_spacing_mm=(1.8, 1.8),
        slice_thickness_mm=6.0,
        n_slices=20,
        lesions=lesions,
        slab_samples=3,
        beam_hardening=0.6,
    )
    study = tmp_path / name
    return study, generate_study(study, spec=spec, seed=seed)


def _measure(study: Path, out: Path, segmenter: object, truth: object) -> tuple[float, float]:
    outcome = segment_study(study_dir=study, out_dir=out, segmenter=segmenter, options=SegmentationOptions())  # type: ignore[arg-type]
    assert outcome.ok, outcome.result
    with np.load(outcome.artefacts["mask_npz"]) as data:
        order = {str(u): i for i, u in enumerate(data["sop_instance_uids"])}
        pred = data["mask"][[order[u] for u in truth.sop_instance_uids]] > 0  # type: ignore[attr-defined]
    true = truth.mask > 0  # type: ignore[attr-defined]
    denom = int(true.sum()) + int(pred.sum())
    dice = 1.0 if denom == 0 else 2.0 * int((true & pred).sum()) / denom
    return float(outcome.volume_ml or 0.0), dice


@pytest.mark.parametrize(
    ("kind", "volume_ml", "seed", "volume_tolerance"),
    [
        ("round", 20.0, 6_000_001, 0.35),
        # Extra-axial blood is measured low (MODEL_CARD.md: subdural 30 mL 55-58 % low on the
        # held-out table); this one 33 % low at threshold 0.5, 40 % at the calibrated 0.9.
        ("subdural", 35.0, 6_000_002, 0.45),
        ("intraventricular", 6.0, 6_000_003, 0.35),
    ],
)
@pytest.mark.slow
def test_held_out_phantom_hematomas_are_found(
    tmp_path: Path, default_segmenter: object, kind: str, volume_ml: float, seed: int, volume_tolerance: float
) -> None:
    study, truth = _phantom_study(tmp_path, kind, (LesionSpec(kind, volume_ml=volume_ml),), seed)
    measured, dice = _measure(study, tmp_path / "out", default_segmenter, truth)
    true_ml = truth.analytic_volume_ml  # type: ignore[attr-defined]
    assert dice >= 0.6, (kind, dice)
    assert abs(measured - true_ml) <= volume_tolerance * true_ml, (kind, measured, true_ml)


def test_held_out_phantom_without_hemorrhage_stays_near_zero(tmp_path: Path, default_segmenter: object) -> None:
    study, truth = _phantom_study(tmp_path, "empty", (), 6_000_004)
    measured, _ = _measure(study, tmp_path / "out", default_segmenter, truth)
    assert measured < 1.0


@pytest.mark.realdata
def test_real_head_ct_without_hemorrhage_measures_under_1_ml(
    real_ge_ct: Path, tmp_path: Path, default_segmenter: object
) -> None:
    """As shipped (intracranial restriction on): under 1 mL, nothing on bright calcifications
    or bone, nothing on the skull-base slices."""
    outcome = segment_study(study_dir=real_ge_ct, out_dir=tmp_path, segmenter=default_segmenter)  # type: ignore[arg-type]
    assert outcome.ok and outcome.series is not None
    assert outcome.volume_ml is not None and outcome.volume_ml < 1.0, outcome.volume_ml
    with np.load(outcome.artefacts["mask_npz"]) as data:
        mask = data["mask"] > 0
    hu = outcome.series.hu
    # Calcifications (choroid plexus, pineal, falx) and bone: > 120 HU, grown by one pixel.
    from scipy import ndimage

    dense = ndimage.binary_dilation(hu > 120.0, structure=np.ones((1, 3, 3), dtype=bool))
    assert dense.any()
    assert not (mask & dense).any()
    # Skull base: the lowest 10 slices (neck, petrous bones, orbits, posterior fossa floor).
    assert not mask[:10].any()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"]["version"].startswith(DEFAULT_VERSION_PREFIX)
