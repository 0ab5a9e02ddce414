"""The outputs room: what a measurement leaves behind. Mask files (NumPy, NIfTI) and the DICOM
SEG, the volume SR, the overlay secondary capture and the overlay PNG.

Imports only :mod:`worker.core`. Read :mod:`worker.outputs.mask_files` first.
"""
