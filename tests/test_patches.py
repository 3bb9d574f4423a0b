"""On-device patch gathering against numpy slicing; the patch convolution of both kernel sets (the
CPU set's GEMM included) against XLA's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.kernels.cpu.patch_conv import conv_matrix
from ossnet_jax.models import patches as P

KERNELS = ["xla", "cpu"]


def _numpy_patch(volume, loc, start_offset, size):
    """Slow reference: volume[loc - start_offset : loc - start_offset + size] with zeros outside."""
    out = np.zeros((size, size, size, volume.shape[-1]), np.float64)
    for i in range(size):
        for j in range(size):
            for k in range(size):
                x, y, z = (
                    loc[0] - start_offset + i,
                    loc[1] - start_offset + j,
                    loc[2] - start_offset + k,
                )
                if (
                    0 <= x < volume.shape[0]
                    and 0 <= y < volume.shape[1]
                    and 0 <= z < volume.shape[2]
                ):
                    out[i, j, k] = volume[x, y, z]
    return out


@pytest.fixture
def volume():
    return np.random.default_rng(0).normal(size=(12, 10, 8, 2))


CORNERS = np.array([[0, 0, 0], [11, 9, 7], [5, 4, 3], [1, 9, 0], [6, 0, 7], [10, 1, 2]], np.int32)


def test_gather_patches_equals_numpy_slicing_borders_included(volume):
    got = np.asarray(P.gather_patches(jnp.asarray(volume, jnp.float32), jnp.asarray(CORNERS), 7))
    for n, loc in enumerate(CORNERS):
        np.testing.assert_allclose(got[n], _numpy_patch(volume, loc, 3, 7), atol=1e-6)


def test_large_patches_equal_pooled_14_cube(volume):
    parity = P.pooled_parity_volumes(jnp.asarray(volume, jnp.float32))
    got = np.asarray(P.gather_large_patches(parity, jnp.asarray(CORNERS), 7))
    for n, loc in enumerate(CORNERS):
        big = _numpy_patch(volume, loc, 7, 14)
        pooled = big.reshape(7, 2, 7, 2, 7, 2, -1).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(got[n], pooled, atol=1e-5)


@pytest.mark.parametrize("cin,cout", [(4, 2), (2, 1)])
def test_patch_conv_equals_xla_convolution_with_gradients(cin, cout):
    """CPU set internals: the convolution of a patch as a product with `conv_matrix`."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 7, 7, 7, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(7, 7, 7, cin, cout)) * 0.1, jnp.float32)
    weight = jnp.asarray(rng.normal(size=(5, 7, 7, 7, cout)), jnp.float32)

    def reference(k, x):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
        return jnp.sum(jnp.tanh(y) * weight), y

    def gemm(k, x):
        y = (x.reshape(5, -1) @ conv_matrix(k, 7)).reshape(5, 7, 7, 7, cout)
        return jnp.sum(jnp.tanh(y) * weight), y

    (_, y_ref), g_ref = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(kernel, x)
    (_, y_new), g_new = jax.value_and_grad(gemm, argnums=(0, 1), has_aux=True)(kernel, x)
    np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_ref), rtol=1e-4, atol=1e-4)
    for a, b in zip(g_new, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
def test_patch_conv_module_equals_flax_conv_with_bias_and_gradients(kernels):
    """PatchConv on (B, N, S^3 Cin) rows against nn.Conv on the (S, S, S, Cin) patches, same kernel
    and bias, gradients of both parameters and of the input included."""
    rng = np.random.default_rng(2)
    b, n, cin, cout = 2, 3, 4, 2
    x = jnp.asarray(rng.normal(size=(b, n, 7**3 * cin)), jnp.float32)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(7, 7, 7, cin, cout)) * 0.1, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(cout,)), jnp.float32),
    }
    weight = jnp.asarray(rng.normal(size=(b, n, 7**3 * cout)), jnp.float32)
    module = P.PatchConv(cout, 7, 7, kernels=kernels)
    conv = nn.Conv(cout, (7, 7, 7), padding="SAME")

    def ours(params, x):
        return jnp.sum(jnp.tanh(module.apply({"params": params}, x)) * weight)

    def reference(params, x):
        y = conv.apply({"params": params}, x.reshape(b * n, 7, 7, 7, cin))
        return jnp.sum(jnp.tanh(y.reshape(b, n, -1)) * weight)

    v_new, g_new = jax.value_and_grad(ours, argnums=(0, 1))(params, x)
    v_ref, g_ref = jax.value_and_grad(reference, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(float(v_new), float(v_ref), rtol=1e-4)
    for a, r in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
def test_patch_encoder_output_shape(kernels):
    module = P.PatchEncoder(kernels=kernels)
    x = jnp.ones((2, 3, 7, 7, 7, 8))
    variables = module.init(jax.random.key(0), x, train=False)
    assert module.apply(variables, x, train=False).shape == (2, 3, 343)
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 7, 8, 4)
    assert variables["params"]["conv2"]["kernel"].shape == (7, 7, 7, 4, 1)


@pytest.mark.slow
def test_patch_encoder_weight_gradients_need_no_transposed_copy():
    """CPU set only (its patch GEMMs): they run over (rows, S^3 C), with no (S^3 Cout, rows) copy of
    an output gradient."""
    encoder = P.PatchEncoder(kernels="cpu")
    patches = jax.random.normal(jax.random.key(0), (2, 16, 7, 7, 7, 4))
    variables = encoder.init(jax.random.key(1), patches, False)
    loss = lambda params: jnp.sum(encoder.apply({"params": params}, patches, True) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    assert "f32[32,686]" in hlo  # the first convolution's output, 2 x 16 rows
    assert "f32[686,32]" not in hlo and "f32[343,32]" not in hlo


REAL = np.array(
    [[0.0, 0.0, 0.0], [11.0, 9.0, 7.0], [5.3, 4.75, 3.5], [0.2, 8.9, 0.01], [10.99, 0.5, 6.6]],
    np.float32,
)


def _trilinear_reference(volume, loc, start_offset, size, stride=1):
    """Slow reference: the patch lattice loc - start_offset + stride i sampled trilinearly from the
    zero-extended volume (scipy's map_coordinates on a zero-padded copy)."""
    from scipy import ndimage

    pad = size * stride + 2
    padded = np.pad(volume, [(pad, pad)] * 3 + [(0, 0)])
    steps = np.arange(size) * stride
    axes = [loc[a] - start_offset + steps + pad for a in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.stack(
        [ndimage.map_coordinates(padded[..., c], coords, order=1) for c in range(volume.shape[-1])],
        -1,
    )


def test_real_locations_sample_the_shifted_patch_trilinearly(volume):
    got = np.asarray(P.gather_patches(jnp.asarray(volume, jnp.float32), jnp.asarray(REAL), 7))
    for n, loc in enumerate(REAL.astype(np.float64)):
        np.testing.assert_allclose(got[n], _trilinear_reference(volume, loc, 3, 7), atol=1e-5)


def test_real_large_patches_are_pooled_trilinear_samples(volume):
    """The pooled 14^3 patch at a real centre: the mean of the 2^3 trilinear samples of each cell."""
    parity = P.pooled_parity_volumes(jnp.asarray(volume, jnp.float32))
    got = np.asarray(P.gather_large_patches(parity, jnp.asarray(REAL), 7))
    for n, loc in enumerate(REAL.astype(np.float64)):
        big = _trilinear_reference(volume, loc, 7, 14)
        pooled = big.reshape(7, 2, 7, 2, 7, 2, -1).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(got[n], pooled, atol=1e-5)


@pytest.mark.parametrize("large", [False, True])
def test_integer_valued_real_locations_equal_the_integer_gather_with_gradients(volume, large):
    """Bitwise: the trilinear path at integer-valued centres is today's gather. The gradient with
    respect to the volume agrees to rounding: overlapping patches scatter-add in another order."""
    vol = jnp.asarray(volume, jnp.float32)
    weight = jnp.asarray(np.random.default_rng(3).normal(size=(len(CORNERS), 7, 7, 7, 2)))

    def cut(v, locs):
        if large:
            return P.gather_large_patches(P.pooled_parity_volumes(v), locs, 7)
        return P.gather_patches(v, locs, 7)

    loss = lambda v, locs: jnp.sum(jnp.sin(cut(v, locs)) * weight)
    as_int, as_real = jnp.asarray(CORNERS), jnp.asarray(CORNERS, jnp.float32)
    np.testing.assert_array_equal(np.asarray(cut(vol, as_real)), np.asarray(cut(vol, as_int)))
    np.testing.assert_allclose(
        np.asarray(jax.grad(loss)(vol, as_real)),
        np.asarray(jax.grad(loss)(vol, as_int)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_patches_are_differentiable_in_the_location_inside_a_cell(volume):
    vol = jnp.asarray(volume, jnp.float32)
    weight = jnp.asarray(np.random.default_rng(4).normal(size=(1, 7, 7, 7, 2)), jnp.float32)
    f = jax.jit(lambda loc: jnp.sum(P.gather_patches(vol, loc[None], 7) * weight))
    loc = jnp.asarray([5.3, 4.6, 3.4], jnp.float32)
    grad = np.asarray(jax.grad(f)(loc))
    h = 0.05
    for a in range(3):
        step = jnp.zeros(3).at[a].set(h)
        numeric = (float(f(loc + step)) - float(f(loc - step))) / (2 * h)
        np.testing.assert_allclose(grad[a], numeric, rtol=1e-3, atol=1e-3)
