"""``ichvol adapt STUDIES --out WEIGHTS.keras [--model BASE]``: site adaptation (:mod:`worker.research.adaptation`).

Recomputes the BatchNorm statistics of the base model (default: the shipped weights) over
the site's own unlabelled studies, one per subfolder of ``STUDIES``; writes a new weights
file (never the default). Fewer than five usable studies: exit 2, nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


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


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.imaging.series_selection import SelectionRules
    from worker.model import framework
    from worker.research.adaptation import DEFAULT_SITE_SHARE, adapt_model

    framework.set_threads(settings.inference_threads)
    report = adapt_model(
        studies_dir=args.studies,
        out_path=args.out,
        base_model=args.base_model or (Path(settings.model_path) if settings.model_path else None),
        rules=SelectionRules.from_settings(settings),
        progress=True,
        site_share=DEFAULT_SITE_SHARE if args.site_share is None else args.site_share,
    )
    for skipped in report.skipped:
        print(f"skipped {skipped.name}: {skipped.reason} [{skipped.code}]")
    print(
        f"adapted {report.base.version} to {report.n_studies} studies ({report.n_slices} slices) in "
        f"{report.seconds:.0f} s: {report.adapted.version}, sha256 {report.adapted.sha256[:12]}..., written to "
        f"{report.out_path}. Use it with ICHVOL_MODEL={report.out_path}; unset it to roll back. {DISCLAIMER}"
    )
    return 0
