"""``ichvol phantom OUT_DIR``: a synthetic head-CT study with known hematoma truth.

The generator is :mod:`worker.synth.phantom`; this module turns its options into a
:class:`~worker.synth.phantom.spec.PhantomSpec` and prints the truth. Research use only,
not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.core.settings import Settings
from worker.synth.phantom.dicom import TRANSFER_SYNTAXES
from worker.synth.phantom.lesions import KINDS, LesionSpec
from worker.synth.phantom.spec import DISCLAIMER, EXTRA_SERIES, PhantomSpec
from worker.synth.phantom.study import generate_batch, generate_study

# ---------------------------------------------------------------------------------------
# Command line: ichvol phantom OUT_DIR


def _pair(text: str) -> tuple[float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected one number or two separated by a comma, got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from exc


def _lesion(text: str) -> LesionSpec | None:
    """``KIND`` or ``KIND:VOLUME_ML`` or ``KIND:VOLUME_ML:SIDE``; ``none`` for no lesion."""
    parts = text.split(":")
    if parts[0] == "none":
        return None
    try:
        volume = float(parts[1]) if len(parts) > 1 and parts[1] else None
        side = parts[2] if len(parts) > 2 and parts[2] else None
        return LesionSpec(kind=parts[0], volume_ml=volume, side=side)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ichvol phantom OUT_DIR``."""
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new or empty folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--n", type=int, default=1, help="number of studies; >1 writes OUT_DIR/<name>/ per study")
    parser.add_argument(
        "--lesion",
        action="append",
        type=_lesion,
        metavar="KIND[:ML[:SIDE]]",
        help=f"repeatable; KIND in {', '.join((*KINDS, 'random'))} or none (default: one random)",
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--columns", type=int, default=256)
    parser.add_argument("--pixel-spacing", type=_pair, default=(0.9, 0.9), metavar="MM[,MM]")
    parser.add_argument("--slice-thickness", type=float, default=5.0, metavar="MM")
    parser.add_argument("--slices", type=int, default=None, help="number of slices (default 28)")
    parser.add_argument("--slice-spacing", type=float, default=None, metavar="MM")
    parser.add_argument("--gaps", type=_floats, default=None, metavar="MM,MM,...", help="explicit uneven gaps")
    parser.add_argument("--uneven", action="store_true", help="random gaps between 1 and 7 mm")
    parser.add_argument("--tilt", type=float, default=0.0, metavar="DEG", help="gantry tilt about the x axis")
    parser.add_argument("--intercept", type=float, default=-1024.0, help="rescale intercept (0: signed storage)")
    parser.add_argument("--slope", type=float, default=1.0)
    parser.add_argument("--padding", type=int, default=None, help="pixel padding value outside the FOV circle")
    parser.add_argument("--transfer-syntax", choices=tuple(TRANSFER_SYNTAXES), default="explicit")
    parser.add_argument("--noise-hu", type=float, default=5.0, help="noise sigma in HU")
    parser.add_argument("--no-calcifications", action="store_true")
    parser.add_argument(
        "--extra-series",
        action="append",
        choices=EXTRA_SERIES,
        default=None,
        help="repeatable distractor series",
    )
    parser.add_argument("--nested", action="store_true", help="nested DICOM/ST*/SE* folders")
    parser.add_argument("--ordered-names", action="store_true", help="S0002I00001.dcm instead of random names")
    parser.add_argument("--shuffle-instances", action="store_true", help="shuffle InstanceNumber")
    parser.add_argument("--patient-id", default=None)
    parser.add_argument("--patient-name", default="Phantom^Head")
    parser.add_argument("--truth-dir", type=Path, default=None, help="default OUT_DIR/truth")


def _spec_from_args(args: argparse.Namespace) -> PhantomSpec:
    lesions: tuple[LesionSpec, ...]
    if args.lesion is None:
        lesions = (LesionSpec("random"),)
    else:
        lesions = tuple(item for item in args.lesion if item is not None)
    return PhantomSpec(
        rows=args.rows,
        columns=args.columns,
        pixel_spacing_mm=args.pixel_spacing,
        slice_thickness_mm=args.slice_thickness,
        n_slices=args.slices,
        slice_spacing_mm=args.slice_spacing,
        gaps_mm=args.gaps,
        uneven=args.uneven,
        gantry_tilt_deg=args.tilt,
        rescale_intercept=args.intercept,
        rescale_slope=args.slope,
        pixel_padding_value=args.padding,
        transfer_syntax=args.transfer_syntax,
        lesions=lesions,
        calcifications=not args.no_calcifications,
        noise_sigma_hu=args.noise_hu,
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        extra_series=tuple(args.extra_series or ()),
        random_file_names=not args.ordered_names,
        nested_folders=args.nested,
        shuffle_instance_numbers=args.shuffle_instances,
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``ichvol phantom``: 0 on success, 2 for a bad option, 1 when writing fails.

    Prints one summary line (no patient identifiers) with the true volume and the disclaimer.
    """
    try:
        spec = _spec_from_args(args)
        if args.n > 1:
            if args.truth_dir is not None:
                raise ValueError("--truth-dir works with one study only (each batch study keeps truth/ inside)")
            truths = generate_batch(args.out_dir, n=args.n, seed=args.seed, spec=spec)
            total = sum(t.analytic_volume_ml for t in truths)
            print(
                f"ichvol phantom: wrote {len(truths)} studies to {args.out_dir}; true hematoma volumes "
                f"{min(t.analytic_volume_ml for t in truths):.2f} to "
                f"{max(t.analytic_volume_ml for t in truths):.2f} mL "
                f"(total {total:.2f} mL). {DISCLAIMER}"
            )
            return 0
        truth = generate_study(args.out_dir, spec=spec, seed=args.seed, truth_dir=args.truth_dir)
    except ValueError as exc:
        print(f"ichvol phantom: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ichvol phantom: cannot write: {exc.strerror or exc} ({exc.filename})", file=sys.stderr)
        return 1
    kinds = ", ".join(str(lesion["kind"]) for lesion in truth.lesions) or "no lesion"
    print(
        f"ichvol phantom: wrote {len(truth.sop_instance_uids)} slices to {truth.study_dir} ({kinds}); "
        f"true hematoma volume {truth.analytic_volume_ml:.2f} mL (voxel mask {truth.mask_volume_ml:.2f} mL), "
        f"truth in {truth.truth_dir}. {DISCLAIMER}"
    )
    return 0
