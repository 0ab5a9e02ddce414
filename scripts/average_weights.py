"""Average two weights files (a fine-tuned model and the one it started from), BatchNorm recomputed.

    .venv/bin/python scripts/average_weights.py FIRST SECOND --share 0.5 --out OUT --version V \
        --bank WORK/bank/synthetic-KEY.npz

The shipped default is made this way (``scripts/train_default.sh``, MODEL_CARD.md): the
fine-tuned run scored better on held-out phantoms, extra-axial kinds above all, and worse on
the real hemorrhage screenshots; the half-and-half average kept most of both. ``--bank``
is a training bank of ``ichvol train --synthetic realistic`` (uint8 slices); its first
``--calibration-slices`` slices (the bank is shuffled when made) recompute the BatchNorm
statistics. Research use only, not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    from worker.research.training import average_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--share", type=float, default=0.5, help="the second model's share (0..1)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--bank", type=Path, help="training bank (.npz) for the BatchNorm statistics")
    parser.add_argument("--calibration-slices", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    batches = None
    if args.bank is not None:
        with np.load(args.bank) as data:
            images = data["images"][: args.calibration_slices]
        x = (images.astype(np.float32) / 127.5 - 1.0)[..., None]  # the bank's uint8 back to [-1, 1]
        batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    info = average_weights(
        args.first,
        args.second,
        share_second=args.share,
        out=args.out,
        version=args.version,
        calibration=batches,
        note=f"over the first {args.calibration_slices} slices of the training bank" if batches else "",
    )
    print(f"wrote {args.out} ({info.version}). Research use only, not for clinical use.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
