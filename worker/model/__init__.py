"""The model room: the one TensorFlow importer, DR-UNet and UNet, weights files and their metadata,
the loss, the mapping between CT slices and model input, and the inference engines.

Imports only :mod:`worker.core`. Only :mod:`worker.model.framework` imports TensorFlow or
Keras, and only when first asked; :mod:`worker.model.weights` reads a weights file's
metadata without it (the scheduler's one door into this room).
Read :mod:`worker.model.weights` first.
"""
