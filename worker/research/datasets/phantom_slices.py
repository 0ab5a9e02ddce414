"""Training slices from in-memory phantoms with a random geometry and lesion mix (domain randomisation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from worker.model import preprocess
from worker.research.training_data import SliceArrays

if TYPE_CHECKING:
    from worker.synth.phantom import PhantomSpec

LESION_MIXES: tuple[tuple[str, ...], ...] = (
    ("round",),
    ("irregular",),
    ("subdural",),
    ("epidural",),
    ("intraventricular",),
    ("round", "subdural"),
    ("irregular", "intraventricular"),
    (),
)


def random_spec(rng: np.random.Generator) -> PhantomSpec:
    """A phantom geometry and lesion mix drawn at random (domain randomisation for training).

    Pixel spacing 0.4-1.0 mm on 256-512 pixel slices, slice thickness 2.5-7 mm, gantry tilt
    up to 20 degrees, noise 3-9 HU, every lesion kind including none, volumes 1-80 mL.
    """
    from worker.synth.phantom import LesionSpec, PhantomSpec

    kinds = LESION_MIXES[int(rng.integers(len(LESION_MIXES)))]
    lesions = []
    for kind in kinds:
        high = 6.0 if kind == "intraventricular" else 80.0
        volume = float(np.exp(rng.uniform(np.log(1.0), np.log(high))))
        lesions.append(LesionSpec(kind, volume_ml=volume, side="both" if kind == "intraventricular" else None))
    size = int(rng.choice([256, 320, 384, 512]))
    fov_mm = float(rng.uniform(200.0, 250.0))
    spacing = fov_mm / size
    thickness = float(rng.uniform(2.5, 7.0))
    n_slices = int(np.clip(round(140.0 / thickness), 12, 48))
    return PhantomSpec(
        rows=size,
        columns=size,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=thickness,
        n_slices=n_slices,
        gantry_tilt_deg=float(rng.uniform(-20.0, 20.0)) if rng.random() < 0.5 else 0.0,
        lesions=tuple(lesions),
        noise_sigma_hu=float(rng.uniform(3.0, 9.0)),
        calcifications=bool(rng.random() < 0.8),
    )


def phantom_slices(
    *, n_studies: int, input_size: int, window: tuple[float, float], seed: int, negatives_per_study: int = 4
) -> SliceArrays:
    """Slices from ``n_studies`` in-memory phantoms: every slice with blood plus a few without.

    Study ``i`` uses seed ``seed * 100_003 + i`` and a varied geometry and lesion mix, so
    the set is reproducible and a patient-level split is possible (one study = one patient).
    """
    from worker.synth.phantom import render_hu

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    patients: list[str] = []
    for i in range(n_studies):
        study_seed = seed * 100_003 + i
        spec = random_spec(np.random.default_rng(study_seed))
        hu, mask, _geometry = render_hu(spec, study_seed)
        has_blood = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        without = np.flatnonzero(~mask.reshape(mask.shape[0], -1).any(axis=1))
        chosen = list(has_blood)
        if len(without):
            chosen += list(rng.choice(without, size=min(negatives_per_study, len(without)), replace=False))
        chosen.sort()
        x, fit = preprocess.to_model_input(hu[chosen], size=input_size, window=window)
        y = preprocess.mask_to_model(mask[chosen], fit)
        images.append(x)
        masks.append(y)
        patients += [f"phantom-{study_seed}"] * len(chosen)
    return SliceArrays(np.concatenate(images), np.concatenate(masks), tuple(patients))
