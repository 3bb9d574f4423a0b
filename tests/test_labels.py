"""Label modes against slow numpy references: tables, losses, decisions and written label maps."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from ossnet_jax import losses, reporting
from ossnet_jax.data import labels, nifti
from ossnet_jax.families.oss_net import predictor as oss_net_predictor


def spec_for(mode: str, **overrides) -> labels.LabelSpec:
    data = ml_collections.ConfigDict(base.get_base_config("brats").data.to_dict())
    data.label_mode = mode
    for key, value in overrides.items():
        data[key] = value
    return labels.label_spec(data)


def test_channel_tables_of_each_mode():
    values = np.array([0, 1, 2, 4])
    binary, multi, regions = (spec_for(m) for m in labels.MODES)
    np.testing.assert_array_equal(binary.table[:, 0], values > 0)
    np.testing.assert_array_equal(multi.table, values[:, None] == np.array([1, 2, 4])[None])
    expected = np.stack([np.isin(values, r) for r in ((1, 2, 4), (1, 4), (4,))], axis=1)
    np.testing.assert_array_equal(regions.table, expected)
    assert (binary.num_outputs, multi.num_outputs, regions.num_outputs) == (1, 4, 3)
    assert multi.names == ("necrotic tumour core", "oedema", "enhancing tumour")


def test_regions_must_nest_and_use_declared_labels():
    with pytest.raises(ValueError, match="nested"):
        spec_for("brats_regions", region_labels=((1, 2), (4,)), region_names=("a", "b"))
    with pytest.raises(ValueError, match=r"uses \[3\]"):
        spec_for("brats_regions", region_labels=((1, 2, 3), (1,), (4,)))
    with pytest.raises(ValueError, match="label_mode"):
        spec_for("softmax")


def test_to_index_maps_values_and_names_the_file_for_unknown_ones():
    label = np.array([[[0, 4], [2, 1]]], np.int16)
    np.testing.assert_array_equal(labels.to_index(label, (0, 1, 2, 4), "a.nii"), [[[0, 3], [2, 1]]])
    with pytest.raises(nifti.DataError, match=r"b.nii: label values \[-1, 3\] are not in"):
        labels.to_index(np.array([0, 3, -1, 4]), (0, 1, 2, 4), "b.nii")
    with pytest.raises(nifti.DataError, match="non-integer"):
        labels.to_index(np.array([0.0, 0.5]), (0, 1), "c.nii")


def test_multiclass_loss_matches_float64_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 4))
    index = rng.integers(0, 4, size=(2, 5))
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    reference = -np.take_along_axis(log_p, index[..., None], -1).mean()
    loss = spec_for("multiclass").point_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(index))
    np.testing.assert_allclose(float(loss), reference, rtol=1e-5)


def test_regions_loss_is_bce_of_each_region():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 6, 3))
    index = np.array([[0, 1, 2, 3, 3, 2]])  # values 0, 1, 2, 4, 4, 2
    target = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])[None]
    p = 1 / (1 + np.exp(-logits))
    reference = -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()
    loss = spec_for("brats_regions").point_loss(
        jnp.asarray(logits, jnp.float32), jnp.asarray(index)
    )
    np.testing.assert_allclose(float(loss), reference, rtol=1e-5)


@pytest.mark.parametrize("mode", labels.MODES)
def test_label_dice_loss_matches_a_float64_soft_dice_over_every_sampled_location(mode):
    """1 - mean over channels of (2 sum p m + 1) / (sum p + sum m + 1), the sums over both volumes'
    locations; channels: the foreground (binary), the non-background classes (softmax), the regions."""
    spec = spec_for(mode)
    rng = np.random.default_rng(2)
    shape = (2, 40) if mode == "binary" else (2, 40, spec.num_outputs)
    logits = rng.normal(size=shape) * 2
    index = rng.integers(0, 4, size=(2, 40))  # class indices into labels (0, 1, 2, 4)
    if mode == "multiclass":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        p = (e / e.sum(-1, keepdims=True))[..., 1:]
        masks = index[..., None] == np.arange(1, 4)
    else:
        p = 1 / (1 + np.exp(-logits.reshape(2, 40, -1)))
        values = np.array([0, 1, 2, 4])[index]
        regions = ((1, 2, 4),) if mode == "binary" else ((1, 2, 4), (1, 4), (4,))
        masks = np.stack([np.isin(values, r) for r in regions], axis=-1)
    dice = (2 * (p * masks).sum((0, 1)) + 1) / (p.sum((0, 1)) + masks.sum((0, 1)) + 1)
    got = losses.label_dice_loss(spec, jnp.asarray(logits, jnp.float32), jnp.asarray(index))
    np.testing.assert_allclose(float(got), 1 - dice.mean(), rtol=1e-5)


def test_decisions_give_label_values_and_a_foreground_score():
    regions = spec_for("brats_regions")
    probs = np.array(
        [[0.1, 0.2, 0.3], [0.9, 0.2, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.7], [0.2, 0.1, 0.9]]
    )
    score, value = regions.decide(probs, 0.5)
    np.testing.assert_array_equal(value, [0, 2, 1, 4, 4])  # ET alone still means label 4
    np.testing.assert_allclose(score, probs.max(-1))
    multi = spec_for("multiclass")
    probs = np.array([[0.45, 0.3, 0.25, 0.0], [0.2, 0.1, 0.6, 0.1], [0.1, 0.1, 0.1, 0.7]])
    score, value = multi.decide(probs, 0.5)
    np.testing.assert_array_equal(value, [0, 2, 4])  # arg-max, not 1 - p(background) > 0.5
    np.testing.assert_array_equal(score, [0.0, 1.0, 1.0])
    score, value = spec_for("binary").decide(np.array([0.2, 0.7]), 0.5)
    np.testing.assert_array_equal(value, [0, 1])


def test_region_scores_of_label_maps_match_a_hand_count():
    target = np.array([0, 1, 2, 4, 4, 2, 0, 1]).reshape(2, 2, 2)
    pred = np.array([0, 1, 2, 2, 4, 0, 4, 4]).reshape(2, 2, 2)
    row = reporting.score(spec_for("brats_regions"), pred, target)
    # voxels in C order; whole tumour {1,2,4}: pred 6 voxels, target 6, overlap 5 -> 10/12
    # tumour core {1,4}: pred {1,4,6,7}, target {1,3,4,7}, overlap 3 -> 6/8
    # enhancing {4}: pred {4,6,7}, target {3,4}, overlap 1 -> 2/5
    dice = {"whole_tumour": 10 / 12, "tumour_core": 6 / 8, "enhancing_tumour": 2 / 5}
    for name, value in dice.items():
        assert row["regions"][name]["dice"] == pytest.approx(value)
    assert row["dice"] == pytest.approx(np.mean(list(dice.values())))
    assert row["regions"]["enhancing_tumour"]["iou"] == pytest.approx(1 / 4)


def test_empty_prediction_and_empty_label_score_one():
    empty = np.zeros((3, 3, 3), np.uint8)
    row = reporting.score(spec_for("binary"), empty, empty)
    assert row["dice"] == row["iou"] == row["surface_dice"] == 1.0 and row["hd95"] == 0.0


def _nested_spheres(locations: np.ndarray, radii=(8.0, 5.0, 3.0), centre=(11.0, 12.0, 9.0)):
    """(M, 3) region memberships of three nested balls (a sharp analytic stand-in for the decoder)."""
    distance = np.linalg.norm(locations - np.asarray(centre), axis=-1)
    return np.stack([distance <= r for r in radii], axis=-1)


@pytest.mark.parametrize("mode", labels.MODES)
def test_every_strategy_in_every_mode_equals_dense_evaluation(mode):
    spec = spec_for(mode)
    grid = (24, 22, 18)

    def decode(locations):
        inside = _nested_spheres(locations.astype(np.float64))
        if mode == "binary":
            return np.where(inside[:, 0], 0.9, 0.1)
        if mode == "brats_regions":
            return np.where(inside, 0.8, 0.2)
        # multiclass over (0, 1, 2, 4): oedema shell, necrotic core ring, enhancing centre
        winner = np.select([inside[:, 2], inside[:, 1], inside[:, 0]], [3, 1, 2], 0)
        probs = np.full((len(locations), 4), 0.1)
        probs[np.arange(len(locations)), winner] = 0.7
        return probs

    everything = np.argwhere(np.ones(grid, bool)).astype(np.int32)
    dense = spec.decide(decode(everything), 0.5)[1].reshape(grid)
    ev = base.get_base_config("small").eval
    ev.octree_finest, ev.octree_confident = 1, 0.0  # exact octree: no interpolated labels
    for strategy in oss_net_predictor.STRATEGIES:
        ev.strategy = strategy
        refined, evaluations = oss_net_predictor.extract(decode, spec, grid, ev)
        np.testing.assert_array_equal(refined, dense, err_msg=strategy)
        assert set(np.unique(refined)) == ({0, 1} if mode == "binary" else {0, 1, 2, 4})
        assert evaluations < (1 if strategy == "dense" else 0.5) * np.prod(grid) + 1


@pytest.mark.parametrize("mode", labels.MODES)
def test_default_octree_interpolates_logits_close_to_dense_in_every_mode(mode):
    spec = spec_for(mode)
    grid = (40, 36, 32)
    centre, radii = np.array([19.4, 17.7, 15.2]), np.array([13.0, 9.5, 6.0])

    def decode(locations):  # smooth stand-in: logits 3 x signed distance to three nested spheres
        distance = np.linalg.norm(locations - centre, axis=-1)[:, None]
        inside = 1.0 / (1.0 + np.exp(-3.0 * (radii - distance)))  # (M, 3) region probabilities
        if mode == "binary":
            return inside[:, 0]
        if mode == "brats_regions":
            return inside
        # multiclass over (0, 1, 2, 4): class k's logit sums the sphere logits up to its depth
        depth = np.cumsum(1.5 * (radii - distance), axis=-1)  # oedema, necrotic core, enhancing
        logits = np.concatenate([np.zeros((len(locations), 1)), depth], axis=-1)[:, [0, 2, 1, 3]]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    everything = np.argwhere(np.ones(grid, bool)).astype(np.int32)
    dense = spec.decide(decode(everything), 0.5)[1].reshape(grid)
    assert set(np.unique(dense)) == ({0, 1} if mode == "binary" else {0, 1, 2, 4})
    ev = base.get_base_config("small").eval
    ev.strategy = "octree"
    refined, evaluations = oss_net_predictor.extract(decode, spec, grid, ev)
    changes = sum(np.count_nonzero(np.diff(dense, axis=a)) for a in range(3))
    assert np.count_nonzero(refined != dense) <= 0.05 * changes  # boundary voxels shift, no more
    ev.octree_finest, ev.octree_confident = 1, 0.0
    exact, exact_evaluations = oss_net_predictor.extract(decode, spec, grid, ev)
    np.testing.assert_array_equal(exact, dense)
    assert evaluations < 0.3 * exact_evaluations
