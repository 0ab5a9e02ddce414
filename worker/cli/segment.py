"""``ichvol segment STUDY_DIR --out OUT``: measure the hematoma in one DICOM study folder.

Prints one line with the volume, the ABC/2 estimate and the series; unusable input exits
with code 2 and one line on stderr. The model loads only once the study is known to be usable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.cli import add_threshold_option
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--batch-size`` (``ichvol segment``, ``demo`` and ``run``)."""
    p.add_argument("--model", dest="model_path", help="weights file (.keras); default: ICHVOL_MODEL or the shipped one")
    p.add_argument("--batch-size", dest="inference_batch_size", type=int, help="slices per model call")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="folder with the study's DICOM files (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    add_model_options(p)
    add_threshold_option(p)
    p.add_argument("--min-component-ml", type=float, help="remove components smaller than this (mL)")
    p.add_argument("--no-intracranial", action="store_true", help="do not restrict to the skull-enclosed space")
    p.add_argument("--no-growth", action="store_true", help="no seeded growth into the blood-density region")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.measure.pipeline import SegmentationOptions, segment_study
    from worker.model.engines import configured_segmenter

    outcome = segment_study(
        study_dir=args.study_dir,
        out_dir=args.out,
        segmenter=configured_segmenter(settings, lazy=True),
        options=SegmentationOptions.from_settings(settings),
    )
    if not outcome.ok:
        assert outcome.error is not None
        print(f"ichvol: {outcome.error.message} [{outcome.error.code.value}]", file=sys.stderr)
        return 2
    r = outcome.result
    print(
        f"hematoma volume {r['volume_ml']:.2f} mL (ABC/2 {r['abc2_ml']:.2f} mL), "
        f"{r['n_slices']} slices, series {r['series_instance_uid']}; outputs in {args.out}. {DISCLAIMER}"
    )
    return 0
