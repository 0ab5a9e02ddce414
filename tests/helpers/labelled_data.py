"""Labelled data for training and evaluation tests: small phantom studies and 2-D image/mask folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from worker.synth.phantom import LesionSpec, PhantomSpec, PhantomTruth, generate_study

# Lesion kinds and volumes (mL) cycled over the studies; None: a study without blood.
# Large lesions keep 64 x 64 phantoms learnable in a few hundred steps.
LESION_CYCLE: tuple[tuple[str, float] | None, ...] = (
    ("round", 45.0),
    ("irregular", 35.0),
    ("subdural", 30.0),
    ("round", 60.0),
    ("epidural", 25.0),
    None,
)


def small_spec(lesion: tuple[str, float] | None, *, size: int = 64, slices: int = 12) -> PhantomSpec:
    """A whole head on ``size`` x ``size`` pixels (about 220 mm field of view), ``slices`` slices of 10 mm."""
    spacing = 220.0 / size
    return PhantomSpec(
        rows=size,
        columns=size,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=10.0,
        n_slices=slices,
        lesions=() if lesion is None else (LesionSpec(lesion[0], volume_ml=lesion[1]),),
    )


def write_phantom_studies(root: Path, n: int, *, seed: int = 0, size: int = 64, slices: int = 12) -> list[PhantomTruth]:
    """``n`` phantom DICOM studies ``root/study-XX`` with their truth (``truth/truth_mask.npz``).

    Lesions cycle through :data:`LESION_CYCLE`; a placement that does not fit a head is
    retried with the next seed, so the set is the same on every run.
    """
    truths = []
    attempt = 0
    for i in range(n):
        lesion = LESION_CYCLE[i % len(LESION_CYCLE)]
        while True:
            study_seed = seed * 1000 + i * 17 + attempt
            try:
                truths.append(
                    generate_study(
                        root / f"study-{i:02d}", spec=small_spec(lesion, size=size, slices=slices), seed=study_seed
                    )
                )
                break
            except ValueError:
                attempt += 1
                shutil.rmtree(root / f"study-{i:02d}", ignore_errors=True)
    return truths


def write_image_folders(
    root: Path, *, patients: int = 3, slices: int = 2, size: int = 48, seed: int = 0
) -> tuple[Path, Path]:
    """``root/images`` and ``root/masks``: bright discs on a grey background, names ``P<k>_<i>.png``."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for p in range(patients):
        for s in range(slices):
            cy, cx = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            r = int(rng.integers(4, size // 5))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            image = np.clip(rng.normal(60, 8, (size, size)), 0, 255).astype(np.uint8)
            image[disc] = 200
            name = f"P{p}_{s:02d}.png"
            cv2.imwrite(str(images / name), image)
            cv2.imwrite(str(masks / name), (disc * 255).astype(np.uint8))
    return images, masks
