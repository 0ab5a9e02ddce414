"""The core room: settings, errors, logging, the disclaimer and the value types every room shares.

Imports nothing of the project. Read :mod:`worker.core.settings` first.
"""
