"""The infra room: the database (engines, tables, migrations), object storage, the bucket listing,
the intake of new study versions and runs, the trend configuration row and the readiness checks.

Imports :mod:`worker.core` and model metadata (:mod:`worker.model.weights`). The scheduler
imports only this room, :mod:`worker.core` and model metadata. Read :mod:`worker.infra.tables` first.
"""
