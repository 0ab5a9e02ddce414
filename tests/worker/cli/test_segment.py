"""``ichvol segment``: the output contract and every unusable input (exit 2, one line, failed result.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.bad_studies import BAD_STUDIES
from tests.helpers.dicom_builders import write_ct_series
from worker.cli import main
from worker.model.engines import resolve_engine


@pytest.mark.parametrize("name", sorted(BAD_STUDIES))
def test_bad_input_exits_2_with_one_line_and_a_failed_result(
    name: str, tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = BAD_STUDIES[name]
    study = tmp_path / "study"
    bad.build(study)
    out = tmp_path / "out"
    code = main(["segment", str(study), "--out", str(out), "--model", str(tiny_model_path)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ichvol: "), captured.err
    assert bad.message_part in lines[0] and f"[{bad.code.value}]" in lines[0]
    assert "Traceback" not in captured.err + captured.out
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["error_code"] == bad.code.value
    assert bad.message_part in result["reason"]
    assert result["volume_ml"] is None
    assert result["disclaimer"] == "Research use only, not for clinical use."
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]


def test_missing_study_folder_is_a_failed_result(tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "nope"), "--out", str(out), "--model", str(tiny_model_path)]) == 2
    assert json.loads((out / "result.json").read_text())["error_code"] == "empty_study"


def test_missing_model_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_ct_series(tmp_path / "study")
    code = main(["segment", str(tmp_path / "study"), "--out", str(tmp_path / "o"), "--model", "/no/such.keras"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "ichvol: model file /no/such.keras does not exist"


def test_good_study_writes_every_output(tmp_path: Path, tiny_model_path: Path) -> None:
    written = write_ct_series(tmp_path / "study", n_slices=6, rows=40, columns=48)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "study"), "--out", str(out), "--model", str(tiny_model_path)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mask.nii.gz", "mask.npz", "overlay.png", "result.json", "seg.dcm"]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["series_instance_uid"] == written.series_instance_uid
    assert [s["sop_instance_uid"] for s in result["slices"]] == list(written.sop_instance_uids)
    assert result["model"]["version"] == "tiny-test-1" and len(result["model"]["sha256"]) == 64
    assert result["model"]["engine"] == resolve_engine("auto")  # the default, resolved for this machine
    assert {"read", "preprocess", "inference", "postprocess", "write"} <= set(result["timings_s"])
    assert result["n_slices"] == 6 and result["pixel_spacing_mm"] == [0.5, 0.5]
    assert result["slab_thickness_mm"] == [5.0] * 6


def test_real_process_prints_no_traceback(tmp_path: Path, tiny_model_path: Path) -> None:
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "x.dcm").write_bytes(b"DICM" + bytes(100))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "segment",
            str(tmp_path / "study"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_model_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("ichvol: none of the 1 files in the study folder is a DICOM image [no_dicom]")


@pytest.mark.slow
def test_invalid_uids_leave_stderr_clean_and_are_named_in_result_json(tmp_path: Path, tiny_model_path: Path) -> None:
    """UIDs pydicom finds invalid (letters; a leading zero, as in some vendors' exports): pydicom warns
    while the outputs are written. A successful run prints only its summary line; each distinct
    warning is one log line (INFO, once per study); result.json names the UIDs."""
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom, as the test files are written
        write_ct_series(
            tmp_path / "study",
            n_slices=6,
            rows=40,
            columns=48,
            study_instance_uid="1.2.840.ABC.7",
            series_instance_uid="1.3.12.2.1107.5.1.4.05.1",
        )
    ichvol = [sys.executable, "-m", "worker.cli"]
    segment = ["segment", str(tmp_path / "study"), "--model", str(tiny_model_path)]
    proc = subprocess.run(
        [*ichvol, *segment, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("hematoma volume"), proc.stdout
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    [named] = [w for w in result["warnings"] if "not valid DICOM UIDs" in w]
    assert "StudyInstanceUID 1.2.840.ABC.7" in named and "SeriesInstanceUID 1.3.12.2.1107.5.1.4.05.1" in named

    logged = subprocess.run(
        [*ichvol, "--log-level", "INFO", *segment, "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert logged.returncode == 0, logged.stderr
    lines = [line for line in logged.stderr.splitlines() if "worker.warnings" in line]
    assert len(lines) == 1 and "pydicom UserWarning: Invalid value for VR UI" in lines[0], logged.stderr
    assert "warn_and_log" not in logged.stderr and ".py:" not in logged.stderr  # no source line, no location
