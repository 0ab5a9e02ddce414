"""The overnight room: one queued run from the bucket to a result row, the worker dependencies
and per-process state built after the fork, reading the next study ahead, and the embedded
runner with no services.

Imports core, imaging, model, infra, measure and delivery; never
Celery, :mod:`worker.synth` or :mod:`worker.research`. Read :mod:`worker.overnight.processing` first.
"""
