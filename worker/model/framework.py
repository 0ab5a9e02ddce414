"""The only module that imports TensorFlow and Keras, and only when first asked.

Everything that needs the deep-learning framework (the model, training, datasets)
calls :func:`tf` or :func:`keras` at run time. Importing any other module of the
project never loads TensorFlow: the scheduler, the CLI's help, the database code
and a Celery worker's parent process stay light and fork-safe (TensorFlow is not:
a prefork worker whose parent touched it hangs, so the model is built in the child).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_configured = False


def tf() -> ModuleType:
    """The ``tensorflow`` module, configured on first use (threads, GPU memory growth)."""
    _configure()
    import tensorflow

    module: ModuleType = tensorflow
    return module


def keras() -> ModuleType:
    """The ``keras`` (3.x) module."""
    _configure()
    import keras as _keras

    module: ModuleType = _keras
    return module


def is_loaded() -> bool:
    """Whether TensorFlow has been imported in this process (for tests and fork guards)."""
    import sys

    return "tensorflow" in sys.modules


_pending_threads: int = 0


def set_threads(intra_op: int) -> None:
    """Ask for ``intra_op`` TensorFlow threads (0: one per core). Must run before first use."""
    global _pending_threads
    _pending_threads = intra_op


def _configure() -> None:
    global _configured
    if _configured:
        return
    with _lock:
        if _configured:
            return
        # TensorFlow's C++ start-up chatter (oneDNN, CPU features) would pollute stderr, where
        # the CLI promises one line per problem; Python-level errors still raise. The native
        # logger reads its level before Python can set it, so the start-up is muted at the
        # file-descriptor level: the import and the first device initialisation.
        with _native_stderr_muted():
            import tensorflow

            tensorflow.constant(0.0).numpy()

        if _pending_threads > 0:
            try:
                tensorflow.config.threading.set_intra_op_parallelism_threads(_pending_threads)
                tensorflow.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # already initialised by someone else: keep theirs
                pass
        for gpu in tensorflow.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):
                tensorflow.config.experimental.set_memory_growth(gpu, True)
        _configured = True


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    import os
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # captured or replaced stderr: nothing to mute
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def device_description() -> str:
    """``"GPU: <name>"`` for the first visible GPU, else ``"CPU"``."""
    t = tf()
    gpus = t.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details: dict[str, Any] = t.config.experimental.get_device_details(gpus[0])
    return f"GPU: {details.get('device_name', gpus[0].name)}"
