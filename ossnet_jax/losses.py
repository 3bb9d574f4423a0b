"""Losses: the official OSS-Net recipe (BCE at the sampled locations plus a weighted BCE of the
segmentation head), optionally with a soft Dice of the sampled locations (train.point_dice_weight),
and the U-Nets' dense Dice + cross-entropy.

The point loss of the other label modes lives with them in data/labels.py (LabelSpec.point_loss).
"""

import jax
import jax.numpy as jnp
import optax

from ossnet_jax.data.labels import LabelSpec

DICE_SMOOTHING = (
    1.0  # voxels added to numerator and denominator: an empty channel scores 1, not 0/0
)


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


def soft_dice_loss(probs: jax.Array, masks: jax.Array) -> jax.Array:
    """1 - mean over channels of the soft Dice of probabilities against 0/1 masks, both (..., R).

    Sums run over every other axis (the batch included, "batch Dice"), so a crop or slice without
    foreground does not dominate the loss. float32 scalar.
    """
    probs = probs.astype(jnp.float32)
    masks = masks.astype(jnp.float32)
    axes = tuple(range(probs.ndim - 1))
    overlap = jnp.sum(probs * masks, axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(masks, axis=axes)
    return 1.0 - jnp.mean((2.0 * overlap + DICE_SMOOTHING) / (total + DICE_SMOOTHING))


def label_dice_loss(spec: LabelSpec, logits: jax.Array, index: jax.Array) -> jax.Array:
    """soft_dice_loss of logits (..., O) (binary: (...)) against class indices (...): sums over every
    location or voxel of the batch; 'multiclass' scores the non-background classes. float32 scalar.
    OSS-Net's sampled locations (train.point_dice_weight) and the U-Nets' voxels use it alike."""
    probs = spec.probabilities(logits)
    if spec.mode == "binary":
        probs = probs[..., None]
    elif spec.mode == "multiclass":
        probs = probs[..., 1:]
    return soft_dice_loss(probs, spec.channel_masks(index))


def dice_ce_loss(
    spec: LabelSpec,
    logits: jax.Array,
    index: jax.Array,
    dice_weight: float,
    ce_weight: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense loss of a U-Net: dice_weight x soft Dice + ce_weight x cross-entropy.

    Args:
      spec: the label mode; cross-entropy is LabelSpec.point_loss (softmax CE for 'multiclass',
        sigmoid BCE per channel otherwise), Dice runs over the R label channels (for 'multiclass'
        the softmax probabilities of the non-background classes).
      logits: (..., O) per voxel; O = spec.num_outputs.
      index: (...) class indices into data.labels.
    Returns:
      (loss, cross-entropy, Dice loss), float32 scalars.
    """
    logits = logits[..., 0] if spec.mode == "binary" else logits
    ce = spec.point_loss(logits, index)
    dice = label_dice_loss(spec, logits, index)
    return dice_weight * dice + ce_weight * ce, ce, dice
