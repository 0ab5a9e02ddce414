"""The outputs room: what a measurement leaves behind. Mask files (NumPy, NIfTI), the DICOM SEG,
the volume SR, the overlay secondary capture and the overlay PNG.

Imports only :mod:`worker.core` and :mod:`worker.imaging`. Read :mod:`worker.outputs.mask_files.mask_files` first.
"""
