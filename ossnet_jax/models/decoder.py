"""The residual occupancy decoder with conditional batch norm (one row of locations per volume)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax.models.layers import ConditionalBatchNorm, make_activation


class DecoderBlock(nn.Module):
    """Linear -> CBN -> act -> dropout -> Linear -> CBN, plus a Linear shortcut if the width changes."""

    width: int
    activation: str = "pau"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, latent: jax.Array, train: bool) -> jax.Array:
        """x: (B, N, Fin); latent: (B, L). Returns (B, N, width)."""
        act = make_activation(self.activation)
        h = nn.Dense(self.width, name="dense1")(x)
        h = act(name="act1")(ConditionalBatchNorm(self.width, name="cbn1")(h, latent, train))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(self.width, name="dense2")(h)
        h = ConditionalBatchNorm(self.width, name="cbn2")(h, latent, train)
        shortcut = x if x.shape[-1] == self.width else nn.Dense(self.width, name="shortcut")(x)
        return act(name="act2")(h + shortcut)


class Decoder(nn.Module):
    """Maps per-location inputs and per-volume latents to occupancy logits.

    Block b is conditioned on latent b + 1 when there are more latents than one (skip encoder),
    otherwise every block is conditioned on the one global latent.

    Attributes:
      width: hidden width (512 official).
      blocks: number of residual blocks (5 official).
      outputs: logits per location (1 for the binary task).
    """

    width: int = 512
    blocks: int = 5
    outputs: int = 1
    activation: str = "pau"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: jax.Array, latents: jax.Array, train: bool) -> jax.Array:
        """inputs: (B, N, Fin); latents: (B, K, L). Returns logits (B, N, outputs)."""
        k = latents.shape[1]
        if k not in (1, self.blocks + 1):
            raise ValueError(
                f"decoder with {self.blocks} blocks needs 1 or {self.blocks + 1} latents, got {k}"
            )
        x = inputs
        for b in range(self.blocks):
            latent = latents[:, b + 1] if k > 1 else latents[:, 0]
            x = DecoderBlock(self.width, self.activation, self.dropout, name=f"block{b}")(
                x, latent, train
            )
        return nn.Dense(self.outputs, use_bias=False, name="out")(x)


def decoder_inputs(
    locations: jax.Array,
    grid_shape: tuple[int, int, int],
    patch_features,
    latent0,
    encoding: str,
    fourier: jax.Array | None,
) -> jax.Array:
    """Concatenates [location code | patch features | latent 0] per location.

    Args:
      locations: (B, N, 3) integer voxel indices of the padded grid.
      grid_shape: (X, Y, Z) of that grid.
      patch_features: (B, N, P) or None.
      latent0: (B, L), broadcast to every location.
      encoding: 'normalized' maps indices to [-1, 1]; 'voxel' keeps raw indices (official release).
      fourier: (3, F) random frequencies or None; adds sin and cos of 2 pi * normalized location @ B.
    Returns:
      (B, N, 3 [+ 2F] [+ P] + L).
    """
    loc = locations.astype(jnp.float32)
    unit = 2.0 * loc / (jnp.asarray(grid_shape, jnp.float32) - 1.0) - 1.0
    if encoding == "normalized":
        parts = [unit]
    elif encoding == "voxel":
        parts = [loc]
    else:
        raise ValueError(
            f"model.location_encoding must be 'normalized' or 'voxel', got {encoding!r}"
        )
    if fourier is not None:
        angle = 2.0 * jnp.pi * unit @ fourier
        parts += [jnp.sin(angle), jnp.cos(angle)]
    if patch_features is not None:
        parts.append(patch_features.astype(jnp.float32))
    n = locations.shape[1]
    parts.append(jnp.broadcast_to(latent0[:, None, :], (latent0.shape[0], n, latent0.shape[-1])))
    return jnp.concatenate(parts, axis=-1)
