"""PAU, conditional batch norm and the residual 3D block against float64 numpy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.models import conv, layers


def test_pau_near_leaky_relu_at_init():
    x = np.linspace(-3, 3, 601)
    module = layers.PAU()
    variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    y = np.asarray(module.apply(variables, jnp.asarray(x, jnp.float32)), np.float64)
    leaky = np.where(x > 0, x, 0.01 * x)
    assert np.max(np.abs(y - leaky)) < 0.035
    assert np.sqrt(np.mean((y - leaky) ** 2)) < 0.01


def test_pau_matches_rational_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50) * 2
    a, b = rng.normal(size=6), rng.normal(size=4)
    expected = sum(a[i] * x**i for i in range(6)) / (
        1 + sum(np.abs(b[j] * x ** (j + 1)) for j in range(4))
    )
    got = layers.pau(
        jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_make_activation_rejects_unknown():
    with pytest.raises(ValueError, match="unknown activation"):
        layers.make_activation("gelu")


def _cbn(x, latent, train):
    module = layers.ConditionalBatchNorm(x.shape[-1])
    variables = module.init(jax.random.key(0), x, latent, train=False)
    return module, variables


def test_cbn_equals_plain_normalisation_at_init():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(2, 50, 8))
    latent = rng.normal(size=(2, 5))
    module, variables = _cbn(jnp.asarray(x, jnp.float32), jnp.asarray(latent, jnp.float32), True)
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


def test_cbn_conditions_per_volume_and_uses_running_stats_at_eval():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    module, variables = _cbn(x, latent, False)
    params = jax.tree.map(lambda p: p, variables["params"])
    params["gamma"]["kernel"] = jnp.ones_like(params["gamma"]["kernel"])
    stats = {"mean": jnp.asarray(0.5), "var": jnp.asarray(4.0)}
    y = module.apply({"params": params, "batch_stats": stats}, x, latent, train=False)
    gamma = 1.0 + np.asarray(latent).sum(-1)  # kernel of ones, bias of ones
    expected = (np.asarray(x) - 0.5) / np.sqrt(4.0 + layers.BN_EPSILON) * gamma[:, None, None]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,cout", [(4, 4), (4, 8)])
def test_residual_block_halves_spatial_shape(cin, cout):
    x = jnp.ones((2, 8, 6, 4, cin))
    block = layers.ResidualBlock3D(cout)
    variables = block.init(jax.random.key(0), x, train=False)
    y = block.apply(variables, x, train=False)
    assert y.shape == (2, 4, 3, 2, cout)
    assert ("shortcut" in variables["params"]) == (cin != cout)


def test_spatial_shape_after_checks_divisibility():
    assert layers.spatial_shape_after((256, 256, 160), 2, 4) == (8, 8, 5)
    with pytest.raises(ValueError, match="divisible"):
        layers.spatial_shape_after((100, 96, 64), 2, 3)


def _plain_pau(x, a, b):
    p = sum(a[i] * x**i for i in range(6))
    return p / (1 + sum(jnp.abs(b[j] * x ** (j + 1)) for j in range(4)))


# the coefficient sums keep the leading axes (41,) and (2, 5, 3); (6, 7) and (287,) have too few
# leading values and are summed as gcd(size, 16) = 2 and 1 rows
@pytest.mark.parametrize("shape", [(41, 7), (2, 5, 3, 7), (6, 7), (287,)])
@pytest.mark.parametrize("case", ["b1>0", "b1<0", "b1=0", "b2=0"])
def test_pau_hand_written_gradients_equal_autodiff_of_the_formula(shape, case):
    rng = np.random.default_rng(3)
    values = rng.normal(size=shape) * 2
    values.flat[::5] = 0.0  # zero-padded patches: the sign convention at x = 0
    x = jnp.asarray(values, jnp.float32)
    a = jnp.asarray(rng.normal(size=6), jnp.float32)
    b = rng.normal(size=4) * [1, -1, 1, -1]
    # the sign of b_1 decides dQ/dx at x = 0; b_j = 0 takes s_j = +1, so d/db_j sums -P / Q^2 x^j
    b[0] = {"b1>0": abs(b[0]), "b1<0": -abs(b[0]), "b1=0": 0.0, "b2=0": b[0]}[case]
    if case == "b2=0":
        b[1] = 0.0
    b = jnp.asarray(b, jnp.float32)
    weight = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(fn):
        return lambda x, a, b: jnp.sum(jnp.sin(fn(x, a, b)) * weight)

    got = jax.grad(loss(layers.pau), argnums=(0, 1, 2))(x, a, b)
    expected = jax.grad(loss(_plain_pau), argnums=(0, 1, 2))(x, a, b)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-4, atol=2e-4)


def test_cbn_gradients_equal_the_plain_formula():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 30, 6)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    module, variables = _cbn(x, latent, True)
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


def test_residual_block_equals_reference_order_with_gradients(monkeypatch):
    """Pooling the shortcut before its 1^3 convolution (the fast order) changes neither values nor
    gradients, and the slab-GEMM kernel gradients agree with XLA's convolution."""
    monkeypatch.setattr(conv, "SLAB_MIN_VOXELS", 0)  # the slab kernel gradient at this small size
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 4, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(2, 4, 3, 2, 5)), jnp.float32)
    ours, reference = layers.ResidualBlock3D(5), _ReferenceBlock(5)
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


def test_scale_shift_gradients_equal_float64_sums():
    """The GEMV backward of x * a + c gives the per-volume sums over locations of a float64 reference."""
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 7, 3))
    a, c = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    y, vjp = jax.vjp(layers.scale_shift, f32(x), f32(a), f32(c))
    dx, da, dc = vjp(f32(g))
    np.testing.assert_allclose(np.asarray(y), x * a[:, None] + c[:, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g * a[:, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), (g * x).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dc), g.sum(1), rtol=1e-5, atol=1e-5)


def _assert_agrees_with_float64_autodiff(plain, ours, args, argnums, rtol=1e-4):
    """ours(*args) in float32 under jit against plain(*args) in float64: the value to 1e-5 relative,
    the gradients of argnums (float32) to rtol, with an absolute floor of rtol times each gradient's
    largest magnitude. None arguments stay None."""
    with jax.enable_x64(True):
        as64 = [None if a is None else jnp.asarray(a, jnp.float64) for a in args]
        want_value, want = jax.value_and_grad(plain, argnums)(*as64)
        want = [np.asarray(g) for g in want]
    as32 = [None if a is None else jnp.asarray(a, jnp.float32) for a in args]
    value, got = jax.jit(jax.value_and_grad(ours, argnums))(*as32)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    for g, e in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), e, rtol=rtol, atol=rtol * np.abs(e).max())


def test_conditional_batch_norm_train_equals_the_plain_formula_with_gradients():
    """The one-pass backward of training-mode CBN against autodiff of the plain formula in float64:
    values, statistics, and the gradients of x, gamma, beta and the returned statistics' cotangents."""
    rng = np.random.default_rng(9)
    x = 0.4 + 1.3 * rng.normal(size=(2, 6, 5))
    gamma, beta = 1.0 + 0.5 * rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    w, u, v = rng.normal(size=x.shape), rng.normal(), rng.normal()

    def plain(x, gamma, beta):
        mean, var = x.mean(), x.var()
        y = (x - mean) / jnp.sqrt(var + layers.BN_EPSILON) * gamma[:, None] + beta[:, None]
        return jnp.sum(y * w) + mean * u + var * v

    def ours(x, gamma, beta):
        y, mean, var = layers.conditional_batch_norm_train(x, gamma, beta)
        return jnp.sum(y * w) + mean * u + var * v

    _assert_agrees_with_float64_autodiff(plain, ours, (x, gamma, beta), (0, 1, 2))


def test_avg_pool2_values_and_gradient_equal_float64_cells():
    """Pooling averages each 2^3 cell; its gradient gives every voxel of a cell 1/8 of the cell's."""
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=(2, 4, 6, 2, 3)), rng.normal(size=(2, 2, 3, 1, 3))
    cells = x.reshape(2, 2, 2, 3, 2, 1, 2, 3).mean(axis=(2, 4, 6))
    y, vjp = jax.vjp(layers.avg_pool2, jnp.asarray(x, jnp.float32))
    (dx,) = vjp(jnp.asarray(g, jnp.float32))
    spread = np.repeat(np.repeat(np.repeat(g, 2, axis=1), 2, axis=2), 2, axis=3) / 8
    np.testing.assert_allclose(np.asarray(y), cells, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), spread, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="even spatial sizes"):
        layers.avg_pool2(jnp.zeros((1, 4, 3, 2, 1)))


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_mean_pool_equals_float64_cell_means(factor):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 8, 4, 12, 3))
    got = layers.mean_pool(jnp.asarray(x, jnp.float32), factor)
    b, nx, ny, nz, c = x.shape
    cells = x.reshape(b, nx // factor, factor, ny // factor, factor, nz // factor, factor, c)
    np.testing.assert_allclose(np.asarray(got), cells.mean(axis=(2, 4, 6)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot mean-pool"):
        layers.mean_pool(jnp.zeros((1, 8, 4, 6, 1)), 4)


def test_batch_norm_equals_flax_batch_norm_values_statistics_and_gradients():
    """layers.BatchNorm (one-pass statistics, hand-written backward) against nn.BatchNorm's autodiff
    and a float64 numpy forward, in training and evaluation mode, running statistics included."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(1.5 + 2.0 * rng.normal(size=(2, 6, 4, 5, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours = layers.BatchNorm()
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
    mean, var = x64.mean(axis=(0, 1, 2, 3)), x64.var(axis=(0, 1, 2, 3))
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


def test_batch_norm_train_gradients_through_the_returned_statistics():
    """Cotangents of the returned mean and variance reach x as in autodiff of the plain formula."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 4, 2, 2, 4)), jnp.float32)
    w, u, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (4,), (4,)))
    scale, bias = jnp.asarray([1.0, 0.5, -1.0, 2.0]), jnp.asarray([0.0, 0.2, 0.1, -0.4])

    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2, 3))
        var = jnp.mean(jnp.square(x), axis=(0, 1, 2, 3)) - jnp.square(mean)
        y = (x - mean) * jax.lax.rsqrt(var + layers.BN_EPSILON) * scale + bias
        return jnp.sum(y * w) + jnp.sum(mean * u) + jnp.sum(var * v)

    def ours(x, scale, bias):
        y, mean, var = layers.batch_norm_train(x, scale, bias)
        return jnp.sum(y * w) + jnp.sum(mean * u) + jnp.sum(var * v)

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    expected = jax.grad(plain, argnums=(0, 1, 2))(x, scale, bias)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def _plain_batch_norm_pau(x, scale, bias, numerator, denominator, shortcut=None):
    """Training batch norm over all axes but the last, + shortcut, then the PAU, written plainly for
    autodiff: (y, mean, biased variance)."""
    mean = x.mean(axis=(0, 1, 2, 3))
    var = x.var(axis=(0, 1, 2, 3))
    t = (x - mean) / jnp.sqrt(var + layers.BN_EPSILON) * scale + bias
    t = t if shortcut is None else t + shortcut
    return _plain_pau(t, numerator, denominator), mean, var


def _weighted_sum(y, mean, var, w, u, v):
    """A scalar that gives y, mean and var the random cotangents w, u, v."""
    return jnp.sum(y * w) + jnp.sum(mean * u) + jnp.sum(var * v)


@pytest.mark.parametrize("with_shortcut", [False, True])
def test_batch_norm_pau_equals_the_plain_formula_with_gradients(with_shortcut):
    """The fused normalisation + PAU (normalised input recomputed in the backward pass) against
    autodiff of the plain formula in float64: values, statistics, and the gradients of x, the batch-norm
    parameters, the PAU coefficients, the shortcut and the returned statistics' cotangents."""
    rng = np.random.default_rng(8)
    shape = (2, 5, 4, 3, 4)
    x = 0.7 + 1.5 * rng.normal(size=shape)
    x[0, 0, 0, 0] = 0.7  # values whose normalisation is near 0: the PAU's sign convention there
    scale, bias = rng.normal(size=4), rng.normal(size=4) * 0.3
    numerator = np.asarray(layers.PAU_INIT_NUMERATOR) + 0.1 * rng.normal(size=6)
    denominator = np.asarray(layers.PAU_INIT_DENOMINATOR) * [1, -1, 1, 1]
    shortcut = rng.normal(size=shape) if with_shortcut else None
    w, u, v = rng.normal(size=shape), rng.normal(size=4), rng.normal(size=4)

    def plain(*args):
        return _weighted_sum(*_plain_batch_norm_pau(*args), w, u, v)

    def fused(*args):
        return _weighted_sum(*layers.batch_norm_pau(*args), w, u, v)

    args = (x, scale, bias, numerator, denominator, shortcut)
    argnums = (0, 1, 2, 3, 4, 5) if with_shortcut else (0, 1, 2, 3, 4)
    _assert_agrees_with_float64_autodiff(plain, fused, args, argnums)


def test_conv_batch_norm_pau_equals_the_plain_formula_with_gradients():
    """The convolution + BN + PAU that runs its convolution again in the backward pass against
    autodiff of the plain formula in float64 (XLA's convolution): values, statistics, and the
    gradients of x, the kernel, the batch-norm parameters, the PAU coefficients and the returned
    statistics' cotangents."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 6, 4, 4, 3))
    kernel = 0.3 * rng.normal(size=(3, 3, 3, 3, 4))
    scale, bias = 1.0 + 0.3 * rng.normal(size=4), 0.3 * rng.normal(size=4)
    numerator = np.asarray(layers.PAU_INIT_NUMERATOR) + 0.1 * rng.normal(size=6)
    denominator = np.asarray(layers.PAU_INIT_DENOMINATOR) * [1, -1, 1, 1]
    w, u, v = rng.normal(size=x.shape[:4] + (4,)), rng.normal(size=4), rng.normal(size=4)

    def plain(x, kernel, *rest):
        h = jax.lax.conv_general_dilated(
            x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
        return _weighted_sum(*_plain_batch_norm_pau(h, *rest), w, u, v)

    def fused(*args):
        return _weighted_sum(*layers.conv_batch_norm_pau(*args), w, u, v)

    args = (x, kernel, scale, bias, numerator, denominator)
    _assert_agrees_with_float64_autodiff(plain, fused, args, tuple(range(6)), rtol=2e-4)


def test_encoder_recomputing_its_first_convolution_is_the_same_function_with_less_memory():
    """Encoder(recompute_stem=True): the same latents, segmentation, statistics and gradients as
    storing the first convolution's output, and fewer compiled temporaries for the gradient."""
    from ossnet_jax.models.encoder import Encoder

    x = jax.random.normal(jax.random.key(3), (1, 32, 32, 32, 4))
    # one set of variables for both: the flag changes no parameter or statistic
    init = jax.jit(Encoder(channels=(16,), num_latents=3).init, static_argnums=2)
    variables = init(jax.random.key(0), x, False)

    def run(recompute):
        model = Encoder(channels=(16,), num_latents=3, recompute_stem=recompute)
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
    for a, b in zip(jax.tree.leaves((grads_r, stats_r)), jax.tree.leaves((grads, stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(grads["block0"]["conv1"]["kernel"]))) > 0  # not vacuous
    assert recomputed < stored, (recomputed, stored)


def test_backward_values_wait_for_the_gradient(monkeypatch):
    """XLA's memory analysis of an encoder's compiled gradient: with the backward rules' residuals tied
    to the incoming gradient (PAU, BN + PAU, the convolution's kernel gradient), nothing of the
    backward pass is computed during the forward pass and kept until it is needed. Untied, 1 / Q of
    the PAUs and the kernel gradients' transposed inputs were (OSS-Net C update step 957 -> 782 MiB
    with both; here 10.3 against 12.5 MiB of temporaries)."""
    from ossnet_jax.models.encoder import Encoder

    x = jnp.zeros((1, 32, 32, 32, 4))
    model = Encoder(channels=(16,), num_latents=3)
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
    monkeypatch.setattr(layers, "after_gradient", untie)
    monkeypatch.setattr(conv, "after_gradient", untie)
    untied = temporaries()
    assert tied < 0.9 * untied, (tied, untied)
