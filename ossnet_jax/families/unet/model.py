"""Residual U-Nets, the paper's baselines: 3D on volumes (performance), 2D on axial slices (efficiency).

Shapes are channels-last: UNet3D maps (B, X, Y, Z, C) to logits (B, X, Y, Z, O), UNet2D maps
(B, X, Y, C) to (B, X, Y, O), with O = LabelSpec.num_outputs (1 sigmoid for 'binary', one per region,
K softmax classes for 'multiclass'). Any spatial size works: the input is zero-padded at the far end of
each axis to a multiple of input_downscale x 2^(levels - 1) and the logits are cropped back.

Encoder: a full-resolution residual block, then one residual block per further level, each OSS-Net's
(models/layers.py's ResidualBlock: conv3 -> BN -> act -> avgpool2 -> dropout -> conv3 -> BN, pooled
1^d-conv shortcut, add, act), so every level halves each spatial axis. Decoder: per level, upsampling
x2 (transposed 2^d convolution, or linear resize + 1^d convolution), concatenation with the encoder's
features of that level (the skip connection), and a residual block without pooling. Head: a 1^d
convolution. The blocks compute through the kernel set `kernels` (ossnet_jax/kernels); the
upsampling and the head are flax's own convolutions.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.data.labels import label_spec
from ossnet_jax.errors import ConfigError
from ossnet_jax.models.layers import ResidualBlock

UPSAMPLING = ("transpose", "resize")
FAMILIES = {"unet3d": 3, "unet2d": 2}  # model.name -> spatial axes the network convolves


class Upsample(nn.Module):
    """Doubles every spatial axis of (B, *S, Cin) -> (B, *2S, features)."""

    features: int
    mode: str = "transpose"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rank = x.ndim - 2
        if self.mode == "transpose":
            return nn.ConvTranspose(
                self.features, (2,) * rank, strides=(2,) * rank, padding="VALID"
            )(x)
        shape = (x.shape[0],) + tuple(2 * s for s in x.shape[1:-1]) + (x.shape[-1],)
        return nn.Conv(self.features, (1,) * rank)(jax.image.resize(x, shape, "linear"))


class ResidualUNet(nn.Module):
    """Residual U-Net over `spatial_dims` axes; UNet3D and UNet2D fix them.

    Attributes:
      channels: width of each resolution level, full resolution first; len(channels) - 1 halvings.
      num_outputs: O, logits per voxel.
      input_downscale: the network sees the input average-pooled by this factor (data.downscale);
        its logits are resized (linear) back to the input's size.
      upsample: 'transpose' or 'resize' (see Upsample).
      activation: 'relu' or 'pau'.
      dropout: rate inside each residual block.
      spatial_dims: 3 (volumes) or 2 (slices).
      kernels: the resolved kernel set of the residual blocks, 'xla' or 'cpu'.
    """

    channels: Sequence[int] = (16, 32, 64, 128)
    num_outputs: int = 1
    input_downscale: int = 1
    upsample: str = "transpose"
    activation: str = "relu"
    dropout: float = 0.0
    spatial_dims: int = 3
    kernels: str = "xla"

    def block(self, features: int, downsample: bool, name: str) -> ResidualBlock:
        """The residual block of one level: (B, *S, Cin) -> (B, *S, features), or (B, *S/2, features)
        with `downsample`."""
        return ResidualBlock(
            features,
            self.activation,
            self.dropout,
            kernels=self.kernels,
            downsample=downsample,
            name=name,
        )

    def features(self, x: jax.Array, train: bool) -> list[jax.Array]:
        """Encoder features per level for a padded input: [(B, *S/d/2^l, channels[l]) for l]."""
        d = self.input_downscale
        rank = self.spatial_dims
        if d > 1:
            x = nn.avg_pool(x, (d,) * rank, strides=(d,) * rank)
        skips = [self.block(self.channels[0], False, "stem")(x, train)]
        for level, c in enumerate(self.channels[1:], start=1):
            skips.append(self.block(c, True, f"down{level}")(skips[-1], train))
        return skips

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits (B, *S, O) for an input (B, *S, C) of any spatial size S."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected (B, {self.spatial_dims} spatial axes, C) input, got shape {x.shape}"
            )
        if self.upsample not in UPSAMPLING:
            raise ConfigError(f"model.upsample must be one of {UPSAMPLING}, got {self.upsample!r}")
        size = x.shape[1:-1]
        multiple = self.input_downscale * 2 ** (len(self.channels) - 1)
        padded = tuple(-(-s // multiple) * multiple for s in size)
        x = jnp.pad(x, [(0, 0)] + [(0, p - s) for p, s in zip(padded, size)] + [(0, 0)])
        skips = self.features(x, train)
        h = skips[-1]
        for level in reversed(range(len(self.channels) - 1)):
            h = Upsample(self.channels[level], self.upsample, name=f"up{level}")(h)
            h = jnp.concatenate([h, skips[level]], axis=-1)
            h = self.block(self.channels[level], False, f"dec{level}")(h, train)
        logits = nn.Conv(self.num_outputs, (1,) * self.spatial_dims, name="head")(h)
        if self.input_downscale > 1:
            logits = jax.image.resize(logits, x.shape[:-1] + (self.num_outputs,), "linear")
        return logits[(slice(None),) + tuple(slice(0, s) for s in size)]


class UNet3D(ResidualUNet):
    """The 3D residual U-Net: (B, X, Y, Z, C) -> logits (B, X, Y, Z, O)."""

    spatial_dims: int = 3


class UNet2D(ResidualUNet):
    """The 2D residual U-Net on axial slices: (B, X, Y, C) -> logits (B, X, Y, O)."""

    spatial_dims: int = 2


def grid_multiple(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """What divides each axis of data.grid_shape: data.downscale x 2^(levels - 1) along the axes the
    network halves (all three in 3D, X and Y in 2D), so that it needs no padding of its own."""
    side = config.data.downscale * 2 ** (len(config.model.channels) - 1)
    return (side, side, side if FAMILIES[config.model.name] == 3 else 1)


def build_unet(config: ml_collections.ConfigDict) -> ResidualUNet:
    """UNet3D ('unet3d') or UNet2D ('unet2d') as described by config.model, for config.data's labels."""
    m = config.model
    if m.name not in FAMILIES:
        raise ConfigError(f"model.name {m.name!r} is not a U-Net; choose one of {sorted(FAMILIES)}")
    if len(m.channels) < 1:
        raise ConfigError("model.channels needs at least one level")
    for key in ("train", "eval"):
        if config[key].get("dtype", "float32") != "float32":
            raise ConfigError(f"{key}.dtype: the U-Nets compute in float32 only")
    cls = UNet3D if FAMILIES[m.name] == 3 else UNet2D
    return cls(
        channels=tuple(m.channels),
        num_outputs=label_spec(config.data).num_outputs,
        input_downscale=config.data.downscale,
        upsample=m.upsample,
        activation=m.activation,
        dropout=m.dropout,
        kernels=kernel_sets.of_config(config),
    )
