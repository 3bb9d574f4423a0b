"""Shapes of every variant (O-Net, OSS-Net A-D) and the encode/decode split."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net.model import OSSNet, build_model
from tests.conftest import TINY_GRID, tiny_config

VARIANTS = ["o_net", "oss_net_a", "oss_net_b", "oss_net_c", "oss_net_d"]


def _config(name, tmp_path):
    base = tiny_config(tmp_path)
    variant = importlib.import_module(f"configs.{name}").get_config("small")
    base.model = variant.model
    base.model.encoder_channels = (4, 8)
    base.model.decoder_width = 16
    base.model.decoder_blocks = 2
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_shapes(name, tmp_path):
    config = _config(name, tmp_path)
    model = build_model(config)
    b, n = 2, 5
    image = jax.random.normal(jax.random.key(0), (b,) + TINY_GRID + (4,))
    locs = jax.random.randint(jax.random.key(1), (b, n, 3), 0, 16)
    low, patches = oss_net_model.model_inputs(config, image, locs)
    assert low.shape == (b, 16, 16, 8, 4)
    if config.model.patches:
        assert patches.shape == (b, n, 7, 7, 7, 8 if config.model.large_patches else 4)
    else:
        assert patches is None
    # shapes only: traced, not compiled (values: test_decode_of_encoded_latents_equals_call)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(2), low, locs, patches, False))
    (logits, seg), _ = jax.eval_shape(
        lambda v: model.apply(v, low, locs, patches, train=True, mutable=["batch_stats"]), variables
    )
    assert logits.shape == (b, n)
    latents, _ = jax.eval_shape(
        lambda v: model.apply(v, low, train=False, method=OSSNet.encode), variables
    )
    latent_grid = 4 * 4 * 2  # 16x16x8 after two halvings
    k = 1 if config.model.encoder == "plain" else config.model.decoder_blocks + 1
    assert latents.shape == (b, k, latent_grid)
    assert (seg is None) == (not config.model.seg_head)
    if seg is not None:
        assert seg.shape == (b, 4, 4, 2)
    assert ("patch_net" in variables["params"]) == config.model.patches


@pytest.mark.slow
def test_decode_of_encoded_latents_equals_call(tmp_path):
    config = _config("oss_net_c", tmp_path)
    model = build_model(config)
    image = jax.random.normal(jax.random.key(0), (1,) + TINY_GRID + (4,))
    locs = jax.random.randint(jax.random.key(1), (1, 9, 3), 0, 16)
    low, patches = oss_net_model.model_inputs(config, image, locs)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(2), low, locs, patches
    )

    @jax.jit  # one program each, not one per operation
    def both(variables, low, locs, patches):
        logits, _ = model.apply(variables, low, locs, patches, train=False)
        latents, _ = model.apply(variables, low, train=False, method=OSSNet.encode)
        return logits, model.apply(
            variables, locs, patches, latents, train=False, method=OSSNet.decode
        )

    logits, again = both(variables, low, locs, patches)
    assert jnp.allclose(logits, again, atol=1e-6)


def test_official_brats_sizes():
    """The 'brats' preset of OSS-Net C gives the published latent sizes: 6 latents of 8x8x5 = 320."""
    config = importlib.import_module("configs.oss_net_c").get_config("brats")
    model = build_model(config)
    low = jax.ShapeDtypeStruct((1, 128, 128, 80, 4), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros(low.shape), train=False, method=OSSNet.encode
        )
    )
    latents, seg = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(low.shape), train=False, method=OSSNet.encode), variables
    )
    assert latents.shape == (1, 6, 320)
    assert seg.shape == (1, 8, 8, 5)


def test_unknown_encoder_is_rejected(tmp_path):
    config = _config("oss_net_c", tmp_path)
    config.model.encoder = "resnet"
    model = build_model(config)
    with pytest.raises(ValueError, match="plain' or 'skip"):
        model.init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 8, 4)), train=False, method=OSSNet.encode
        )


@pytest.mark.slow
def test_patch_size_is_a_config_value(tmp_path):
    config = _config("oss_net_d", tmp_path)
    config.model.patch_size = 5
    model = build_model(config)
    image = jax.random.normal(jax.random.key(0), (1,) + TINY_GRID + (4,))
    locs = jax.random.randint(jax.random.key(1), (1, 3, 3), 0, 16)
    low, patches = oss_net_model.model_inputs(config, image, locs)
    assert patches.shape == (1, 3, 5, 5, 5, 8)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(2), low, locs, patches, False))
    assert variables["params"]["patch_net"]["conv1"]["kernel"].shape == (5, 5, 5, 8, 4)
    config.model.patch_size = 6
    with pytest.raises(ValueError, match="must be odd"):
        build_model(config)


def _kernel_set_models(tmp_path):
    """The tiny config's model built with model.kernels 'xla' and 'cpu', its inputs, and each
    model's initial variables."""
    models = {}
    for name in ("xla", "cpu"):
        config = tiny_config(tmp_path, kernels=name)
        models[name] = build_model(config)
        assert models[name].kernels == name
    image = jax.random.normal(jax.random.key(0), (2,) + TINY_GRID + (4,))
    locs = jax.random.randint(jax.random.key(1), (2, 32, 3), 0, jnp.asarray(TINY_GRID))
    inputs = oss_net_model.model_inputs(tiny_config(tmp_path, kernels="xla"), image, locs)
    low, patches = inputs
    init = {
        name: jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(2), low, locs, patches
        )
        for name, model in models.items()
    }
    return models, (low, locs, patches), init


@pytest.mark.slow
def test_kernel_sets_build_the_same_variables_and_agree_in_the_forward_pass(tmp_path):
    """model.kernels 'xla' and 'cpu' give identical parameter and batch-statistics trees (names,
    shapes, dtypes and initial values: checkpoints move between them), and on the same variables the
    same logits and segmentation in evaluation and in training, updated statistics included."""
    models, inputs, init = _kernel_set_models(tmp_path)
    xla, cpu = init["xla"], init["cpu"]
    assert set(xla) == set(cpu) == {"params", "batch_stats"}
    assert jax.tree.structure(cpu) == jax.tree.structure(xla)
    describe = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
    assert describe(cpu) == describe(xla)
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(xla)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # away from the initialisation (zero conditional-batch-norm weights, unit statistics)
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), xla["params"]
    )
    stats = jax.tree.map(
        lambda s: s * jnp.asarray(1.0 + 0.2 * rng.random(size=s.shape), s.dtype),
        xla["batch_stats"],
    )
    variables = {"params": params, "batch_stats": stats}

    def forward(model, train):
        mutable = ["batch_stats"] if train else False
        apply = functools.partial(model.apply, train=train, mutable=mutable)
        return jax.jit(apply)(variables, *inputs)

    for train in (False, True):
        got, want = forward(models["cpu"], train), forward(models["xla"], train)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert float(np.max(np.abs(np.asarray(jax.tree.leaves(want)[0])))) > 0  # not vacuous
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
