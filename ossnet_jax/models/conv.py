"""3D 'same' convolution of volumes as a 2D convolution, the fast form on XLA's CPU backend.

XLA:CPU runs 3D convolutions of the encoder's sizes at 1-11 GFLOP/s (benchmarks/NOTES.md). Stacking the
k shifted copies of the volume along X as channels turns a k^3 convolution into a k^2 convolution over
(Y, Z) with X folded into the batch, which XLA runs 3-9x faster there. Parameters keep nn.Conv's names
and shapes, so checkpoints of either form load into the other.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv3d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel, k odd.

    Equal to jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME') with NDHWC / DHWIO layouts.
    Returns (B, X, Y, Z, Cout).
    """
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    b, nx, ny, nz = x.shape[:4]
    if k == 1:
        return x @ kernel.reshape(cin, cout)
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
