"""U-Net baselines: shapes, skip connections, crops and slices, sliding windows, slice stacking, loss,
and train -> evaluate through training.train_and_evaluate for both families."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ossnet_jax import evaluation, families, losses, training
from ossnet_jax.families.unet import predictor as unet_inference
from ossnet_jax.families.unet import step as unet_training
from ossnet_jax.data import labels
from ossnet_jax.families.unet.model import ResidualUnit, UNet2D, UNet3D
from tests.conftest import tiny_unet_config


def _init(model, shape):
    return model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def _random_variables(model, shape):
    """Variables of the model's structure with random values: parameters ~ N(0, 0.5), batch-norm
    statistics in [0.5, 1.5] (skips compiling the initialisers, which takes seconds on a CPU)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: _init(model, shape))
    return {
        "params": jax.tree.map(
            lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes["params"]
        ),
        "batch_stats": jax.tree.map(
            lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes["batch_stats"]
        ),
    }


def _apply(model):
    """model.apply(variables, x, train=False), compiled."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _output_shape(model, shape, **kwargs):
    """Shapes of model.apply's outputs for an input of `shape`, traced without running it."""

    def run():
        x = jnp.zeros(shape)
        return model.apply(_init(model, shape), x, train=False, **kwargs)

    return jax.eval_shape(run)


@pytest.mark.parametrize("shape", [(2, 4, 6, 4, 3), (2, 6, 4, 3)])
def test_downsampling_unit_equals_shortcut_convolved_before_pooling(shape):
    """The unit pools its shortcut before the 1^k convolution; the reference order (convolve at full
    resolution, then pool) gives the same outputs and gradients."""
    rank = len(shape) - 2
    unit = ResidualUnit(5, downsample=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    variables = unit.init(jax.random.key(0), x, train=False)
    pool = lambda h: nn.avg_pool(h, (2,) * rank, strides=(2,) * rank)

    def reference(params, x):
        p, stats = params, variables["batch_stats"]

        def bn(h, name):
            mean, var = stats[name]["mean"], stats[name]["var"]
            return (h - mean) / jnp.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

        conv = lambda h, name, k: jax.lax.conv_general_dilated(
            h,
            p[name]["kernel"],
            (1,) * rank,
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")
            if rank == 2
            else ("NDHWC", "DHWIO", "NDHWC"),
        )
        h = pool(jax.nn.relu(bn(conv(x, "conv1", 3), "bn1")))
        h = bn(conv(h, "conv2", 3), "bn2")
        shortcut = conv(x, "shortcut", 1) + p["shortcut"]["bias"]
        return jax.nn.relu(h + pool(shortcut))

    ours = lambda params, x: unit.apply({**variables, "params": params}, x, train=False)
    weight = jnp.asarray(np.random.default_rng(2).normal(size=ours(variables["params"], x).shape))
    loss = lambda fn: jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) * weight), argnums=(0, 1))
    (value, grads), (ref_value, ref_grads) = (
        loss(ours)(variables["params"], x),
        loss(reference)(variables["params"], x),
    )
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-4)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(16, 16, 8), (9, 11, 7)])
@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize("downscale", [1, 2])
def test_unet3d_output_shape_for_even_and_odd_sizes(size, upsample, downscale):
    model = UNet3D(channels=(2, 4, 4), num_outputs=3, upsample=upsample, input_downscale=downscale)
    assert _output_shape(model, (2,) + size + (3,)).shape == (2,) + size + (3,)


@pytest.mark.parametrize("size", [(16, 12), (13, 7)])
def test_unet2d_output_shape_for_even_and_odd_sizes(size):
    model = UNet2D(channels=(2, 4, 4, 8), num_outputs=1)
    assert _output_shape(model, (3,) + size + (4,)).shape == (3,) + size + (1,)


@pytest.mark.parametrize("model", [UNet3D(channels=(2, 3, 5)), UNet2D(channels=(2, 3, 5, 6))])
def test_skip_connections_meet_encoder_features_of_their_level(model):
    """Each level's upsampled features have the spatial shape of that level's encoder features (odd
    input: padded to a multiple of 2^(levels-1)) and the decoder unit returns the level's width."""
    size = (11, 7, 5)[: model.spatial_dims]
    _, state = _output_shape(model, (1,) + size + (2,), capture_intermediates=True)
    caught = state["intermediates"]
    levels = len(model.channels)
    for level in range(levels - 1):
        skip = caught["stem" if level == 0 else f"down{level}"]["__call__"][0]
        up = caught[f"up{level}"]["__call__"][0]
        decoded = caught[f"dec{level}"]["__call__"][0]
        assert up.shape == skip.shape == decoded.shape
        assert skip.shape[-1] == model.channels[level]
    padded = tuple(-(-s // 2 ** (levels - 1)) * 2 ** (levels - 1) for s in size)
    assert caught["stem"]["__call__"][0].shape[1:-1] == padded


def test_random_crops_centre_on_foreground_for_their_share():
    target = np.zeros((4, 20, 20, 12), np.uint8)
    target[:, 15:18, 2:4, 9:11] = 2  # a small lesion near a corner
    image = np.stack([target] * 2, axis=-1).astype(np.float32)
    crop = jax.jit(unet_training.random_crops, static_argnums=(3, 4))
    crops, crop_targets = crop(jax.random.key(0), image, target, (8, 8, 6), 0.5)
    assert crops.shape == (4, 8, 8, 6, 2) and crop_targets.shape == (4, 8, 8, 6)
    assert (np.asarray(crop_targets[:2]) > 0).any(axis=(1, 2, 3)).all()  # first round(4 x 0.5)
    np.testing.assert_array_equal(np.asarray(crops[..., 0]), np.asarray(crop_targets))


def test_random_slices_hold_foreground_for_their_share():
    target = np.zeros((2, 10, 10, 30), np.uint8)
    target[:, 4:6, 4:6, 7] = 1  # foreground on one slice only
    image = target[..., None].astype(np.float32)
    cut = jax.jit(unet_training.random_slices, static_argnums=(3, 4))
    slices, slice_targets = cut(jax.random.key(3), image, target, 4, 0.5)
    assert slices.shape == (8, 10, 10, 1) and slice_targets.shape == (8, 10, 10)
    has_foreground = (np.asarray(slice_targets) > 0).any(axis=(1, 2)).reshape(2, 4)
    assert has_foreground[:, :2].all()  # the first round(4 x 0.5) slices of each volume


@pytest.mark.parametrize("window, overlap", [((4, 5, 7), 0.5), ((6, 3, 2), 0.0), ((), 0.25)])
def test_sliding_window_tiles_every_voxel_exactly(window, overlap):
    """With a voxel-wise network, averaging overlapping windows must give the whole-volume output."""
    volume = np.random.default_rng(0).normal(size=(11, 9, 7, 2)).astype(np.float32)
    weights = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    voxelwise = lambda x: 1.0 / (1.0 + np.exp(-(np.asarray(x) @ weights)))
    probs, voxels = unet_inference.sliding_window(voxelwise, volume, window, overlap, batch=3)
    np.testing.assert_allclose(probs, voxelwise(volume), rtol=1e-6)
    assert voxels >= volume[..., 0].size


def test_window_starts_cover_the_axis_and_end_at_its_end():
    assert unet_inference.window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert unet_inference.window_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]
    assert unet_inference.window_starts(5, 8, 0.5) == [0]


def _predictor(model, config_eval, shape):
    config = ml_collections.ConfigDict(
        {"data": {"label_mode": "binary", "labels": (0, 1)}, "eval": config_eval}
    )
    return unet_inference.UNetPredictor(config, model, _random_variables(model, shape))


def test_sliding_window_on_a_small_volume_equals_whole_volume_inference():
    model = UNet3D(channels=(2, 4))
    volume = np.random.default_rng(1).normal(size=(9, 8, 7, 2)).astype(np.float32)
    ev = {"window_shape": (16, 16, 16), "overlap": 0.5, "batch_windows": 2, "threshold": 0.5}
    predictor = _predictor(model, ev, (1, 9, 8, 7, 2))
    probs, voxels = predictor.probabilities(volume)
    direct = jax.nn.sigmoid(_apply(model)(predictor.variables, volume[None]))[0]
    np.testing.assert_allclose(probs, np.asarray(direct), rtol=1e-5, atol=1e-6)
    assert voxels == 9 * 8 * 7


def test_stacked_slices_equal_per_slice_application():
    model = UNet2D(channels=(2, 4, 4))
    volume = np.random.default_rng(2).normal(size=(10, 9, 5, 2)).astype(np.float32)
    ev = {"batch_slices": 2, "threshold": 0.5}  # 5 slices: the last batch is padded
    predictor = _predictor(model, ev, (1, 10, 9, 2))
    probs, _ = predictor.probabilities(volume)
    apply = _apply(model)
    for z in range(volume.shape[2]):
        one = apply(predictor.variables, volume[None, :, :, z])
        np.testing.assert_allclose(probs[:, :, z], np.asarray(jax.nn.sigmoid(one[0])), atol=1e-5)
    label_map, voxels = predictor.predict(volume)
    np.testing.assert_array_equal(label_map, (probs[..., 0] > 0.5).astype(np.int32))
    assert voxels == volume[..., 0].size


@pytest.mark.parametrize("mode", labels.MODES)
def test_dice_ce_loss_is_small_for_confident_right_logits_in_every_mode(mode):
    data = ml_collections.ConfigDict(
        {"label_mode": mode, "labels": (0, 1, 2, 4), "region_names": ("wt", "tc", "et")}
    )
    data.region_labels = ((1, 2, 4), (1, 4), (4,))
    spec = labels.label_spec(data)
    index = jnp.asarray(np.random.default_rng(3).integers(0, 4, (2, 6, 5)))
    if mode == "multiclass":
        right = 20.0 * (2 * jax.nn.one_hot(index, 4) - 1)
    else:
        right = 20.0 * (2 * spec.channel_masks(index).astype(jnp.float32) - 1)
    wrong = -right
    good, ce, dice = losses.dice_ce_loss(spec, right, index, 1.0, 1.0)
    bad = losses.dice_ce_loss(spec, wrong, index, 1.0, 1.0)[0]
    assert float(good) < 1e-3 and float(ce) < 1e-3 and float(dice) < 1e-3
    assert float(bad) > 1.0


def test_unknown_model_name_is_refused(tmp_path):
    config = tiny_unet_config(tmp_path, "unet3d")
    config.model.name = "unet4d"
    with pytest.raises(ValueError, match="unet4d"):
        families.get_family(config)


@pytest.fixture(scope="module", params=["unet3d", "unet2d"])
def trained(request, synthetic_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    config = tiny_unet_config(synthetic_root, request.param)
    return config, workdir, training.train_and_evaluate(config, str(workdir))


def test_unet_training_writes_what_oss_net_training_writes(trained):
    config, workdir, result = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "val_dice" in r] == [2, 4]
    assert {"ce_loss", "dice_loss", "points_per_s"} <= set(rows[0])
    saved = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    grid_voxels = int(np.prod(config.data.grid_shape))
    for case in saved["cases"]:
        assert {"id", "dice", "iou", "hd95", "decoder_points", "seconds"} <= set(case)
        assert case["decoder_points"] == grid_voxels
        assert (workdir / "eval" / "predictions" / f"{case['id']}.nii.gz").exists()


def test_evaluate_restores_a_unet_checkpoint_with_the_same_metrics(trained):
    _, workdir, result = trained
    again = evaluation.evaluate(evaluation.load_config(workdir), workdir)
    for a, b in zip(again["cases"], result["cases"]):
        assert a["id"] == b["id"] and a["dice"] == pytest.approx(b["dice"])
