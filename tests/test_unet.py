"""U-Net baselines: variables as before the shared residual block, that block against the former unit,
shapes, skip connections, crops and slices, sliding windows, slice stacking, loss, and train ->
evaluate through training.train_and_evaluate for both families."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ossnet_jax import evaluation, families, losses, train_state, training
from ossnet_jax.data import labels, nifti
from ossnet_jax.families.unet import predictor as unet_inference
from ossnet_jax.families.unet import step as unet_training
from ossnet_jax.families.unet.model import UNet2D, UNet3D, build_unet
from ossnet_jax.models.layers import BN_EPSILON, BN_MOMENTUM, PAU, ResidualBlock
from tests.conftest import assert_holds_best_slow_weights, tiny_unet_config

KERNELS = ["xla", "cpu"]


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


# The variables of two tiny U-Nets as the U-Nets wrote them with their own residual unit (nn.Conv,
# nn.BatchNorm; before models/layers.py's ResidualBlock served them): "collection/module/.../leaf
# shape", every leaf float32. Checkpoints written then restore into these trees.
_UNET3D_VARIABLES_BEFORE = """
    batch_stats/dec0/bn1/mean 2
    batch_stats/dec0/bn1/var 2
    batch_stats/dec0/bn2/mean 2
    batch_stats/dec0/bn2/var 2
    batch_stats/down1/bn1/mean 3
    batch_stats/down1/bn1/var 3
    batch_stats/down1/bn2/mean 3
    batch_stats/down1/bn2/var 3
    batch_stats/stem/bn1/mean 2
    batch_stats/stem/bn1/var 2
    batch_stats/stem/bn2/mean 2
    batch_stats/stem/bn2/var 2
    params/dec0/act1/denominator 4
    params/dec0/act1/numerator 6
    params/dec0/act2/denominator 4
    params/dec0/act2/numerator 6
    params/dec0/bn1/bias 2
    params/dec0/bn1/scale 2
    params/dec0/bn2/bias 2
    params/dec0/bn2/scale 2
    params/dec0/conv1/kernel 3,3,3,4,2
    params/dec0/conv2/kernel 3,3,3,2,2
    params/dec0/shortcut/bias 2
    params/dec0/shortcut/kernel 1,1,1,4,2
    params/down1/act1/denominator 4
    params/down1/act1/numerator 6
    params/down1/act2/denominator 4
    params/down1/act2/numerator 6
    params/down1/bn1/bias 3
    params/down1/bn1/scale 3
    params/down1/bn2/bias 3
    params/down1/bn2/scale 3
    params/down1/conv1/kernel 3,3,3,2,3
    params/down1/conv2/kernel 3,3,3,3,3
    params/down1/shortcut/bias 3
    params/down1/shortcut/kernel 1,1,1,2,3
    params/head/bias 2
    params/head/kernel 1,1,1,2,2
    params/stem/act1/denominator 4
    params/stem/act1/numerator 6
    params/stem/act2/denominator 4
    params/stem/act2/numerator 6
    params/stem/bn1/bias 2
    params/stem/bn1/scale 2
    params/stem/bn2/bias 2
    params/stem/bn2/scale 2
    params/stem/conv1/kernel 3,3,3,4,2
    params/stem/conv2/kernel 3,3,3,2,2
    params/stem/shortcut/bias 2
    params/stem/shortcut/kernel 1,1,1,4,2
    params/up0/ConvTranspose_0/bias 2
    params/up0/ConvTranspose_0/kernel 2,2,2,3,2
"""
_UNET2D_VARIABLES_BEFORE = """
    batch_stats/dec0/bn1/mean 2
    batch_stats/dec0/bn1/var 2
    batch_stats/dec0/bn2/mean 2
    batch_stats/dec0/bn2/var 2
    batch_stats/down1/bn1/mean 3
    batch_stats/down1/bn1/var 3
    batch_stats/down1/bn2/mean 3
    batch_stats/down1/bn2/var 3
    batch_stats/stem/bn1/mean 2
    batch_stats/stem/bn1/var 2
    batch_stats/stem/bn2/mean 2
    batch_stats/stem/bn2/var 2
    params/dec0/bn1/bias 2
    params/dec0/bn1/scale 2
    params/dec0/bn2/bias 2
    params/dec0/bn2/scale 2
    params/dec0/conv1/kernel 3,3,4,2
    params/dec0/conv2/kernel 3,3,2,2
    params/dec0/shortcut/bias 2
    params/dec0/shortcut/kernel 1,1,4,2
    params/down1/bn1/bias 3
    params/down1/bn1/scale 3
    params/down1/bn2/bias 3
    params/down1/bn2/scale 3
    params/down1/conv1/kernel 3,3,2,3
    params/down1/conv2/kernel 3,3,3,3
    params/down1/shortcut/bias 3
    params/down1/shortcut/kernel 1,1,2,3
    params/head/bias 1
    params/head/kernel 1,1,2,1
    params/stem/bn1/bias 2
    params/stem/bn1/scale 2
    params/stem/bn2/bias 2
    params/stem/bn2/scale 2
    params/stem/conv1/kernel 3,3,3,2
    params/stem/conv2/kernel 3,3,2,2
    params/stem/shortcut/bias 2
    params/stem/shortcut/kernel 1,1,3,2
    params/up0/Conv_0/bias 2
    params/up0/Conv_0/kernel 1,1,3,2
"""


def _variable_table(variables) -> dict:
    """{"collection/module/.../leaf": (shape, dtype name)} of a variables tree (arrays or shapes)."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(k.key for k in path): (leaf.shape, str(leaf.dtype)) for path, leaf in flat}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(
    "model, shape, table",
    [
        (
            UNet3D(channels=(2, 3), num_outputs=2, activation="pau"),
            (1, 4, 4, 4, 4),
            _UNET3D_VARIABLES_BEFORE,
        ),
        (
            UNet2D(channels=(2, 3), num_outputs=1, upsample="resize"),
            (1, 4, 4, 3),
            _UNET2D_VARIABLES_BEFORE,
        ),
    ],
)
def test_unet_variables_are_those_of_checkpoints_written_before(kernels, model, shape, table):
    """The U-Nets on the shared residual block have the parameter and batch_stats trees (names,
    shapes, dtypes) of the U-Nets before it, in either kernel set."""
    model = model.clone(kernels=kernels)
    variables = jax.eval_shape(lambda: _init(model, shape))
    rows = [line.split() for line in table.strip().splitlines()]
    expected = {path: (tuple(int(n) for n in dims.split(",")), "float32") for path, dims in rows}
    assert _variable_table(variables) == expected


class _FormerUnit(nn.Module):
    """The U-Nets' former residual unit from flax's own modules, with the shortcut in the reference
    order (convolved at full resolution, then pooled): conv3 -> BN -> act -> [avgpool2] -> conv3 -> BN,
    plus the 1-conv shortcut, -> act, for 2 or 3 spatial axes."""

    features: int
    downsample: bool
    activation: str

    @nn.compact
    def __call__(self, x, train):
        rank = x.ndim - 2
        act = {"relu": lambda name: nn.relu, "pau": lambda name: PAU(name=name)}[self.activation]
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
        )
        pool = lambda h: nn.avg_pool(h, (2,) * rank, strides=(2,) * rank) if self.downsample else h
        h = nn.Conv(self.features, (3,) * rank, use_bias=False, name="conv1")(x)
        h = pool(act("act1")(norm("bn1")(h)))
        h = norm("bn2")(nn.Conv(self.features, (3,) * rank, use_bias=False, name="conv2")(h))
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Conv(self.features, (1,) * rank, name="shortcut")(x)
        return act("act2")(h + pool(shortcut))


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", [(2, 4, 6, 4, 3), (2, 6, 4, 3)])
@pytest.mark.parametrize("downsample", [True, False])
@pytest.mark.parametrize("activation, features", [("relu", 5), ("pau", 3)])
def test_residual_block_equals_the_former_unet_unit(
    kernels, shape, downsample, activation, features
):
    """layers.ResidualBlock as the U-Nets build it equals their former unit: the same variables, and
    in training (batch statistics) the same outputs, gradients and running statistics, in evaluation
    (running statistics) the same outputs; 3 output features: identity shortcut."""
    rng = np.random.default_rng(1)
    ours = ResidualBlock(features, activation, kernels=kernels, downsample=downsample)
    reference = _FormerUnit(features, downsample, activation)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    init = lambda module: jax.jit(functools.partial(module.init, train=False))(jax.random.key(0), x)
    variables, ref_variables = init(ours), init(reference)
    assert _variable_table(variables) == _variable_table(ref_variables)
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
        variables["params"],
    )
    stats = jax.tree.map(
        lambda s: s + jnp.asarray(rng.uniform(0.2, 0.5, s.shape), jnp.float32),
        variables["batch_stats"],
    )
    out_shape = jax.eval_shape(lambda: ours.apply(variables, x, train=False)).shape
    weight = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def train_step(module):
        def loss(p, x):
            y, updates = module.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * weight), updates["batch_stats"]

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (value, new_stats), grads = train_step(ours)
    (ref_value, ref_stats), ref_grads = train_step(reference)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-4)
    for got, want in zip(
        jax.tree.leaves((grads, new_stats)), jax.tree.leaves((ref_grads, ref_stats))
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    evaluate = lambda module: jax.jit(functools.partial(module.apply, train=False))(
        {"params": params, "batch_stats": stats}, x
    )
    np.testing.assert_allclose(
        np.asarray(evaluate(ours)), np.asarray(evaluate(reference)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["unet3d", "unet2d"])
def test_build_unet_takes_the_kernel_set_of_the_config(tmp_path, name):
    config = tiny_unet_config(tmp_path, name)
    for kernels in ("xla", "cpu"):
        config.model.kernels = kernels
        assert build_unet(config).kernels == kernels
    config.model.kernels = "auto"
    assert build_unet(config).kernels == ("cpu" if jax.default_backend() == "cpu" else "xla")


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_evaluate_restores_a_unet_checkpoint_with_the_same_metrics(trained, tmp_path, capsys):
    """evaluate, into a new folder (nothing to reuse), predicts the run's labels and metrics again
    with the slow (Lookahead) parameters and the statistics of the best checkpoint, read here on
    their own (after 4 steps of k=5 the slow ones are still the initial ones, the fast ones moved)."""
    _, workdir, result = trained
    config = evaluation.load_config(workdir)
    config.eval.meshes = config.eval.pictures = False  # their writing: tests/test_evaluation.py
    again = evaluation.evaluate(config, workdir, out_dir=tmp_path)
    assert "reusing" not in capsys.readouterr().out and again["step"] == result["step"]
    assert [a["id"] for a in again["cases"]] == [b["id"] for b in result["cases"]]
    for a, b in zip(again["cases"], result["cases"]):
        assert a["decoder_points"] == b["decoder_points"]
        assert a["dice"] == pytest.approx(b["dice"]) and a["iou"] == pytest.approx(b["iou"])
        name = f"{a['id']}.nii.gz"
        np.testing.assert_array_equal(
            nifti.load_nifti(tmp_path / "predictions" / name)[0],
            nifti.load_nifti(workdir / "eval" / "predictions" / name)[0],
        )
    predictor, step = evaluation.restore_predictor(config, workdir)
    family = families.get_family(config)
    template = jax.eval_shape(
        lambda: family.init_state(
            config, build_unet(config), train_state.make_optimizer(config), jax.random.key(0)
        )
    )
    assert step == result["step"]
    assert_holds_best_slow_weights(predictor, step, workdir, template)


COMPARE_CONFIG = """# the module's trained U-Net, as compare's --configs names it
import pathlib

from tests.conftest import tiny_unet_config


def get_config(preset):
    return tiny_unet_config(pathlib.Path({root!r}), preset)
"""


@pytest.mark.slow
def test_compare_runs_as_a_program_and_tabulates_a_finished_run(trained, tmp_path):
    """`python -m ossnet_jax.compare --configs tiny.py:unet2d --steps 4 --workdir CW --out O` with
    the trained 2D U-Net copied to CW/tiny_unet2d: it measures the train step (the program the run
    compiled, in the session's compilation cache), resumes at step 4 (nothing left to train), keeps
    the run's evaluation and writes the table's JSON, Markdown and PNG."""
    config, workdir, result = trained
    if config.model.name != "unet2d":
        pytest.skip("one family runs it: the 2D U-Net, the fastest to compile")
    compare_dir = tmp_path / "compare"
    shutil.copytree(workdir, compare_dir / "tiny_unet2d")
    # main() keeps compiled programs in CW/.jax_cache: the session's here, so nothing recompiles
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache:
        (compare_dir / ".jax_cache").symlink_to(cache, target_is_directory=True)
    spec = tmp_path / "tiny.py"
    spec.write_text(COMPARE_CONFIG.format(root=str(config.data.root)))
    out = tmp_path / "out" / "compare"
    args = ["--configs", f"{spec}:unet2d", "--steps", "4", "--workdir", str(compare_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "ossnet_jax.compare", *args, "--out", str(out)],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = compare_dir / "tiny_unet2d"
    assert f"resuming from step 4 of {run_dir / 'checkpoints'}" in done.stdout
    assert "reusing 2 predictions of checkpoint step" in done.stdout
    saved = json.loads(out.with_suffix(".json").read_text())
    (row,) = saved["rows"]
    assert row["name"] == "tiny:unet2d" and row["checkpoint_step"] == result["step"]
    assert row["dice"] == pytest.approx(result["mean"]["dice"])
    assert row["train_memory_mib"] > 0 and row["outputs_per_s"] > 0
    assert saved["settings"]["steps"] == 4 and saved["settings"]["val_cases"] == 2
    assert saved["settings"]["command"] == [*args, "--out", str(out)]
    assert f"| tiny:unet2d | {row['dice']:.4f}" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
