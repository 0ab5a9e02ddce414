"""The measure room: one study from DICOM files to a mask and a volume (:func:`segment_study`),
post-processing, planimetry and ABC/2, and the model on already-windowed slice images.

Imports :mod:`worker.core`, :mod:`worker.imaging`, :mod:`worker.model` and :mod:`worker.outputs`;
never the synthetic-data or research rooms. Read :mod:`worker.measure.pipeline` first.
"""
