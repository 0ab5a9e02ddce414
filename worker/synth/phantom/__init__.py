"""Synthetic head-CT phantoms with known hematoma volume, in memory or as DICOM studies.

Research use only, not for clinical use.

A phantom is a normal head (:mod:`worker.synth.phantom.anatomy`) with zero or more hematomas
(:mod:`worker.synth.phantom.lesions`), both continuous functions of patient position (LPS,
mm), sampled on the voxel centres of an axial series that may be tilted (rotation about
the patient x axis, ImageOrientationPatient ``[1,0,0, 0,cos t,-sin t]``) and unevenly
spaced. A voxel is hematoma when its centre lies inside a lesion.

Truth, per study (see docs/phantoms.md):

* ``analytic_volume_ml``: volume of the continuous lesions (closed form or a fine
  grid-independent integration), the true answer a measurement should approach;
* ``mask_volume_ml``: ``sum_k mask_pixels_k * row_mm * col_mm * slab_k`` with ``slab_k``
  half the gaps to the neighbouring slices along the normal (end slices their single
  gap): what a perfect segmentation on this grid measures with the project's rule.

``render_hu`` returns the volume in memory (for training); ``generate_study`` writes a
DICOM study and its truth files; ``generate_batch`` writes many; ``ichvol phantom`` is the
command line. The same seed and spec give identical files (UIDs are derived from them).
"""

from worker.synth.phantom.geometry import PhantomGeometry
from worker.synth.phantom.lesions import LesionSpec
from worker.synth.phantom.render import RenderedPhantom, render_hu, render_phantom
from worker.synth.phantom.spec import DISCLAIMER, PhantomSpec
from worker.synth.phantom.study import PhantomTruth, generate_batch, generate_study

__all__ = [
    "DISCLAIMER",
    "LesionSpec",
    "PhantomGeometry",
    "PhantomSpec",
    "PhantomTruth",
    "RenderedPhantom",
    "generate_batch",
    "generate_study",
    "render_hu",
    "render_phantom",
]
