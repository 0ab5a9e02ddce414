"""The shipped BLAST-CT weights: checksums, loading, and a built network that gives probabilities (no torch)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from worker.core.errors import ModelFileError
from worker.model.blast_ct_net import (
    BLAST_CT_WEIGHTS_DIR,
    CLASSES,
    build_blast_ct,
    output_size_for,
    path_input_size,
    read_blast_ct_arrays,
    set_blast_ct_weights,
    shipped_blast_ct,
)
from worker.model.weights import sha256_of


def test_their_sizes_rule() -> None:
    # 110^3 in, 30^3 out; the pathways crop 110, 78 and 46 voxels (their calculate_input_size)
    assert output_size_for(110) == 30
    assert [path_input_size(s) for s in (5, 3, 1)] == [110, 78, 46]
    assert output_size_for(140) == 60


def test_shipped_weights_are_listed_with_matching_checksums() -> None:
    shipped = shipped_blast_ct()
    assert [w.name for w in shipped] == ["model_1", "model_2", "model_3"]
    for w in shipped:
        assert sha256_of(w.path) == w.sha256
    sums = (BLAST_CT_WEIGHTS_DIR / "SHA256SUMS").read_text().split()
    assert sums[0] == shipped[0].sha256
    for name in ("LICENSE.txt", "NOTICE"):
        assert (BLAST_CT_WEIGHTS_DIR / name).is_file()
    assert "Apache License" in (BLAST_CT_WEIGHTS_DIR / "LICENSE.txt").read_text()


def test_shipped_model_gives_probabilities() -> None:
    weights = shipped_blast_ct()[0]
    arrays = read_blast_ct_arrays(weights)
    model = build_blast_ct(input_size=85)  # the smallest input: 5^3 out, full width
    set_blast_ct_weights(model, arrays)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 85, 85, 85, 1)).astype(np.float32)
    p = model(x, training=False).numpy()
    assert p.shape == (1, 5, 5, 5, len(CLASSES))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-5)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    weights = shipped_blast_ct()[0]
    copy = tmp_path / weights.path.name
    shutil.copy(weights.path, copy)
    with copy.open("r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelFileError, match="fail their checksum"):
        read_blast_ct_arrays(replace(weights, path=copy))


def test_missing_arrays_are_named() -> None:
    model = build_blast_ct(0.1, input_size=85)
    with pytest.raises(ModelFileError, match="lack"):
        set_blast_ct_weights(model, {})


def test_bfloat16_build_gives_float32_probabilities() -> None:
    model = build_blast_ct(0.1, input_size=85, dtype="bfloat16")
    p = model(np.zeros((1, 85, 85, 85, 1), np.float32), training=False).numpy()
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-3)


def test_onnx_graph_matches_keras_on_the_shipped_model() -> None:
    pytest.importorskip("onnxruntime", reason="the onnx engine needs the 'fast' extra")
    from worker.model.blast_ct_onnx import OnnxBlastCt

    arrays = read_blast_ct_arrays(shipped_blast_ct()[0])
    keras_model = build_blast_ct(input_size=95)  # 15^3 out: the upsampled pathways are cropped
    set_blast_ct_weights(keras_model, arrays)
    x = np.random.default_rng(4).uniform(-1, 1, (1, 95, 95, 95, 1)).astype(np.float32)
    expected = keras_model(x, training=False).numpy()
    got = OnnxBlastCt(arrays, input_size=95, threads=1).predict_patch(x)
    assert got.shape == expected.shape == (1, 15, 15, 15, 5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
