"""``ichvol adapt STUDIES --out WEIGHTS.keras [--model BASE] [--teacher blast-ct ...]``: site adaptation.

Without ``--teacher``: recomputes the BatchNorm statistics of the base model (default: the
shipped weights) over the site's own unlabelled studies, one per subfolder of ``STUDIES``
(:mod:`worker.research.adaptation`). With ``--teacher blast-ct``: distillation, DR-UNet
fine-tuned on the site's studies with the BLAST-CT teacher's hemorrhage probabilities as
targets, agreement reported on a held-out fifth (:mod:`worker.research.distillation`).
Both write a new weights file (never the default). Fewer than five usable studies: exit 2,
nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings

TEACHERS = ("blast-ct",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", type=Path, metavar="STUDIES", help="folder with one study per subfolder (any nesting)")
    p.add_argument("--out", type=Path, required=True, help="the adapted weights file to write (.keras)")
    p.add_argument("--model", dest="base_model", type=Path, help="base weights (default: ICHVOL_MODEL or shipped)")
    p.add_argument(
        "--site-share",
        type=float,
        default=None,
        help="the site's share of the new BatchNorm statistics, above 0 up to 1 (1: plain AdaBN; "
        "default: the value MODEL_CARD.md measured)",
    )
    p.add_argument(
        "--batchnorm-layers",
        type=_layers,
        default=None,
        metavar="N|all",
        help="adapt only the first N BatchNorm layers from the input, or all (plain AdaBN); "
        "default: the value MODEL_CARD.md measured",
    )
    d = p.add_argument_group("distillation (--teacher)")
    d.add_argument("--teacher", choices=TEACHERS, help="distil this teacher's view of blood into the model")
    d.add_argument("--teacher-models", nargs="+", metavar="NAME", help="teacher models (default: its ensemble)")
    d.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    d.add_argument("--cache", type=Path, help="teacher label cache (default: teacher-labels/ next to --out)")
    d.add_argument("--workers", type=int, default=1, help="processes labelling studies in parallel (default 1)")
    d.add_argument("--synthetic-share", type=float, default=0.5, help="share of synthetic samples (default 0.5)")
    d.add_argument("--synthetic-samples", type=int, default=2000, help="size of the synthetic bank (default 2000)")
    d.add_argument("--background-ct", type=Path, help="a bleed-free real head CT for the synthetic bank")
    d.add_argument(
        "--targets",
        choices=("soft", "grown", "union"),
        default="grown",
        help="distillation targets: the teacher's probabilities (soft), grown into blood-density tissue (grown, "
        "the default), or grown and the base model's own mask (union)",
    )
    d.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divide the teacher's logits by this before building targets (>1 softer, <1 harder; default 1)",
    )
    d.add_argument("--no-adabn", action="store_true", help="keep the fine-tuned BatchNorm statistics (no AdaBN)")
    d.add_argument(
        "--freeze-batchnorm",
        action="store_true",
        help="keep the base model's BatchNorm statistics while fine-tuning (combine with --no-adabn to keep them)",
    )
    d.add_argument("--steps-per-epoch", type=int, help="default: the site's training slices once an epoch")


def _layers(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or all, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"at least 1 layer, got {n}")
    return n


def _batchnorm_layers(value: int | str | None) -> int | None:
    """``--batchnorm-layers`` as the research functions take it: None for all, else a count."""
    from worker.research.adaptation import DEFAULT_BATCHNORM_LAYERS

    if value is None:
        return DEFAULT_BATCHNORM_LAYERS
    return None if value == "all" else int(value)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.model import framework

    framework.set_threads(settings.inference_threads)
    base = args.base_model or (Path(settings.model_path) if settings.model_path else None)
    if args.teacher:
        return _distil(args, settings, base)
    from worker.imaging.series_selection import SelectionRules
    from worker.research.adaptation import DEFAULT_SITE_SHARE, adapt_model

    report = adapt_model(
        studies_dir=args.studies,
        out_path=args.out,
        base_model=base,
        rules=SelectionRules.from_settings(settings),
        progress=True,
        site_share=DEFAULT_SITE_SHARE if args.site_share is None else args.site_share,
        batchnorm_layers=_batchnorm_layers(args.batchnorm_layers),
    )
    for skipped in report.skipped:
        print(f"skipped {skipped.name}: {skipped.reason} [{skipped.code}]")
    print(
        f"adapted {report.base.version} to {report.n_studies} studies ({report.n_slices} slices) in "
        f"{report.seconds:.0f} s: {report.adapted.version}, sha256 {report.adapted.sha256[:12]}..., written to "
        f"{report.out_path}. Use it with ICHVOL_MODEL={report.out_path}; unset it to roll back. {DISCLAIMER}"
    )
    return 0


def _threads_per_worker(configured: int, workers: int) -> int:
    """The teacher's threads in each labelling process: the setting, else the cores shared out."""
    import os

    if configured > 0 or workers <= 1:
        return configured
    return max(1, (os.cpu_count() or 1) // workers)


def _distil(args: argparse.Namespace, settings: Settings, base: Path | None) -> int:
    from worker.measure.pipeline import SegmentationOptions
    from worker.research.distillation import DistillConfig, distill
    from worker.research.teacher_labels import TeacherSource

    options = SegmentationOptions.from_settings(settings)
    report = distill(
        DistillConfig(
            studies_dir=args.studies,
            out_path=args.out,
            teacher=TeacherSource(
                tuple(args.teacher_models) if args.teacher_models else None,
                threads=_threads_per_worker(settings.inference_threads, args.workers),
            ),
            base_model=base,
            cache_dir=args.cache,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            synthetic_share=args.synthetic_share,
            synthetic_samples=args.synthetic_samples,
            background_ct=args.background_ct,
            targets=args.targets,
            temperature=args.temperature,
            workers=args.workers,
            adabn=not args.no_adabn,
            freeze_batchnorm=args.freeze_batchnorm,
            batchnorm_layers=_batchnorm_layers(args.batchnorm_layers),
            rules=options.rules,
            options=options,
            progress=True,
        )
    )
    for skipped in report.skipped:
        print(f"skipped {skipped.name}: {skipped.reason} [{skipped.code}]")
    print(
        f"teacher labels: {len(report.train_studies) + len(report.held_out_studies)} studies "
        f"({report.n_reused_labels} from the cache), teacher {', '.join(report.teacher.names)}"
    )
    print(
        f"held-out agreement with the teacher ({len(report.held_out_studies)} studies never trained on): "
        f"distilled {report.student.summary()}; base {report.base_agreement.summary()} ({report.agreement_path})"
    )
    print(
        f"distilled {report.base.version} on {len(report.train_studies)} studies ({report.n_train_slices} slices) "
        f"in {report.seconds / 60:.1f} min: {report.distilled.version}, sha256 {report.distilled.sha256[:12]}..., "
        f"written to {report.out_path}. Use it with ICHVOL_MODEL={report.out_path}; unset it to roll back. "
        f"{DISCLAIMER}"
    )
    return 0
