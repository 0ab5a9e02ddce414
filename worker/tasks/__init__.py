"""The tasks room: the Celery tasks (thin wrappers around the plain functions below) and the
remote-control commands. With :mod:`worker.celery`, the only place that knows Celery.

Read :mod:`worker.tasks.process.process` first.
"""
