"""3D 'same' convolution of volumes in the forms XLA's CPU backend runs fast.

XLA:CPU runs 3D convolutions of the encoder's sizes at 1-11 GFLOP/s (benchmarks/NOTES.md). Stacking the
k shifted copies of the volume along X as channels turns a k^3 convolution into a k^2 convolution over
(Y, Z) with X folded into the batch, which XLA runs 3-9x faster there; the input gradient is that
form's transpose. The kernel gradient is not taken from XLA: it lowers it to one convolution whose
window spans the whole volume, ~0.7 s for the encoder's first layer on 2 volumes at 13 GFLOP/s. Here
it is a sum over slabs of a few X-planes of one GEMM each, (slab voxels, k^3 Cin)^T @ (slab voxels,
Cout), the columns of each slab built in cache. Parameters keep nn.Conv's names and shapes, so
checkpoints of either form load into the other.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Bytes of one slab's im2col columns. 16 MiB gives the encoder's slab layers 2 X-planes per slab (8 MiB:
# 1): on the Zen 5 machine block 0's first kernel gradient alone 253 -> 207 ms (medians of 3), the
# update step 2.20 -> 2.10 s (medians of 6 alternating processes; benchmarks/NOTES.md, tenth run).
SLAB_BYTES = 16 * 2**20
# Volumes with fewer voxels (X Y Z) keep XLA's kernel gradient: there it is as fast (0.03 s at 32x32x20)
# and the slab loop only adds compile time (demo update step 16.5 s -> 31.5 s with slabs everywhere).
SLAB_MIN_VOXELS = 2**16


def _conv3d_folded(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation as a 2D convolution over (Y, Z) of the X-shifted copies."""
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    b, nx, ny, nz = x.shape[:4]
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate(
        [padded[:, i : i + nx] for i in range(k)], axis=-1
    )  # channel i Cin + c
    kernel2d = kernel.transpose(1, 2, 0, 3, 4).reshape(k, k, k * cin, cout)
    y = jax.lax.conv_general_dilated(
        stacked.reshape(b * nx, ny, nz, k * cin),
        kernel2d,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(b, nx, ny, nz, cout)


def slab_planes(shape: tuple[int, ...], k: int, itemsize: int) -> int:
    """X-planes per slab for the kernel gradient of a (B, X, Y, Z, Cin) input: the largest divisor of X
    whose im2col columns (planes Y Z k^3 Cin values) fit SLAB_BYTES, at least 1."""
    nx, ny, nz, cin = shape[1:]
    per_plane = ny * nz * k**3 * cin * itemsize
    fitting = [d for d in range(1, nx + 1) if nx % d == 0 and d * per_plane <= SLAB_BYTES]
    return max(fitting, default=1)


def conv3d_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """Gradient of sum(g * conv3d_same(x, kernel)) with respect to the (k, k, k, Cin, Cout) kernel.

    Args:
      x: (B, X, Y, Z, Cin) input of the convolution.
      g: (B, X, Y, Z, Cout) gradient of its output.
      k: odd kernel edge.
    Returns:
      (k, k, k, Cin, Cout), accumulated in float32 and returned in x's dtype.
    """
    b, nx, ny, nz, cin = x.shape
    cout = g.shape[-1]
    p = k // 2
    planes = slab_planes(x.shape, k, x.dtype.itemsize)
    per_volume = nx // planes
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    g_slabs = g.reshape(b * per_volume, planes * ny * nz, cout)

    def add_slab(total, index):
        start = (index // per_volume, (index % per_volume) * planes, 0, 0, 0)
        size = (1, planes + 2 * p, ny + 2 * p, nz + 2 * p, cin)
        slab = jax.lax.dynamic_slice(padded, start, size)[0]
        columns = jnp.concatenate(
            [
                slab[i : i + planes, j : j + ny, m : m + nz]
                for i in range(k)
                for j in range(k)
                for m in range(k)
            ],
            axis=-1,
        ).reshape(planes * ny * nz, k**3 * cin)  # column (tap, c), taps row-major over (i, j, m)
        product = jax.lax.dot_general(
            columns,
            g_slabs[index],
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return total + product, None

    total, _ = jax.lax.scan(
        add_slab, jnp.zeros((k**3 * cin, cout), jnp.float32), jnp.arange(b * per_volume)
    )
    return total.reshape(k, k, k, cin, cout).astype(x.dtype)


def conv3d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel, k odd.

    Equal to jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME') with NDHWC / DHWIO layouts,
    gradients included; the kernel gradient is `conv3d_kernel_grad` from SLAB_MIN_VOXELS voxels on.
    Returns (B, X, Y, Z, Cout).
    """
    if kernel.shape[0] == 1:  # over (voxels, Cin) rows: see layers.over_rows
        y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[3], kernel.shape[4])
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if x.shape[1] * x.shape[2] * x.shape[3] < SLAB_MIN_VOXELS:
        return _conv3d_folded(x, kernel)
    return _conv3d(x, kernel)


@jax.custom_vjp
def _conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _conv3d_folded(x, kernel)


def _conv3d_fwd(x, kernel):
    return _conv3d_folded(x, kernel), (x, kernel)


def _conv3d_bwd(residuals, g):
    x, kernel = residuals
    _, transpose = jax.vjp(lambda v: _conv3d_folded(v, kernel), x)
    (dx,) = transpose(g)
    return dx, conv3d_kernel_grad(x, g, kernel.shape[0]).astype(kernel.dtype)


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


class Conv3D(nn.Module):
    """Drop-in for nn.Conv(features, (k, k, k)) with 'SAME' padding on (B, X, Y, Z, Cin), via conv3d_same.

    Parameters 'kernel' (k, k, k, Cin, features) and 'bias' (features,) as nn.Conv, float32; the
    computation runs in `dtype`.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size,) * 3 + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        y = conv3d_same(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
