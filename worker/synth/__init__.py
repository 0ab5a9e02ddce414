"""The synth room: synthetic data with known truth. The phantom generator (a head and hematomas
as continuous functions of patient position, written as DICOM studies), lesions blended into
real slices, domain randomisation, CT artefacts, and the demo bucket.

Imports only :mod:`worker.core`. Production rooms (measure, overnight,
delivery, tasks) never import it. Read :mod:`worker.synth.phantom` first.
"""
