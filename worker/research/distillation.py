"""Distillation: DR-UNet fine-tuned on a site's own unlabelled studies, with the BLAST-CT teacher's blood as targets.

Research use only, not for clinical use.

``ichvol adapt --teacher blast-ct STUDIES --out WEIGHTS.keras``. BLAST-CT (a 3-D CNN trained
on real traumatic head CT) finds real blood that the synthetic-trained DR-UNet misses; it
is slow and not ours to retrain. Here DR-UNet learns from it on the site's own scans:

1. **Labels** (:mod:`worker.research.teacher_labels`): each study's series selected as
   ``ichvol segment`` selects it, the teacher's hemorrhage probability (IPH + EAH + IVH) on
   the native grid, cached per study and teacher (resumable, parallel over studies).
2. **A held-out fifth** of the usable studies (at least one), chosen by a hash of the study
   folder's name (the studies whose sha256 of the name sort first): never trained on, only
   scored.
3. **Fine-tuning** from the base weights on the other studies' slices prepared exactly as
   inference prepares them (:func:`worker.model.preprocess.to_model_input`), with soft
   targets (:func:`distillation_targets`, resampled like the input:
   :func:`worker.model.preprocess.soft_to_model`) under the project's BCE + Dice loss,
   mixed with samples of the synthetic bank (:mod:`worker.research.realistic_data`) at
   ``synthetic_share``, so bleed-free anatomy and the kinds of blood the teacher does not
   know (dark chronic collections) are not forgotten; then the BatchNorm statistics are
   recomputed over the site's training slices (AdaBN,
   :func:`worker.research.adaptation.adabn_batches`).
4. **A new weights file**, version ``<base>-distilled-<8 hex>``, with its provenance
   (:attr:`worker.model.weights.ModelInfo.provenance`). Never the default or the base file.
5. **Agreement** on the held-out studies, for the distilled and the base model: Dice of
   the model's final mask (the post-processing of ``ichvol segment``) against the
   teacher's mask (hemorrhage probability >= 0.5), mean over studies, and the Pearson
   correlation of their volumes (mL, from the DICOM geometry). Printed and written next to
   the weights (``<WEIGHTS stem>.agreement.json``). No labels are needed to read it; it
   says how far the student moved towards the teacher, not how right either is.

Targets (:data:`TARGETS`): ``soft`` is the teacher's probability as it is, so the student
copies the teacher's view of blood including its under-segmentation (about half the true
volume on real trauma scans). ``grown`` (the default) adds the teacher's mask grown into
connected blood-density tissue inside the skull with the pipeline's own seeded-growth rule
(:class:`worker.measure.seeded_growth.GrowthSettings`: 50-90 HU, away from bone, at most
15 mm from a confident seed), which measured on the shipped DR-UNet doubled real-scan Dice
at no false volume: the teacher's confident cores decide where blood is, the HU decide how
far it reaches. ``union`` adds, on top of ``grown``, the base DR-UNet's own final mask, so
what the base model already finds and the teacher does not call (small bleeds, dark
collections; measured on the phantoms in MODEL_CARD.md) is not unlearnt. ``temperature``
T divides the teacher's logits before any of these (:func:`tempered`): T > 1 passes on
more of its uncertainty, T < 1 makes its targets harder; its mask (p >= 0.5) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.ct import CtSeries
from worker.core.errors import ConfigurationError, StudyError
from worker.imaging.series_selection import SelectionRules
from worker.measure import volume
from worker.measure.pipeline import SegmentationOptions, final_mask
from worker.model import preprocess
from worker.model.weights import ModelInfo, default_model_path, read_model_info, resolve_model_path
from worker.research.adaptation import (
    DEFAULT_BATCHNORM_LAYERS,
    MIN_STUDIES,
    SkippedStudy,
    adabn_batches,
    batchnorm_statistics,
    blend_batchnorm_statistics,
    study_folders,
)
from worker.research.distillation_targets import TARGETS, TEACHER_THRESHOLD, distillation_targets, tempered
from worker.research.teacher_labels import (
    LabelledStudy,
    TeacherIdentity,
    TeacherLoader,
    label_studies,
    read_label,
)

__all__ = [
    "DEFAULT_EPOCHS",
    "TARGETS",
    "TEACHER_THRESHOLD",
    "Agreement",
    "DistillConfig",
    "DistillationReport",
    "distill",
    "distillation_targets",
    "fine_tune",
    "split_held_out",
    "synthetic_bank",
    "tempered",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

HELD_OUT_FRACTION = 0.2
DEFAULT_EPOCHS = 5
DEFAULT_SYNTHETIC_SHARE = 0.5
DEFAULT_SYNTHETIC_SAMPLES = 2000
DEFAULT_LEARNING_RATE = 1e-4  # a twentieth of the paper's: fine-tuning, not training
DEFAULT_BATCH_SIZE = 8
PREDICT_BATCH = 16


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run (module docstring). ``teacher``: builds the teacher (picklable for ``workers`` > 1)."""

    studies_dir: Path
    out_path: Path
    teacher: TeacherLoader
    base_model: Path | None = None
    cache_dir: Path | None = None  # None: ``teacher-labels/`` next to ``out_path``
    epochs: int = DEFAULT_EPOCHS
    steps_per_epoch: int | None = None  # None: the site's training slices seen about once an epoch
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LEARNING_RATE
    synthetic_share: float = DEFAULT_SYNTHETIC_SHARE
    synthetic_samples: int = DEFAULT_SYNTHETIC_SAMPLES
    background_ct: Path | None = None  # a bleed-free real head CT for the synthetic bank (optional)
    targets: str = "grown"
    temperature: float = 1.0  # the teacher's logits divided by this before any target is built
    workers: int = 1
    adabn: bool = True  # recompute BatchNorm statistics on the site's training slices after fine-tuning
    batchnorm_layers: int | None = DEFAULT_BATCHNORM_LAYERS  # AdaBN on the first this many layers (None: all)
    freeze_batchnorm: bool = False  # BatchNorm in inference mode while fine-tuning: its statistics stay the base's
    seed: int = 0
    min_studies: int = MIN_STUDIES
    rules: SelectionRules = field(default_factory=SelectionRules)
    options: SegmentationOptions = field(default_factory=SegmentationOptions)
    progress: bool = False

    def labels_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.out_path).parent / "teacher-labels"


@dataclass(frozen=True)
class Agreement:
    """A model against the teacher on the held-out studies (one entry per study, in order)."""

    studies: tuple[str, ...]
    dice: tuple[float, ...]
    model_ml: tuple[float, ...]
    teacher_ml: tuple[float, ...]

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice)) if self.dice else float("nan")

    @property
    def volume_r(self) -> float | None:
        """Pearson r of the volumes; None when undefined (fewer than two studies, or a constant side)."""
        a, b = np.asarray(self.model_ml), np.asarray(self.teacher_ml)
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            return None
        return float(np.corrcoef(a, b)[0, 1])

    def to_json(self) -> dict[str, Any]:
        r = self.volume_r
        return {
            "mean_dice": round(self.mean_dice, 4),
            "volume_pearson_r": None if r is None else round(r, 4),
            "studies": [
                {"study": s, "dice": round(d, 4), "model_ml": round(m, 3), "teacher_ml": round(t, 3)}
                for s, d, m, t in zip(self.studies, self.dice, self.model_ml, self.teacher_ml, strict=True)
            ],
        }

    def summary(self) -> str:
        r = self.volume_r
        return f"mean Dice {self.mean_dice:.3f}, volume r {'n/a' if r is None else f'{r:.3f}'}"


@dataclass(frozen=True)
class DistillationReport:
    out_path: Path
    agreement_path: Path
    base: ModelInfo
    distilled: ModelInfo
    teacher: TeacherIdentity
    train_studies: tuple[str, ...]
    held_out_studies: tuple[str, ...]
    n_train_slices: int
    n_reused_labels: int
    skipped: tuple[SkippedStudy, ...]
    student: Agreement
    base_agreement: Agreement
    seconds: float


def split_held_out(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train, held out)``: a fifth of ``names`` (at least one), those whose sha256 sorts first."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    held = set(ranked[: max(1, round(len(names) * HELD_OUT_FRACTION))])
    return tuple(n for n in names if n not in held), tuple(n for n in names if n in held)


def _usable(studies: Sequence[Path], rules: SelectionRules) -> tuple[list[Path], list[SkippedStudy]]:
    """Series selection on the headers alone (no pixels): which studies the teacher will see."""
    from worker.imaging.dicom_files import scan_study
    from worker.imaging.series_selection import select_series

    usable, skipped = [], []
    for study in studies:
        try:
            select_series(scan_study(study, max_files=rules.max_files).headers, rules=rules)
        except StudyError as error:
            skipped.append(SkippedStudy(study.name, error.code.value, error.message))
            continue
        usable.append(study)
    return usable, skipped


def _refuse_if_few(n_usable: int, n_studies: int, skipped: Sequence[SkippedStudy], config: DistillConfig) -> None:
    if n_usable < config.min_studies:
        listed = "; ".join(f"{s.name}: {s.reason} [{s.code}]" for s in skipped) or "none"
        raise ConfigurationError(
            f"distillation needs at least {config.min_studies} usable studies, {config.studies_dir} has "
            f"{n_usable} of {n_studies} (skipped: {listed}); nothing was written"
        )


def _check_config(config: DistillConfig, base_path: Path) -> None:
    out_path = Path(config.out_path)
    for protected in (default_model_path(), base_path):
        if out_path.exists() and out_path.resolve() == Path(protected).resolve():
            raise ConfigurationError(f"--out {out_path} would overwrite {Path(protected).name}: write a new file")
    if out_path.suffix != ".keras":
        raise ConfigurationError(f"--out must be a .keras file, got {out_path.name}")
    if config.targets not in TARGETS:
        raise ConfigurationError(f"unknown distillation targets {config.targets!r}: use one of {', '.join(TARGETS)}")
    if config.temperature <= 0.0:
        raise ConfigurationError(f"--temperature must be above 0, got {config.temperature}")
    if not 0.0 <= config.synthetic_share < 1.0:
        raise ConfigurationError(f"--synthetic-share must be in [0, 1), got {config.synthetic_share}")
    if config.epochs < 1 or config.workers < 1:
        raise ConfigurationError("--epochs and --workers must be at least 1")


def _site_slices(
    studies: Sequence[LabelledStudy],
    *,
    info: ModelInfo,
    config: DistillConfig,
    base_predict: Callable[[F32], F32] | None = None,
) -> tuple[F32, F32, list[str]]:
    """Model-input slices ``(n, S, S)`` in [-1, 1] and their targets ``(n, S, S)`` in [0, 1]; series UIDs.

    ``base_predict`` (the base model, needed by ``union`` targets) gives the base mask."""
    from worker.imaging.dicom_load import load_study

    images: list[F32] = []
    targets: list[F32] = []
    uids: list[str] = []
    for study in studies:
        series, hemorrhage = _series_and_label(study, config.rules, load_study)
        x, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
        base_mask = None
        if config.targets == "union":
            if base_predict is None:
                raise ConfigurationError("union targets need the base model")
            base_mask = final_mask(preprocess.to_native(base_predict(x), fit), series, config.options.for_model(info))
        native = distillation_targets(
            hemorrhage,
            series,
            targets=config.targets,
            options=config.options,
            temperature=config.temperature,
            base_mask=base_mask,
        )
        images.append(x)
        targets.append(preprocess.soft_to_model(native, fit))
        uids.append(series.series_instance_uid)
    return np.concatenate(images), np.concatenate(targets), uids


def _series_and_label(study: LabelledStudy, rules: SelectionRules, load_study: Any) -> tuple[CtSeries, F32]:
    series: CtSeries = load_study(study.path, rules=rules)
    label = read_label(study.cache_file)
    if label.series_uid != series.series_instance_uid or label.hemorrhage.shape != series.hu.shape:
        raise ConfigurationError(
            f"{study.name} changed since the teacher labelled it: delete {study.cache_file} and run again"
        )
    return series, label.hemorrhage


def synthetic_bank(config: DistillConfig, info: ModelInfo) -> Any:
    """The synthetic bank at the model's input size and window (cached in the labels folder), or None."""
    if config.synthetic_share <= 0.0 or config.synthetic_samples <= 0:
        return None
    from worker.research.realistic_data import SyntheticConfig, load_background_slices, load_or_generate_bank

    backgrounds = load_background_slices(config.background_ct) if config.background_ct is not None else ()
    synthetic = SyntheticConfig(
        size=info.input_size,
        n_samples=config.synthetic_samples,
        seed=config.seed,
        window=(float(info.hu_window[0]), float(info.hu_window[1])),
        background_share=0.6 if backgrounds else 0.0,
        n_val_phantoms=0,
    )
    return load_or_generate_bank(
        config=synthetic, backgrounds=backgrounds, cache_dir=config.labels_dir(), workers=config.workers
    )


def fine_tune(model: Any, *, images: F32, targets: F32, bank: Any, config: DistillConfig) -> tuple[int, list[float]]:
    """Adam on BCE + Dice over site slices mixed with bank samples; returns steps per epoch and epoch losses.

    With ``config.freeze_batchnorm`` the BatchNorm layers run in inference mode and are not
    trained (their statistics and scales stay the base model's), then are made trainable again.
    """
    from worker.model import framework, losses
    from worker.research.training_data import finish_dataset

    tf = framework.tf()
    keras = framework.keras()
    keras.utils.set_random_seed(config.seed)
    site = tf.data.Dataset.from_tensor_slices((images[..., None], targets[..., None].astype(np.float32)))
    site = site.shuffle(min(len(images), 4096), seed=config.seed, reshuffle_each_iteration=True).repeat()
    share = config.synthetic_share if bank is not None else 0.0
    if share > 0.0:
        synthetic = tf.data.Dataset.from_tensor_slices((bank.images[..., None], bank.masks[..., None]))
        synthetic = synthetic.map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, tf.cast(y, tf.float32)))
        synthetic = synthetic.shuffle(min(len(bank), 4096), seed=config.seed + 1).repeat()
        stream = tf.data.Dataset.sample_from_datasets(
            [site, synthetic], weights=[1.0 - share, share], seed=config.seed, stop_on_empty_dataset=False
        )
    else:
        stream = site
    batches = finish_dataset(
        stream,
        batch_size=config.batch_size,
        shuffle=False,
        augment=True,
        seed=config.seed,
        repeat=False,
        shuffle_buffer=1,
    )
    steps = config.steps_per_epoch or max(1, -(-round(len(images) / (1.0 - share)) // config.batch_size))
    from worker.model.networks import norm_layers

    norms = norm_layers(model)
    for layer in norms if config.freeze_batchnorm else ():
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss=losses.bce_dice_loss)
    history = model.fit(
        batches, epochs=config.epochs, steps_per_epoch=steps, verbose=2 if config.progress else 0, shuffle=False
    )
    for layer in norms:
        layer.trainable = True
    return steps, [float(v) for v in history.history.get("loss", [])]


def keras_predictor(model: Any) -> Callable[[F32], F32]:
    from worker.model import framework

    tf = framework.tf()
    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)

    def predict(images: F32) -> F32:
        parts = [
            np.asarray(step(tf.constant(images[i : i + PREDICT_BATCH, ..., None])), dtype=np.float32)[..., 0]
            for i in range(0, len(images), PREDICT_BATCH)
        ]
        return np.concatenate(parts)

    return predict


def mask_dice(a: npt.NDArray[np.integer], b: npt.NDArray[np.integer]) -> float:
    """Dice of two binary masks; 1.0 when both are empty (they agree that there is no blood)."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def agreements(
    models: dict[str, Callable[[F32], F32]],
    studies: Sequence[LabelledStudy],
    *,
    info: ModelInfo,
    rules: SelectionRules,
    options: SegmentationOptions,
) -> dict[str, Agreement]:
    """Each model's final mask against the teacher's on ``studies`` (each study read once)."""
    from worker.imaging.dicom_load import load_study

    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    for study in studies:
        series, hemorrhage = _series_and_label(study, rules, load_study)
        spacing, slabs = series.pixel_spacing_mm, series.slab_thickness_mm
        teacher_mask = (hemorrhage >= TEACHER_THRESHOLD).astype(np.uint8)
        teacher_ml = volume.planimetric_volume_ml(teacher_mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
        x, fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
        for name, predict in models.items():
            mask = final_mask(preprocess.to_native(predict(x), fit), series, options.for_model(info))
            model_ml = volume.planimetric_volume_ml(mask, pixel_spacing_mm=spacing, slab_thickness_mm=slabs)
            rows[name].append((mask_dice(mask, teacher_mask), model_ml, teacher_ml))
    names = tuple(s.name for s in studies)
    return {
        name: Agreement(names, tuple(r[0] for r in got), tuple(r[1] for r in got), tuple(r[2] for r in got))
        for name, got in rows.items()
    }


def _which_layers(config: DistillConfig) -> str:
    return "every layer" if config.batchnorm_layers is None else f"the first {config.batchnorm_layers} layer(s)"


def _version(base: ModelInfo, teacher: TeacherIdentity, uids: Sequence[str], config: DistillConfig) -> str:
    recipe: list[Any] = [config.targets, config.epochs, config.synthetic_share, config.synthetic_samples, config.seed]
    recipe += [] if config.adabn else ["no-adabn"]
    recipe += [] if config.temperature == 1.0 else [f"T{config.temperature:g}"]
    recipe += ["frozen-bn"] if config.freeze_batchnorm else []
    recipe += [] if not config.adabn or config.batchnorm_layers is None else [f"adabn-{config.batchnorm_layers}"]
    text = "\n".join([base.sha256, *teacher.sha256, *sorted(uids), json.dumps(recipe)])
    return f"{base.version}-distilled-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def distill(config: DistillConfig) -> DistillationReport:
    """Run the five stages of the module docstring; writes the weights and the agreement JSON.

    Raises :class:`ConfigurationError` (no weights written) when ``out_path`` would overwrite
    the default or base weights, or fewer than ``config.min_studies`` studies are usable
    (checked on the headers before the teacher runs, so then nothing at all is written).
    """
    started = time.perf_counter()
    base_path, _ = resolve_model_path(config.base_model)
    _check_config(config, base_path)
    base = read_model_info(base_path)
    studies = study_folders(config.studies_dir)
    usable, skipped = _usable(studies, config.rules)
    _refuse_if_few(len(usable), len(studies), skipped, config)
    bank = synthetic_bank(config, base)  # before any TensorFlow in this process: the bank may fork
    labelling = label_studies(
        usable,
        loader=config.teacher,
        cache_dir=config.labels_dir(),
        rules=config.rules,
        workers=config.workers,
        progress=config.progress,
    )
    skipped = [*skipped, *labelling.skipped]
    _refuse_if_few(len(labelling.labelled), len(studies), skipped, config)
    train_names, held_names = split_held_out([s.name for s in labelling.labelled])
    train = [s for s in labelling.labelled if s.name in set(train_names)]
    held = [s for s in labelling.labelled if s.name in set(held_names)]

    from worker.model.networks import load_keras_model, save_model
    from worker.research.training import recalibrate_batchnorm

    model = load_keras_model(base_path)
    images, targets, uids = _site_slices(train, info=base, config=config, base_predict=keras_predictor(model))
    steps, epoch_losses = fine_tune(model, images=images, targets=targets, bank=bank, config=config)
    if config.adabn:
        tuned = batchnorm_statistics(model)
        recalibrate_batchnorm(model, adabn_batches(images, seed=config.seed))
        if config.batchnorm_layers is not None:
            blend_batchnorm_statistics(model, tuned, 1.0, layers=config.batchnorm_layers)
    scores = agreements(
        {"distilled": keras_predictor(model), "base": keras_predictor(load_keras_model(base_path))},
        held,
        info=base,
        rules=config.rules,
        options=config.options,
    )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    provenance: dict[str, Any] = {
        "method": "distillation",
        "base_version": base.version,
        "base_sha256": base.sha256,
        "teacher": "blast-ct",
        "teacher_models": list(labelling.teacher.names),
        "teacher_sha256": list(labelling.teacher.sha256),
        "targets": config.targets,
        "temperature": config.temperature,
        "adabn": config.adabn,
        "freeze_batchnorm": config.freeze_batchnorm,
        "batchnorm_layers": "all" if config.batchnorm_layers is None else config.batchnorm_layers,
        "n_studies_train": len(train),
        "n_slices_train": len(images),
        "n_studies_held_out": len(held),
        "n_skipped": len(skipped),
        "epochs": config.epochs,
        "steps_per_epoch": steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "synthetic_share": config.synthetic_share if bank is not None else 0.0,
        "synthetic_samples": len(bank) if bank is not None else 0,
        "agreement_mean_dice": round(scores["distilled"].mean_dice, 4),
        "date": now,
    }
    distilled = replace(
        base,
        version=_version(base, labelling.teacher, uids, config),
        created=now,
        sha256="",
        validation={},
        training_data=(
            f"{base.training_data}; then distilled from the BLAST-CT teacher ({len(labelling.teacher.names)} models, "
            f"{config.targets} targets, temperature {config.temperature:g}) on {len(train)} unlabelled site "
            f"studies ({len(images)} slices), mixed with "
            f"synthetic samples at share {provenance['synthetic_share']}"
            + (f", BatchNorm statistics of {_which_layers(config)} recomputed (AdaBN)" if config.adabn else "")
        ),
        provenance=provenance,
    )
    out_path = Path(config.out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out_path, distilled)
    written = read_model_info(out_path)
    agreement_path = out_path.with_name(f"{out_path.stem}.agreement.json")
    agreement_path.write_text(
        json.dumps(
            {
                "model_version": written.version,
                "model_sha256": written.sha256,
                "base_version": base.version,
                "teacher_models": list(labelling.teacher.names),
                "teacher_mask": f"hemorrhage probability >= {TEACHER_THRESHOLD}",
                "held_out_studies": len(held),
                "distilled": scores["distilled"].to_json(),
                "base": scores["base"].to_json(),
                "epoch_losses": [round(v, 5) for v in epoch_losses],
            },
            indent=1,
        )
    )
    log.info("distilled %s into %s", base.version, written.version)
    return DistillationReport(
        out_path=out_path,
        agreement_path=agreement_path,
        base=base,
        distilled=written,
        teacher=labelling.teacher,
        train_studies=tuple(s.name for s in train),
        held_out_studies=tuple(s.name for s in held),
        n_train_slices=len(images),
        n_reused_labels=labelling.n_reused,
        skipped=tuple(skipped),
        student=scores["distilled"],
        base_agreement=scores["base"],
        seconds=time.perf_counter() - started,
    )
