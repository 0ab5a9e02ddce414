"""The imaging room: DICOM files and headers, loading one series, series selection, slice geometry,
Hounsfield units, 2-D image files and ground-truth masks.

Imports only :mod:`worker.core`. Read :mod:`worker.imaging.dicom_load` first.
"""
