"""Local observations: patches gathered on the device around each location, and the patch encoder.

A location is an integer voxel index (x, y, z) of the padded full-resolution grid. Its patch of size S
covers voxels l - S//2 ... l - S//2 + S - 1 along each axis; voxels outside the grid read as zero.

The patch encoder's 'same' convolutions act on one S^3 patch at a time, zero outside it (the kernel
set's `patch_conv`: a 3D convolution of the patches in kernels/xla.py, one GEMM per layer on the CPU).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.models.layers import make_activation


def gather_patches(volume: jax.Array, locations: jax.Array, size: int) -> jax.Array:
    """Cuts an S^3 patch around each location out of one volume, zero outside the grid.

    Args:
      volume: (X, Y, Z, C).
      locations: (N, 3) integer voxel indices inside the grid.
      size: S, the patch edge in voxels.
    Returns:
      (N, S, S, S, C).
    """
    lo = size // 2
    hi = size - 1 - lo
    padded = jnp.pad(volume, ((lo, hi), (lo, hi), (lo, hi), (0, 0)))
    channels = volume.shape[-1]

    def one(loc):
        start = (loc[0], loc[1], loc[2], jnp.zeros((), loc.dtype))
        return jax.lax.dynamic_slice(padded, start, (size, size, size, channels))

    return jax.vmap(one)(locations)


def pooled_parity_volumes(volume: jax.Array) -> jax.Array:
    """Prepares a volume for large patches: the 2^3 box filter split by index parity.

    A 2S^3 patch average-pooled by 2 reads the box filter B[v] = mean(volume[v : v+2]^3) at
    v = l - S + 2i, i = 0..S-1, i.e. at every other voxel. Splitting B by the parity of v makes this a
    contiguous slice, so large patches are gathered as cheaply as small ones.

    Args:
      volume: (X, Y, Z, C) with even X, Y, Z.
    Returns:
      (8, X/2 + 1, Y/2 + 1, Z/2 + 1, C): entry 4 px + 2 py + pz holds B[px - 1 + 2j, ...] so that index
      j = 0 is the voxel just before the grid (zero padding included).
    """
    padded = jnp.pad(volume, ((1, 2), (1, 2), (1, 2), (0, 0)))
    box = (
        padded[:-1, :-1, :-1]
        + padded[1:, :-1, :-1]
        + padded[:-1, 1:, :-1]
        + padded[:-1, :-1, 1:]
        + padded[1:, 1:, :-1]
        + padded[1:, :-1, 1:]
        + padded[:-1, 1:, 1:]
        + padded[1:, 1:, 1:]
    ) / 8.0
    parts = [box[px::2, py::2, pz::2] for px in (0, 1) for py in (0, 1) for pz in (0, 1)]
    return jnp.stack(parts)


def gather_large_patches(parity: jax.Array, locations: jax.Array, size: int) -> jax.Array:
    """Large patches: the (2 size)^3 patch around each location average-pooled by 2 to size^3.

    Args:
      parity: output of `pooled_parity_volumes`, (8, X/2 + 1, Y/2 + 1, Z/2 + 1, C).
      locations: (N, 3) integer voxel indices.
      size: S; the patch read covers l - S ... l + S - 1.
    Returns:
      (N, S, S, S, C).
    """
    channels = parity.shape[-1]
    lo = size // 2
    hi = size - 1 - lo
    padded = jnp.pad(parity, ((0, 0), (lo, hi + 1), (lo, hi + 1), (lo, hi + 1), (0, 0)))

    def one(loc):
        t = (
            loc - size + 1
        )  # box-filter index of the first pooled cell, shifted by the leading pad of 1
        par = jnp.mod(t, 2)
        start = jnp.floor_divide(t, 2) + lo
        index = 4 * par[0] + 2 * par[1] + par[2]
        zero = jnp.zeros((), loc.dtype)
        out = jax.lax.dynamic_slice(
            padded, (index, start[0], start[1], start[2], zero), (1, size, size, size, channels)
        )
        return out[0]

    return jax.vmap(one)(locations)


class PatchConv(nn.Module):
    """A 'same' k^3 convolution of each S^3 patch on its own: (..., S^3 Cin) -> (..., S^3 Cout), the
    patches flattened row-major from (S, S, S, C).

    Parameters as nn.Conv ('kernel' (k, k, k, Cin, features), 'bias'), float32; computed in `dtype`.
    """

    features: int
    size: int
    kernel: int
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1] // self.size**3
        shape = (self.kernel,) * 3 + (cin, self.features)
        kern = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        ops = kernel_sets.get(self.kernels)
        y = ops.patch_conv(x.astype(self.dtype), kern.astype(self.dtype), self.size)
        return y + jnp.tile(bias.astype(self.dtype), self.size**3)


class PatchEncoder(nn.Module):
    """conv k^3 (C -> max(C/2, 1)) -> act -> dropout -> conv k^3 (-> 1) -> act, flattened.

    (B, N, S, S, S, C) patches -> (B, N, S^3) features (343 for S = 7), computed in `dtype`.
    """

    kernel: int = 7
    activation: str = "pau"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, patches: jax.Array, train: bool) -> jax.Array:
        size, channels = patches.shape[-2], patches.shape[-1]
        act = make_activation(self.activation)
        x = patches.reshape(*patches.shape[:-4], size**3 * channels)

        def conv(features: int, name: str) -> PatchConv:
            return PatchConv(features, size, self.kernel, self.dtype, self.kernels, name=name)

        x = act(self.kernels, name="act1")(conv(max(channels // 2, 1), "conv1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return act(self.kernels, name="act2")(conv(1, "conv2")(x))
