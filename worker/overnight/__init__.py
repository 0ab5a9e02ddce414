"""The overnight room: one queued run from the bucket to a result row, the per-process worker state
built after the fork, reading the next study ahead, and the embedded runner with no services.

Imports the rooms below it (core, imaging, model, outputs, measure, infra, delivery), never
:mod:`worker.synth` or :mod:`worker.research`, and never Celery. Read :mod:`worker.overnight.processing` first.
"""
