"""Domain randomisation for training slices: geometry, resolution, noise, artefacts, window, 8-bit export.

Research use only, not for clinical use.

The default model is trained on synthetic hematomas only, so it must learn "a
blood-density region inside the skull" rather than the look of one scanner, one
reconstruction kernel or one generator. Every training slice therefore passes through
two random stages:

1. :func:`random_view` -- resample a native slice ``(rows, columns)`` (HU, with its masks)
   onto the model's square grid ``(S, S)`` with a random field of view (the head fills
   45-95 % of the frame, as in thin-FOV reconstructions and in wide screenshots alike),
   in-plane rotation (mostly within +-25 degrees, sometimes any), left-right flip,
   translation and a smooth elastic warp (amplitude up to ~4 mm). HU are resampled
   linearly after an anti-aliasing blur; masks are resampled linearly and re-thresholded at
   0.5, so the mask follows the blood's partial volume exactly like the HU do.
2. :func:`randomize_appearance` -- on the resampled HU: scanner calibration offset (+-6 HU),
   soft-tissue contrast gain (0.8-1.25 about 35 HU), reconstruction blur or sharpening,
   correlated noise (0-10 HU), beam-hardening streaks across the skull base
   (:func:`worker.ct_artifacts.beam_hardening_streaks`); then the window: the model's
   window or a random brain window (low -40..10 HU, high 70..130 HU), a gamma, and, for a
   share of samples, an 8-bit export with JPEG compression and bright head-holder arcs,
   because users also feed screenshots (like the DR-UNet authors' test slices).

Arrays: ``(rows, columns)`` float32 HU in, ``(S, S)`` float32 in [-1, 1] out (the model's
input scale, :mod:`worker.preprocess`); masks uint8 0/1. ``pixel_spacing_mm`` is
``(between rows, between columns)``; the output grid is square with isotropic pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from worker.synth.ct_artifacts import beam_hardening_streaks
from worker.synth.lesion_insertion import smooth_noise

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class View:
    """One slice on the model grid: HU ``(S, S)`` float32, and uint8 0/1 masks of the same shape."""

    hu: F32
    mask: U8
    intracranial: U8
    pixel_mm: float  # output pixel size, mm (isotropic)


@dataclass(frozen=True)
class RandomizationConfig:
    """How wide each random draw is (defaults: the shipped model's training)."""

    head_fill: tuple[float, float] = (0.45, 0.95)  # head width / frame width
    max_rotation_deg: float = 25.0
    any_rotation_fraction: float = 0.05
    elastic_mm: float = 4.0
    noise_hu: tuple[float, float] = (0.0, 10.0)
    offset_hu: float = 6.0
    gain: tuple[float, float] = (0.8, 1.25)
    model_window: tuple[float, float] = (-20.0, 100.0)
    random_window_fraction: float = 0.6
    window_low: tuple[float, float] = (-40.0, 10.0)
    window_high: tuple[float, float] = (70.0, 130.0)
    export_8bit_fraction: float = 0.35
    jpeg_fraction: float = 0.5  # of the 8-bit exports
    arc_fraction: float = 0.25
    streak_fraction: float = 0.3
    gamma_fraction: float = 0.3
    # The screenshot path (``physical`` recipe): an 8-bit export through a display window
    # (level, width in HU), read back as inference reads images (worker.imaging.slice_calibration).
    screenshot_calibration: bool = False
    display_level: tuple[float, float] = (30.0, 50.0)
    display_width: tuple[float, float] = (60.0, 140.0)

    @classmethod
    def physical(cls, *, screenshot_fraction: float = 0.3) -> RandomizationConfig:
        """What CT physically varies, on calibrated HU: a few HU of offset, noise, kernel, streaks.

        No contrast gain, gamma or random window on the HU path (HU are calibrated). A share
        ``screenshot_fraction`` of samples takes the screenshot path instead: a random brain
        display window, 8-bit, often JPEG, head-holder arcs, then the parenchyma
        re-anchoring that ``ichvol predict-images`` applies to images.
        """
        return cls(
            offset_hu=4.0,
            gain=(1.0, 1.0),
            random_window_fraction=0.0,
            gamma_fraction=0.0,
            export_8bit_fraction=screenshot_fraction,
            jpeg_fraction=0.5,
            arc_fraction=0.5,
            screenshot_calibration=True,
        )


def _head_extent_px(hu: F32) -> tuple[float, float, float, float]:
    """Centre (row, col) and half extents (rows, cols) of the body (> -300 HU) in pixels."""
    body = hu > -300.0
    if not body.any():
        h, w = hu.shape
        return h / 2.0, w / 2.0, h / 4.0, w / 4.0
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    return (
        (rows[0] + rows[-1]) / 2.0,
        (cols[0] + cols[-1]) / 2.0,
        max((rows[-1] - rows[0]) / 2.0, 8.0),
        max((cols[-1] - cols[0]) / 2.0, 8.0),
    )


def random_view(
    *,
    hu: F32,
    mask: U8,
    intracranial: U8,
    pixel_spacing_mm: tuple[float, float],
    size: int,
    rng: np.random.Generator,
    config: RandomizationConfig = RandomizationConfig(),
) -> View:
    """Resample one native slice onto a random ``(size, size)`` view (see the module docstring)."""
    row_mm, col_mm = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
    cy, cx, half_r, half_c = _head_extent_px(hu)
    head_mm = 2.0 * max(half_r * row_mm, half_c * col_mm)
    fill = float(rng.uniform(*config.head_fill))
    out_mm = head_mm / (fill * size)  # output pixel size
    if rng.random() < config.any_rotation_fraction:
        angle = float(rng.uniform(-math.pi, math.pi))
    else:
        angle = math.radians(float(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)))
    flip = rng.random() < 0.5
    shift_mm = rng.uniform(-0.08, 0.08, size=2) * size * out_mm
    # Output pixel (i, j) -> patient-plane offset (mm) from the view centre -> native pixel.
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    u = (jj - (size - 1) / 2.0) * out_mm
    v = (ii - (size - 1) / 2.0) * out_mm
    if flip:
        u = -u
    if config.elastic_mm > 0 and rng.random() < 0.7:
        amp = float(rng.uniform(0.0, config.elastic_mm))
        scale_px = float(rng.uniform(10.0, 25.0)) / out_mm
        u = u + amp * smooth_noise((size, size), scale_px=scale_px, rng=rng)
        v = v + amp * smooth_noise((size, size), scale_px=scale_px, rng=rng)
    ca, sa = math.cos(angle), math.sin(angle)
    xr = ca * u - sa * v + shift_mm[0]
    yr = sa * u + ca * v + shift_mm[1]
    map_x = (cx + xr / col_mm).astype(np.float32)
    map_y = (cy + yr / row_mm).astype(np.float32)
    # Anti-aliasing before a downsampling resample (sigma ~ half the scale factor).
    source = hu.astype(np.float32)
    factor_r, factor_c = out_mm / row_mm, out_mm / col_mm
    if max(factor_r, factor_c) > 1.2:
        source = np.asarray(
            cv2.GaussianBlur(source, (0, 0), sigmaX=max(0.45 * factor_c, 0.3), sigmaY=max(0.45 * factor_r, 0.3)),
            dtype=np.float32,
        )
    out_hu = cv2.remap(
        source, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1024.0
    )
    out_mask = cv2.remap(
        mask.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    out_ic = cv2.remap(
        intracranial.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT
    )
    return View(
        hu=out_hu.astype(np.float32),
        mask=(out_mask >= 0.5).astype(np.uint8),
        intracranial=(out_ic > 0.5).astype(np.uint8),
        pixel_mm=out_mm,
    )


def _head_holder_arcs(image: F32, rng: np.random.Generator) -> F32:
    """Bright arcs of a head holder / table below and beside the head (values in [-1, 1])."""
    size = image.shape[0]
    out = image.copy()
    centre = (int(size / 2 + rng.uniform(-0.05, 0.05) * size), int(size * rng.uniform(0.2, 0.45)))
    radius = int(size * rng.uniform(0.42, 0.6))
    thickness = max(1, round(size / 256 * rng.uniform(1.0, 3.0)))
    canvas = np.zeros_like(out, dtype=np.float32)
    start = float(rng.uniform(20, 50))
    cv2.ellipse(canvas, centre, (radius, radius), 0, start, 180 - start, 1.0, thickness)
    return np.where(canvas > 0, float(rng.uniform(0.6, 1.0)), out).astype(np.float32)


def _screenshot(hu: F32, *, rng: np.random.Generator, config: RandomizationConfig) -> F32:
    """The screenshot path: display window -> 8-bit (JPEG, arcs) -> HU as inference estimates them."""
    from worker.imaging.slice_calibration import calibrate_image
    from worker.model.preprocess import window_to_unit

    level = float(rng.uniform(*config.display_level))
    width = float(rng.uniform(*config.display_width))
    pixels = np.clip(np.rint((hu - (level - width / 2.0)) * (255.0 / width)), 0, 255).astype(np.uint8)
    if rng.random() < config.arc_fraction:
        arcs = _head_holder_arcs(np.full(pixels.shape, -1.0, dtype=np.float32), rng)
        pixels = np.where(arcs > -1.0, np.uint8(255), pixels).astype(np.uint8)
    if rng.random() < config.jpeg_fraction:
        quality = int(rng.integers(55, 96))
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            pixels = np.asarray(cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    calibration = calibrate_image(pixels, model_window=config.model_window)
    out: F32 = window_to_unit(calibration.to_hu(pixels), window=config.model_window)
    return out


def randomize_appearance(
    view: View,
    *,
    rng: np.random.Generator,
    config: RandomizationConfig = RandomizationConfig(),
) -> F32:
    """The model input ``(S, S)`` float32 in [-1, 1] for a view, with random appearance."""
    hu = view.hu.astype(np.float32).copy()
    size = hu.shape[0]
    body = hu > -300.0
    # Scanner calibration and soft-tissue contrast (about 35 HU, only in the soft-tissue range).
    hu[body] += float(rng.uniform(-config.offset_hu, config.offset_hu))
    gain = float(rng.uniform(*config.gain))
    soft = (hu > -150.0) & (hu < 200.0)
    hu[soft] = 35.0 + (hu[soft] - 35.0) * gain
    if rng.random() < config.streak_fraction:
        hu = beam_hardening_streaks(hu, pixel_mm=view.pixel_mm, strength=float(rng.uniform(0.3, 1.5)), rng=rng)
    # Reconstruction kernel: soft (blur) or sharp (unsharp mask).
    kernel = rng.random()
    if kernel < 0.35:
        sigma = float(rng.uniform(0.3, 1.0))
        hu = np.asarray(cv2.GaussianBlur(hu, (0, 0), sigmaX=sigma), dtype=np.float32)
    elif kernel < 0.5:
        blurred = cv2.GaussianBlur(hu, (0, 0), sigmaX=float(rng.uniform(0.8, 1.5)))
        hu = hu + float(rng.uniform(0.2, 0.6)) * (hu - blurred)
    noise_hu = float(rng.uniform(*config.noise_hu))
    if noise_hu > 0:
        corr = float(rng.uniform(0.0, 1.2))
        hu = hu + noise_hu * smooth_noise((size, size), scale_px=corr, rng=rng) * body
    if config.screenshot_calibration and rng.random() < config.export_8bit_fraction:
        return _screenshot(hu, rng=rng, config=config)
    if rng.random() < config.random_window_fraction:
        low = float(rng.uniform(*config.window_low))
        high = float(rng.uniform(*config.window_high))
    else:
        low, high = config.model_window
    unit = np.clip((hu - low) * (2.0 / (high - low)) - 1.0, -1.0, 1.0)
    if config.screenshot_calibration:  # the HU path of the physical recipe ends here
        hu_path: F32 = unit.astype(np.float32)
        return hu_path
    if rng.random() < config.gamma_fraction:
        gamma = float(rng.uniform(0.8, 1.25))
        unit = 2.0 * ((unit + 1.0) / 2.0) ** gamma - 1.0
    if rng.random() < config.arc_fraction:
        unit = _head_holder_arcs(unit.astype(np.float32), rng)
    if rng.random() < config.export_8bit_fraction:
        pixels = np.clip(np.rint((unit + 1.0) * 127.5), 0, 255).astype(np.uint8)
        if rng.random() < config.jpeg_fraction:
            quality = int(rng.integers(55, 96))
            ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok:
                pixels = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
        unit = pixels.astype(np.float32) / 127.5 - 1.0
    out: F32 = np.clip(unit, -1.0, 1.0).astype(np.float32)
    return out
