"""The embedded default: folders as buckets, SQLite, tasks in process (``ichvol demo`` / ``ichvol run``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.segmenters import HuBandSegmenter
from worker.core.settings import Settings
from worker.overnight.local import format_table, local_settings, run_local
from worker.synth.demo import make_demo_bucket


def test_demo_bucket_is_processed_like_the_overnight_pipeline(tmp_path: Path) -> None:
    truth = make_demo_bucket(tmp_path / "bucket", n=2, seed=3, rows=64, pixel_spacing_mm=3.6)
    assert set(truth) == {"ich-round-25ml", "ich-irregular-40ml"}
    settings = local_settings(
        Settings.from_env({}), bucket_dir=tmp_path / "bucket", state_dir=tmp_path / "state", quiet_period_s=0.0
    )
    segmenter = HuBandSegmenter(input_size=64)
    report, rows = run_local(settings, segmenter=segmenter)
    assert report.registered == 3 and report.enqueued == 3
    by_study = {r.study: r for r in rows}
    assert set(by_study) == {"ich-round-25ml", "ich-irregular-40ml", "scout-only-export"}
    for name in truth:
        assert by_study[name].state == "succeeded" and by_study[name].volume_ml is not None
        assert by_study[name].n_slices == 28
        overlay = by_study[name].overlay_uri
        assert overlay is not None and overlay.startswith("file://") and Path(overlay[7:]).is_file()
    failed = by_study["scout-only-export"]
    assert failed.state == "failed" and failed.error_code == "only_localizers"
    assert (tmp_path / "state" / "ichvol.db").is_file()
    table = format_table(rows, truth_ml=truth)
    assert "only_localizers" in table and "25.00" in table

    # a second run over the same folder measures nothing again
    report2, rows2 = run_local(settings, segmenter=segmenter)
    assert report2.registered == 0 and len(rows2) == 3


def test_cli_run_rejects_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    assert main(["run", "--bucket", str(tmp_path / "missing"), "--state-dir", str(tmp_path / "s")]) == 2
    assert "is not a folder" in capsys.readouterr().err
