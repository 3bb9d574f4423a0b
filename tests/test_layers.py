"""The layers (PAU, batch norms, the residual block, the encoder) of both kernel sets against
float64 numpy references and flax's own modules. The kernel sets' operations alone are tested in
tests/test_kernels.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.kernels.cpu import conv as cpu_conv
from ossnet_jax.kernels.cpu import norm as cpu_norm
from ossnet_jax.models import layers

KERNELS = ["xla", "cpu"]


@pytest.mark.parametrize("kernels", KERNELS)
def test_pau_near_leaky_relu_at_init(kernels):
    x = np.linspace(-3, 3, 601)
    module = layers.PAU(kernels)
    variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    y = np.asarray(module.apply(variables, jnp.asarray(x, jnp.float32)), np.float64)
    leaky = np.where(x > 0, x, 0.01 * x)
    assert np.max(np.abs(y - leaky)) < 0.035
    assert np.sqrt(np.mean((y - leaky) ** 2)) < 0.01


@pytest.mark.parametrize("kernels", KERNELS)
def test_pau_module_applies_the_rational_formula_with_its_parameters(kernels):
    rng = np.random.default_rng(0)
    x = rng.normal(size=50) * 2
    a, b = rng.normal(size=6), rng.normal(size=4)
    expected = sum(a[i] * x**i for i in range(6)) / (
        1 + sum(np.abs(b[j] * x ** (j + 1)) for j in range(4))
    )
    params = {"numerator": jnp.asarray(a, jnp.float32), "denominator": jnp.asarray(b, jnp.float32)}
    got = layers.PAU(kernels).apply({"params": params}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_make_activation_rejects_unknown():
    with pytest.raises(ValueError, match="unknown activation"):
        layers.make_activation("gelu")


def _cbn(x, latent, train, kernels):
    module = layers.ConditionalBatchNorm(x.shape[-1], kernels=kernels)
    variables = module.init(jax.random.key(0), x, latent, train=False)
    return module, variables


@pytest.mark.parametrize("kernels", KERNELS)
def test_cbn_equals_plain_normalisation_at_init(kernels):
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(2, 50, 8))
    latent = rng.normal(size=(2, 5))
    x32, latent32 = jnp.asarray(x, jnp.float32), jnp.asarray(latent, jnp.float32)
    module, variables = _cbn(x32, latent32, True, kernels)
    y, updates = module.apply(
        variables,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(latent, jnp.float32),
        train=True,
        mutable=["batch_stats"],
    )
    expected = (x - x.mean()) / np.sqrt(
        x.var() + layers.BN_EPSILON
    )  # one statistic over everything
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(float(stats["mean"]), 0.1 * x.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(stats["var"]), 0.9 + 0.1 * x.var(), rtol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
def test_cbn_conditions_per_volume_and_uses_running_stats_at_eval(kernels):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    module, variables = _cbn(x, latent, False, kernels)
    params = jax.tree.map(lambda p: p, variables["params"])
    params["gamma"]["kernel"] = jnp.ones_like(params["gamma"]["kernel"])
    stats = {"mean": jnp.asarray(0.5), "var": jnp.asarray(4.0)}
    y = module.apply({"params": params, "batch_stats": stats}, x, latent, train=False)
    gamma = 1.0 + np.asarray(latent).sum(-1)  # kernel of ones, bias of ones
    expected = (np.asarray(x) - 0.5) / np.sqrt(4.0 + layers.BN_EPSILON) * gamma[:, None, None]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("cin,cout", [(4, 4), (4, 8)])
@pytest.mark.parametrize("spatial", [(8, 6, 4), (8, 6)])
@pytest.mark.parametrize("downsample", [True, False])
def test_residual_block_halves_spatial_shape_with_downsample(
    cin, cout, kernels, spatial, downsample
):
    x = jnp.ones((2, *spatial, cin))
    block = layers.ResidualBlock(cout, kernels=kernels, downsample=downsample)
    # shapes only: traced, not run (the values: test_residual_block_equals_reference_order_...)
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
    for train in (False, True):
        apply = lambda v: block.apply(v, x, train=train, mutable=["batch_stats"])
        y, _ = jax.eval_shape(apply, variables)
        assert y.shape == (2, *(s // 2 if downsample else s for s in spatial), cout)
    assert ("shortcut" in variables["params"]) == (cin != cout)
    rank = len(spatial)
    assert variables["params"]["conv1"]["kernel"].shape == (3,) * rank + (cin, cout)


def test_residual_block_refuses_other_ranks_and_2d_recomputation():
    with pytest.raises(ValueError, match="input"):
        layers.ResidualBlock(4).init(jax.random.key(0), jnp.ones((2, 8, 3)), train=False)
    block = layers.ResidualBlock(4, recompute_conv1=True)
    with pytest.raises(ValueError, match="3D"):
        block.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)), train=True)


def test_spatial_shape_after_checks_divisibility():
    assert layers.spatial_shape_after((256, 256, 160), 2, 4) == (8, 8, 5)
    with pytest.raises(ValueError, match="divisible"):
        layers.spatial_shape_after((100, 96, 64), 2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
def test_cbn_gradients_equal_the_plain_formula(kernels):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 30, 6)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    module, variables = _cbn(x, latent, True, kernels)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.3, jnp.float32),
        variables["params"],
    )

    def cbn(params, x, latent):
        y, _ = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            latent,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y))

    def plain(params, x, latent):
        gamma = latent @ params["gamma"]["kernel"] + params["gamma"]["bias"]
        beta = latent @ params["beta"]["kernel"] + params["beta"]["bias"]
        norm = (x - x.mean()) / jnp.sqrt(x.var() + layers.BN_EPSILON)
        return jnp.sum(jnp.sin(norm * gamma[:, None] + beta[:, None]))

    got = jax.grad(cbn, argnums=(0, 1, 2))(params, x, latent)
    expected = jax.grad(plain, argnums=(0, 1, 2))(params, x, latent)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


class _ReferenceBlock(nn.Module):
    """The residual block as the reference describes it, from XLA's own 3D convolution: the shortcut
    is convolved at full resolution and pooled afterwards."""

    features: int

    @nn.compact
    def __call__(self, x, train):
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=layers.BN_EPSILON, name=name
        )
        pool = lambda v: nn.avg_pool(v, (2, 2, 2), strides=(2, 2, 2))
        h = nn.Conv(self.features, (3, 3, 3), use_bias=False, name="conv1")(x)
        h = pool(layers.PAU(name="act1")(norm("bn1")(h)))
        h = norm("bn2")(nn.Conv(self.features, (3, 3, 3), use_bias=False, name="conv2")(h))
        shortcut = nn.Conv(self.features, (1, 1, 1), name="shortcut")(x)
        return layers.PAU(name="act2")(h + pool(shortcut))


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("recompute_conv1", [False, True])
def test_residual_block_equals_reference_order_with_gradients(
    monkeypatch, kernels, recompute_conv1
):
    """Pooling the shortcut before its 1^3 convolution (the fast order) and the fused batch norm +
    PAU (with conv1 recomputed in the backward pass, or not) change neither values nor gradients; in
    the CPU set the slab-GEMM kernel gradients agree with XLA's convolution."""
    monkeypatch.setattr(cpu_conv, "SLAB_MIN_VOXELS", 0)  # CPU set: the slab kernel gradient here
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 4, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(2, 4, 3, 2, 5)), jnp.float32)
    ours = layers.ResidualBlock(5, kernels=kernels, recompute_conv1=recompute_conv1)
    reference = _ReferenceBlock(5)
    variables = ours.init(jax.random.key(0), x, train=True)
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
        variables["params"],
    )

    def loss(module):
        def f(p, x):
            y, _ = module.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * weight)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (value, grads), (ref_value, ref_grads) = loss(ours)(params, x), loss(reference)(params, x)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-4)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # evaluation: running averages, and XLA's pooling
    stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    evaluate = lambda module: module.apply({"params": params, "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(
        np.asarray(evaluate(ours)), np.asarray(evaluate(reference)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", [(2, 6, 4, 5, 3), (2, 6, 4, 3)])
def test_batch_norm_equals_flax_batch_norm_values_statistics_and_gradients(kernels, shape):
    """layers.BatchNorm (in the CPU set one-pass statistics and a hand-written backward) against
    nn.BatchNorm's autodiff and a float64 numpy forward, in training and evaluation mode, running
    statistics included, on volumes and on slices."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(1.5 + 2.0 * rng.normal(size=shape), jnp.float32)
    weight = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours = layers.BatchNorm(kernels=kernels)
    flax_bn = nn.BatchNorm(momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON)
    variables = ours.init(jax.random.key(0), x, train=True)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_bn.init(jax.random.key(0), x, use_running_average=False)
    )
    params = {"scale": jnp.asarray([0.5, 1.5, -2.0]), "bias": jnp.asarray([0.1, -0.3, 2.0])}
    stats = {"mean": jnp.asarray([0.2, -0.1, 0.0]), "var": jnp.asarray([1.0, 2.0, 0.5])}

    def loss(p, x, module):
        kwargs = {"train": True} if module is ours else {"use_running_average": False}
        y, new = module.apply(
            {"params": p, "batch_stats": stats}, x, mutable=["batch_stats"], **kwargs
        )
        return jnp.sum(y * weight), (y, new["batch_stats"])

    (value, (y, new_stats)), grads = jax.jit(
        jax.value_and_grad(lambda p, x: loss(p, x, ours), argnums=(0, 1), has_aux=True)
    )(params, x)
    (ref_value, (ref_y, ref_stats)), ref_grads = jax.jit(
        jax.value_and_grad(lambda p, x: loss(p, x, flax_bn), argnums=(0, 1), has_aux=True)
    )(params, x)

    x64 = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    scale, bias = (np.asarray(params[k], np.float64) for k in ("scale", "bias"))
    want = (x64 - mean) / np.sqrt(var + layers.BN_EPSILON) * scale + bias
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    for name, batch in (("mean", mean), ("var", var)):
        expected = layers.BN_MOMENTUM * np.asarray(stats[name]) + (1 - layers.BN_MOMENTUM) * batch
        np.testing.assert_allclose(np.asarray(new_stats[name]), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_stats[name], ref_stats[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)

    evaluated = ours.apply({"params": params, "batch_stats": stats}, x, train=False)
    ref_eval = flax_bn.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(ref_eval), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
def test_encoder_recomputing_its_first_convolution_is_the_same_function_with_less_memory(kernels):
    """Encoder(recompute_stem=True): the same latents, segmentation, statistics and gradients as
    storing the first convolution's output; in the CPU set also fewer compiled temporaries for the
    gradient (XLA:CPU's memory analysis; the XLA set's jax.checkpoint is left to XLA's
    scheduler)."""
    from ossnet_jax.models.encoder import Encoder

    x = jax.random.normal(jax.random.key(3), (1, 16, 16, 16, 4))
    # one set of variables for both: the flag changes no parameter or statistic
    init = jax.jit(Encoder(channels=(16,), num_latents=3, kernels=kernels).init, static_argnums=2)
    variables = init(jax.random.key(0), x, False)

    def run(recompute):
        model = Encoder(channels=(16,), num_latents=3, recompute_stem=recompute, kernels=kernels)
        shapes = jax.eval_shape(lambda key: model.init(key, x, False), jax.random.key(0))
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

        def loss(params):
            (latents, seg), updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(latents)) + jnp.sum(jnp.cos(seg)), updates

        compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"]).compile()
        return compiled(variables["params"]), compiled.memory_analysis().temp_size_in_bytes

    (grads, stats), stored = run(False)
    (grads_r, stats_r), recomputed = run(True)
    # to 2e-5 of each array's largest magnitude: the recomputing program sums in another order
    for a, b in zip(jax.tree.leaves((grads_r, stats_r)), jax.tree.leaves((grads, stats))):
        scale = float(np.max(np.abs(np.asarray(b))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5 * scale)
    assert float(jnp.max(jnp.abs(grads["block0"]["conv1"]["kernel"]))) > 0  # not vacuous
    if kernels == "cpu":
        assert recomputed < stored, (recomputed, stored)


@pytest.mark.slow
def test_backward_values_wait_for_the_gradient(monkeypatch):
    """CPU set only (its hand-written backward rules). XLA's memory analysis of an encoder's
    compiled gradient: with the backward rules' residuals tied
    to the incoming gradient (PAU, BN + PAU, the convolution's kernel gradient), nothing of the
    backward pass is computed during the forward pass and kept until it is needed. Untied, 1 / Q of
    the PAUs and the kernel gradients' transposed inputs were (OSS-Net C update step 957 -> 782 MiB
    with both; here 10.3 against 12.5 MiB of temporaries)."""
    from ossnet_jax.models.encoder import Encoder

    x = jnp.zeros((1, 32, 32, 32, 4))
    model = Encoder(channels=(16,), num_latents=3, kernels="cpu")
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), x, False)

    def loss(params):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            True,
            mutable=["batch_stats"],
        )
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(outputs))

    def temporaries():
        compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    tied = temporaries()
    untie = lambda value, gradient: value
    monkeypatch.setattr(cpu_norm, "after_gradient", untie)
    monkeypatch.setattr(cpu_conv, "after_gradient", untie)
    untied = temporaries()
    assert tied < 0.9 * untied, (tied, untied)
