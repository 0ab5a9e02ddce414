"""BCE + Dice loss (the paper's) and a Dice metric, written with ``keras.ops``.

The authors' Dice term used ``reduce_mean`` for the intersection and both sums plus
``smooth = 1``: with a hematoma covering a few percent of the image those means are
tiny next to 1, so the term stays near a constant and gives almost no gradient. Here
the soft Dice is computed **per image from sums** with a small smoothing constant,
then averaged over the batch; an image with an empty target still gets a gradient that
pushes its predicted mass towards zero.

Tensors are ``(batch, H, W, 1)`` with targets in {0, 1} and predictions in (0, 1).
Keras is reached through :mod:`worker.model.framework` (the ops are backend-agnostic).
"""

from __future__ import annotations

from typing import Any

from worker.model import framework

DICE_SMOOTH = 1.0
BCE_EPSILON = 1e-7


def soft_dice_per_image(y_true: Any, y_pred: Any, *, smooth: float = DICE_SMOOTH) -> Any:
    """Soft Dice coefficient per image: ``(2 sum(y p) + s) / (sum(y) + sum(p) + s)``, shape (batch,)."""
    ops = framework.keras().ops
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(y_true.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * intersection + smooth) / (total + smooth)


def dice_loss(y_true: Any, y_pred: Any) -> Any:
    """``1 - mean over the batch of the per-image soft Dice``."""
    ops = framework.keras().ops
    return 1.0 - ops.mean(soft_dice_per_image(y_true, y_pred))


def bce_loss(y_true: Any, y_pred: Any) -> Any:
    """Mean binary cross-entropy over every pixel of the batch."""
    ops = framework.keras().ops
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.clip(ops.cast(y_pred, "float32"), BCE_EPSILON, 1.0 - BCE_EPSILON)
    return -ops.mean(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))


def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """The paper's loss: BCE + Dice (each term in [0, ~1])."""
    return bce_loss(y_true, y_pred) + dice_loss(y_true, y_pred)


def hard_dice(y_true: Any, y_pred: Any) -> Any:
    """Dice of the masks thresholded at 0.5, per image then averaged (a training metric)."""
    ops = framework.keras().ops
    return ops.mean(soft_dice_per_image(y_true, ops.cast(y_pred > 0.5, "float32"), smooth=1e-6))
