"""Prepared datasets: image/mask folders and studies to TFRecords, split by patient, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers.labelled_data import write_image_folders, write_phantom_studies
from worker.core.errors import ErrorCode, StudyError
from worker.imaging.dicom_load import load_study
from worker.imaging.series_selection import SelectionRules
from worker.model import preprocess
from worker.research import datasets

WINDOW = (-20.0, 100.0)


# --- image folders ------------------------------------------------------------------------


def test_pairs_match_by_name_and_patients_come_from_names_or_folders(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=2, slices=2)
    pairs = datasets.find_image_pairs(images, masks)
    assert [p.key for p in pairs] == ["P0_00", "P0_01", "P1_00", "P1_01"]
    assert [p.patient for p in pairs] == ["P0", "P0", "P1", "P1"]
    nested_images, nested_masks = tmp_path / "ni" / "case-7", tmp_path / "nm" / "case-7"
    nested_images.mkdir(parents=True)
    nested_masks.mkdir(parents=True)
    (images / "P0_00.png").rename(nested_images / "a.png")
    (masks / "P0_00.png").rename(nested_masks / "a.jpg")  # any image extension on either side
    nested = datasets.find_image_pairs(tmp_path / "ni", tmp_path / "nm")
    assert [(p.key, p.patient) for p in nested] == [("case-7/a", "case-7")]


def test_unmatched_names_are_named_in_the_error(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=1, slices=2)
    (masks / "P0_01.png").rename(masks / "P0_01_mask.png")
    with pytest.raises(StudyError) as info:
        datasets.find_image_pairs(images, masks)
    assert "P0_01.png" in info.value.message and "P0_01_mask.png" in info.value.message
    assert info.value.code == ErrorCode.INCONSISTENT_GEOMETRY


def test_a_mask_that_is_not_binary_or_of_another_size_is_refused(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=1, slices=2)
    pairs = datasets.find_image_pairs(images, masks)
    grey = cv2.imread(str(masks / "P0_00.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(masks / "P0_00.png"), cv2.GaussianBlur(grey, (5, 5), 0))
    with pytest.raises(StudyError, match="mask P0_00 is not binary") as info:
        datasets.load_image_pair(pairs[0], input_size=32)
    assert info.value.code == ErrorCode.CORRUPT_PIXEL_DATA
    cv2.imwrite(str(masks / "P0_01.png"), np.zeros((20, 30), np.uint8))
    with pytest.raises(StudyError, match="P0_01: the image is 48x48 pixels but its mask 20x30"):
        datasets.load_image_pair(pairs[1], input_size=32)


def test_an_image_pair_is_windowed_and_resized_like_inference(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=1, slices=1)
    pair = datasets.find_image_pairs(images, masks)[0]
    x, y = datasets.load_image_pair(pair, input_size=32)
    raw = cv2.imread(str(pair.image), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    expected, _ = preprocess.to_model_input(raw[None], size=32, window=(0.0, 255.0))
    np.testing.assert_allclose(x, expected)
    np.testing.assert_allclose(preprocess.uint8_to_unit(raw.astype(np.uint8)), raw / 127.5 - 1.0)  # the seed's rule
    assert x.shape == (1, 32, 32) and y.dtype == np.uint8 and set(np.unique(y)) == {0, 1}


def test_splits_never_share_a_patient_and_depend_only_on_the_seed() -> None:
    patients = [f"p{i}" for i in range(20)] * 3
    split = datasets.assign_splits(patients, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert sorted(split.values()).count("val") == 4 and sorted(split.values()).count("test") == 2
    assert split == datasets.assign_splits(list(reversed(patients)), val_fraction=0.2, test_fraction=0.1, seed=4)
    assert split != datasets.assign_splits(patients, val_fraction=0.2, test_fraction=0.1, seed=5)
    with pytest.raises(StudyError, match="2 patient"):
        datasets.assign_splits(["a", "b"], val_fraction=0.5, test_fraction=0.4, seed=0)


def test_image_folders_to_tfrecords_and_back(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=4, slices=3)
    out = tmp_path / "ds"
    prepared = datasets.prepare_dataset(
        out_dir=out, input_size=32, window=(0.0, 80.0), images_dir=images, masks_dir=masks, val_fraction=0.25, seed=1
    )
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["intensity"] == "uint8" and manifest["hu_window"] == [0.0, 80.0]
    train, val = prepared.split("train"), prepared.split("val")
    assert (train.n_examples, val.n_examples) == (9, 3)
    assert not set(train.patients) & set(val.patients)
    assert all(len(p) == 16 and "P" not in p for p in train.patients)  # pseudonyms, not the names
    arrays = val.load_arrays()
    assert arrays.images.shape == (3, 32, 32) and len(set(arrays.patients)) == 1
    # the stored slices are what load_image_pair gives (float16 storage: 1e-3 in [-1, 1])
    pairs = {p.key: p for p in datasets.find_image_pairs(images, masks)}
    sources = [p.key for p in pairs.values() if datasets.pseudonym(p.patient) == arrays.patients[0]]
    expected = np.concatenate([datasets.load_image_pair(pairs[k], input_size=32)[0] for k in sources])
    order = np.argsort([float(a.sum()) for a in arrays.images])
    np.testing.assert_allclose(
        arrays.images[order], expected[np.argsort([float(e.sum()) for e in expected])], atol=1e-3
    )


def test_a_bad_file_leaves_nothing_behind(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=3, slices=2)
    cv2.imwrite(str(masks / "P2_01.png"), np.full((48, 48), 128, np.uint8))
    out = tmp_path / "ds"
    with pytest.raises(StudyError, match="P2_01"):
        datasets.prepare_dataset(out_dir=out, input_size=32, window=WINDOW, images_dir=images, masks_dir=masks)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks"]  # no staging folder either


def test_an_existing_output_folder_is_never_overwritten(tmp_path: Path) -> None:
    images, masks = write_image_folders(tmp_path, patients=2, slices=1)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StudyError, match="not empty"):
        datasets.prepare_dataset(out_dir=out, input_size=32, window=WINDOW, images_dir=images, masks_dir=masks)
    assert (out / "keep.txt").read_text() == "mine"


# --- studies ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    write_phantom_studies(root, 4, size=48, slices=8)
    return root


def test_studies_to_tfrecords_window_like_the_pipeline(studies: Path, tmp_path: Path) -> None:
    prepared = datasets.prepare_dataset(
        out_dir=tmp_path / "ds",
        input_size=32,
        window=WINDOW,
        studies_dir=studies,
        val_fraction=0.25,
        seed=0,
        shard_size=5,
    )
    train, val = prepared.split("train"), prepared.split("val")
    assert (train.n_examples, val.n_examples) == (24, 8) and len(train.paths) == 5  # 24 records, 5 per shard
    assert (len(train.patients), len(val.patients)) == (3, 1)
    arrays = val.load_arrays()
    # The validation study, loaded the way ichvol segment loads it, gives the same model input.
    for study in sorted(studies.iterdir()):
        series = load_study(study, rules=SelectionRules())
        if datasets.pseudonym(series.study.patient_id or "") == arrays.patients[0]:
            expected, _ = preprocess.to_model_input(series.hu, size=32, window=WINDOW)
            stored = arrays.images[np.argsort(arrays.images.sum(axis=(1, 2)))]
            np.testing.assert_allclose(stored, expected[np.argsort(expected.sum(axis=(1, 2)))], atol=1e-3)
            break
    else:
        pytest.fail("the validation patient is none of the studies")
    assert prepared.intensity == "hu" and "4 CT studies" in prepared.description
    listed = json.loads((tmp_path / "ds" / "dataset.json").read_text())["splits"]
    assert len(listed["val"]["studies"]) == 1 and listed["test"]["studies"] == []
    assert sorted(listed["train"]["studies"] + listed["val"]["studies"]) == [p.name for p in sorted(studies.iterdir())]


def test_negatives_per_study_keeps_every_bleed_slice(studies: Path, tmp_path: Path) -> None:
    full = datasets.prepare_dataset(
        out_dir=tmp_path / "full", input_size=32, window=WINDOW, studies_dir=studies, val_fraction=0.25
    )
    few = datasets.prepare_dataset(
        out_dir=tmp_path / "few",
        input_size=32,
        window=WINDOW,
        studies_dir=studies,
        val_fraction=0.25,
        negatives_per_study=1,
    )
    n_full = sum(s.n_hematoma for s in full.splits.values())
    assert sum(s.n_hematoma for s in few.splits.values()) == n_full
    assert sum(s.n_examples for s in few.splits.values()) == n_full + 4


def test_an_unusable_study_fails_the_dataset_or_is_skipped(studies: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    for study in sorted(studies.iterdir())[:3]:
        (root / study.name).symlink_to(study, target_is_directory=True)
    bad = root / "study-zz"
    bad.mkdir()
    (bad / "readme.txt").write_text("no images here")
    with pytest.raises(StudyError, match="study study-zz"):
        datasets.prepare_dataset(out_dir=tmp_path / "a", input_size=32, window=WINDOW, studies_dir=root)
    assert not (tmp_path / "a").exists()
    prepared = datasets.prepare_dataset(
        out_dir=tmp_path / "b", input_size=32, window=WINDOW, studies_dir=root, val_fraction=0.34, skip_bad=True
    )
    assert [s["study"] for s in prepared.skipped] == ["study-zz"]
    assert sum(len(s.patients) for s in prepared.splits.values()) == 3


def test_streamed_batches_are_deterministic_under_the_seed(studies: Path, tmp_path: Path) -> None:
    prepared = datasets.prepare_dataset(
        out_dir=tmp_path / "ds", input_size=32, window=WINDOW, studies_dir=studies, val_fraction=0.25, shard_size=4
    )
    train = prepared.split("train")

    def first_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = next(iter(train.tf_dataset(batch_size=6, shuffle=True, augment=True, seed=seed)))
        return images.numpy(), masks.numpy()

    a, b, c = first_batch(3), first_batch(3), first_batch(4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (6, 32, 32, 1) and set(np.unique(a[1])) <= {0.0, 1.0}
    assert a[0].min() >= -1.0 and a[0].max() <= 1.0


def test_a_folder_without_manifest_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"no dataset\.json"):
        datasets.read_dataset(tmp_path)


# --- phantoms (the lead's training source) -------------------------------------------------------


def test_random_spec_and_phantom_slices_still_work() -> None:
    specs = [datasets.random_spec(np.random.default_rng(i)) for i in range(5)]
    assert all(256 <= s.rows <= 512 for s in specs)
    data = datasets.phantom_slices(n_studies=2, input_size=32, window=WINDOW, seed=1, negatives_per_study=1)
    assert data.images.shape[1:] == (32, 32) and len(set(data.patients)) == 2
