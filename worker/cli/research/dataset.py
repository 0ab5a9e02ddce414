"""``ichvol dataset``: labelled 2-D images or CT studies to a prepared TFRecord dataset.

The command-line front of :func:`worker.research.datasets.prepare_dataset`; the format, the
windowing and the patient split are documented there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from worker.cli import hu_window
from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def _labels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label numbers separated by commas, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new (or empty) folder for the TFRecords")
    source = p.add_argument_group("source (2-D images with masks, or CT studies)")
    source.add_argument("--images", type=Path, help="folder of windowed 8-bit slices (PNG/JPEG/BMP)")
    source.add_argument("--masks", type=Path, help="folder of binary masks with the images' names")
    source.add_argument("--studies", type=Path, help="folder of study folders, each with DICOM and its truth mask")
    p.add_argument("--input-size", type=int, default=256, help="model input size in pixels (paper: 256)")
    p.add_argument(
        "--window",
        type=hu_window,
        metavar="LOW,HIGH",
        help="HU window: applied to studies (default -20,100); for images, the window they were exported with "
        "(required, stored in the weights)",
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients for validation (default 0.2)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of patients for testing (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and slice sampling")
    p.add_argument("--shard-size", type=int, default=512, help="records per TFRecord file (default 512)")
    p.add_argument("--negatives-per-study", type=int, help="studies: keep at most N slices without hematoma each")
    p.add_argument(
        "--patient-pattern",
        default=None,
        help="images in a flat folder: regular expression with a group 'patient' matched to the file name",
    )
    p.add_argument(
        "--patient-key",
        choices=["patient-id", "folder"],
        default="patient-id",
        help="studies: group by DICOM PatientID (default) or by study folder",
    )
    p.add_argument("--labels", type=_labels, help="NIfTI label values / SEG segment numbers that are hematoma")
    p.add_argument("--skip-bad", action="store_true", help="studies: skip unusable ones (listed) instead of failing")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.errors import ConfigurationError
    from worker.model import framework
    from worker.research import datasets
    from worker.research.training import DEFAULT_HU_WINDOW

    framework.set_threads(settings.inference_threads)
    if args.studies is not None and (args.images is not None or args.masks is not None):
        raise ConfigurationError("give --studies, or --images with --masks, not both")
    if args.studies is None and (args.images is None or args.masks is None):
        raise ConfigurationError("give --studies DIR, or --images DIR with --masks DIR")
    if args.studies is None and args.window is None:
        raise ConfigurationError(
            "--window LOW,HIGH is required for 2-D images: the HU window they were exported with "
            "(it is stored in the trained weights so that DICOM input is windowed the same way)"
        )
    try:
        dataset = _prepare(args, datasets, DEFAULT_HU_WINDOW)
    except ValueError as exc:  # option values the parser cannot check (fractions, sizes)
        raise ConfigurationError(str(exc)) from None
    parts = [
        f"{name} {s.n_examples} slices ({s.n_hematoma} with hematoma, {len(s.patients)} patient(s))"
        for name, s in dataset.splits.items()
        if s.n_examples
    ]
    skipped = f"; skipped {len(dataset.skipped)} unusable studies (see dataset.json)" if dataset.skipped else ""
    print(f"dataset in {dataset.root}: {'; '.join(parts)}{skipped}. {DISCLAIMER}")
    return 0


def _prepare(args: argparse.Namespace, datasets: Any, default_window: tuple[float, float]) -> Any:
    return datasets.prepare_dataset(
        out_dir=args.out_dir,
        input_size=args.input_size,
        window=args.window or default_window,
        images_dir=args.images,
        masks_dir=args.masks,
        studies_dir=args.studies,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        shard_size=args.shard_size,
        negatives_per_study=args.negatives_per_study,
        patient_pattern=args.patient_pattern or datasets.DEFAULT_PATIENT_PATTERN,
        patient_key=args.patient_key,
        labels=args.labels,
        skip_bad=args.skip_bad,
        progress=True,
    )
