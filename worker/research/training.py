"""Training DR-UNet (or the UNet baseline) the paper's way, with validation and resume.

Defaults follow the paper: Adam, learning rate 2e-4, batch 16, BCE + Dice loss,
50 epochs, 256x256 input. Each epoch is validated; the weights with the best
validation Dice are kept as the output ``.keras`` file (with metadata, see
:mod:`worker.model.weights`). An interrupted run resumes from its last finished epoch,
optimizer state included (Keras ``BackupAndRestore`` in ``work_dir/backup``). Every
epoch is logged to ``work_dir/log.csv`` and ``log.json``; ``curves.png`` plots them.

Data are :class:`~worker.research.training_data.SliceArrays`: images ``(n, S, S)`` float32 already windowed to
[-1, 1] (see :mod:`worker.model.preprocess`), masks ``(n, S, S)`` uint8 in {0, 1}, and the
patient each slice came from (splits are by patient, never by slice); or any
:class:`~worker.research.training_data.TrainingSource`, such as a split of a prepared TFRecord dataset
(:class:`worker.research.datasets.DatasetSplit`), streamed from disk. Validation data are held in
memory (a source is loaded with its ``load_arrays``).

Short runs and BatchNorm: Keras' BatchNormalization keeps moving statistics with momentum
0.99, so after a few hundred steps of fast learning they still lag the weights and the
model in inference mode can predict nothing while it segments well in training mode
(measured: validation Dice 0.0 in inference mode, 0.95 in training mode after 300 steps at
learning rate 1e-2; 0.71 with momentum 0.9). ``TrainConfig.bn_momentum`` (0.5 for quick
runs) shortens that memory; the default keeps the layers' own 0.99, right for the paper's
50 epochs. Before each validation the moving statistics are also recomputed for the current
weights ("precise BatchNorm", :func:`recalibrate_batchnorm`, over
``TrainConfig.bn_recalibration_batches`` training batches without augmentation), so what
is validated and saved is what inference will compute (measured on the default model's
run at learning rate 1e-3: validation Dice 0.07 in inference mode before, 0.83 in
training mode). Early in a run the thresholded validation Dice also swings between epochs (a
model that is not yet confident sits near the 0.5 threshold): the best epoch is kept.

Mixed precision (``mixed_precision=True``) computes in float16 where a GPU supports it; the
weights stay float32 and the saved model is always a plain float32 model.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.errors import ConfigurationError
from worker.model import framework
from worker.model.weights import ModelInfo
from worker.research.training_data import SliceArrays, TrainingSource

log = logging.getLogger(__name__)

DEFAULT_HU_WINDOW = (-20.0, 100.0)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Units: learning rate per step, sizes in pixels."""

    out_path: Path
    work_dir: Path
    architecture: str = "drunet"
    dims: int = 32
    input_size: int = 256
    epochs: int = 50
    batch_size: int = 16
    learning_rate: float = 2e-4
    seed: int = 0
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    augment: bool = True
    mixed_precision: bool = False
    float16_weights: bool = False
    version: str = ""
    training_data: str = ""
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    verbose: int = 1
    bn_momentum: float | None = None  # None: the layers' own (0.99); e.g. 0.5 for short runs
    bn_recalibration_batches: int = 25  # precise BatchNorm before each validation (0: off)
    init_weights: Path | None = None  # fine-tune: start from this weights file instead of random weights
    lr_schedule: str = "constant"  # "constant", or "cosine": decay to LR_FLOOR_FRACTION of it over the run
    # Real slices with reference masks (images folder, masks folder): scored each epoch through the
    # image path of `ichvol predict-images`; the checkpoint kept is the best mean of this real Dice
    # and the pooled synthetic validation Dice (never the synthetic score alone). Never in the loss.
    real_images: tuple[Path, Path] | None = None


LR_SCHEDULES = ("constant", "cosine")
LR_FLOOR_FRACTION = 0.01  # a cosine schedule ends at 1 % of the starting learning rate


@dataclass
class TrainOutcome:
    out_path: Path
    best_epoch: int
    best_val_dice: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class _FunctionSegmenter:
    """A model function behind the Segmenter protocol (for scoring during training)."""

    engine = "keras"

    def __init__(self, info: ModelInfo, fn: Any, batch_size: int) -> None:
        self._info = info
        self._fn = fn
        self._batch_size = batch_size

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        parts = [
            np.asarray(self._fn(images[i : i + self._batch_size, ..., None]), dtype=np.float32)[..., 0]
            for i in range(0, len(images), self._batch_size)
        ]
        return np.concatenate(parts)


def combined_dice(synthetic: float, real: float | None) -> float:
    """What checkpoints and thresholds are chosen by: synthetic and real Dice averaged (real None/NaN: synthetic)."""
    return synthetic if real is None or real != real else 0.5 * synthetic + 0.5 * float(real)


def selection_score(scores: dict[str, float]) -> float:
    """What checkpoints are chosen by: :func:`combined_dice` of the pooled synthetic and the real-slice Dice."""
    return combined_dice(float(scores["val_dice_pooled"]), scores.get("real_dice"))


def _dice_scores(model_fn: Any, data: SliceArrays, batch_size: int) -> dict[str, float]:
    """Validation Dice at threshold 0.5: over hematoma slices (the paper's) and over all slices."""
    preds = (
        np.concatenate([model_fn(data.images[i : i + batch_size, ..., None]) for i in range(0, len(data), batch_size)])[
            ..., 0
        ]
        > 0.5
    )
    truth = data.masks > 0
    inter = np.logical_and(preds, truth).sum(axis=(1, 2)).astype(np.float64)
    sums = preds.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    per_slice = np.where(sums > 0, 2 * inter / np.maximum(sums, 1), 1.0)
    has_blood = truth.any(axis=(1, 2))
    pooled = 2 * inter.sum() / max(float(sums.sum()), 1.0)
    return {
        "val_dice_hematoma_slices": float(per_slice[has_blood].mean()) if has_blood.any() else float("nan"),
        "val_dice_all_slices": float(per_slice.mean()),
        "val_dice_pooled": float(pooled),
    }


def train(
    config: TrainConfig,
    *,
    train_data: SliceArrays | TrainingSource,
    val_data: SliceArrays | TrainingSource,
) -> TrainOutcome:
    """Train, validate each epoch, keep the best-Dice weights at ``config.out_path``.

    ``train_data`` is streamed (shuffled, augmented, repeated); ``val_data`` is held in
    memory. Both must be at ``config.input_size``. A ``work_dir`` that holds an interrupted
    run of the same configuration resumes it (weights, optimizer state, epoch, logs); one
    that holds a run of another configuration is refused (:class:`ConfigurationError`, as
    are data of the wrong size).
    """
    from worker.model import losses

    keras = framework.keras()
    tf = framework.tf()
    size = config.input_size
    if train_data.input_size != size or val_data.input_size != size:
        raise ConfigurationError(
            f"training slices are {train_data.input_size}x{train_data.input_size} and validation slices "
            f"{val_data.input_size}x{val_data.input_size}, the model input is {size}x{size}"
        )
    if len(train_data) == 0 or len(val_data) == 0:
        raise ConfigurationError("training and validation need at least one slice each")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigurationError(f"unknown learning-rate schedule {config.lr_schedule!r}: use one of {LR_SCHEDULES}")
    if config.init_weights is not None:
        check_init_weights(config)
    validation = val_data.load_arrays()
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(work_dir, config)
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy().name
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _fit(config, train_data=train_data, validation=validation, work_dir=work_dir, losses=losses, tf=tf)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


_RESUME_KEYS = (
    "architecture",
    "dims",
    "input_size",
    "batch_size",
    "learning_rate",
    "hu_window",
    "seed",
    "lr_schedule",
    "init_weights",
)
# What a configuration file written before a key existed implies for it.
_RESUME_DEFAULTS: dict[str, object] = {"lr_schedule": "constant", "init_weights": None}


def _check_resume(work_dir: Path, config: TrainConfig) -> None:
    """Record the run's configuration; refuse to resume a run of another one."""
    path = work_dir / "config.json"
    current = {key: getattr(config, key) for key in _RESUME_KEYS}
    current["hu_window"] = list(config.hu_window)
    current["init_weights"] = str(config.init_weights) if config.init_weights is not None else None
    if path.exists() and (work_dir / "backup").exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        changed = [key for key in _RESUME_KEYS if saved.get(key, _RESUME_DEFAULTS.get(key)) != current[key]]
        if changed:
            raise ConfigurationError(
                f"{work_dir} holds an interrupted run with another {', '.join(changed)}; "
                "use a new --work-dir or delete that one"
            )
    path.write_text(json.dumps(current, indent=1))


def check_init_weights(config: TrainConfig) -> ModelInfo:
    """The metadata of ``config.init_weights``, refused unless it fits the run (no TensorFlow).

    Fine-tuning starts from those weights, so the architecture, base filters, input size
    and HU window must be the run's: a model cannot take weights of another shape, and
    another window would change what its inputs mean.
    """
    from worker.model.weights import read_model_info

    assert config.init_weights is not None
    path = Path(config.init_weights)
    if not path.is_file():
        raise ConfigurationError(f"--init-weights {path} does not exist")
    info = read_model_info(path)
    wanted = {
        "architecture": (info.architecture, config.architecture),
        "dims": (info.dims, config.dims),
        "input size": (info.input_size, config.input_size),
        "HU window": (tuple(info.hu_window), tuple(float(v) for v in config.hu_window)),
    }
    different = [f"{name} {have} (run: {want})" for name, (have, want) in wanted.items() if have != want]
    if different:
        raise ConfigurationError(f"--init-weights {path.name} does not fit this run: {'; '.join(different)}")
    return info


def recalibrate_batchnorm(model: Any, batches: Any) -> int:
    """Precise BatchNorm: set every BatchNormalization layer's moving mean and variance to the
    average of its batch statistics over ``batches`` (an iterable of ``(n, S, S, 1)`` float32
    inputs, or ``(inputs, targets)`` pairs), computed with the current weights.

    Keras keeps an exponential average of batch statistics taken while the weights changed;
    after fast learning it lags them, and inference mode (which uses it) then differs from
    what training optimised. Returns the number of batches used (0: nothing changed).
    The layers' momentum is restored; the weights are not touched.
    """
    tf = framework.tf()
    from worker.model.networks import norm_layers

    layers = norm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums_mean = [np.zeros(layer.moving_mean.shape, dtype=np.float64) for layer in layers]
    sums_var = [np.zeros(layer.moving_variance.shape, dtype=np.float64) for layer in layers]
    n = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # each call leaves exactly that batch's statistics behind
        step = tf.function(lambda x: model(x, training=True), reduce_retracing=True, autograph=False)
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            step(tf.convert_to_tensor(x, dtype=tf.float32))
            for i, layer in enumerate(layers):
                sums_mean[i] += np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
                sums_var[i] += np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
            n += 1
        if n:
            for i, layer in enumerate(layers):
                layer.moving_mean.assign((sums_mean[i] / n).astype(np.float32))
                layer.moving_variance.assign((sums_var[i] / n).astype(np.float32))
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return n


def _export_copy(model: Any, config: TrainConfig) -> Any:
    """A fresh, uncompiled float32 copy of ``model`` for saving (no optimizer, no mixed policy)."""
    from worker.model.networks import build_model

    keras = framework.keras()
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = build_model(config.architecture, dims=config.dims, input_size=config.input_size)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(model.get_weights())
    return copy


def learning_rate_for(config: TrainConfig, *, steps_per_epoch: int) -> Any:
    """Adam's learning rate: a number (``constant``), or a Keras schedule over the optimizer's
    step count (``cosine``: from ``config.learning_rate`` down to ``LR_FLOOR_FRACTION`` of it
    at the run's last step; resumed runs continue it, the step count is in the backup)."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    keras = framework.keras()
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch, alpha=LR_FLOOR_FRACTION
    )


def _fit(
    config: TrainConfig,
    *,
    train_data: SliceArrays | TrainingSource,
    validation: SliceArrays,
    work_dir: Path,
    losses: Any,
    tf: Any,
) -> TrainOutcome:
    from worker.model.networks import DISPLAY_NAMES, build_model, save_model

    keras = framework.keras()
    size = config.input_size
    model = build_model(config.architecture, dims=config.dims, input_size=size)
    if config.init_weights is not None:
        from worker.model.networks import load_keras_model

        # A resumed run's own backup replaces these weights when fitting starts.
        model.set_weights(load_keras_model(Path(config.init_weights)).get_weights())
    if config.bn_momentum is not None:
        from worker.model.networks import norm_layers

        for layer in norm_layers(model):
            layer.momentum = float(config.bn_momentum)
    steps = config.steps_per_epoch or max(1, -(-len(train_data) // config.batch_size))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate_for(config, steps_per_epoch=steps)),
        loss=losses.bce_dice_loss,
        metrics=[losses.hard_dice],
    )
    train_ds = train_data.tf_dataset(
        batch_size=config.batch_size,
        shuffle=True,
        augment=config.augment,
        seed=config.seed,
        repeat=True,
    )
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
    calibration = (
        train_data.tf_dataset(
            batch_size=config.batch_size, shuffle=True, augment=False, seed=config.seed + 1, repeat=True
        )
        if config.bn_recalibration_batches > 0
        else None
    )

    def model_fn(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(predict(tf.constant(x)), dtype=np.float32)

    version = config.version or f"{config.architecture}-d{config.dims}-s{size}-{datetime.now(UTC):%Y%m%d%H%M}"
    state_path = work_dir / "best.json"
    best = json.loads(state_path.read_text()) if state_path.exists() else {"epoch": -1, "dice": -1.0}
    history: list[dict[str, float]] = []
    log_json = work_dir / "log.json"
    if log_json.exists():
        history = json.loads(log_json.read_text())

    real_pairs = None
    if config.real_images is not None:
        from worker.research.image_yardstick import load_reference_pairs

        real_pairs = load_reference_pairs(Path(config.real_images[0]), Path(config.real_images[1]))

    def validate() -> dict[str, float]:
        scores = _dice_scores(model_fn, validation, config.batch_size)
        if real_pairs is not None:
            from worker.measure.image_inference import ImageOptions
            from worker.research.image_yardstick import score_pairs

            segmenter = _FunctionSegmenter(info_for(scores), model_fn, config.batch_size)
            result, _ = score_pairs(real_pairs, segmenter=segmenter, options=ImageOptions())
            scores |= result.summary()
        scores["selection"] = selection_score(scores)
        return scores

    def info_for(scores: dict[str, float]) -> ModelInfo:
        return ModelInfo(
            name=DISPLAY_NAMES[config.architecture],
            architecture=config.architecture,
            dims=config.dims,
            input_size=size,
            hu_window=config.hu_window,
            version=version,
            training_data=config.training_data,
            validation={k: round(v, 4) for k, v in scores.items() if v == v},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    started = time.perf_counter()
    epoch_started = [started]
    if config.init_weights is not None and not history and best["epoch"] < 0:
        # Fine-tuning: the starting weights are epoch 0, scored as they are (their own
        # BatchNorm statistics) and kept unless an epoch beats them, so a run never hands
        # back a model that validates worse than the one it started from.
        scores = validate()
        history.append(
            {
                "epoch": 0.0,
                "loss": float("nan"),
                "train_dice": float("nan"),
                **scores,
                "seconds": 0.0,
                "slices_per_s": 0.0,
            }
        )
        best.update(epoch=0, dice=scores["selection"])
        save_model(_export_copy(model, config), config.out_path, info_for(scores), float16=config.float16_weights)
        state_path.write_text(json.dumps(best))
        _write_logs(work_dir, history)
        if config.verbose:
            print(f"epoch 0 (the starting weights): selection score {best['dice']:.3f}", flush=True)

    class _Validate(keras.callbacks.Callback):  # type: ignore[misc,name-defined]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            epoch_started[0] = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            train_seconds = time.perf_counter() - epoch_started[0]
            if calibration is not None:
                recalibrate_batchnorm(model, calibration.take(config.bn_recalibration_batches))
            scores = validate()
            seconds = time.perf_counter() - epoch_started[0]
            row = {
                "epoch": float(epoch + 1),
                "loss": float((logs or {}).get("loss", float("nan"))),
                "train_dice": float((logs or {}).get("hard_dice", float("nan"))),
                **scores,
                "seconds": round(seconds, 2),
                "slices_per_s": round(steps * config.batch_size / max(train_seconds, 1e-9), 2),
            }
            # A resumed run repeats the epochs after its last backup: keep one row per epoch.
            history[:] = [r for r in history if r["epoch"] < epoch + 1]
            history.append(row)
            dice = scores["selection"]
            if dice > best["dice"]:
                best.update(epoch=epoch + 1, dice=dice)
                save_model(
                    _export_copy(model, config), config.out_path, info_for(scores), float16=config.float16_weights
                )
                state_path.write_text(json.dumps(best))
            _write_logs(work_dir, history)
            if config.verbose:
                real = (
                    f", real slices {scores['real_dice']:.3f} ({scores['real_found']:.0f} found)"
                    if "real_dice" in scores
                    else ""
                )
                print(
                    f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f} "
                    f"val Dice {scores['val_dice_pooled']:.3f}{real}, selection {dice:.3f} "
                    f"(best {best['dice']:.3f} @ {best['epoch']}), "
                    f"{row['slices_per_s']:.1f} slices/s",
                    flush=True,
                )

    # Validation (and its log row) first, then the backup: an interruption between the two
    # repeats that epoch on resume, and its row is replaced, never lost.
    callbacks = [
        _Validate(),
        keras.callbacks.BackupAndRestore(str(work_dir / "backup")),
    ]
    model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps,
        callbacks=callbacks,
        verbose=config.verbose,
        shuffle=False,  # the dataset shuffles itself, deterministically
    )
    _plot_curves(work_dir, history)
    return TrainOutcome(
        out_path=Path(config.out_path),
        best_epoch=int(best["epoch"]),
        best_val_dice=float(best["dice"]),
        history=history,
        seconds=time.perf_counter() - started,
    )


def _write_logs(work_dir: Path, history: list[dict[str, float]]) -> None:
    (work_dir / "log.json").write_text(json.dumps(history, indent=1))
    if history:
        with (work_dir / "log.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)


def _plot_curves(work_dir: Path, history: list[dict[str, float]]) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [row["loss"] for row in history], label="training loss (BCE + Dice)")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [row["train_dice"] for row in history], label="training Dice")
    ax2.plot(epochs, [row["val_dice_pooled"] for row in history], label="validation Dice (pooled)")
    ax2.plot(
        epochs,
        [row["val_dice_hematoma_slices"] for row in history],
        label="validation Dice (hematoma slices)",
    )
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    path = work_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def average_weights(
    first: Path,
    second: Path,
    *,
    share_second: float,
    out: Path,
    version: str,
    calibration: Any = None,
    note: str = "",
) -> ModelInfo:
    """Write the weight average ``(1 - share_second) * first + share_second * second`` to ``out``.

    Meant for a fine-tuned model and the model it started from (weights along one training
    path average well; unrelated models do not). Both files must have the same architecture,
    dims, input size and HU window. ``calibration``: an iterable of ``(n, S, S, 1)`` float32
    input batches; when given, the BatchNorm statistics of the average are recomputed over it
    (:func:`recalibrate_batchnorm`), since averaged weights change every layer's activations.
    The metadata is ``second``'s with ``version``, the training description extended by how
    the file was made (and ``note``), and the validation scores dropped (they were the
    second model's). Returns the metadata written.
    """
    from dataclasses import replace

    from worker.model.networks import load_keras_model, save_model
    from worker.model.weights import read_model_info

    if not 0.0 <= share_second <= 1.0:
        raise ConfigurationError(f"the share of the second model must be in [0, 1], got {share_second}")
    info_a, info_b = read_model_info(Path(first)), read_model_info(Path(second))
    shape_a = (info_a.architecture, info_a.dims, info_a.input_size, tuple(info_a.hu_window))
    shape_b = (info_b.architecture, info_b.dims, info_b.input_size, tuple(info_b.hu_window))
    if shape_a != shape_b:
        raise ConfigurationError(f"cannot average {Path(first).name} {shape_a} with {Path(second).name} {shape_b}")
    model_a, model_b = load_keras_model(Path(first)), load_keras_model(Path(second))
    share = float(share_second)
    model_b.set_weights(
        [(1.0 - share) * a + share * b for a, b in zip(model_a.get_weights(), model_b.get_weights(), strict=True)]
    )
    n_batches = recalibrate_batchnorm(model_b, calibration) if calibration is not None else 0
    how = (
        f"weight average of {info_a.version} ({1.0 - share:.2f}) and {info_b.version} ({share:.2f})"
        + (f", BatchNorm statistics recomputed over {n_batches} batches" if n_batches else "")
        + (f"; {note}" if note else "")
    )
    info = replace(
        info_b,
        version=version,
        training_data=f"{info_b.training_data}; {how}",
        validation={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        sha256="",
    )
    save_model(model_b, Path(out), info)
    return info
