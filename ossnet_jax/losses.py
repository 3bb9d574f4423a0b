"""Losses of the official recipe: BCE at the sampled locations plus a weighted BCE of the segmentation head.

The point loss of the other label modes lives with them in data/labels.py (LabelSpec.point_loss).
"""

import jax
import jax.numpy as jnp
import optax


def bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of logits against 0/1 targets of the same shape (float32)."""
    return jnp.mean(
        optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    )


def max_pool_target(target: jax.Array, out_shape: tuple[int, int, int]) -> jax.Array:
    """Adaptive max-pool of (B, X, Y, Z, ...) 0/1 masks to (B, *out_shape, ...): any voxel in a cell counts."""
    b, x, y, z = target.shape[:4]
    rest = target.shape[4:]
    fx, fy, fz = x // out_shape[0], y // out_shape[1], z // out_shape[2]
    cells = target.reshape(b, out_shape[0], fx, out_shape[1], fy, out_shape[2], fz, *rest)
    return cells.max(axis=(2, 4, 6))
