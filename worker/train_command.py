"""``ichvol train``: the command-line front of :mod:`worker.training`.

Data come from the phantom generator (synthetic studies with exact masks) unless a
prepared dataset is given. Every default is the paper's (Adam 2e-4, batch 16,
BCE + Dice, 50 epochs, 256x256); small values make a quick CPU run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.ct import DISCLAIMER
from worker.settings import Settings


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.keras)")
    p.add_argument("--architecture", choices=["drunet", "unet"], default="drunet")
    p.add_argument("--dims", type=int, default=32, help="base filters (paper: 32)")
    p.add_argument("--input-size", type=int, default=256, help="model input size in pixels (paper: 256)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="checkpoints, logs and curves (default: OUT's folder/train-<name>)")
    p.add_argument("--phantoms", type=int, default=40, help="phantom studies for training and validation")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out for validation")
    p.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: one pass)")
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute where a GPU supports it")
    p.add_argument("--float16-weights", action="store_true", help="store weights at half precision (half size)")
    p.add_argument("--version", default="", help="version string stored in the weights")


def run_train_command(args: argparse.Namespace, settings: Settings) -> int:
    from worker import datasets, framework
    from worker.training import DEFAULT_HU_WINDOW, TrainConfig, split_by_patient, train

    framework.set_threads(settings.inference_threads)
    data = datasets.phantom_slices(
        n_studies=args.phantoms, input_size=args.input_size, window=DEFAULT_HU_WINDOW, seed=args.seed
    )
    train_data, val_data = split_by_patient(data, val_fraction=args.val_fraction, seed=args.seed)
    out = Path(args.out)
    config = TrainConfig(
        out_path=out,
        work_dir=args.work_dir or out.parent / f"train-{out.stem}",
        architecture=args.architecture,
        dims=args.dims,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        augment=not args.no_augment,
        mixed_precision=args.mixed_precision,
        float16_weights=args.float16_weights,
        version=args.version,
        steps_per_epoch=args.steps_per_epoch,
        training_data=(
            f"{args.phantoms} synthetic phantom studies (ichvol phantom generator, seed {args.seed}); "
            f"{len(train_data)} training and {len(val_data)} validation slices, split by study"
        ),
    )
    outcome = train(config, train_data=train_data, val_data=val_data)
    print(
        f"best validation Dice {outcome.best_val_dice:.3f} at epoch {outcome.best_epoch}; "
        f"weights in {outcome.out_path}; logs in {config.work_dir} ({outcome.seconds:.0f} s). {DISCLAIMER}"
    )
    return 0
