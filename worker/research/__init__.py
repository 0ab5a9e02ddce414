"""The research room: training the model, prepared datasets, realistic synthetic training data,
the paper's evaluation against UNet and the classical baselines, its metrics and report.

May import every room below the entry points. Production rooms never import it.
Read :mod:`worker.research.training` first.
"""
