"""The core room: settings, errors, logging, the disclaimer, and the value types every room shares.

Imports nothing of the project. Only :mod:`worker.core.settings` reads the environment.
Read :mod:`worker.core.settings` first.
"""
