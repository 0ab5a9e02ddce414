"""``ichvol train``: the command-line front of :mod:`worker.training`.

Data come from a prepared dataset (``--data DIR``, made by ``ichvol dataset``: its
``train`` split for training, its ``val`` split or ``--val-data DIR`` for validation) or,
without ``--data``, from the phantom generator (synthetic slices with exact masks). Every
default is the paper's (Adam 2e-4, batch 16, BCE + Dice, 50 epochs, 256x256); small values
make a quick CPU run. The input size and HU window of a prepared dataset are the model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from worker.core.notices import DISCLAIMER
from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.keras)")
    p.add_argument("--data", type=Path, help="prepared dataset (ichvol dataset): trains on its train split")
    p.add_argument("--val-data", type=Path, help="prepared dataset to validate on (default: --data's val split)")
    p.add_argument("--architecture", choices=["drunet", "unet"], default="drunet")
    p.add_argument("--dims", type=int, default=32, help="base filters (paper: 32)")
    p.add_argument(
        "--input-size", type=int, default=None, help="model input size in pixels (paper: 256; default: the dataset's)"
    )
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="constant (the paper), or cosine decay to 1%% of --lr over the run (settles a run for the last epochs)",
    )
    p.add_argument(
        "--init-weights",
        type=Path,
        help="fine-tune: start from this weights file (e.g. the shipped default) instead of random weights; "
        "same architecture, --dims, input size and HU window",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, help="checkpoints, logs and curves (default: OUT's folder/train-<name>)")
    p.add_argument("--phantoms", type=int, default=40, help="without --data: phantom studies to train and validate on")
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="without --data: share of phantom patients for validation"
    )
    p.add_argument(
        "--synthetic",
        choices=["phantom", "realistic"],
        default="phantom",
        help="without --data: basic phantom slices, or realistic synthetic data (real-CT backgrounds with "
        "inserted hematomas, whole-range phantoms, domain randomisation; worker.research.realistic_data)",
    )
    p.add_argument(
        "--background-ct",
        type=Path,
        help="with --synthetic realistic: a real head CT without hemorrhage (DICOM folder) to blend hematomas into",
    )
    p.add_argument(
        "--synthetic-samples", type=int, default=20000, help="with --synthetic realistic: training slices to generate"
    )
    p.add_argument(
        "--recipe",
        choices=["v3", "physical"],
        default="v3",
        help="with --synthetic realistic: v3 (the v3 weights' wide randomisation of window, gain and gamma) or "
        "physical (what CT physically varies on the HU path, plus a screenshot path; worker.research.realistic_data)",
    )
    p.add_argument(
        "--screenshot-fraction",
        type=float,
        default=0.3,
        help="with --recipe physical: share of samples on the screenshot path (8-bit display window, JPEG)",
    )
    p.add_argument(
        "--real-empty-fraction",
        type=float,
        default=0.35,
        help="with --synthetic realistic: share of real-background samples left without inserted blood "
        "(hard negatives: the real anatomy that is not blood)",
    )
    p.add_argument(
        "--lesion-shapes",
        type=Path,
        help="with --synthetic realistic: a NIfTI label map (e.g. BLAST-CT scan_0_segmentation.nii.gz) whose "
        "label 1 gives real hemorrhage outlines for half the intraparenchymal lesions (read, never copied)",
    )
    p.add_argument(
        "--real-images",
        type=Path,
        help="real slice images (8-bit) scored each epoch against --real-masks; checkpoints are chosen on the "
        "mean of this real Dice and the synthetic validation Dice (never in the loss)",
    )
    p.add_argument("--real-masks", type=Path, help="reference masks for --real-images (same file names)")
    p.add_argument(
        "--synthetic-cache",
        type=Path,
        help="with --synthetic realistic: folder for the generated bank (default: work dir)",
    )
    p.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: one pass)")
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--bn-momentum", type=float, help="BatchNorm momentum (default: Keras' 0.99; 0.5 for short runs)")
    p.add_argument(
        "--bn-recalibration-batches",
        type=int,
        default=25,
        help="before each validation, recompute BatchNorm statistics over this many training batches (0: off)",
    )
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute where a GPU supports it")
    p.add_argument("--float16-weights", action="store_true", help="store weights at half precision (half size)")
    p.add_argument("--version", default="", help="version string stored in the weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar (one line per epoch)")


def _prepared_sources(args: argparse.Namespace) -> tuple[Any, Any, tuple[float, float], int, str]:
    """Training and validation splits of prepared datasets, their window, size and a description."""
    from worker.core.errors import ConfigurationError
    from worker.research import datasets

    data = datasets.read_dataset(args.data)
    train_split = data.split("train")
    if args.val_data is not None:
        val_set = datasets.read_dataset(args.val_data)
        has_val = "val" in val_set.splits and val_set.splits["val"].n_examples > 0
        val_split = val_set.split("val") if has_val else val_set.all_records(name="val")
        if val_set.input_size != data.input_size or val_set.hu_window != data.hu_window:
            raise ConfigurationError(
                f"--val-data is {val_set.input_size} px with window {val_set.hu_window}, --data is "
                f"{data.input_size} px with window {data.hu_window}: prepare both alike"
            )
        where = f"{val_split.name} split of {Path(args.val_data).name}"
    else:
        if "val" not in data.splits or data.splits["val"].n_examples == 0:
            raise ConfigurationError(
                f"{args.data} has no validation split: prepare it with --val-fraction > 0 or give --val-data"
            )
        val_split = data.split("val")
        where = f"val split of {Path(args.data).name}"
    shared = set(train_split.patients) & set(val_split.patients)
    if shared:
        raise ConfigurationError(
            f"{len(shared)} patient(s) have slices in both the training and the validation data: "
            "split by patient (ichvol dataset does)"
        )
    if args.input_size is not None and args.input_size != data.input_size:
        raise ConfigurationError(
            f"--input-size {args.input_size} differs from the dataset's {data.input_size}: prepare it at that size"
        )
    description = (
        f"{data.description}; training: train split ({len(train_split)} slices, {len(train_split.patients)} "
        f"patients); validation: {where} ({len(val_split)} slices, {len(val_split.patients)} patients); "
        "split by patient"
    )
    return train_split, val_split, data.hu_window, data.input_size, description


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.core.errors import ConfigurationError
    from worker.model import framework
    from worker.research import datasets
    from worker.research.training import DEFAULT_HU_WINDOW, TrainConfig, train
    from worker.research.training_data import split_by_patient

    framework.set_threads(settings.inference_threads)
    if args.val_data is not None and args.data is None:
        raise ConfigurationError("--val-data needs --data (the training set)")
    if (args.real_images is None) != (args.real_masks is None):
        raise ConfigurationError("--real-images and --real-masks go together")
    train_data: Any
    val_data: Any
    if args.data is not None:
        train_data, val_data, window, input_size, description = _prepared_sources(args)
    elif args.synthetic == "realistic":
        from worker.research import realistic_data

        input_size = args.input_size or 256
        window = DEFAULT_HU_WINDOW
        cache = args.synthetic_cache or args.work_dir or Path(args.out).parent / f"train-{Path(args.out).stem}"
        train_data, val_data, description = realistic_data.training_sources(
            input_size=input_size,
            window=window,
            n_samples=args.synthetic_samples,
            seed=args.seed,
            cache_dir=cache,
            background_ct=args.background_ct,
            recipe=args.recipe,
            lesion_shapes=args.lesion_shapes,
            screenshot_fraction=args.screenshot_fraction,
            empty_fraction_real=args.real_empty_fraction,
        )
    else:
        if args.phantoms < 2:
            raise ConfigurationError("--phantoms must be at least 2 (training and validation patients)")
        input_size = args.input_size or 256
        window = DEFAULT_HU_WINDOW
        data = datasets.phantom_slices(n_studies=args.phantoms, input_size=input_size, window=window, seed=args.seed)
        train_data, val_data = split_by_patient(data, val_fraction=args.val_fraction, seed=args.seed)
        description = (
            f"{args.phantoms} synthetic phantom studies (ichvol phantom generator, seed {args.seed}); "
            f"{len(train_data)} training and {len(val_data)} validation slices, split by study"
        )
    device = framework.device_description()
    print(f"training {args.architecture} on {device}: {len(train_data)} training, {len(val_data)} validation slices")
    if args.mixed_precision and device == "CPU":
        print("ichvol: --mixed-precision has no float16 hardware to use here (no GPU); training in float16 anyway")
    if args.init_weights is not None:
        from worker.model.weights import read_model_info

        start = read_model_info(args.init_weights)
        description = f"{description}; fine-tuned from {start.version} (sha256 {start.sha256[:12]})"
    out = Path(args.out)
    config = TrainConfig(
        out_path=out,
        work_dir=args.work_dir or out.parent / f"train-{out.stem}",
        architecture=args.architecture,
        dims=args.dims,
        input_size=input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        hu_window=window,
        augment=not args.no_augment,
        mixed_precision=args.mixed_precision,
        float16_weights=args.float16_weights,
        version=args.version,
        steps_per_epoch=args.steps_per_epoch,
        training_data=description,
        verbose=2 if args.quiet else 1,
        bn_momentum=args.bn_momentum,
        bn_recalibration_batches=args.bn_recalibration_batches,
        init_weights=args.init_weights,
        lr_schedule=args.lr_schedule,
        real_images=None if args.real_images is None else (args.real_images, args.real_masks),
    )
    outcome = train(config, train_data=train_data, val_data=val_data)
    print(
        f"best validation Dice {outcome.best_val_dice:.3f} at epoch {outcome.best_epoch}; "
        f"weights in {outcome.out_path}; logs in {config.work_dir} ({outcome.seconds:.0f} s). {DISCLAIMER}"
    )
    return 0
