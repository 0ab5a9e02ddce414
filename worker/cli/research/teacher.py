"""``ichvol teacher STUDY --out OUT [--models ...]``: the BLAST-CT teacher on one study.

:mod:`worker.measure.teacher_study` does the work. Writes the outputs ``ichvol segment``
writes (result.json with per-class volumes, mask.npz, mask.nii.gz, seg.dcm with one segment
per class, overlay.png), so that the two models can be compared on a site's own scans. Not
the worker's model. Unusable input exits with code 2 and one line on stderr; the models load
only once the study is known to be usable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, metavar="STUDY", help="folder with the study's DICOM files (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--models", nargs="+", metavar="NAME", help="shipped BLAST-CT models to average (default: model_1)")
    p.add_argument("--engine", help="inference engine (default: ICHVOL_INFERENCE_ENGINE; auto: bfloat16 where fast)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.errors import StudyError
    from worker.imaging.series_selection import SelectionRules
    from worker.measure.teacher import load_teacher, teacher_engine
    from worker.measure.teacher_study import teacher_study
    from worker.model import framework

    engine = args.engine or settings.inference_engine
    teacher_engine(engine)  # an unknown engine fails now, before the study is read
    framework.set_threads(settings.inference_threads)
    try:
        result = teacher_study(
            study_dir=args.study_dir,
            out_dir=args.out,
            teacher=lambda: load_teacher(args.models, engine=engine, threads=settings.inference_threads),
            rules=SelectionRules.from_settings(settings),
        )
    except StudyError as error:
        print(f"ichvol: {error.message} [{error.code.value}]", file=sys.stderr)
        return 2
    v = result["volumes_ml"]
    print(
        f"BLAST-CT ({', '.join(result['model']['models'])}): hemorrhage {result['hemorrhage_ml']:.2f} mL "
        f"(IPH {v['IPH']:.2f}, EAH {v['EAH']:.2f}, IVH {v['IVH']:.2f}; oedema {v['oedema']:.2f} mL), "
        f"{result['n_slices']} slices, series {result['series_instance_uid']}; outputs in {args.out}. {DISCLAIMER}"
    )
    return 0
