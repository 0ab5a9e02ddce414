"""Real hemorrhage outlines for 2-D lesion insertion: cross-sections of a BLAST-CT label map.

Research use only, not for clinical use.

Ellipses and lobes (:mod:`worker.synth.lesion_insertion`) are smooth; real intraparenchymal
hematomas are lumpy, with lobules and irregular margins. A real patient's label map (the
BLAST-CT project's ``scan_0_segmentation.nii.gz``, Apache-2.0, read from a path given at
run time and never copied) gives real outlines: its intraparenchymal label (1, 46 mL) is
cut by planes at random 3-D angles and offsets, each cross-section becomes one 2-D shape
at 1 mm (:class:`ShapeBank`), and insertion scales it (0.3-1.5x, so areas from a few mm^2 to
tens of cm^2), mirrors and rotates it before placing it in the brain.

Shapes are boolean arrays ``(rows, columns)`` at 1 mm per pixel; placement returns a
mask on the slice's own grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["IPH_LABEL", "ShapeBank", "load_shape_bank"]

F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]

IPH_LABEL = 1
_MIN_AREA_MM2 = 20.0


@dataclass(frozen=True)
class ShapeBank:
    """2-D hemorrhage cross-sections at 1 mm (``shapes``), used for ``share`` of parenchymal lesions."""

    shapes: tuple[Bool, ...]
    share: float = 0.5
    scale: tuple[float, float] = (0.3, 1.5)
    source: str = ""

    def place(
        self,
        *,
        distance: F32,
        allowed: Bool,
        pixel_mm: float,
        rng: np.random.Generator,
    ) -> tuple[Bool, tuple[float, float], float] | None:
        """One shape in ``allowed`` (a slice's brain, ``distance``: mm to the inner table), or ``None``.

        Returns the mask on the slice's grid, its centre (row, column) and equivalent radius in
        pixels, as :func:`worker.synth.lesion_insertion.insert_lesions` expects.
        """
        if not self.shapes:
            return None
        shape = self.shapes[int(rng.integers(len(self.shapes)))]
        scale = float(np.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1]))))
        angle = float(rng.uniform(0.0, 360.0))
        if rng.random() < 0.5:
            shape = shape[:, ::-1]
        # To the slice grid: mm -> pixels, scaled and rotated about the shape's centre.
        factor = scale / pixel_mm
        side = max(shape.shape) * factor * 1.5 + 4
        side_px = math.ceil(side)
        centre_in = ((shape.shape[1] - 1) / 2.0, (shape.shape[0] - 1) / 2.0)
        matrix = cv2.getRotationMatrix2D(centre_in, angle, factor)
        matrix[0, 2] += (side_px - 1) / 2.0 - centre_in[0]
        matrix[1, 2] += (side_px - 1) / 2.0 - centre_in[1]
        local = cv2.warpAffine(shape.astype(np.float32), matrix, (side_px, side_px), flags=cv2.INTER_LINEAR) >= 0.5
        if local.sum() < 3:
            return None
        ys, xs = np.nonzero(local)
        radius_mm = math.sqrt(float(local.sum()) / math.pi) * pixel_mm
        extent_mm = max(ys.max() - ys.min(), xs.max() - xs.min()) * pixel_mm / 2.0
        candidates = np.argwhere(allowed & (distance > min(extent_mm, 2.0 * radius_mm) + 2.0))
        if len(candidates) == 0:
            return None
        cy, cx = (int(v) for v in candidates[int(rng.integers(len(candidates)))])
        oy, ox = round(ys.mean()), round(xs.mean())
        h, w = allowed.shape
        out = np.zeros((h, w), dtype=bool)
        top, left = cy - oy, cx - ox
        r0, r1 = max(top, 0), min(top + side_px, h)
        c0, c1 = max(left, 0), min(left + side_px, w)
        if r0 >= r1 or c0 >= c1:
            return None
        out[r0:r1, c0:c1] = local[r0 - top : r1 - top, c0 - left : c1 - left]
        out &= allowed
        if out.sum() < 3:
            return None
        ys, xs = np.nonzero(out)
        return out, (float(ys.mean()), float(xs.mean())), math.sqrt(float(out.sum()) / math.pi)


def _rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    out: npt.NDArray[np.float64] = q
    return out


def cross_sections(labels: Bool, *, n: int, seed: int = 0) -> tuple[Bool, ...]:
    """``n`` planar cross-sections (1 mm grid) of a 1 mm isotropic boolean volume at random angles.

    Each plane passes through a random labelled voxel of the volume smoothed by 1 mm (the
    cut follows the smoothed outline, not the voxel staircase); the piece through that voxel
    is kept, holes filled, cropped to its bounding box; pieces under 20 mm^2 are skipped (so
    fewer than ``n`` may come back).
    """
    rng = np.random.default_rng(seed)
    points = np.argwhere(labels)
    if len(points) == 0:
        return ()
    lo, hi = points.min(axis=0), points.max(axis=0)
    half = math.ceil(np.linalg.norm(hi - lo) / 2.0) + 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    uu, vv = np.meshgrid(grid, grid, indexing="ij")
    # A label map at 1 mm is a staircase; smoothed by 1 mm and cut at half, it is an outline.
    smooth = ndimage.gaussian_filter(labels.astype(np.float32), sigma=1.0)
    out: list[Bool] = []
    for _ in range(n * 3):
        if len(out) >= n:
            break
        rotation = _rotation(rng)
        origin = points[int(rng.integers(len(points)))].astype(np.float64)
        coords = origin[:, None, None] + rotation[:, 0, None, None] * uu[None] + rotation[:, 1, None, None] * vv[None]
        cut = ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=0.0) >= 0.5
        if cut.sum() < _MIN_AREA_MM2:
            continue
        # The piece the plane passes through, holes filled (a cut can graze two lobes: keep one).
        lab, _count = ndimage.label(cut)
        centre = lab[half, half]
        piece = lab == (centre if centre > 0 else 1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
        piece = ndimage.binary_fill_holes(piece)
        if piece.sum() < _MIN_AREA_MM2:
            continue
        rows = np.flatnonzero(piece.any(axis=1))
        cols = np.flatnonzero(piece.any(axis=0))
        out.append(np.ascontiguousarray(piece[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))
    return tuple(out)


def load_shape_bank(
    path: Path, *, label: int = IPH_LABEL, n: int = 400, seed: int = 0, share: float = 0.5
) -> ShapeBank:
    """Cross-sections of ``label`` in the NIfTI label map at ``path`` (resampled to 1 mm when needed)."""
    import nibabel as nib

    image: Any = nib.load(str(path))
    data = np.asarray(image.dataobj)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    volume = data == label
    if not volume.any():
        raise ValueError(f"{path} holds no voxel of label {label}")
    if any(abs(z - 1.0) > 1e-3 for z in zooms):
        volume = ndimage.zoom(volume.astype(np.float32), zooms, order=1) >= 0.5
    return ShapeBank(shapes=cross_sections(volume, n=n, seed=seed), share=share, source=Path(path).name)
