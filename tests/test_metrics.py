"""Tests for count-based Dice/IoU metrics and the jax point counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.metrics import (
    dice,
    dice_from_counts,
    iou,
    iou_from_counts,
    overlap_counts,
    point_counts,
)


def test_hand_computed_counts_and_metrics():
    pred = np.array([1, 1, 1, 0, 0], dtype=bool)
    target = np.array([1, 1, 0, 1, 0], dtype=bool)
    counts = overlap_counts(pred, target)
    assert counts == {"tp": 2, "fp": 1, "fn": 1}
    assert all(type(v) is int for v in counts.values())
    assert dice(pred, target) == pytest.approx(4.0 / 6.0)
    assert iou(pred, target) == pytest.approx(0.5)


def test_hand_computed_metrics_without_false_negatives():
    pred = np.array([1, 1, 1, 0], dtype=bool)
    target = np.array([1, 1, 0, 0], dtype=bool)
    assert overlap_counts(pred, target) == {"tp": 2, "fp": 1, "fn": 0}
    assert dice(pred, target) == pytest.approx(0.8)
    assert iou(pred, target) == pytest.approx(2.0 / 3.0)


def test_zero_one_integer_arrays_are_accepted():
    pred = np.array([[1, 0], [1, 1]])
    target = np.array([[1, 1], [0, 1]], dtype=np.uint8)
    assert overlap_counts(pred, target) == {"tp": 2, "fp": 1, "fn": 1}


def test_both_empty_is_perfect():
    empty = np.zeros((3, 4, 5), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert dice_from_counts({"tp": 0, "fp": 0, "fn": 0}) == 1.0
    assert iou_from_counts({"tp": 0, "fp": 0, "fn": 0}) == 1.0


def test_one_empty_is_zero():
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    for pred, target in [(empty, full), (full, empty)]:
        assert dice(pred, target) == 0.0
        assert iou(pred, target) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        overlap_counts(np.zeros((2, 3)), np.zeros((3, 2)))


def test_non_binary_values_raise():
    with pytest.raises(ValueError, match="pred"):
        overlap_counts(np.array([0.0, 0.4]), np.array([0, 1]))


def test_counts_aggregate_exactly_over_volumes():
    rng = np.random.default_rng(0)
    preds = [rng.uniform(size=(5, 6, 7)) > 0.6, rng.uniform(size=(3, 6, 7)) > 0.3]
    targets = [rng.uniform(size=(5, 6, 7)) > 0.5, rng.uniform(size=(3, 6, 7)) > 0.8]
    per_volume = [overlap_counts(p, t) for p, t in zip(preds, targets)]
    summed = {key: sum(c[key] for c in per_volume) for key in ("tp", "fp", "fn")}
    joint_pred, joint_target = np.concatenate(preds), np.concatenate(targets)
    assert summed == overlap_counts(joint_pred, joint_target)
    assert dice_from_counts(summed) == dice(joint_pred, joint_target)
    assert iou_from_counts(summed) == iou(joint_pred, joint_target)
    mean_of_ratios = np.mean([dice_from_counts(c) for c in per_volume])
    assert not math.isclose(mean_of_ratios, dice(joint_pred, joint_target))


def _numpy_point_counts(logits: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Reference in float64: predicted positive when sigmoid(logit) > threshold."""
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return overlap_counts(prob > threshold, labels.astype(bool))


@pytest.mark.parametrize("threshold", [0.5, 0.25, 0.9])
def test_point_counts_matches_numpy_on_random_logits(threshold):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(4, 257)).astype(np.float32)
    labels = rng.uniform(size=(4, 257)) > 0.5
    counts = jax.jit(lambda x, y: point_counts(x, y, threshold))(logits, labels)
    assert {k: int(v) for k, v in counts.items()} == _numpy_point_counts(logits, labels, threshold)


def test_point_counts_threshold_boundary():
    # sigmoid(0) == 0.5 is not > 0.5, so a zero logit is a negative prediction.
    logits = np.array([0.0, -0.0, 1e-6, -1e-6, 0.0, 1e-6], dtype=np.float32)
    labels = np.array([1, 0, 1, 1, 0, 0], dtype=np.float32)
    counts = point_counts(jnp.asarray(logits), jnp.asarray(labels))
    expected = _numpy_point_counts(logits, labels, 0.5)
    assert expected == {"tp": 1, "fp": 1, "fn": 2}
    assert {k: int(v) for k, v in counts.items()} == expected


def test_point_counts_sum_across_batches_and_feed_metrics():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 64)).astype(np.float32)
    labels = rng.uniform(size=(3, 64)) > 0.4
    batches = [point_counts(logits[i], labels[i]) for i in range(3)]
    total = jax.tree_util.tree_map(lambda *xs: sum(xs), *batches)
    assert all(v.dtype == jnp.int32 and v.shape == () for v in total.values())
    expected = _numpy_point_counts(logits, labels, 0.5)
    assert dice_from_counts(total) == dice_from_counts(expected)
    assert iou_from_counts(total) == iou_from_counts(expected)


def test_point_counts_validates_inputs():
    with pytest.raises(ValueError, match="threshold"):
        point_counts(jnp.zeros(3), jnp.zeros(3), threshold=1.0)
    with pytest.raises(ValueError, match="shape"):
        point_counts(jnp.zeros(3), jnp.zeros(4))
