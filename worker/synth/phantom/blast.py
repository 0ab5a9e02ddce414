"""The optional ``blast`` lesion: a real hemorrhage shape from a BLAST-CT label map.

The label map (1 mm NIfTI, e.g. ``scan_0_segmentation.nii.gz`` of the BLAST-CT project,
label 1 intraparenchymal hemorrhage) is read from a path given at run time and never
copied into the repository. Its labelled voxels become a union of cubes in patient mm
(LPS; NIfTI RAS is flipped in x and y), moved so their centroid lies at the chosen centre
and scaled uniformly to the target volume. Volume = voxel count x voxel volume (exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.synth.phantom.geometry import F64, BoolArray, SampleGrid, Vec3
from worker.synth.phantom.lesions import MM3_PER_ML, BloodDensity, LesionSpec


@dataclass(frozen=True, eq=False)
class LabelMapLesion:
    """A real hemorrhage shape: the voxels of a label map (a union of cubes), placed and scaled.

    ``index_to_lps`` maps voxel indices ``(i, j, k, 1)`` of ``labels`` to LPS mm (after
    placement); a point is inside when the nearest voxel is labelled.
    """

    labels: npt.NDArray[np.bool_] = field(repr=False)
    index_to_lps: tuple[tuple[float, ...], ...]
    source: str
    density: BloodDensity
    analytic_volume_ml: float
    volume_method: str
    rim_hu: float = 20.0
    rim_mm: float = 0.0  # no rim for label maps
    target_volume_ml: float | None = None
    kind: str = "blast"

    def _voxel_centres(self) -> F64:
        idx = np.argwhere(self.labels).astype(np.float64)
        a = np.asarray(self.index_to_lps)
        return np.asarray(idx @ a[:3, :3].T + a[:3, 3], dtype=np.float64)

    @property
    def center_mm(self) -> Vec3:
        c = self._voxel_centres().mean(axis=0)
        return (float(c[0]), float(c[1]), float(c[2]))

    @property
    def _half_diagonal_mm(self) -> float:
        a = np.asarray(self.index_to_lps)[:3, :3]
        return 0.5 * float(np.linalg.norm(a @ np.ones(3)))

    @property
    def bounding_radius_mm(self) -> float:
        pts = self._voxel_centres()
        return float(np.linalg.norm(pts - np.asarray(self.center_mm), axis=1).max()) + self._half_diagonal_mm

    def translated(self, offset_mm: npt.ArrayLike) -> LabelMapLesion:
        a = np.asarray(self.index_to_lps, dtype=np.float64).copy()
        a[:3, 3] += np.asarray(offset_mm, dtype=np.float64)
        return replace(self, index_to_lps=tuple(tuple(float(v) for v in row) for row in a))

    def contains(self, grid: SampleGrid) -> BoolArray:
        a = np.asarray(self.index_to_lps)
        inv = np.linalg.inv(a)
        x, y, z = (np.broadcast_to(v, grid.shape) for v in (grid.x, grid.y, grid.z))
        out = np.ones(grid.shape, dtype=bool)
        idx = []
        for axis in range(3):
            v = inv[axis, 0] * x + inv[axis, 1] * y + inv[axis, 2] * z + inv[axis, 3]
            i = np.floor(v + 0.5).astype(np.int64)
            out &= (i >= 0) & (i < self.labels.shape[axis])
            idx.append(np.clip(i, 0, self.labels.shape[axis] - 1))
        hit: BoolArray = out & self.labels[idx[0], idx[1], idx[2]]
        return hit

    def rim_contains(self, grid: SampleGrid) -> BoolArray | None:
        return None

    def surface_points(self) -> F64:
        pts = self._voxel_centres()
        # The cube corners reach half a diagonal further than the centres.
        c = np.asarray(self.center_mm)
        d = pts - c
        n = np.linalg.norm(d, axis=1, keepdims=True)
        return np.asarray(pts + d / np.maximum(n, 1e-9) * self._half_diagonal_mm, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center_mm": list(self.center_mm),
            "analytic_volume_ml": self.analytic_volume_ml,
            "volume_method": self.volume_method,
            "target_volume_ml": self.target_volume_ml,
            "mean_hu": self.density.mean_hu,
            "source": self.source,
            "voxel_count": int(self.labels.sum()),
            "index_to_lps": [list(r) for r in self.index_to_lps],
        }


def loadlabel_map_lesion(path: Path, *, label: int) -> tuple[npt.NDArray[np.bool_], F64]:
    """Voxels equal to ``label`` (cropped) and their index -> LPS mm affine (4x4), from a NIfTI."""
    import nibabel as nib  # only needed for the optional 'blast' kind

    if not path.is_file():
        raise ValueError(f"label map not found: {path}")
    try:
        image: Any = nib.load(str(path))
        data = np.asarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise ValueError(f"cannot read label map {path}: {exc}") from exc
    mask = data == label
    if not mask.any():
        raise ValueError(f"label map {path} has no voxel labelled {label}")
    nz = np.argwhere(mask)
    lo = nz.min(axis=0)
    hi = nz.max(axis=0) + 1
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    shift = np.eye(4)
    shift[:3, 3] = lo
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    return np.ascontiguousarray(crop), np.asarray(ras_to_lps @ affine @ shift, dtype=np.float64)


def label_map_lesion(
    spec: LesionSpec, *, center: F64 | None, volume_ml: float | None, density: BloodDensity
) -> LabelMapLesion:
    assert spec.source_path is not None
    labels, affine = loadlabel_map_lesion(spec.source_path, label=spec.source_label)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    native_ml = float(labels.sum()) * voxel_mm3 / MM3_PER_ML
    factor = 1.0 if volume_ml is None else (volume_ml / native_ml) ** (1.0 / 3.0)
    idx = np.argwhere(labels).astype(np.float64)
    centroid = idx.mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]
    placed = affine.copy()
    placed[:3, :3] *= factor
    target = np.zeros(3) if center is None else center
    placed[:3, 3] = (affine[:3, 3] - centroid) * factor + target
    return LabelMapLesion(
        labels=labels,
        index_to_lps=tuple(tuple(float(v) for v in row) for row in placed),
        source=f"{spec.source_path.name} label {spec.source_label}",
        density=density,
        analytic_volume_ml=native_ml * factor**3,
        volume_method="union of labelled voxel cubes: voxel count x voxel volume (exact)",
        target_volume_ml=volume_ml,
    )
