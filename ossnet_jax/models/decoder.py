"""The residual occupancy decoder with conditional batch norm (one row of locations per volume)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.errors import ConfigError
from ossnet_jax.models.layers import ConditionalBatchNorm, make_activation, over_rows


class SplitDense(nn.Module):
    """Dense of [x | context broadcast to every location], with the context's product once per volume.

    Equal to nn.Dense(features) on concatenate([x, broadcast(context)], -1) with the same parameters
    ('kernel' (Fx + L, features), 'bias' (features,)), but the context rows of the kernel multiply the
    (B, L) context once instead of at each of the N locations.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, N, Fx); context: (B, L). Returns (B, N, features)."""
        fx = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (fx + context.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        per_volume = context.astype(jnp.float32) @ kernel[fx:] + bias  # (B, features)
        w = kernel[:fx].astype(self.dtype)
        y = over_rows(lambda rows: rows @ w, x.astype(self.dtype))
        return y + per_volume[:, None, :].astype(self.dtype)


class DecoderBlock(nn.Module):
    """Linear -> CBN -> act -> dropout -> Linear -> CBN, plus a Linear shortcut if the width changes.

    With a context (latent 0 of the first block) the input is [x | context] at every location; its
    first Linear and shortcut are SplitDense (same parameters as a Dense of the concatenation).
    """

    width: int
    activation: str = "pau"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, latent: jax.Array, train: bool, context: Optional[jax.Array] = None
    ) -> jax.Array:
        """x: (B, N, Fin); latent: (B, L) condition; context: (B, Lc) or None. Returns (B, N, width)."""
        act = make_activation(self.activation)

        def dense(name: str, h: jax.Array, with_context: bool) -> jax.Array:
            if with_context:
                return SplitDense(self.width, self.dtype, name=name)(h, context)
            return over_rows(nn.Dense(self.width, dtype=self.dtype, name=name), h)

        cbn = lambda name, h: ConditionalBatchNorm(self.width, self.dtype, self.kernels, name=name)(
            h, latent, train
        )
        has_context = context is not None
        h = act(self.kernels, name="act1")(cbn("cbn1", dense("dense1", x, has_context)))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = cbn("cbn2", dense("dense2", h, False))
        width_in = x.shape[-1] + (context.shape[-1] if has_context else 0)
        shortcut = x if width_in == self.width else dense("shortcut", x, has_context)
        return act(self.kernels, name="act2")(h + shortcut)


def _train_call(block: DecoderBlock, x: jax.Array, latent: jax.Array, context: Any) -> jax.Array:
    return block(x, latent, True, context)


class Decoder(nn.Module):
    """Maps per-location features and per-volume latents to occupancy logits.

    Latent 0 is part of the first block's input at every location (applied once per volume, see
    SplitDense). Block b is conditioned on latent b + 1 when there are more latents than one (skip
    encoder), otherwise every block is conditioned on the one global latent.

    Attributes:
      width: hidden width (512 official).
      blocks: number of residual blocks (5 official).
      outputs: logits per location (1 for the binary task).
      dtype: computation dtype (parameters stay float32); logits are returned in float32.
      remat: in training, keep only each block's inputs for the backward pass and run the block again
        there (the kernel set's `recomputed`): per location one array per block instead of about
        six. Same parameters and values. Needs dropout 0.
      kernels: the resolved kernel set, 'xla' or 'cpu' (ossnet_jax/kernels).
    """

    width: int = 512
    blocks: int = 5
    outputs: int = 1
    activation: str = "pau"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    kernels: str = "xla"

    @nn.compact
    def __call__(self, features: jax.Array, latents: jax.Array, train: bool) -> jax.Array:
        """features: (B, N, Fl) per location; latents: (B, K, L). Returns logits (B, N, outputs).

        The first block's input is [features | latent 0], Fl + L wide.
        """
        k = latents.shape[1]
        if k not in (1, self.blocks + 1):
            raise ValueError(
                f"decoder with {self.blocks} blocks needs 1 or {self.blocks + 1} latents, got {k}"
            )
        if self.remat and self.dropout:
            raise ConfigError(
                "train.remat recomputes the decoder blocks without their dropout masks: set"
                " model.dropout = 0 or train.remat = False"
            )
        x = features.astype(self.dtype)
        for b in range(self.blocks):
            latent = latents[:, b + 1] if k > 1 else latents[:, 0]
            block = DecoderBlock(
                self.width, self.activation, self.dropout, self.dtype, self.kernels, name=f"block{b}"
            )
            context = latents[:, 0] if b == 0 else None
            if self.remat and train and not self.is_initializing():
                recomputed = kernel_sets.get(self.kernels).recomputed
                x = recomputed(block, _train_call, x, latent, context)
            else:
                x = block(x, latent, train, context)
        out = nn.Dense(self.outputs, use_bias=False, dtype=self.dtype, name="out")
        logits = over_rows(out, x)
        return logits.astype(jnp.float32)


def decoder_inputs(
    locations: jax.Array,
    grid_shape: tuple[int, int, int],
    patch_features: Optional[jax.Array],
    encoding: str,
    fourier: jax.Array | None,
) -> jax.Array:
    """Concatenates [location code | patch features] per location (latent 0 is added by the Decoder).

    Args:
      locations: (B, N, 3) voxel coordinates of the padded grid, integer or real (used as real values).
      grid_shape: (X, Y, Z) of that grid.
      patch_features: (B, N, P) or None.
      encoding: 'normalized' maps coordinates [0, n - 1] to [-1, 1]; 'voxel' keeps them (official).
      fourier: (3, F) random frequencies or None; adds sin and cos of 2 pi * normalized location @ B.
    Returns:
      (B, N, 3 [+ 2F] [+ P]) float32.
    """
    loc = locations.astype(jnp.float32)
    unit = 2.0 * loc / (jnp.asarray(grid_shape, jnp.float32) - 1.0) - 1.0
    if encoding == "normalized":
        parts = [unit]
    elif encoding == "voxel":
        parts = [loc]
    else:
        raise ConfigError(
            f"model.location_encoding must be 'normalized' or 'voxel', got {encoding!r}"
        )
    if fourier is not None:
        angle = 2.0 * jnp.pi * unit @ fourier
        parts += [jnp.sin(angle), jnp.cos(angle)]
    if patch_features is not None:
        parts.append(patch_features.astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1)
