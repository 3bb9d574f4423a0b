"""Segmentation overlap metrics kept as sums of counts so they aggregate exactly.

Dice and IoU are ratios, so averaging per-volume (or per-batch) values is not
the same as the metric over the union. Instead accumulate the integer counts
``tp`` (true positives), ``fp`` (false positives) and ``fn`` (false negatives)
with ``overlap_counts`` / ``point_counts``, add them up, and convert once with
``dice_from_counts`` / ``iou_from_counts``.

Counts are numbers of voxels (or sampled points); the metrics are unitless in
``[0, 1]``. When prediction and target are both empty the metrics are 1.0.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

# Values may be Python ints, numpy or jax scalars: anything ``float()`` accepts.
Counts = Mapping[str, Any]


def _as_binary(name: str, array: np.ndarray) -> np.ndarray:
    """Return ``array`` as bool, requiring bool dtype or only values 0 and 1."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return array.astype(bool)


def overlap_counts(pred: np.ndarray, target: np.ndarray) -> dict[str, int]:
    """Count true positives, false positives and false negatives.

    Args:
        pred: Predicted mask, any shape, bool or 0/1 values.
        target: Ground-truth mask of the same shape, bool or 0/1 values.

    Returns:
        ``{"tp": int, "fp": int, "fn": int}`` voxel counts.

    Raises:
        ValueError: If the shapes differ or the values are not binary.
    """
    pred_arr, target_arr = np.asarray(pred), np.asarray(target)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"pred shape {pred_arr.shape} does not match target shape {target_arr.shape}"
        )
    p = _as_binary("pred", pred_arr)
    t = _as_binary("target", target_arr)
    return {
        "tp": int(np.count_nonzero(p & t)),
        "fp": int(np.count_nonzero(p & ~t)),
        "fn": int(np.count_nonzero(~p & t)),
    }


def _unpack(counts: Counts) -> tuple[float, float, float]:
    return float(counts["tp"]), float(counts["fp"]), float(counts["fn"])


def dice_from_counts(counts: Counts) -> float:
    """Dice ``2 tp / (2 tp + fp + fn)``; 1.0 when prediction and target are empty."""
    tp, fp, fn = _unpack(counts)
    denominator = 2.0 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def iou_from_counts(counts: Counts) -> float:
    """IoU (Jaccard) ``tp / (tp + fp + fn)``; 1.0 when prediction and target are empty."""
    tp, fp, fn = _unpack(counts)
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient of two binary masks of equal shape (see ``overlap_counts``)."""
    return dice_from_counts(overlap_counts(pred, target))


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """IoU of two binary masks of equal shape (see ``overlap_counts``)."""
    return iou_from_counts(overlap_counts(pred, target))


def point_counts(
    logits: jnp.ndarray, labels: jnp.ndarray, threshold: float = 0.5
) -> dict[str, jnp.ndarray]:
    """tp/fp/fn counts for sampled points, usable inside ``jax.jit``.

    A point is predicted positive when ``sigmoid(logit) > threshold``, computed
    without the sigmoid as ``logit > log(threshold / (1 - threshold))`` (the
    bound is cast to the dtype of ``logits``; for ``threshold=0.5`` it is
    exactly 0, so a logit of 0 is negative).

    Args:
        logits: Pre-sigmoid occupancy logits, any shape, e.g. ``(B, N)``.
        labels: Ground-truth occupancy of the same shape, bool or 0/1 values.
        threshold: Probability threshold in ``(0, 1)``; a static Python float.

    Returns:
        ``{"tp", "fp", "fn"}`` as int32 scalar arrays; sum them across batches
        and convert with ``dice_from_counts`` / ``iou_from_counts``.

    Raises:
        ValueError: If the shapes differ or ``threshold`` is outside ``(0, 1)``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if jnp.shape(logits) != jnp.shape(labels):
        raise ValueError(
            f"logits shape {jnp.shape(logits)} does not match labels shape {jnp.shape(labels)}"
        )
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    bound = jnp.asarray(math.log(threshold / (1.0 - threshold)), dtype=logits.dtype)
    pred = logits > bound
    target = jnp.asarray(labels).astype(bool)
    return {
        "tp": jnp.sum(pred & target, dtype=jnp.int32),
        "fp": jnp.sum(pred & ~target, dtype=jnp.int32),
        "fn": jnp.sum(~pred & target, dtype=jnp.int32),
    }


def mask_counts(pred: jnp.ndarray, target: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per-channel tp/fp/fn of bool masks (..., R), usable inside ``jax.jit``: int32 arrays (R,)."""
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(f"pred shape {jnp.shape(pred)} does not match target {jnp.shape(target)}")
    axes = tuple(range(jnp.ndim(pred) - 1))
    return {
        "tp": jnp.sum(pred & target, axis=axes, dtype=jnp.int32),
        "fp": jnp.sum(pred & ~target, axis=axes, dtype=jnp.int32),
        "fn": jnp.sum(~pred & target, axis=axes, dtype=jnp.int32),
    }


def channel_mean(counts: Counts, fn=dice_from_counts) -> float:
    """Mean over channels of a metric of per-channel counts {"tp": (R,), ...} (macro average)."""
    tp, fp, fneg = (np.atleast_1d(np.asarray(counts[k])) for k in ("tp", "fp", "fn"))
    return float(np.mean([fn({"tp": a, "fp": b, "fn": c}) for a, b, c in zip(tp, fp, fneg)]))
