"""The patch encoder's convolutions as one GEMM per layer, the form XLA:CPU runs fast.

The 'same' convolution of one S^3 patch is a fixed linear map R^(S^3 Cin) -> R^(S^3 Cout): applied as a
matrix built from the kernel, XLA:CPU runs it at GEMM speed, where its 3D convolution of 7^3 patches
runs slowly (docs/performance.md). Equal to kernels/xla.patch_conv, gradients included.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=8)
def _conv_matrix_index(size: int, kernel: int) -> np.ndarray:
    """(S^3, S^3) index into the flattened kernel (k^3 taps, plus one zero slot at k^3) for in -> out."""
    c = kernel // 2
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    offset = grid[:, None, :] - grid[None, :, :] + c  # (in p, out q, 3): tap that maps p to q
    valid = np.all((offset >= 0) & (offset < kernel), axis=-1)
    flat = (offset[..., 0] * kernel + offset[..., 1]) * kernel + offset[..., 2]
    return np.where(valid, flat, kernel**3).astype(np.int32)


def conv_matrix(kernel: jax.Array, size: int) -> jax.Array:
    """The 'same' convolution of an S^3 patch as a matrix.

    Args:
      kernel: (k, k, k, Cin, Cout) cross-correlation kernel (flax/XLA convention), k odd.
      size: S.
    Returns:
      (S^3 Cin, S^3 Cout) matrix M with flatten(conv(p)) = flatten(p) @ M, flattening (S, S, S, C)
      row-major.
    """
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    taps = jnp.concatenate(
        [kernel.reshape(k**3, cin, cout), jnp.zeros((1, cin, cout), kernel.dtype)]
    )
    m = taps[_conv_matrix_index(size, k)]  # (S^3, S^3, Cin, Cout)
    return m.transpose(0, 2, 1, 3).reshape(size**3 * cin, size**3 * cout)


def patch_conv(x: jax.Array, kernel: jax.Array, size: int) -> jax.Array:
    """'same' k^3 convolution of flattened S^3 patches, (..., S^3 Cin) -> (..., S^3 Cout), as one GEMM
    over (rows, S^3 Cin). kernel: (k, k, k, Cin, Cout) in x's dtype."""
    matrix = conv_matrix(kernel, size)
    y = x.reshape(-1, x.shape[-1]) @ matrix
    return y.reshape(*x.shape[:-1], y.shape[-1])
