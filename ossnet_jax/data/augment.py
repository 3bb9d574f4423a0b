"""Training augmentation on the device (official recipe): in-plane flips, brightness shift, noise."""

import jax
import jax.numpy as jnp
import ml_collections

from ossnet_jax import kernels as kernel_sets


def augment(
    rng: jax.Array,
    image: jax.Array,
    target: jax.Array,
    band: jax.Array,
    cfg: ml_collections.ConfigDict,
    kernels: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augments one volume; geometric changes apply to image, target and band alike.

    Args:
      rng: PRNG key.
      image: (X, Y, Z, C) float32 z-scored; target, band: (X, Y, Z).
      cfg: config.train (flip_probability; brightness_shift, noise_std each applied with
        augment_probability: a shift uniform in +-brightness_shift, Gaussian noise of std noise_std).
      kernels: the resolved kernel set whose `gaussian_noise` draws the noise.
    Returns:
      The augmented (image, target, band).
    """
    keys = jax.random.split(rng, 6)
    for axis, key in zip((0, 1), keys[:2]):
        # a select of the reversed and the plain read, which XLA fuses with the brightness shift
        # (a conditional copied the volume on its own)
        flip = jax.random.uniform(key) < cfg.flip_probability
        image, target, band = (jnp.where(flip, jnp.flip(v, axis), v) for v in (image, target, band))
    if cfg.brightness_shift:
        apply = jax.random.uniform(keys[2]) < cfg.augment_probability
        shift = jax.random.uniform(
            keys[3], minval=-cfg.brightness_shift, maxval=cfg.brightness_shift
        )
        image = image + jnp.where(apply, shift, 0.0)
    if cfg.noise_std:
        apply = jax.random.uniform(keys[4]) < cfg.augment_probability
        image = jax.lax.cond(
            apply,
            lambda x: kernel_sets.get(kernels).gaussian_noise(keys[5], x, cfg.noise_std),
            lambda x: x,
            image,
        )
    return image, target, band


def augment_batch(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    bands: jax.Array,
    cfg: ml_collections.ConfigDict,
    kernels: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`augment` of each volume of a batch with key split(rng, B)[i]: (B, X, Y, Z, C), (B, X, Y, Z) x 2.

    On one device this is a loop over the batch, so that the noise is only computed for the volumes
    that draw it (under vmap the conditional becomes a select that computes both branches). With
    several devices it is a vmap, which keeps a batch split over devices where it is. Both give the
    same values.
    """
    keys = jax.random.split(rng, images.shape[0])
    if jax.device_count() > 1:
        return jax.vmap(lambda k, i, g, d: augment(k, i, g, d, cfg, kernels))(
            keys, images, targets, bands
        )
    out = [augment(k, i, g, d, cfg, kernels) for k, i, g, d in zip(keys, images, targets, bands)]
    return tuple(jnp.stack(parts) for parts in zip(*out))
