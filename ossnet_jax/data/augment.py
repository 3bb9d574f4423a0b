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
        image, target, band = jax.lax.cond(
            flip,
            lambda vols, axis=axis: tuple(jnp.flip(v, axis) for v in vols),
            lambda vols: vols,
            (image, target, band),
        )
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
            lambda x: x + cfg.noise_std * jax.random.normal(keys[5], x.shape, x.dtype),
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`augment` of each volume of a batch with key split(rng, B)[i]: (B, X, Y, Z, C), (B, X, Y, Z) x 2.

    On one device this is a loop over the batch, so that the flips and the noise (about 1 s per BraTS
    volume on the 2-core CPU) are only computed for the volumes that draw them (under vmap the
    conditionals become selects that compute both branches). With several devices it is a vmap, which
    keeps a batch split over devices where it is. Both give the same values.
    """
    keys = jax.random.split(rng, images.shape[0])
    if jax.device_count() > 1:
        return jax.vmap(lambda k, i, g, d: augment(k, i, g, d, cfg))(keys, images, targets, bands)
    out = [augment(k, i, g, d, cfg) for k, i, g, d in zip(keys, images, targets, bands)]
    return tuple(jnp.stack(parts) for parts in zip(*out))
