"""The DR-UNet and UNet builders, weights files with metadata, and loading."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from worker.core.errors import ModelFileError
from worker.model.weights import METADATA_MEMBER, ModelInfo, read_model_info

INFO = ModelInfo(
    name="DR-UNet",
    architecture="drunet",
    dims=4,
    input_size=32,
    hu_window=(-20.0, 100.0),
    version="t-1",
    training_data="unit test",
    validation={"val_dice_pooled": 0.5},
)


def test_drunet_has_the_papers_parameter_count_and_shape() -> None:
    from worker.model.networks import build_drunet

    model = build_drunet(dims=32, input_size=256)
    assert model.count_params() == 10_978_305  # the authors' code, dims=32, 256x256x1
    assert tuple(model.input_shape) == (None, 256, 256, 1)
    assert tuple(model.output_shape) == (None, 256, 256, 1)
    assert model.layers[-1].activation.__name__ == "sigmoid"


def test_architectures_by_name() -> None:
    from worker.model.networks import build_model

    unet = build_model("unet", dims=4, input_size=32)
    assert unet.name == "unet" and tuple(unet.output_shape) == (None, 32, 32, 1)
    with pytest.raises(ValueError, match="unknown architecture 'vnet'"):
        build_model("vnet", dims=4, input_size=32)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_model("drunet", dims=4, input_size=48)


def test_saved_file_carries_metadata_readable_without_the_model(tmp_path: Path) -> None:
    from worker.model.networks import build_drunet, save_model

    path = save_model(build_drunet(dims=4, input_size=32), tmp_path / "m.keras", INFO)
    with zipfile.ZipFile(path) as archive:
        stored = json.loads(archive.read(METADATA_MEMBER))
    assert stored["hu_window"] == [-20.0, 100.0] and "sha256" not in stored
    info = read_model_info(path)
    assert (info.architecture, info.dims, info.input_size, info.version) == ("drunet", 4, 32, "t-1")
    assert info.validation == {"val_dice_pooled": 0.5} and len(info.sha256) == 64


@pytest.mark.slow
def test_float16_storage_halves_the_weights_and_predicts_alike(tmp_path: Path) -> None:
    from worker.model.engines import load_segmenter
    from worker.model.networks import build_drunet, save_model

    model = build_drunet(dims=8, input_size=32)
    full = save_model(model, tmp_path / "f32.keras", INFO)
    half = save_model(model, tmp_path / "f16.keras", INFO, float16=True)
    import io

    import h5py

    def dtypes(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as h5:
            found: set[str] = set()
            h5.visititems(lambda _n, node: found.add(str(node.dtype)) if isinstance(node, h5py.Dataset) else None)
            return found

    assert dtypes(full) == {"float32"} and dtypes(half) == {"float16"}
    assert half.stat().st_size < full.stat().st_size
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    a = load_segmenter(full, batch_size=2).predict(x)
    b = load_segmenter(half, batch_size=2).predict(x)
    assert np.abs(a - b).max() < 5e-3


def test_load_refuses_a_file_that_is_not_an_ichvol_model(tmp_path: Path) -> None:
    from worker.model.engines import load_segmenter

    bad = tmp_path / "x.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=r"not a readable \.keras file"):
        load_segmenter(bad)
    plain = tmp_path / "plain.keras"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(ModelFileError, match=r"carries no ichvol\.json"):
        load_segmenter(plain)


@pytest.mark.slow
def test_metadata_that_lies_about_the_input_size_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from worker.model.engines import load_segmenter
    from worker.model.networks import build_drunet, save_model

    path = save_model(build_drunet(dims=4, input_size=32), tmp_path / "m.keras", replace(INFO, input_size=64))
    with pytest.raises(ModelFileError, match="does not match its metadata"):
        load_segmenter(path)


def test_lazy_segmenter_reads_metadata_without_tensorflow(tiny_model_path: Path) -> None:
    code = (
        "import sys; from worker.model.engines import LazySegmenter; "
        f"s = LazySegmenter({str(tiny_model_path)!r}); "
        "assert s.info.version == 'tiny-test-1'; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_model_info_command_prints_the_metadata(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    assert main(["model-info", "--model", str(tiny_model_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == "tiny-test-1" and data["default"] is False and len(data["sha256"]) == 64
