"""Prepared TFRecord datasets (``ichvol dataset``): labelled data at model input size, split by patient.

Images are windowed exactly as inference windows them (:mod:`worker.model.preprocess`), so a
model never sees a different intensity mapping in training and in production:

* CT studies (DICOM, read by :func:`worker.imaging.dicom_load.load_study` as ``ichvol segment``
  reads them): HU clipped to the window and mapped to [-1, 1], padded to a square with air
  and resized to the input size (:func:`worker.model.preprocess.to_model_input`); the truth mask
  (:mod:`worker.imaging.ground_truth`) is padded and resized the same way and re-thresholded at
  0.5 (:func:`worker.model.preprocess.mask_to_model`).
* 2-D images (the seed's format: 8-bit slices already windowed, PNG/JPEG/BMP, any size):
  ``pixel / 127.5 - 1`` (the window (0, 255) on the pixel values, the same mapping as
  :func:`worker.model.preprocess.uint8_to_unit`), then the same padding and resizing. The HU
  window the images were exported with is recorded (the user states it), because a model
  trained on them windows DICOM input the same way.

Prepared datasets (``ichvol dataset``)
-------------------------------------
A folder with ``dataset.json`` (the manifest) and sharded GZIP TFRecord files
``<split>-<nnnnn>.tfrecord.gz`` for the splits ``train``, ``val`` and ``test``. The
manifest lists per split its files, counts, pseudonymous patients and, for studies, the
study folders (so that the ``test`` studies can be given to ``ichvol evaluate``). Every
record is one slice (``tf.train.Example``):

=========  ======================================================================
feature    content
=========  ======================================================================
image      bytes: float16 little-endian ``(S, S)``, row-major, in [-1, 1]
mask       bytes: uint8 ``(S, S)``, row-major, values 0/1
size       int64: ``S``
patient    bytes: the pseudonymous patient key (below)
source     bytes: the image's relative path, or ``<study folder>#<slice index>``
=========  ======================================================================

Splits are by patient, never by slice: every slice of a patient lands in the same split.
The patient of a 2-D image is its first sub-folder (``images/<patient>/<slice>.png``),
or, in a flat folder, the part of its name that the patient pattern captures (default:
everything before a trailing separator and number, ``P012_07.png`` -> ``P012``); an image
whose name does not match is a patient of its own. The patient of a study is its DICOM
PatientID (with IssuerOfPatientID), or the study folder's name where the ID is absent or
``patient_key="folder"`` asks for it (anonymised exports often give every study the same
ID). Patients are shuffled with the seed and split by the fractions. The manifest and the
records store only ``sha256("ichvol-dataset:" + key)[:16]``, never the ID itself.

Writing is all or nothing: everything goes to a hidden staging folder beside the output,
renamed into place only when every input was converted. Bad input (image/mask names that
do not match, masks that are not binary, sizes that differ, unreadable files, studies
without a usable series or truth) raises :class:`worker.core.errors.StudyError` naming the file,
and nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import worker
from worker.core.errors import ErrorCode, StudyError
from worker.core.notices import DISCLAIMER
from worker.model import framework, preprocess
from worker.research.datasets.labelled import (
    DEFAULT_PATIENT_PATTERN,
    ImagePair,
    assign_splits,
    find_image_pairs,
    find_studies,
    load_image_pair,
    load_study_slices,
    pseudonym,
    study_patient,
)
from worker.research.training_data import SliceArrays, finish_dataset

log = logging.getLogger(__name__)

MANIFEST_NAME = "dataset.json"
DATASET_FORMAT = "ichvol-tfrecord/1"
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_SIZE = 512

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


# --- TFRecord encoding ---------------------------------------------------------------------


def _example_bytes(tf: Any, image: F32, mask: U8, *, patient: str, source: str) -> bytes:
    train = tf.train

    def raw(value: bytes) -> Any:
        return train.Feature(bytes_list=train.BytesList(value=[value]))

    features = {
        "image": raw(np.ascontiguousarray(image, dtype="<f2").tobytes()),
        "mask": raw(np.ascontiguousarray(mask, dtype=np.uint8).tobytes()),
        "size": train.Feature(int64_list=train.Int64List(value=[int(image.shape[0])])),
        "patient": raw(patient.encode("utf-8")),
        "source": raw(source.encode("utf-8")),
    }
    serialized: bytes = train.Example(features=train.Features(feature=features)).SerializeToString()
    return serialized


def parse_example(record: Any, *, input_size: int) -> tuple[Any, Any]:
    """One serialized record -> ``(image (S, S, 1) float32, mask (S, S, 1) float32)`` tensors."""
    tf = framework.tf()
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "mask": tf.io.FixedLenFeature([], tf.string),
    }
    parsed = tf.io.parse_single_example(record, spec)
    image = tf.reshape(tf.io.decode_raw(parsed["image"], tf.float16, little_endian=True), [input_size, input_size, 1])
    mask = tf.reshape(tf.io.decode_raw(parsed["mask"], tf.uint8), [input_size, input_size, 1])
    return tf.cast(image, tf.float32), tf.cast(mask, tf.float32)


class _ShardWriter:
    """Writes one split's records into shards of at most ``shard_size`` records."""

    def __init__(self, tf: Any, folder: Path, split: str, shard_size: int) -> None:
        self._tf = tf
        self.folder = folder
        self.split = split
        self.shard_size = shard_size
        self.files: list[str] = []
        self.n_examples = 0
        self.n_hematoma = 0
        self.patients: set[str] = set()
        self.items: set[str] = set()  # study folders (or image keys) written
        self._writer: Any = None
        self._in_shard = 0

    def write(self, image: F32, mask: U8, *, patient: str, source: str, item: str) -> None:
        if self._writer is None or self._in_shard >= self.shard_size:
            self.close()
            name = f"{self.split}-{len(self.files):05d}.tfrecord.gz"
            self._writer = self._tf.io.TFRecordWriter(str(self.folder / name), options="GZIP")
            self.files.append(name)
            self._in_shard = 0
        self._writer.write(_example_bytes(self._tf, image, mask, patient=patient, source=source))
        self._in_shard += 1
        self.n_examples += 1
        self.n_hematoma += int(mask.any())
        self.patients.add(patient)
        self.items.add(item)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- prepared datasets ---------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a prepared dataset: its shard files, streamed with :meth:`tf_dataset`."""

    name: str
    paths: tuple[Path, ...]
    n_examples: int
    n_hematoma: int  # slices whose mask holds hematoma
    patients: tuple[str, ...]  # pseudonymous keys
    input_size: int

    def __len__(self) -> int:
        return self.n_examples

    def records(self) -> Any:
        """The raw parsed records ``(image, mask)`` in file order (no shuffling, no batching)."""
        tf = framework.tf()
        if not self.paths:
            raise ValueError(f"split {self.name!r} has no files")
        ds = tf.data.TFRecordDataset([str(p) for p in self.paths], compression_type="GZIP")
        size = self.input_size
        return ds.map(lambda r: parse_example(r, input_size=size), num_parallel_calls=tf.data.AUTOTUNE)

    def tf_dataset(self, *, batch_size: int, shuffle: bool, augment: bool, seed: int, repeat: bool = False) -> Any:
        """Shards interleaved (order shuffled with ``seed``), records shuffled, augmented, batched, prefetched.

        Deterministic under ``seed`` like :func:`worker.research.training_data.make_dataset`.
        """
        tf = framework.tf()
        if not self.paths:
            raise ValueError(f"split {self.name!r} has no files")
        files = tf.data.Dataset.from_tensor_slices([str(p) for p in self.paths])
        if shuffle:
            files = files.shuffle(len(self.paths), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(
            lambda p: tf.data.TFRecordDataset(p, compression_type="GZIP"),
            cycle_length=min(8, len(self.paths)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        size = self.input_size
        ds = ds.map(
            lambda r: parse_example(r, input_size=size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return finish_dataset(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            augment=augment,
            seed=seed,
            repeat=repeat,
            shuffle_buffer=min(self.n_examples, 4096),
        )

    def load_arrays(self) -> SliceArrays:
        """Every record of the split in memory (file order), with the patient of each slice."""
        tf = framework.tf()
        if not self.paths:
            raise ValueError(f"split {self.name!r} has no files")
        n, size = self.n_examples, self.input_size
        spec = {"patient": tf.io.FixedLenFeature([], tf.string)}

        def parse(record: Any) -> tuple[Any, Any, Any]:
            image, mask = parse_example(record, input_size=size)
            return image[..., 0], tf.cast(mask[..., 0], tf.uint8), tf.io.parse_single_example(record, spec)["patient"]

        raw = tf.data.TFRecordDataset([str(p) for p in self.paths], compression_type="GZIP")
        batches = raw.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
        images: list[F32] = []
        masks: list[U8] = []
        patients: list[str] = []
        for image, mask, patient in batches.as_numpy_iterator():
            images.append(np.asarray(image, dtype=np.float32))
            masks.append(np.asarray(mask, dtype=np.uint8))
            patients += [bytes(p).decode("utf-8") for p in patient]
        if len(patients) != n:
            raise StudyError(
                ErrorCode.INCONSISTENT_GEOMETRY,
                f"split {self.name!r} holds {len(patients)} records, its manifest says {n}",
            )
        return SliceArrays(np.concatenate(images), np.concatenate(masks), tuple(patients))


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset folder as its manifest describes it."""

    root: Path
    input_size: int
    hu_window: tuple[float, float]
    intensity: str  # "hu" (from CT studies) or "uint8" (from windowed 8-bit images)
    description: str
    seed: int
    splits: dict[str, DatasetSplit] = field(default_factory=dict)
    skipped: tuple[dict[str, str], ...] = ()

    def split(self, name: str) -> DatasetSplit:
        if name not in self.splits or self.splits[name].n_examples == 0:
            raise StudyError(
                ErrorCode.EMPTY_STUDY,
                f"the dataset {self.root} has no {name!r} split (splits: {', '.join(self.splits)})",
            )
        return self.splits[name]

    def all_records(self, *, name: str = "all") -> DatasetSplit:
        """Every split together, as one split."""
        parts = [s for s in self.splits.values() if s.n_examples]
        return DatasetSplit(
            name=name,
            paths=tuple(p for s in parts for p in s.paths),
            n_examples=sum(s.n_examples for s in parts),
            n_hematoma=sum(s.n_hematoma for s in parts),
            patients=tuple(sorted({p for s in parts for p in s.patients})),
            input_size=self.input_size,
        )


def read_dataset(root: Path) -> PreparedDataset:
    """Read a prepared dataset's manifest and check that its shard files exist."""
    root = Path(root)
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(ErrorCode.EMPTY_STUDY, f"{root} is not a prepared dataset: no {MANIFEST_NAME}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StudyError(ErrorCode.CORRUPT_PIXEL_DATA, f"{path} cannot be read: {exc}") from None
    try:
        if manifest["format"] != DATASET_FORMAT:
            raise StudyError(
                ErrorCode.UNSUPPORTED_PIXEL_FORMAT, f"{path}: format {manifest['format']!r}, expected {DATASET_FORMAT}"
            )
        size = int(manifest["input_size"])
        splits = {}
        for name, entry in manifest["splits"].items():
            paths = tuple(root / f for f in entry["files"])
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise StudyError(
                    ErrorCode.EMPTY_STUDY, f"{root}: shard {missing[0]} listed in {MANIFEST_NAME} is missing"
                )
            splits[name] = DatasetSplit(
                name=name,
                paths=paths,
                n_examples=int(entry["n_examples"]),
                n_hematoma=int(entry["n_hematoma"]),
                patients=tuple(str(p) for p in entry["patients"]),
                input_size=size,
            )
        window = manifest["hu_window"]
        return PreparedDataset(
            root=root,
            input_size=size,
            hu_window=(float(window[0]), float(window[1])),
            intensity=str(manifest["intensity"]),
            description=str(manifest.get("description", "")),
            seed=int(manifest.get("seed", 0)),
            splits=splits,
            skipped=tuple(dict(s) for s in manifest.get("skipped", [])),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StudyError(ErrorCode.CORRUPT_PIXEL_DATA, f"{path} is incomplete or malformed: {exc}") from None


@dataclass(frozen=True)
class _Item:
    """One unit of conversion: an image pair or a study, with its patient and split."""

    label: str
    patient: str
    split: str
    load: Callable[[], tuple[F32, U8]]


def _staging(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise StudyError(ErrorCode.UNSAFE_PATH, f"{out_dir} already exists and is not empty: choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _progress(items: Sequence[_Item], enabled: bool) -> Iterator[_Item]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="converting", unit="item", dynamic_ncols=True)


def prepare_dataset(
    *,
    out_dir: Path,
    input_size: int,
    window: tuple[float, float],
    images_dir: Path | None = None,
    masks_dir: Path | None = None,
    studies_dir: Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    negatives_per_study: int | None = None,
    patient_pattern: str = DEFAULT_PATIENT_PATTERN,
    patient_key: str = "patient-id",
    labels: Sequence[int] | None = None,
    skip_bad: bool = False,
    progress: bool = False,
) -> PreparedDataset:
    """Convert labelled 2-D images (``images_dir`` + ``masks_dir``) or studies (``studies_dir``) to TFRecords.

    ``window`` is the HU window: applied to CT studies, recorded for 8-bit images (the
    window they were exported with). ``negatives_per_study`` keeps every slice with
    hematoma and at most that many slices without (chosen with ``seed``) per study;
    ``None`` keeps all. ``skip_bad`` skips (and lists in the manifest) studies that cannot
    be used instead of failing. Returns the dataset as :func:`read_dataset` would.
    """
    if (studies_dir is None) == (images_dir is None and masks_dir is None):
        raise ValueError("give either images_dir and masks_dir, or studies_dir")
    if studies_dir is None and (images_dir is None or masks_dir is None):
        raise ValueError("images_dir and masks_dir go together")
    if input_size < 16:
        raise ValueError(f"input_size must be at least 16, got {input_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    preprocess.window_to_unit(np.zeros(1, np.float32), window=window)  # validates the window
    rng = np.random.default_rng(seed)
    skipped: list[dict[str, str]] = []
    items: list[_Item] = []
    if studies_dir is not None:
        intensity = "hu"
        studies = find_studies(Path(studies_dir))
        patients: dict[Path, str] = {}
        for study in studies:
            try:
                patients[study] = study_patient(study, patient_key=patient_key)
            except StudyError as error:
                if not skip_bad:
                    raise StudyError(error.code, f"study {study.name}: {error.message}") from None
                skipped.append({"study": study.name, "code": error.code.value, "reason": error.message})
        split_of = assign_splits(
            list(patients.values()), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        for study, patient in patients.items():

            def load(study: Path = study) -> tuple[F32, U8]:
                x, y = load_study_slices(study, input_size=input_size, window=window, labels=labels)
                if negatives_per_study is not None:
                    has = y.reshape(len(y), -1).any(axis=1)
                    empty = np.flatnonzero(~has)
                    picked = rng.choice(empty, size=min(negatives_per_study, empty.size), replace=False)
                    keep = np.sort(np.concatenate([np.flatnonzero(has), picked]).astype(np.intp))
                    x, y = x[keep], y[keep]
                return x, y

            items.append(_Item(study.name, patient, split_of[patient], load))
        description = (
            f"{len(patients)} CT studies from {Path(studies_dir).name}/ (truth: masks beside each study), "
            f"HU window {window[0]:g} to {window[1]:g}"
        )
    else:
        assert images_dir is not None and masks_dir is not None
        intensity = "uint8"
        pairs = find_image_pairs(Path(images_dir), Path(masks_dir), patient_pattern=patient_pattern)
        split_of = assign_splits(
            [p.patient for p in pairs], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        for pair in pairs:

            def load_pair(pair: ImagePair = pair) -> tuple[F32, U8]:
                return load_image_pair(pair, input_size=input_size)

            items.append(_Item(pair.key, pair.patient, split_of[pair.patient], load_pair))
        description = (
            f"{len(pairs)} windowed 8-bit slices of {len(set(split_of))} patients from {Path(images_dir).name}/ "
            f"and {Path(masks_dir).name}/ (exported with the HU window {window[0]:g} to {window[1]:g})"
        )
    if not items:
        raise StudyError(ErrorCode.EMPTY_STUDY, "no usable input: every study was skipped")
    order = rng.permutation(len(items))  # shards should not be sorted by patient name
    items = [items[i] for i in order]

    tf = framework.tf()
    staging = _staging(out_dir)
    writers = {name: _ShardWriter(tf, staging, name, shard_size) for name in SPLITS}
    try:
        for item in _progress(items, progress):
            try:
                x, y = item.load()
            except StudyError as error:
                if intensity == "hu" and skip_bad:
                    skipped.append({"study": item.label, "code": error.code.value, "reason": error.message})
                    continue
                message = error.message if error.message.startswith(item.label) else f"{item.label}: {error.message}"
                raise StudyError(error.code, message) from None
            key = pseudonym(item.patient)
            for i in range(x.shape[0]):
                source = item.label if intensity == "uint8" else f"{item.label}#{i}"
                writers[item.split].write(x[i], y[i], patient=key, source=source, item=item.label)
        for writer in writers.values():
            writer.close()
        if writers["train"].n_examples == 0:
            raise StudyError(ErrorCode.EMPTY_STUDY, "no training slices were written")
        manifest = {
            "format": DATASET_FORMAT,
            "input_size": input_size,
            "hu_window": [float(window[0]), float(window[1])],
            "intensity": intensity,
            "description": description,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "negatives_per_study": negatives_per_study,
            "splits": {
                name: {
                    "files": w.files,
                    "n_examples": w.n_examples,
                    "n_hematoma": w.n_hematoma,
                    "patients": sorted(w.patients),
                    **({"studies": sorted(w.items)} if intensity == "hu" else {}),
                }
                for name, w in writers.items()
            },
            "skipped": skipped,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "ichvol_version": worker.__version__,
            "disclaimer": DISCLAIMER,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        out = Path(out_dir)
        if out.exists():
            out.rmdir()  # checked empty above
        staging.rename(out)
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_dataset(Path(out_dir))
