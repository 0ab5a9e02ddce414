"""Model input and output mapping: HU window, square padding, resizing (pure numpy + OpenCV).

Input normalisation is one rule for inference, training and datasets alike: HU are
clipped to the model's window ``(low, high)`` and mapped linearly to [-1, 1]. This is
the same scale the authors used for 8-bit windowed PNG slices (``pixel / 127.5 - 1``),
so an already-windowed 8-bit image maps with :func:`uint8_to_unit`.

Slices of shape ``(rows, columns)`` that are not square are padded symmetrically to a
square with air (the window's low end) before resizing, so the anatomy is never
stretched; :class:`Fit` remembers the padding to undo it on the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def window_to_unit(hu: npt.NDArray[np.floating], *, window: tuple[float, float]) -> F32:
    """Map HU to [-1, 1]: ``low`` -> -1, ``high`` -> +1, clipped outside. Any shape."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"HU window must have high > low, got {window}")
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (2.0 / (high - low)) - 1.0
    return np.clip(scaled, -1.0, 1.0, out=scaled)


def uint8_to_unit(image: npt.NDArray[np.uint8]) -> F32:
    """An already-windowed 8-bit image to [-1, 1] (the seed's ``x / 127.5 - 1``)."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class Fit:
    """How native ``(rows, columns)`` slices were fitted into the square model input."""

    rows: int
    columns: int
    side: int  # padded square side in native pixels
    pad_top: int
    pad_left: int
    size: int  # model input size

    @classmethod
    def for_shape(cls, rows: int, columns: int, size: int) -> Fit:
        side = max(rows, columns)
        return cls(rows, columns, side, (side - rows) // 2, (side - columns) // 2, size)


def _resize(images: F32, size: int) -> F32:
    """Resize a stack ``(n, s, s)`` to ``(n, size, size)``: area when shrinking, linear when growing."""
    n, side = images.shape[0], images.shape[1]
    if side == size:
        return images.astype(np.float32, copy=True)
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        out[i] = cv2.resize(images[i], (size, size), interpolation=interp)
    return out


def to_model_input(hu: npt.NDArray[np.floating], *, size: int, window: tuple[float, float]) -> tuple[F32, Fit]:
    """HU slices ``(n, rows, columns)`` -> model input ``(n, size, size)`` in [-1, 1] and the fit."""
    if hu.ndim != 3:
        raise ValueError(f"expected (slices, rows, columns), got shape {hu.shape}")
    n, rows, columns = hu.shape
    fit = Fit.for_shape(rows, columns, size)
    unit = window_to_unit(hu, window=window)
    if rows != columns:
        padded = np.full((n, fit.side, fit.side), -1.0, dtype=np.float32)
        padded[:, fit.pad_top : fit.pad_top + rows, fit.pad_left : fit.pad_left + columns] = unit
        unit = padded
    return _resize(unit, size), fit


def to_native(probabilities: F32, fit: Fit) -> F32:
    """Model output ``(n, size, size)`` -> ``(n, rows, columns)`` on the native grid (linear)."""
    n = probabilities.shape[0]
    out = np.empty((n, fit.side, fit.side), dtype=np.float32)
    for i in range(n):
        out[i] = (
            probabilities[i]
            if fit.side == fit.size
            else cv2.resize(probabilities[i], (fit.side, fit.side), interpolation=cv2.INTER_LINEAR)
        )
    return out[:, fit.pad_top : fit.pad_top + fit.rows, fit.pad_left : fit.pad_left + fit.columns]


def mask_to_model(mask: npt.NDArray[np.integer], fit: Fit) -> npt.NDArray[np.uint8]:
    """A native binary mask ``(n, rows, columns)`` -> ``(n, size, size)`` uint8, for training targets.

    Pads like :func:`to_model_input`, then resizes by area and re-thresholds at 0.5, so the
    target matches what the model sees.
    """
    n = mask.shape[0]
    padded = np.zeros((n, fit.side, fit.side), dtype=np.float32)
    padded[:, fit.pad_top : fit.pad_top + fit.rows, fit.pad_left : fit.pad_left + fit.columns] = mask > 0
    return (_resize(padded, fit.size) >= 0.5).astype(np.uint8)


def soft_to_model(probabilities: npt.NDArray[np.floating], fit: Fit) -> F32:
    """Native probabilities ``(n, rows, columns)`` in [0, 1] -> ``(n, size, size)`` float32, for soft targets.

    Pads with 0 like :func:`to_model_input` pads with air, then resizes by area (linear when
    growing), so each target pixel is the mean probability of the native pixels the model
    pixel covers: the same footprint as the input pixel it is paired with.
    """
    n = probabilities.shape[0]
    if probabilities.shape[1:] != (fit.rows, fit.columns):
        raise ValueError(f"probabilities {probabilities.shape} do not match the fit ({fit.rows}, {fit.columns})")
    padded = np.zeros((n, fit.side, fit.side), dtype=np.float32)
    padded[:, fit.pad_top : fit.pad_top + fit.rows, fit.pad_left : fit.pad_left + fit.columns] = probabilities
    return np.clip(_resize(padded, fit.size), 0.0, 1.0)
