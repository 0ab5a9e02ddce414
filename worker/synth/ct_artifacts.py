"""CT artefacts simulated in image space: beam-hardening streaks and cupping from dense bone.

Research use only, not for clinical use.

A polychromatic X-ray beam hardens as it crosses bone, so the measured line integral of
attenuation falls short of the true one by roughly ``k p^2`` (``p``: the bone path length
along the ray). Filtered back-projection spreads that error back over the image: dark
bands between dense structures (the "Hounsfield bar" between the petrous bones across the
posterior fossa), darker cupping inside a thick skull, and faint bright flares beside
them. :func:`beam_hardening_streaks` reproduces this with a small parallel-beam model of
the slice: bone-equivalent path lengths by rotating and summing, the squared error
ramp-filtered in 1-D and smeared back, at ``n_angles`` angles.

Arrays are one slice ``(rows, columns)`` float32 HU (square or not); ``pixel_mm`` is the
(isotropic) pixel size in mm. The result is returned as a new array.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

BONE_FLOOR_HU = 300.0  # bone-equivalent density counts only above this
BONE_SCALE_HU = 1000.0  # HU above the floor that count as 1 cm of bone per cm of path


def _ramp(n: int) -> npt.NDArray[np.float64]:
    freqs = np.fft.rfftfreq(2 * n)
    return np.asarray(2.0 * np.abs(freqs), dtype=np.float64)


def beam_hardening_streaks(
    hu: F32,
    *,
    pixel_mm: float,
    strength: float,
    rng: np.random.Generator,
    n_angles: int = 24,
    amplitude_hu: float = 35.0,
) -> F32:
    """``hu`` plus beam-hardening streaks and cupping (see the module docstring).

    ``strength`` scales the artefact: 1 gives dark streaks of about ``amplitude_hu`` HU
    (the 99th percentile of the error inside the body) where dense bone is plentiful; the
    amplitude grows with the square of the bone paths, so a vertex slice (thin bone) gets
    only faint cupping. Returns ``hu`` unchanged when the slice holds no dense bone.
    """
    image = np.asarray(hu, dtype=np.float32)
    bone = np.clip((image - BONE_FLOOR_HU) / BONE_SCALE_HU, 0.0, None).astype(np.float32)
    if float(bone.max()) <= 0.0:
        return image.copy()
    h, w = image.shape
    side = math.ceil(math.hypot(h, w)) + 2
    pad_y, pad_x = (side - h) // 2, (side - w) // 2
    canvas = np.zeros((side, side), dtype=np.float32)
    canvas[pad_y : pad_y + h, pad_x : pad_x + w] = bone
    centre = (side / 2.0 - 0.5, side / 2.0 - 0.5)
    ramp = _ramp(side)
    error = np.zeros((side, side), dtype=np.float32)
    offset = float(rng.uniform(0.0, 180.0 / n_angles))
    cm_per_px = pixel_mm / 10.0
    for k in range(n_angles):
        angle = offset + 180.0 * k / n_angles
        forward = cv2.getRotationMatrix2D(centre, angle, 1.0)
        rotated = cv2.warpAffine(canvas, forward, (side, side), flags=cv2.INTER_LINEAR)
        path_cm = rotated.sum(axis=0).astype(np.float64) * cm_per_px
        deficit = -(path_cm**2)
        filtered = np.fft.irfft(np.fft.rfft(deficit, n=2 * side) * ramp)[:side].astype(np.float32)
        smear = np.broadcast_to(filtered[None, :], (side, side)).copy()
        backward = cv2.getRotationMatrix2D(centre, -angle, 1.0)
        error += cv2.warpAffine(smear, backward, (side, side), flags=cv2.INTER_LINEAR)
    error = error[pad_y : pad_y + h, pad_x : pad_x + w]
    body = image > -300.0
    if not body.any():
        return image.copy()
    # Physical scale: a 1.5 cm petrous path on each side gives the reference amplitude.
    reference = 0.375 * n_angles
    scaled = error * (amplitude_hu * strength / reference)
    scaled = np.clip(scaled, -4.0 * amplitude_hu * strength, 2.0 * amplitude_hu * strength)
    out: F32 = (image + np.where(body, scaled, 0.0)).astype(np.float32)
    return out
