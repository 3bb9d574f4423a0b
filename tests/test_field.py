"""Real-valued locations through the whole model, and the field as a pure function of one location:
integer-valued real locations reproduce integer ones bitwise, both kernel sets agree, the vmapped
field equals the batched decoder, and its location gradient matches finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.families.oss_net import field
from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.predictor import Predictor
from tests.conftest import TINY_GRID, tiny_config

pytestmark = pytest.mark.slow  # each compiles a model (the gather-level tests: test_patches.py)


def _config(root, kernels):
    """OSS-Net D-like: skip latents, large patches and Fourier features, so every path sees the
    real location."""
    config = tiny_config(
        root, large_patches=True, fourier_features=4, kernels=kernels, patch_size=3
    )
    # one encoder and one decoder block (PAU kept, as in the kernel sets' comparison): the paths
    # of the location do not depend on the depth, and the programs compile about twice as fast
    config.model.encoder_channels, config.model.decoder_blocks = (4,), 1
    config.train.remat = "none"
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, model and variables away from the initialisation, one image, for both kernel sets."""
    root = tmp_path_factory.mktemp("field")
    image = jax.random.normal(jax.random.key(0), (1,) + TINY_GRID + (4,))
    configs = {kernels: _config(root, kernels) for kernels in ("xla", "cpu")}
    models = {kernels: oss_net_model.build_model(c) for kernels, c in configs.items()}
    locs = jnp.zeros((1, 2, 3), jnp.int32)
    low, patches = oss_net_model.model_inputs(configs["xla"], image, locs)
    init = jax.jit(functools.partial(models["xla"].init, train=False))(
        jax.random.key(2), low, locs, patches
    )  # the same variables for both kernel sets (tests/test_models.py)
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(0.05 * rng.normal(size=p.shape), p.dtype), init["params"]
    )
    variables = {"params": params, "batch_stats": init["batch_stats"]}
    return {k: (configs[k], models[k], variables) for k in configs}, image


INTEGER = np.array([[0, 0, 0], [31, 31, 15], [7, 20, 3], [16, 1, 14], [30, 2, 9]], np.int32)
REAL = np.array(
    [[0.0, 0.0, 0.0], [30.99, 31.0, 14.5], [7.25, 20.5, 3.75], [16.1, 1.9, 13.3], [3.5, 2.5, 9.4]],
    np.float32,
)


def test_integer_valued_real_locations_equal_integer_locations_with_gradients(setup):
    """A training forward and backward pass at float32 locations holding integers: the same logits,
    segmentation, batch statistics and parameter gradients, bitwise, as at int32 locations. (The
    kernel sets differ only after the patches are gathered: test_kernel_sets_agree_...)"""
    models, image = setup
    config, model, variables = models["xla"]
    weight = jnp.asarray(np.random.default_rng(5).normal(size=(1, len(INTEGER))), jnp.float32)

    @jax.jit
    def step(params, locs):
        def loss(params):
            low, patches = oss_net_model.model_inputs(config, image, locs)
            (logits, seg), stats = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                low,
                locs,
                patches,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.tanh(logits) * weight) + jnp.mean(seg), (logits, stats)

        return jax.grad(loss, has_aux=True)(params)

    as_int = step(variables["params"], jnp.asarray(INTEGER)[None])
    as_real = step(variables["params"], jnp.asarray(INTEGER, jnp.float32)[None])
    assert jax.tree.structure(as_int) == jax.tree.structure(as_real)
    for a, b in zip(jax.tree.leaves(as_real), jax.tree.leaves(as_int)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_sets_agree_at_real_locations(setup):
    models, image = setup
    out = {}
    for kernels, (config, model, variables) in models.items():
        locs = jnp.asarray(REAL)[None]
        low, patches = oss_net_model.model_inputs(config, image, locs)
        out[kernels], _ = jax.jit(functools.partial(model.apply, train=False))(
            variables, low, locs, patches
        )
    assert float(jnp.std(out["xla"])) > 1e-3
    np.testing.assert_allclose(np.asarray(out["cpu"]), np.asarray(out["xla"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_vmapped_field_equals_the_batched_decoder(setup, kernels):
    models, image = setup
    config, model, variables = models[kernels]
    predictor = Predictor(config, model, variables)
    latents, _, source = predictor.encode(variables, image[0])
    batched = predictor.decode_all(latents, source, REAL)
    one = functools.partial(field.value, model=model, config=config)
    mapped = jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))(
        variables, latents, source, jnp.asarray(REAL)
    )
    assert batched.shape == mapped.shape == (len(REAL),)
    np.testing.assert_allclose(np.asarray(mapped), batched, rtol=1e-5, atol=1e-6)


def test_field_gradient_matches_central_differences(setup):
    """Inside a voxel cell (where the trilinear patches are linear) jax.grad of the field with
    respect to the location equals the central difference, for each axis."""
    models, image = setup
    config, model, variables = models["xla"]
    predictor = Predictor(config, model, variables)
    latents, _, source = predictor.encode(variables, image[0])
    f = jax.jit(
        lambda loc: field.foreground_value(
            variables, latents, source, loc, model=model, config=config
        )
    )
    grad = jax.jit(jax.grad(lambda loc: f(loc)))
    h = 2e-3
    for point in ([7.4, 20.5, 3.6], [16.3, 9.7, 8.45]):
        loc = jnp.asarray(point, jnp.float32)
        g = np.asarray(grad(loc))
        numeric = np.array(
            [(float(f(loc.at[a].add(h))) - float(f(loc.at[a].add(-h)))) / (2 * h) for a in range(3)]
        )
        assert np.abs(g).max() > 1e-4  # a field that varies: the comparison is not of zeros
        np.testing.assert_allclose(g, numeric, rtol=1e-2, atol=1e-4)


def test_continuous_training_locations_stay_in_their_voxel_and_keep_its_target(tmp_path):
    """train.continuous_locations: the same voxels are drawn (same targets), each location moved
    within its voxel (rounding gives the voxel back) and inside the grid."""
    config = tiny_config(tmp_path)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(2,) + TINY_GRID + (4,)), jnp.float32),
        "target": jnp.asarray(rng.integers(0, 4, (2,) + TINY_GRID), jnp.uint8),
        "band": jnp.asarray(rng.random((2,) + TINY_GRID) < 0.3),
    }
    out = {}
    for continuous in (False, True):
        config.train.continuous_locations = continuous
        prepare = jax.jit(functools.partial(oss_net_step.prepare_inputs, config=config))
        out[continuous] = prepare(batch, jax.random.key(1), 0)
    voxels, real = out[False]["locations"], out[True]["locations"]
    assert voxels.dtype == jnp.int32 and real.dtype == jnp.float32
    np.testing.assert_array_equal(out[True]["index"], out[False]["index"])
    np.testing.assert_array_equal(np.rint(np.asarray(real)), np.asarray(voxels))
    assert np.abs(np.asarray(real) - np.asarray(voxels)).max() <= 0.5
    assert np.asarray(real).min() >= 0 and np.all(np.asarray(real) <= np.asarray(TINY_GRID) - 1)
    assert np.mean(np.asarray(real) != np.asarray(voxels)) > 0.9
