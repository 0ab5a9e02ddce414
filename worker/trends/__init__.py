"""The trends room: hematoma volume over time per patient and the expansion flags, read from the
SQL views of the trend migration; text tables and the plot.

Imports :mod:`worker.core` and :mod:`worker.infra`. Read :mod:`worker.trends.views` first.
"""
