"""Local observations: patches gathered on the device around each location, and the patch encoder.

A location is a voxel coordinate (x, y, z) of the padded full-resolution grid: an integer index, or any
real value in [0, n - 1] along an axis of n voxels. At an integer location l the patch of size S covers
voxels l - S//2 ... l - S//2 + S - 1 along each axis, voxels outside the grid reading as zero. At a
real location the same lattice is shifted with it and sampled trilinearly from that zero-extended
volume (`trilinear`): the weighted sum of the patches at the 8 integer corners of the location's cell,
so at integer-valued real locations it equals the integer gather exactly, and it is differentiable
with respect to the location inside each cell.

The patch encoder's 'same' convolutions act on one S^3 patch at a time, zero outside it (the kernel
set's `patch_conv`: a 3D convolution of the patches in kernels/xla.py, one GEMM per layer on the CPU).
"""

import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.models.layers import make_activation


def trilinear(
    gather: Callable[[jax.Array], jax.Array], locations: jax.Array, grid_shape: Sequence[int]
) -> jax.Array:
    """Trilinear interpolation of an integer-location gather at real locations.

    With c = floor(l) (kept in [0, n - 2] so every corner lies in the grid) and t = l - c, the result
    is sum over the 8 corners k in {0, 1}^3 of prod_a (t_a if k_a else 1 - t_a) * gather(c + k). At an
    integer-valued l one weight is exactly 1 and the others exactly 0, so the result equals
    gather(l) bitwise (finite values); the gradient with respect to l flows through the weights.

    Args:
      gather: maps (N, 3) int32 voxel indices to (N, ...) values.
      locations: (N, 3) float voxel coordinates, each in [0, n - 1] of its axis (not checked here).
      grid_shape: (X, Y, Z), the n of each axis.
    Returns:
      (N, ...) in the gather's dtype.
    """
    upper = jnp.maximum(jnp.asarray(grid_shape, jnp.int32) - 2, 0)
    base = jnp.clip(jnp.floor(locations).astype(jnp.int32), 0, upper)
    frac = locations - base.astype(locations.dtype)  # (N, 3), in [0, 1] inside the grid
    out = None
    for corner in itertools.product((0, 1), repeat=3):
        offset = jnp.asarray(corner, jnp.int32)
        weight = jnp.prod(jnp.where(offset == 1, frac, 1.0 - frac), axis=-1)  # (N,)
        values = gather(base + offset)
        term = weight.astype(values.dtype).reshape(weight.shape + (1,) * (values.ndim - 1)) * values
        out = term if out is None else out + term
    return out


def gather_patches(volume: jax.Array, locations: jax.Array, size: int) -> jax.Array:
    """Cuts an S^3 patch around each location out of one volume, zero outside the grid.

    Args:
      volume: (X, Y, Z, C).
      locations: (N, 3) voxel coordinates inside the grid: integer indices (a slice per location)
        or real values (the shifted lattice sampled trilinearly, `trilinear`).
      size: S, the patch edge in voxels.
    Returns:
      (N, S, S, S, C).
    """
    if not jnp.issubdtype(locations.dtype, jnp.integer):
        cut = lambda corners: gather_patches(volume, corners, size)
        return trilinear(cut, locations, volume.shape[:3])
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
      locations: (N, 3) integer voxel indices, or real voxel coordinates inside the grid: pooling and
        trilinear sampling are both linear and commute with shifts, so the pooled patch at a real
        location is the trilinear combination of the pooled patches at its cell's corners.
      size: S; the patch read covers l - S ... l + S - 1.
    Returns:
      (N, S, S, S, C).
    """
    if not jnp.issubdtype(locations.dtype, jnp.integer):
        grid = tuple(2 * (n - 1) for n in parity.shape[1:4])
        cut = lambda corners: gather_large_patches(parity, corners, size)
        return trilinear(cut, locations, grid)
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
