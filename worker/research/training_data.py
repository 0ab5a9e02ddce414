"""Training slices and their streams: arrays in memory, sources on disk, tf.data pipelines, augmentation.

:class:`SliceArrays` holds images ``(n, S, S)`` float32 already windowed to [-1, 1] (see
:mod:`worker.model.preprocess`), masks ``(n, S, S)`` uint8 in {0, 1}, and the patient each
slice came from (splits are by patient, never by slice); a :class:`TrainingSource` streams
them from disk. :func:`finish_dataset` turns either into batches for
:func:`worker.research.training.train`, with the trainer's flips, small rotations and
intensity jitter (:func:`augment_pair`). TensorFlow is reached only through
:mod:`worker.model.framework`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from worker.model import framework


@dataclass(frozen=True)
class SliceArrays:
    """Training or validation slices at model input size."""

    images: npt.NDArray[np.float32]  # (n, S, S) in [-1, 1]
    masks: npt.NDArray[np.uint8]  # (n, S, S) in {0, 1}
    patients: tuple[str, ...]  # (n,) patient/study id per slice

    def __post_init__(self) -> None:
        if self.images.shape != self.masks.shape or self.images.ndim != 3:
            raise ValueError(f"images {self.images.shape} and masks {self.masks.shape} must be (n, S, S) alike")
        if len(self.patients) != self.images.shape[0]:
            raise ValueError("one patient id per slice is required")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, index: npt.NDArray[np.intp]) -> SliceArrays:
        return SliceArrays(self.images[index], self.masks[index], tuple(self.patients[i] for i in index))

    @property
    def input_size(self) -> int:
        return int(self.images.shape[1])

    def tf_dataset(self, *, batch_size: int, shuffle: bool, augment: bool, seed: int, repeat: bool = False) -> Any:
        """The slices as a ``tf.data`` pipeline (see :func:`make_dataset`)."""
        return make_dataset(self, batch_size=batch_size, shuffle=shuffle, augment=augment, seed=seed, repeat=repeat)

    def load_arrays(self) -> SliceArrays:
        return self


class TrainingSource(Protocol):
    """Training slices that can be streamed: :class:`SliceArrays` or a prepared dataset split.

    ``tf_dataset`` yields batches of ``(images (b, S, S, 1) float32 in [-1, 1],
    masks (b, S, S, 1) float32 in {0, 1})``; ``load_arrays`` holds every slice in memory.
    """

    @property
    def input_size(self) -> int: ...

    def __len__(self) -> int: ...

    def tf_dataset(self, *, batch_size: int, shuffle: bool, augment: bool, seed: int, repeat: bool = False) -> Any: ...

    def load_arrays(self) -> SliceArrays: ...


def split_by_patient(data: SliceArrays, *, val_fraction: float, seed: int) -> tuple[SliceArrays, SliceArrays]:
    """Split so that no patient has slices on both sides."""
    patients = sorted(set(data.patients))
    if len(patients) < 2:
        raise ValueError("at least two patients are needed for a patient-level split")
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    val_patients = set(patients[:n_val])
    is_val = np.array([p in val_patients for p in data.patients])
    return data.take(np.flatnonzero(~is_val)), data.take(np.flatnonzero(is_val))


def make_dataset(
    data: SliceArrays, *, batch_size: int, shuffle: bool, augment: bool, seed: int, repeat: bool = False
) -> Any:
    """A ``tf.data`` pipeline: shuffle, augment (flips, small rotations/scales, intensity jitter), batch, prefetch.

    Deterministic under ``seed`` (stateless random ops keyed by the position in the stream).
    """
    tf = framework.tf()
    images = data.images[..., None]
    masks = data.masks[..., None].astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    return finish_dataset(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        augment=augment,
        seed=seed,
        repeat=repeat,
        shuffle_buffer=min(len(data), 4096),
    )


def finish_dataset(
    ds: Any,
    *,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    repeat: bool,
    shuffle_buffer: int,
) -> Any:
    """Shuffle, repeat, augment, batch and prefetch a ``tf.data`` stream of ``(S, S, 1)`` pairs.

    The augmentation key of each element is ``(seed, position in the stream)``: the same
    slice gets a different augmentation in each epoch, and the whole stream is the same in
    every run with the same seed (the shuffle is seeded, the maps are ordered).
    """
    tf = framework.tf()
    if shuffle:
        ds = ds.shuffle(max(1, shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()

    def _augment(index: Any, pair: Any) -> Any:
        image, mask = pair
        if not augment:
            return image, mask
        key = tf.stack([tf.cast(seed, tf.int64), index])
        return augment_pair(image, mask, key)

    ds = ds.map(_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augment_pair(image: Any, mask: Any, key: Any) -> Any:
    """Random flip, rotation (+-10 deg), scale (0.9-1.1) and intensity jitter of one (S, S, 1) pair."""
    tf = framework.tf()
    seeds = tf.random.experimental.stateless_split(tf.cast(key, tf.int64), num=6)
    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
    image = tf.where(flip, tf.image.flip_left_right(image), image)
    mask = tf.where(flip, tf.image.flip_left_right(mask), mask)
    angle = tf.random.stateless_uniform([], seeds[1], -10.0, 10.0) * np.pi / 180.0
    scale = tf.random.stateless_uniform([], seeds[2], 0.9, 1.1)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    centre = (size - 1.0) / 2.0
    # output pixel (x, y) samples input at A (x, y) + b: rotation and scale about the centre
    transform = tf.stack(
        [
            cos,
            -sin,
            centre - cos * centre + sin * centre,
            sin,
            cos,
            centre - sin * centre - cos * centre,
            0.0,
            0.0,
        ]
    )[None]
    shape = tf.shape(image)[:2]
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=shape,
        fill_value=-1.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    mask = tf.raw_ops.ImageProjectiveTransformV3(
        images=mask[None],
        transforms=transform,
        output_shape=shape,
        fill_value=0.0,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )[0]
    gain = tf.random.stateless_uniform([], seeds[3], 0.9, 1.1)
    offset = tf.random.stateless_uniform([], seeds[4], -0.08, 0.08)
    noise = tf.random.stateless_normal(tf.shape(image), seeds[5], stddev=0.03)
    image = tf.clip_by_value(image * gain + offset + noise, -1.0, 1.0)
    return image, mask
