"""The BLAST-CT teacher's preprocessing and tiled inference (tiny networks, small volumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.series_builders import make_ct_series
from worker.core.errors import ModelFileError
from worker.measure.teacher import (
    BLAST_CT_CLASSES,
    BlastCtTeacher,
    TeacherPrediction,
    load_teacher,
    predict_teacher,
    window,
)
from worker.measure.teacher_grid import orientation, to_native, to_reoriented_1mm
from worker.model.blast_ct_net import build_blast_ct


def _series(shape=(6, 40, 36), spacing=(2.0, 2.5), gap=5.0, seed=0):  # type: ignore[no-untyped-def]
    hu = np.random.default_rng(seed).uniform(-50, 120, shape).astype(np.float32)
    return make_ct_series(hu, pixel_spacing_mm=spacing, slice_gap_mm=gap)


def test_window_maps_their_bounds() -> None:
    np.testing.assert_allclose(window(np.array([-100.0, -15.0, 42.5, 100.0, 300.0], np.float32)), [-1, -1, 0, 1, 1])


def test_axial_series_is_already_standard() -> None:
    series = _series()
    axes, flips = orientation(series)
    assert axes == (0, 1, 2) and flips == (False, False, False)
    grid = to_reoriented_1mm(series)
    # round((n - 1) * spacing + 1) voxels per axis (Python rounding: 88.5 -> 88), 1 mm apart
    assert grid.volume.shape == (26, 79, 88)
    np.testing.assert_allclose(grid.volume[0, 0, 0], series.hu[0, 0, 0], atol=1e-4)
    np.testing.assert_allclose(grid.volume[5, 2, 5], series.hu[1, 1, 2], atol=1e-4)


def test_round_trip_keeps_labels_on_the_native_grid() -> None:
    series = _series()
    grid = to_reoriented_1mm(series)
    labels = (np.arange(grid.volume.size) % 5).reshape(grid.volume.shape).astype(np.float32)
    back = to_native(labels, grid, nearest=True)
    assert back.shape == series.hu.shape
    # native voxel (i, j, k) sits exactly on 1 mm voxel (5 i, 2 j, 2.5 k -> nearest)
    assert back[1, 3, 2] == labels[5, 6, 5]


def test_flipped_series_is_reoriented() -> None:
    hu = np.random.default_rng(1).uniform(0, 80, (5, 20, 20)).astype(np.float32)
    # rows run anterior (column cosine -y) and so the normal points inferior: both axes flip
    series = make_ct_series(hu, pixel_spacing_mm=(1.0, 1.0), slice_gap_mm=1.0, orientation=((1, 0, 0), (0, -1, 0)))
    axes, flips = orientation(series)
    assert axes == (0, 1, 2) and flips == (True, True, False)
    grid = to_reoriented_1mm(series)
    np.testing.assert_allclose(grid.volume, hu[::-1, ::-1, :], atol=1e-4)
    np.testing.assert_allclose(to_native(grid.volume, grid, nearest=False), hu, atol=1e-4)


def _tiny_teacher(n: int = 1) -> BlastCtTeacher:
    models = [build_blast_ct(0.1, input_size=85) for _ in range(n)]
    return BlastCtTeacher.from_keras(models, [f"tiny_{i}" for i in range(n)], ["0" * 64] * n)


def test_tiled_volume_equals_one_big_patch() -> None:
    """Tiles of 15 voxels (95^3 patches) give what one 110^3 patch gives on 30^3.

    The subsampling factors 5 and 3 divide 15, so any tile edge that is a multiple of 15 gives
    the numbers of their 30^3 tiles: the reason :data:`worker.measure.teacher.TILE` may be larger.
    """
    teacher = BlastCtTeacher.from_keras([build_blast_ct(0.1, input_size=95)], ["tiny"], ["0" * 64])
    volume = np.random.default_rng(2).uniform(-1, 1, (30, 30, 30)).astype(np.float32)
    tiled = teacher.predict_volume(volume)
    assert tiled.shape == (5, 30, 30, 30)
    big = build_blast_ct(0.1, input_size=110)
    small = teacher._models[0]
    for layer in big.layers:
        if layer.weights:
            layer.set_weights(small.get_layer(layer.name).get_weights())
    padded = np.pad(volume, 40, mode="edge")
    whole = np.moveaxis(big(padded[None, ..., None], training=False).numpy()[0], -1, 0)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_predict_teacher_on_the_native_grid() -> None:
    series = _series()
    prediction = predict_teacher(series, _tiny_teacher(2))
    assert isinstance(prediction, TeacherPrediction)
    assert prediction.probabilities.shape == (len(BLAST_CT_CLASSES), *series.hu.shape)
    assert prediction.probabilities.dtype == np.float32
    np.testing.assert_allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert prediction.labels.shape == series.hu.shape and prediction.labels.dtype == np.uint8
    hem = prediction.hemorrhage_probability
    assert hem.dtype == np.float32 and hem.shape == series.hu.shape
    assert np.all((hem >= 0) & (hem <= 1 + 1e-5))
    assert prediction.model_names == ("tiny_0", "tiny_1")


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ModelFileError, match="no shipped BLAST-CT model"):
        load_teacher(["model_99"])


def test_engine_names_map_to_how_the_teacher_runs() -> None:
    from worker.core.errors import ConfigurationError
    from worker.measure.teacher import teacher_engine

    assert teacher_engine("folded") == "float32"
    assert teacher_engine("keras") == "float32"
    assert teacher_engine("onnx") == "onnx"
    assert teacher_engine("auto") in ("bfloat16", "float32")
    with pytest.raises(ConfigurationError, match="ICHVOL_INFERENCE_ENGINE"):
        teacher_engine("warp")


@pytest.mark.slow
@pytest.mark.realdata
def test_shipped_teacher_on_the_real_ge_scan_marks_under_1_ml(real_ge_ct: Path, tmp_path: Path) -> None:
    """The real GE head CT has no hemorrhage. The three shipped models averaged marked 0.15 mL
    (AMD EPYC Zen 4, bfloat16; ~6 min on 2 cores). model_1 alone, the default, marked 0.97 mL
    (bfloat16) and 0.99 mL (float32): under the bar, but too close to it for a test that must
    pass on CPUs whose bfloat16 and float32 kernels round differently, so the test runs the
    ensemble the README recommends for comparisons."""
    from worker.measure.teacher_study import teacher_study

    models = ["model_1", "model_2", "model_3"]
    result = teacher_study(study_dir=real_ge_ct, out_dir=tmp_path, teacher=lambda: load_teacher(models))
    assert result["status"] == "ok"
    assert result["hemorrhage_ml"] < 1.0
    assert result["volumes_ml"]["IPH"] < 0.1 and result["volumes_ml"]["IVH"] < 0.1
