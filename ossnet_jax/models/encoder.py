"""The 3D CNN encoder of the downscaled volume: latent vectors and a low-resolution segmentation.

'plain' (O-Net, configs A and B): residual blocks, conv5^3 to one channel, flattened: one global latent.
'skip' (configs C and D): after every block an adaptive max-pool to the latent grid and a conv5^3 to
half the block's channels; all are concatenated and a conv5^3 makes K = decoder_blocks + 1 channels,
each flattened into one latent. The latent grid is the last block's spatial shape (8x8x5 for BraTS).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax.errors import ConfigError
from ossnet_jax.models.layers import BatchNorm, Conv3D, ResidualBlock, make_activation


def adaptive_max_pool(x: jax.Array, target: Sequence[int]) -> jax.Array:
    """Max-pools (B, X, Y, Z, C) to (B, *target, C); each axis must be a multiple of its target."""
    spatial = x.shape[1:4]
    if any(s % t for s, t in zip(spatial, target)):
        raise ValueError(
            f"cannot max-pool spatial shape {spatial} to {tuple(target)}: not a multiple"
        )
    window = tuple(s // t for s, t in zip(spatial, target))
    return nn.max_pool(x, window, strides=window)


class ConvBNAct(nn.Module):
    """conv k^3 -> BatchNorm -> activation, spatial shape kept."""

    features: int
    kernel: int = 5
    activation: str = "pau"
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv3D(self.features, self.kernel, False, self.dtype, self.kernels, name="conv")(x)
        act = make_activation(self.activation)(self.kernels, name="act")
        return BatchNorm(self.dtype, self.kernels, name="bn")(x, train, act)


class Encoder(nn.Module):
    """Encodes (B, x, y, z, C) into latents (B, K, L) and, optionally, segmentation logits.

    Attributes:
      kind: 'plain' (K = 1) or 'skip' (K = num_latents).
      channels: output channels of each residual block; each block halves every axis.
      num_latents: K for the skip encoder (decoder blocks + 1).
      seg_head: also return the conv5^3 segmentation logits of the last block: (B, sx, sy, sz) for
        one channel, (B, sx, sy, sz, seg_channels) for several.
      dtype: computation dtype (parameters and BatchNorm statistics float32); latents and logits are
        returned in float32.
      recompute_stem: in training, run the first convolution again in the backward pass instead of
        storing its output, the largest array of the encoder (train.remat = 'all').
      kernels: the resolved kernel set, 'xla' or 'cpu' (ossnet_jax/kernels).
    """

    kind: str = "skip"
    channels: Sequence[int] = (16, 32, 64, 128)
    num_latents: int = 6
    seg_head: bool = True
    activation: str = "pau"
    dropout: float = 0.0
    seg_channels: int = 1
    dtype: Any = jnp.float32
    recompute_stem: bool = False
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, Optional[jax.Array]]:
        if self.kind not in ("plain", "skip"):
            raise ConfigError(f"model.encoder must be 'plain' or 'skip', got {self.kind!r}")
        x = x.astype(self.dtype)
        features = []
        for i, ch in enumerate(self.channels):
            block = ResidualBlock(
                ch,
                self.activation,
                self.dropout,
                self.dtype,
                self.kernels,
                recompute_conv1=self.recompute_stem and i == 0,
                name=f"block{i}",
            )
            x = block(x, train)
            features.append(x)
        latent_grid = x.shape[1:4]
        if self.kind == "plain":
            z = ConvBNAct(1, 5, self.activation, self.dtype, self.kernels, name="to_latent")(x, train)
        else:
            pooled = [
                ConvBNAct(
                    max(f.shape[-1] // 2, 1),
                    5,
                    self.activation,
                    self.dtype,
                    self.kernels,
                    name=f"skip{i}",
                )(adaptive_max_pool(f, latent_grid), train)
                for i, f in enumerate(features)
            ]
            z = ConvBNAct(
                self.num_latents, 5, self.activation, self.dtype, self.kernels, name="to_latent"
            )(
                jnp.concatenate(pooled, axis=-1), train
            )
        batch, k = z.shape[0], z.shape[-1]
        latents = jnp.moveaxis(z, -1, 1).reshape(batch, k, -1).astype(jnp.float32)
        seg = None
        if self.seg_head:
            seg = Conv3D(
                self.seg_channels, 5, dtype=self.dtype, kernels=self.kernels, name="seg_head"
            )(x)
            seg = seg.astype(jnp.float32)
            if self.seg_channels == 1:
                seg = seg[..., 0]
        return latents, seg
