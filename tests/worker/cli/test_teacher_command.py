"""``ichvol teacher``: the outputs on a small phantom study with a tiny teacher, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.helpers.bad_studies import BAD_STUDIES
from worker.cli import COMMANDS, RESEARCH_COMMANDS, main
from worker.core.notices import DISCLAIMER
from worker.measure import teacher as teacher_module
from worker.measure.teacher import BlastCtTeacher
from worker.model.blast_ct_net import build_blast_ct
from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

# A small whole head: 64 x 64 pixels of 3.2 mm, 6 slices of 10 mm (1 mm grid 51 x 202 x 202).
SMALL = PhantomSpec(
    rows=64,
    columns=64,
    pixel_spacing_mm=(3.2, 3.2),
    slice_thickness_mm=10.0,
    n_slices=6,
    lesions=(LesionSpec("round", volume_ml=20.0),),
)


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = tmp_path_factory.mktemp("phantom") / "study"
    generate_study(study, spec=SMALL, seed=3)
    return study


@pytest.fixture()
def tiny_teacher(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """``load_teacher`` replaced by a tiny network with 60^3 output tiles; records its arguments."""
    calls: list[tuple[object, ...]] = []
    model = build_blast_ct(0.1, input_size=140)

    def fake_load(models: object = None, *, engine: str = "auto", threads: int = 0) -> BlastCtTeacher:
        calls.append((models, engine))
        return BlastCtTeacher.from_keras([model], ["tiny"], ["ab" * 32])

    monkeypatch.setattr(teacher_module, "load_teacher", fake_load)
    return calls


def test_teacher_is_a_research_command() -> None:
    assert "teacher" in COMMANDS and "teacher" in RESEARCH_COMMANDS


def test_teacher_writes_segments_outputs_with_class_volumes(
    phantom_study: Path, tmp_path: Path, tiny_teacher: list[tuple[object, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["teacher", str(phantom_study), "--out", str(out), "--models", "model_2", "--engine", "folded"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert tiny_teacher == [(["model_2"], "folded")]
    assert "hemorrhage" in captured.out and DISCLAIMER in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["result.json", "mask.npz", "mask.nii.gz", "seg.dcm", "overlay.png"]
    )
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["disclaimer"] == DISCLAIMER
    assert set(result["volumes_ml"]) == {"IPH", "EAH", "oedema", "IVH"}
    hemorrhage = result["volumes_ml"]["IPH"] + result["volumes_ml"]["EAH"] + result["volumes_ml"]["IVH"]
    assert result["hemorrhage_ml"] == pytest.approx(hemorrhage, abs=0.01)
    assert result["volume_ml"] == result["hemorrhage_ml"]
    assert result["model"]["models"] == ["tiny"] and result["model"]["sha256"] == ["ab" * 32]
    with np.load(out / "mask.npz", allow_pickle=False) as npz:
        labels, mask = npz["labels"], npz["mask"]
        assert labels.shape == mask.shape == (6, 64, 64)
        np.testing.assert_array_equal(mask, np.isin(labels, (1, 2, 4)))
        assert npz["hemorrhage_probability"].shape == (6, 64, 64)
        assert len(npz["sop_instance_uids"]) == 6
    nifti = nib.load(out / "mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), labels)
    seg = pydicom.dcmread(out / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "IPH intraparenchymal hemorrhage",
        "EAH extra-axial hemorrhage",
        "Perilesional oedema",
        "IVH intraventricular hemorrhage",
    ]


@pytest.mark.parametrize("name", ["empty_folder", "no_ct_series", "one_slice"])
def test_bad_input_exits_2_with_one_line(
    name: str, tmp_path: Path, tiny_teacher: list[tuple[object, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = BAD_STUDIES[name]
    study = tmp_path / "study"
    bad.build(study)
    out = tmp_path / "out"
    assert main(["teacher", str(study), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ichvol: ") and f"[{bad.code.value}]" in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert json.loads((out / "result.json").read_text())["error_code"] == bad.code.value
    assert tiny_teacher == []  # the models never loaded


def test_unknown_model_and_engine_exit_2(
    phantom_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["teacher", str(phantom_study), "--out", str(tmp_path / "a"), "--engine", "warp"]) == 2
    assert main(["teacher", str(phantom_study), "--out", str(tmp_path / "b"), "--models", "model_99"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "ICHVOL_INFERENCE_ENGINE" in lines[0] and "model_99" in lines[1]
