"""The encoder's 3D convolution as a 2D convolution equals XLA's 3D convolution (nn.Conv), with gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.models.conv import Conv3D


@pytest.mark.parametrize("kernel,use_bias", [(3, False), (5, True), (1, True)])
def test_conv3d_equals_nn_conv_with_gradients(kernel, use_bias):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(2, 6, 5, 4, 4)), jnp.float32)
    ours = Conv3D(4, kernel, use_bias=use_bias)
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
