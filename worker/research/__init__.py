"""The research room: training the model, training data (prepared datasets, labelled folders,
phantom and realistic synthetic slices), the paper's evaluation against UNet and the classical
baselines, its metrics and report.

Imports core, imaging, model, outputs, measure and synth; the production rooms never import it.

Read :mod:`worker.research.training` first.
"""
