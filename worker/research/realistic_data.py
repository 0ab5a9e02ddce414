"""Realistic synthetic training data for the default model: real anatomy and phantoms, randomised.

Research use only, not for clinical use.

No CT data with hematoma masks may ship with the project, so the default weights learn
from data the project can generate. A training sample is one axial slice at the model's
input size, made one of two ways:

* **lesion insertion into real anatomy** (``background_share`` of the samples): a slice of
  a real head CT without hemorrhage (the BSD-licensed GE scan in
  ``../shared/data/real-head-ct-ge/``, passed as a folder, never copied), resampled to a
  random view (:func:`worker.synth.domain_randomization.random_view`), with 0-3 synthetic
  hematomas blended in (:func:`worker.synth.lesion_insertion.insert_lesions`);
* **phantom studies** (the rest): whole synthetic head CTs from the phantom generator with
  the skull base, face, neck and shoulders (:mod:`worker.phantom_skull_base`), partial
  volume across the slice, beam hardening and mass effect, covering a random range from
  the shoulders or neck to the vertex; every slice is used, some get an extra 2-D lesion.

Both then pass :func:`worker.synth.domain_randomization.randomize_appearance` (noise, kernel,
streaks, contrast, window, 8-bit/JPEG export, head-holder arcs). A share of samples also
gets extra physiological-looking calcifications (bright, 100-400 HU, never labelled).

Samples are kept as uint8 (the [-1, 1] input quantised to 256 levels, 0.47 HU in the
model's window) in an in-memory :class:`UInt8Slices` bank, cached in the training work
folder, and streamed to Keras with the trainer's own flips/rotations
(:func:`worker.training.finish_dataset`). Validation is what inference sees: held-out
phantom studies and the real background scan itself (no lesion: every predicted pixel
there is a false positive), both prepared exactly as :func:`worker.preprocess.to_model_input`
prepares a study.

Arrays: images ``(n, S, S)``, masks ``(n, S, S)`` uint8 0/1; HU float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from worker.measure.postprocess import intracranial_mask
from worker.model import preprocess
from worker.research.training_data import SliceArrays, finish_dataset
from worker.synth.domain_randomization import RandomizationConfig, View, random_view, randomize_appearance
from worker.synth.lesion_insertion import LesionAppearance, insert_lesions
from worker.synth.lesion_shapes import ShapeBank

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

BANK_FORMAT = "ichvol-synthetic-bank/1"
RECIPES = ("v3", "physical")
PHANTOM_KIND_VOLUMES_ML = {
    "round": (0.3, 100.0),
    "irregular": (0.5, 120.0),
    "intraventricular": (0.3, 20.0),
    "subdural": (1.0, 150.0),
    "epidural": (1.0, 90.0),
}


@dataclass(frozen=True)
class BackgroundSlice:
    """One native slice of a real scan: HU ``(rows, columns)`` float32, its skull-enclosed space."""

    hu: F32
    intracranial: U8
    pixel_spacing_mm: tuple[float, float]


@dataclass(frozen=True)
class SyntheticConfig:
    """What one bank holds. ``size``: model input (pixels); ``n_samples``: training slices."""

    size: int = 160
    n_samples: int = 20000
    seed: int = 0
    background_share: float = 0.5
    window: tuple[float, float] = (-20.0, 100.0)
    empty_fraction_real: float = 0.35  # real-background samples left without a lesion
    calcification_fraction: float = 0.2
    n_val_phantoms: int = 16
    recipe: str = "v3"  # "v3" (the v3 weights' randomisation) or "physical" (RECIPES)
    screenshot_fraction: float = 0.3  # "physical": share of samples on the screenshot path
    lesion_shapes: str = ""  # digest of the real-shape label map ("" without one)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")

    def randomization(self) -> RandomizationConfig:
        if self.recipe == "physical":
            return replace(
                RandomizationConfig.physical(screenshot_fraction=self.screenshot_fraction), model_window=self.window
            )
        return replace(RandomizationConfig(), model_window=self.window)

    def appearance(self) -> LesionAppearance:
        return LesionAppearance.measured() if self.recipe == "physical" else LesionAppearance()

    @property
    def calcification_hu(self) -> tuple[float, float]:
        """Hard negatives: v3 drew 100-400 HU; "physical" only densities blood never has."""
        return (150.0, 600.0) if self.recipe == "physical" else (100.0, 400.0)

    def key(self, background_digest: str) -> str:
        fields = dict(self.__dict__)
        if fields["recipe"] == "v3":  # banks cached before the recipe existed keep their key
            for name in ("recipe", "screenshot_fraction", "lesion_shapes"):
                fields.pop(name)
        text = json.dumps([BANK_FORMAT, fields, background_digest], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- backgrounds -----------------------------------------------------------------------------


def load_background_slices(ct_dir: Path) -> tuple[BackgroundSlice, ...]:
    """Every slice of the study in ``ct_dir`` (read as ``ichvol segment`` reads it) with its
    intracranial mask. Raises :class:`worker.core.errors.StudyError` for an unusable folder."""
    from worker.imaging.dicom_load import load_study
    from worker.imaging.series_selection import SelectionRules

    series = load_study(Path(ct_dir), rules=SelectionRules())
    spacing = (float(series.pixel_spacing_mm[0]), float(series.pixel_spacing_mm[1]))
    inside = intracranial_mask(series.hu, pixel_spacing_mm=spacing)
    return tuple(
        BackgroundSlice(hu=series.hu[k].astype(np.float32), intracranial=inside[k], pixel_spacing_mm=spacing)
        for k in range(series.n_slices)
    )


def _recipe_text(config: SyntheticConfig, shapes: ShapeBank | None) -> str:
    if config.recipe == "v3":
        return "domain randomisation of window, gain, gamma, noise, kernel, streaks and 8-bit/JPEG export"
    real_shapes = f"; real outlines from {shapes.source} for half the parenchymal lesions" if shapes else ""
    return (
        "the physical recipe: calibrated HU with a few HU of offset, noise, kernel and streaks (no gain, gamma "
        f"or random window), {config.screenshot_fraction:.0%} of samples through the screenshot path (random "
        "brain display window, 8-bit, JPEG, re-anchored on the parenchyma as images are at inference); blood "
        "55-85 HU, homogeneous, sharp margins (darker collections extra-axial only); calcifications only at "
        f"150-600 HU{real_shapes}"
    )


def _shapes_digest(shapes: ShapeBank | None) -> str:
    if shapes is None:
        return ""
    digest = hashlib.sha256()
    for shape in shapes.shapes:
        digest.update(np.packbits(shape).tobytes() + str(shape.shape).encode())
    return digest.hexdigest()[:12]


def backgrounds_digest(slices: tuple[BackgroundSlice, ...]) -> str:
    digest = hashlib.sha256()
    for s in slices:
        digest.update(np.ascontiguousarray(s.hu[::8, ::8]).tobytes())
    return digest.hexdigest()[:12]


# --- hard negatives ----------------------------------------------------------------------------


def add_calcifications(
    hu: F32,
    intracranial: U8,
    *,
    pixel_mm: float,
    rng: np.random.Generator,
    hu_range: tuple[float, float] = (100.0, 400.0),
) -> F32:
    """1-4 small bright foci (``hu_range`` HU, 1-4 mm) in the intracranial space: never hematoma."""
    out = hu.copy()
    points = np.argwhere(intracranial > 0)
    if len(points) == 0:
        return out
    for _ in range(int(rng.integers(1, 5))):
        r, c = points[int(rng.integers(len(points)))]
        radius = max(float(rng.uniform(0.5, 2.0)) / pixel_mm, 0.6)
        value = float(rng.uniform(*hu_range))
        canvas = np.zeros(hu.shape, dtype=np.float32)
        cv2.circle(canvas, (int(c), int(r)), math.ceil(radius), 1.0, -1)
        canvas = np.asarray(cv2.GaussianBlur(canvas, (0, 0), sigmaX=max(radius / 2.0, 0.5)), dtype=np.float32)
        canvas /= max(float(canvas.max()), 1e-6)
        out = out * (1.0 - canvas) + value * canvas
    return out.astype(np.float32)


# --- samples from real backgrounds ----------------------------------------------------------


def real_background_sample(
    background: BackgroundSlice,
    *,
    config: SyntheticConfig,
    rng: np.random.Generator,
    shapes: ShapeBank | None = None,
) -> tuple[U8, U8]:
    """One training sample (uint8 image, uint8 mask) from a real slice with inserted hematomas."""
    view = random_view(
        hu=background.hu,
        mask=np.zeros(background.hu.shape, dtype=np.uint8),
        intracranial=background.intracranial,
        pixel_spacing_mm=background.pixel_spacing_mm,
        size=config.size,
        rng=rng,
    )
    hu, mask = view.hu, view.mask
    if rng.random() >= config.empty_fraction_real:
        n = int(rng.choice([1, 1, 1, 2, 2, 3]))
        hu, mask, _ = insert_lesions(
            hu=hu,
            intracranial=view.intracranial,
            pixel_spacing_mm=(view.pixel_mm, view.pixel_mm),
            rng=rng,
            n_lesions=n,
            appearance=config.appearance(),
            shapes=shapes,
        )
    if rng.random() < config.calcification_fraction:
        hu = add_calcifications(
            hu, view.intracranial * (1 - mask), pixel_mm=view.pixel_mm, rng=rng, hu_range=config.calcification_hu
        )
    return _finish(hu, mask, view.intracranial, view.pixel_mm, rng=rng, config=config)


def _finish(
    hu: F32, mask: U8, intracranial: U8, pixel_mm: float, *, rng: np.random.Generator, config: SyntheticConfig
) -> tuple[U8, U8]:
    unit = randomize_appearance(
        View(hu=hu, mask=mask, intracranial=intracranial, pixel_mm=pixel_mm), rng=rng, config=config.randomization()
    )
    image = np.clip(np.rint((unit + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


# --- samples from phantoms ---------------------------------------------------------------------


def random_phantom_spec(rng: np.random.Generator) -> Any:
    """A whole-range phantom study: shoulders/neck to vertex, realistic options, 0-2 lesions."""
    from worker.synth.phantom import LesionSpec, PhantomSpec

    kinds = tuple(PHANTOM_KIND_VOLUMES_ML)
    n_lesions = int(rng.choice([0, 1, 1, 1, 2]))
    lesions = []
    for _ in range(n_lesions):
        kind = str(kinds[int(rng.integers(len(kinds)))])
        low, high = PHANTOM_KIND_VOLUMES_ML[kind]
        volume = float(np.exp(rng.uniform(math.log(low), math.log(high))))
        lesions.append(LesionSpec(kind, volume_ml=volume, side="both" if kind == "intraventricular" else None))
    # 192 pixels of 1.1-1.45 mm (FOV 210-280 mm): rendered near the model's resolution, for speed.
    spacing = float(rng.uniform(1.1, 1.45))
    thickness = float(rng.uniform(2.5, 7.0))
    bottom = float(rng.uniform(-210.0, -30.0)) if rng.random() < 0.6 else float(rng.uniform(-70.0, -20.0))
    n_slices = int(np.clip((88.0 - bottom) / thickness, 8, 48))
    return PhantomSpec(
        rows=192,
        columns=192,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=thickness,
        n_slices=n_slices,
        first_position_mm=bottom,
        gantry_tilt_deg=float(rng.uniform(-20.0, 20.0)) if rng.random() < 0.5 else 0.0,
        lesions=tuple(lesions),
        noise_sigma_hu=float(rng.uniform(2.0, 8.0)),
        calcifications=bool(rng.random() < 0.85),
        slab_samples=3,
        beam_hardening=float(rng.uniform(0.2, 1.5)),
        mass_effect=float(rng.uniform(0.0, 1.0)),
    )


def render_random_phantom(seed: int) -> tuple[F32, U8, tuple[float, float]]:
    """HU and mask of a random phantom study (a new seed is tried when its lesions do not fit)."""
    from worker.synth.phantom import render_hu

    for attempt in range(20):
        study_seed = seed * 1000 + attempt
        spec = random_phantom_spec(np.random.default_rng(study_seed))
        try:
            hu, mask, geometry = render_hu(spec, study_seed)
        except ValueError:
            continue
        return hu, mask, geometry.pixel_spacing_mm
    raise RuntimeError(f"no phantom could be placed for seed {seed}")


def phantom_samples(seed: int, *, config: SyntheticConfig, shapes: ShapeBank | None = None) -> Iterator[tuple[U8, U8]]:
    """Training samples from every slice of one random phantom study."""
    rng = np.random.default_rng([config.seed, 2, seed])
    hu, mask, spacing = render_random_phantom(seed)
    inside = intracranial_mask(hu, pixel_spacing_mm=spacing)
    for k in range(hu.shape[0]):
        view = random_view(
            hu=hu[k], mask=mask[k], intracranial=inside[k], pixel_spacing_mm=spacing, size=config.size, rng=rng
        )
        slice_hu, slice_mask = view.hu, view.mask
        if rng.random() < 0.25:
            slice_hu, slice_mask, _ = insert_lesions(
                hu=slice_hu,
                intracranial=view.intracranial,
                pixel_spacing_mm=(view.pixel_mm, view.pixel_mm),
                rng=rng,
                n_lesions=1,
                existing_mask=slice_mask,
                appearance=config.appearance(),
                shapes=shapes,
            )
        if rng.random() < config.calcification_fraction:
            slice_hu = add_calcifications(
                slice_hu,
                view.intracranial * (1 - slice_mask),
                pixel_mm=view.pixel_mm,
                rng=rng,
                hu_range=config.calcification_hu,
            )
        yield _finish(slice_hu, slice_mask, view.intracranial, view.pixel_mm, rng=rng, config=config)


# --- the bank ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UInt8Slices:
    """Training slices stored as uint8 (a :class:`worker.training.TrainingSource`).

    ``images`` ``(n, S, S)`` uint8 hold the [-1, 1] input as ``(x + 1) * 127.5``; ``masks``
    ``(n, S, S)`` uint8 0/1; ``patients`` one source id per slice.
    """

    images: U8
    masks: U8
    patients: tuple[str, ...]

    @property
    def input_size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tf_dataset(self, *, batch_size: int, shuffle: bool, augment: bool, seed: int, repeat: bool = False) -> Any:
        from worker.model import framework

        tf = framework.tf()
        ds = tf.data.Dataset.from_tensor_slices((self.images[..., None], self.masks[..., None]))
        ds = ds.map(
            lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, tf.cast(y, tf.float32)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return finish_dataset(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            augment=augment,
            seed=seed,
            repeat=repeat,
            shuffle_buffer=min(len(self), 8192),
        )

    def load_arrays(self) -> SliceArrays:
        return SliceArrays(self.images.astype(np.float32) / 127.5 - 1.0, self.masks.copy(), self.patients)


_Task = tuple[str, int, SyntheticConfig, tuple[BackgroundSlice, ...], ShapeBank | None]


def _chunk(task: _Task) -> tuple[U8, U8, list[str]]:
    """One unit of bank generation (runs in a worker process): a phantom study or real samples."""
    kind, index, config, backgrounds, shapes = task
    images: list[U8] = []
    masks: list[U8] = []
    sources: list[str] = []
    if kind == "phantom":
        for image, mask in phantom_samples(index, config=config, shapes=shapes):
            images.append(image)
            masks.append(mask)
            sources.append(f"phantom-{index}")
    else:
        rng = np.random.default_rng([config.seed, 1, index])
        for _ in range(64):
            k = int(rng.integers(len(backgrounds)))
            image, mask = real_background_sample(backgrounds[k], config=config, rng=rng, shapes=shapes)
            images.append(image)
            masks.append(mask)
            sources.append(f"real-{k}")
    return np.stack(images), np.stack(masks), sources


def generate_bank(
    *,
    config: SyntheticConfig,
    backgrounds: tuple[BackgroundSlice, ...],
    workers: int = 1,
    progress: bool = False,
    shapes: ShapeBank | None = None,
) -> UInt8Slices:
    """Generate ``config.n_samples`` training samples (deterministic under ``config.seed``).

    Real-background samples come in chunks of 64, phantom samples a study at a time (its
    slice count); both are drawn until the share and the total are reached. ``workers`` > 1
    uses that many processes.
    """
    n_real = round(config.n_samples * config.background_share) if backgrounds else 0
    n_phantom = config.n_samples - n_real
    per_task = {"real": 64, "phantom": 24}  # samples a task gives (a phantom study: ~24-48 slices)
    images: list[U8] = []
    masks: list[U8] = []
    sources: list[str] = []
    counts = {"real": 0, "phantom": 0}
    wanted = {"real": n_real, "phantom": n_phantom}
    next_index = {"real": 0, "phantom": 0}

    def take(kind: str, result: tuple[U8, U8, list[str]]) -> None:
        room = wanted[kind] - counts[kind]
        if room <= 0:
            return
        x, y, s = result
        images.append(x[:room])
        masks.append(y[:room])
        sources.extend(s[:room])
        counts[kind] += min(room, len(x))
        if progress:
            print(f"synthetic bank: {counts['real'] + counts['phantom']}/{config.n_samples} samples", flush=True)

    def batch() -> list[_Task]:
        """Tasks enough for what is still missing (a short phantom study leaves a gap: more tasks)."""
        tasks = []
        for kind in ("real", "phantom"):
            room = wanted[kind] - counts[kind]
            if room <= 0:
                continue
            n = max(1, -(-room // per_task[kind]))
            base = 0 if kind == "real" else config.seed * 100_000
            tasks += [(kind, base + next_index[kind] + i, config, backgrounds, shapes) for i in range(n)]
            next_index[kind] += n
        return tasks

    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        while counts != wanted:
            tasks = batch()
            results = pool.map(_chunk, tasks, chunksize=1) if pool is not None else map(_chunk, tasks)
            for task, result in zip(tasks, results, strict=True):
                take(task[0], result)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    order = np.random.default_rng([config.seed, 3]).permutation(sum(len(x) for x in images))
    all_images = np.concatenate(images)[order]
    all_masks = np.concatenate(masks)[order]
    return UInt8Slices(all_images, all_masks, tuple(sources[i] for i in order))


def validation_slices(
    *, config: SyntheticConfig, backgrounds: tuple[BackgroundSlice, ...]
) -> tuple[SliceArrays, dict[str, int]]:
    """Held-out phantom studies (seeds no training study uses) and the real background scan
    with no lesion, prepared exactly as inference prepares a study (model window, square
    padding, resize). Returns the slices and how many of each."""
    images: list[F32] = []
    masks: list[U8] = []
    patients: list[str] = []
    for i in range(config.n_val_phantoms):
        seed = 900_000_000 + config.seed * 1000 + i
        hu, mask, _spacing = render_random_phantom(seed)
        x, fit = preprocess.to_model_input(hu, size=config.size, window=config.window)
        images.append(x)
        masks.append(preprocess.mask_to_model(mask, fit))
        patients += [f"val-phantom-{i}"] * len(x)
    n_phantom = len(patients)
    if backgrounds:
        hu = np.stack([b.hu for b in backgrounds])
        x, fit = preprocess.to_model_input(hu, size=config.size, window=config.window)
        images.append(x)
        masks.append(np.zeros(x.shape, dtype=np.uint8))
        patients += ["real-background"] * len(x)
    return SliceArrays(np.concatenate(images), np.concatenate(masks), tuple(patients)), {
        "phantom": n_phantom,
        "real_background": len(patients) - n_phantom,
    }


def load_or_generate_bank(
    *,
    config: SyntheticConfig,
    backgrounds: tuple[BackgroundSlice, ...],
    cache_dir: Path,
    workers: int | None = None,
    shapes: ShapeBank | None = None,
) -> UInt8Slices:
    """The bank for ``config`` from ``cache_dir`` (``synthetic-<key>.npz``), generated and saved if absent."""
    key = config.key(backgrounds_digest(backgrounds) if backgrounds else "none")
    path = Path(cache_dir) / f"synthetic-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return UInt8Slices(data["images"], data["masks"], tuple(str(s) for s in data["sources"]))
    bank = generate_bank(
        config=config,
        backgrounds=backgrounds,
        workers=workers or max(1, (os.cpu_count() or 1)),
        progress=True,
        shapes=shapes,
    )
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=bank.images, masks=bank.masks, sources=np.asarray(bank.patients))
    tmp.replace(path)
    return bank


def training_sources(
    *,
    input_size: int,
    window: tuple[float, float],
    n_samples: int,
    seed: int,
    cache_dir: Path,
    background_ct: Path | None = None,
    workers: int | None = None,
    recipe: str = "v3",
    lesion_shapes: Path | None = None,
    screenshot_fraction: float = 0.3,
    empty_fraction_real: float = 0.35,
) -> tuple[UInt8Slices, SliceArrays, str]:
    """Training bank, validation slices and a description for ``ichvol train --synthetic realistic``.

    ``background_ct``: a folder holding one real head CT without hemorrhage (DICOM), used
    as background for lesion insertion and, unaltered, as the false-positive part of
    validation; without it every sample is a phantom. ``recipe``: ``v3`` or ``physical``
    (:data:`RECIPES`); ``lesion_shapes``: a NIfTI label map whose intraparenchymal label gives
    real outlines for half the parenchymal lesions (:mod:`worker.synth.lesion_shapes`). Raises
    :class:`worker.core.errors.StudyError` when the folder holds no usable CT.
    """
    from worker.synth.lesion_shapes import load_shape_bank

    backgrounds = load_background_slices(background_ct) if background_ct is not None else ()
    shapes = load_shape_bank(lesion_shapes) if lesion_shapes is not None else None
    config = SyntheticConfig(
        size=input_size,
        n_samples=n_samples,
        seed=seed,
        window=(float(window[0]), float(window[1])),
        background_share=0.6 if backgrounds else 0.0,
        recipe=recipe,
        lesion_shapes=_shapes_digest(shapes),
        screenshot_fraction=screenshot_fraction,
        empty_fraction_real=empty_fraction_real,
    )
    bank = load_or_generate_bank(
        config=config, backgrounds=backgrounds, cache_dir=cache_dir, workers=workers, shapes=shapes
    )
    validation, counts = validation_slices(config=config, backgrounds=backgrounds)
    n_real = sum(1 for p in bank.patients if p.startswith("real-"))
    n_blood = int(bank.masks.reshape(len(bank), -1).any(axis=1).sum())
    where = f"the real head CT in {Path(background_ct).name}/ (no hemorrhage)" if background_ct else "none"
    description = (
        f"realistic synthetic data (worker.research.realistic_data, seed {seed}): {len(bank)} training slices at "
        f"{input_size} px, {n_blood} with hematoma; {n_real} from synthetic hematomas blended into {where} with "
        f"random views, {len(bank) - n_real} from whole-range phantom studies (skull base, neck, shoulders); "
        f"{_recipe_text(config, shapes)}. Validation: "
        f"{counts['phantom']} slices of {config.n_val_phantoms} held-out phantom studies and the "
        f"{counts['real_background']} unaltered real background slices (every pixel predicted there is false)"
    )
    return bank, validation, description
