#!/usr/bin/env python
"""Write a "site" of phantom studies for ``ichvol adapt``: one study per subfolder, each with its truth.

Research use only, not for clinical use.

Every kind and size of ``scripts/evaluate_default.py``'s table once (5 kinds x 3 sizes) plus
``--empty`` studies without hemorrhage, with that table's geometry and realism but seeds of
their own (6,000,000 and up, never used by training, validation or the table), so a model
distilled or adapted on this site is still scored on studies it never saw. Each study has
``truth/truth_mask.npz`` (``scripts/distillation_phantoms.py`` reads it).

    .venv/bin/python scripts/make_phantom_site.py SITE [--empty 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluate_default import CASES, phantom_spec, write_phantom

FIRST_SEED = 6_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="new or empty folder")
    parser.add_argument("--empty", type=int, default=3, help="studies without hemorrhage (default 3)")
    args = parser.parse_args(argv)

    from worker.synth.phantom import LesionSpec

    jobs: list[tuple[str, float | None]] = [(k, v) for k, vs in CASES.items() for v in vs]
    jobs += [("none", None)] * args.empty
    written = 0
    for n, (kind, volume) in enumerate(jobs):
        lesions = () if volume is None else (LesionSpec(kind, volume_ml=volume),)
        name = f"{kind}-{volume:g}ml-{n:02d}" if volume is not None else f"none-{n:02d}"
        spec = phantom_spec(lesions, tilted=bool(n % 2))
        truth = write_phantom(args.site / name, spec, FIRST_SEED + 7 * n, label=name)
        if truth is not None:
            written += 1
            print(f"{name}: {truth.analytic_volume_ml:.1f} mL", flush=True)
    print(f"{written} studies in {args.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
