"""The tasks room: with :mod:`worker.celery` (the app and its signals), the Celery adapter and the
only code that imports Celery. One task base (retries with backoff, the soft time limit as the
project's error), the processing and delivery tasks, the task names, sending by name, and the
remote-control command.

Imports core, model metadata, delivery and overnight. Read :mod:`worker.tasks.process` first.
"""
