"""Training data at model input size: synthetic phantom slices (and, later, prepared datasets).

Images are windowed exactly as inference windows them (:mod:`worker.preprocess`), so a
model never sees a different intensity mapping in training and in production.
"""

from __future__ import annotations

import numpy as np

from worker import preprocess
from worker.training import SliceArrays


def phantom_slices(
    *, n_studies: int, input_size: int, window: tuple[float, float], seed: int, negatives_per_study: int = 4
) -> SliceArrays:
    """Slices from ``n_studies`` in-memory phantoms: every slice with blood plus a few without.

    Study ``i`` uses seed ``seed * 100_003 + i`` and a varied geometry and lesion mix, so
    the set is reproducible and a patient-level split is possible (one study = one patient).
    """
    from worker.phantom import random_spec, render_hu

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
