"""The model room: the one TensorFlow importer, DR-UNet and UNet, weights files and their metadata,
the loss, the mapping between CT slices and model input, and the inference engines.

Imports only :mod:`worker.core`. Only :mod:`worker.model.networks.framework` imports TensorFlow or Keras,
and only when first asked; :mod:`worker.model.networks.weights` reads a weights file's metadata without it.
Read :mod:`worker.model.networks.weights` first.
"""
