"""Location sampling on the device: uniform over the grid plus a share from the label's border band."""

import jax
import jax.numpy as jnp

from ossnet_jax import kernels as kernel_sets


def sample_locations(
    rng: jax.Array, band: jax.Array, num_points: int, border_fraction: float, kernels: str = "xla"
) -> jax.Array:
    """Draws integer voxel locations of one volume, with replacement.

    Args:
      rng: PRNG key.
      band: (X, Y, Z) bool border band; when it is empty, its share is drawn uniformly too.
      num_points: N.
      border_fraction: share of the N locations drawn uniformly from the band (static).
      kernels: the resolved kernel set whose `searchsorted` finds the band voxels (same result).
    Returns:
      (N, 3) int32 voxel indices; the first round(N f) come from the band.
    """
    shape = band.shape
    size = band.size
    n_border = int(round(num_points * border_fraction))
    k_uniform, k_border = jax.random.split(rng)
    flat = jax.random.randint(k_uniform, (num_points,), 0, size, dtype=jnp.int32)
    if n_border:
        counts = jnp.cumsum(band.reshape(-1).astype(jnp.int32))
        total = counts[-1]
        u = jax.random.randint(k_border, (n_border,), 0, jnp.maximum(total, 1), dtype=jnp.int32)
        from_band = kernel_sets.get(kernels).searchsorted(counts, u, "right").astype(jnp.int32)
        flat = flat.at[:n_border].set(jnp.where(total > 0, from_band, flat[:n_border]))
    return jnp.stack(jnp.unravel_index(flat, shape), axis=-1).astype(jnp.int32)


def jitter_within_voxels(
    rng: jax.Array, locations: jax.Array, grid_shape: tuple[int, int, int]
) -> jax.Array:
    """Continuous locations: each voxel index moved uniformly within its voxel, [l - 0.5, l + 0.5)
    per axis, then clipped to the grid's coordinates [0, n - 1] (the outer half voxels fold onto the
    border). The voxel index stays the point's target voxel (the voxel that contains it).

    Args:
      rng: PRNG key.
      locations: (N, 3) integer voxel indices.
      grid_shape: (X, Y, Z).
    Returns:
      (N, 3) float32 voxel coordinates.
    """
    offsets = jax.random.uniform(rng, locations.shape, jnp.float32, -0.5, 0.5)
    upper = jnp.asarray(grid_shape, jnp.float32) - 1.0
    return jnp.clip(locations.astype(jnp.float32) + offsets, 0.0, upper)


def take_at(volume: jax.Array, locations: jax.Array) -> jax.Array:
    """Values of an (X, Y, Z) volume at (N, 3) locations: (N,)."""
    return volume[locations[:, 0], locations[:, 1], locations[:, 2]]
