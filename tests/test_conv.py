"""Conv3D of both kernel sets equals XLA's 3D convolution (nn.Conv), with gradients; the CPU set's
slab kernel gradient equals a float64 loop over taps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.kernels.cpu import conv
from ossnet_jax.models.layers import Conv3D


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("kernel,use_bias", [(3, False), (5, True), (1, True)])
def test_conv3d_equals_nn_conv_with_gradients(kernel, use_bias, kernels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(2, 6, 5, 4, 4)), jnp.float32)
    ours = Conv3D(4, kernel, use_bias=use_bias, kernels=kernels)
    plain = nn.Conv(4, (kernel,) * 3, use_bias=use_bias)
    params = ours.init(jax.random.key(0), x)["params"]
    reference_shapes = jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x)["params"])
    assert jax.tree.map(jnp.shape, params) == reference_shapes
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.tanh(module.apply({"params": p}, x)) * weight)

    got = jax.value_and_grad(loss(ours), argnums=(0, 1))(params, x)
    expected = jax.value_and_grad(loss(plain), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5, atol=1e-4)
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)
    y, y_ref = ours.apply({"params": params}, x), plain.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "k,slab_bytes,planes",
    [(3, 1, 1), (3, 2 * 7 * 6 * 27 * 3 * 4, 2), (3, 2**30, 6), (5, 3 * 9 * 8 * 125 * 3 * 4, 3)],
)
def test_kernel_gradient_summed_over_slabs_matches_numpy(monkeypatch, k, slab_bytes, planes):
    """CPU set internals: the slab-wise GEMM kernel gradient equals a float64 loop over taps,
    whatever the slab size, alone and as the kernel gradient of the CPU set's conv3d."""
    monkeypatch.setattr(conv, "SLAB_BYTES", slab_bytes)
    monkeypatch.setattr(conv, "SLAB_MIN_VOXELS", 0)  # the slab path also for this small volume
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5, 4, 3))
    g = rng.normal(size=(2, 6, 5, 4, 2))
    assert conv.slab_planes(x.shape, k, 4) == planes
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    expected = np.zeros((k, k, k, 3, 2))
    for i, j, m in np.ndindex(k, k, k):
        window = padded[:, i : i + 6, j : j + 5, m : m + 4]
        expected[i, j, m] = np.einsum("bxyzc,bxyzo->co", window, g)
    got = jax.jit(conv.conv3d_kernel_grad, static_argnums=2)(
        jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32), k
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    kernel = jnp.asarray(rng.normal(size=(k, k, k, 3, 2)), jnp.float32)
    _, vjp = jax.vjp(lambda w: conv.conv3d(jnp.asarray(x, jnp.float32), w), kernel)
    np.testing.assert_allclose(
        np.asarray(vjp(jnp.asarray(g, jnp.float32))[0]), expected, rtol=1e-5, atol=1e-5
    )
