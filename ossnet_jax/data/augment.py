"""Training augmentation on the device (official recipe): in-plane flips, brightness shift, noise."""

import jax
import jax.numpy as jnp
import ml_collections


def augment(
    rng: jax.Array,
    image: jax.Array,
    target: jax.Array,
    band: jax.Array,
    cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augments one volume; geometric changes apply to image, target and band alike.

    Args:
      rng: PRNG key.
      image: (X, Y, Z, C) float32 z-scored; target, band: (X, Y, Z).
      cfg: config.train (flip_probability; brightness_shift, noise_std each applied with
        augment_probability: a shift uniform in +-brightness_shift, Gaussian noise of std noise_std).
    Returns:
      The augmented (image, target, band).
    """
    keys = jax.random.split(rng, 6)
    for axis, key in zip((0, 1), keys[:2]):
        flip = jax.random.uniform(key) < cfg.flip_probability
        image = jnp.where(flip, jnp.flip(image, axis), image)
        target = jnp.where(flip, jnp.flip(target, axis), target)
        band = jnp.where(flip, jnp.flip(band, axis), band)
    if cfg.brightness_shift:
        apply = jax.random.uniform(keys[2]) < cfg.augment_probability
        shift = jax.random.uniform(
            keys[3], minval=-cfg.brightness_shift, maxval=cfg.brightness_shift
        )
        image = image + jnp.where(apply, shift, 0.0)
    if cfg.noise_std:
        apply = jax.random.uniform(keys[4]) < cfg.augment_probability
        noise = cfg.noise_std * jax.random.normal(keys[5], image.shape, image.dtype)
        image = image + jnp.where(apply, noise, 0.0)
    return image, target, band
