"""OSS-Net (and O-Net as its patch-free special case): encode once, decode many locations.

Shapes: full-resolution volume (B, X, Y, Z, C) on the padded grid; encoder input (B, X/d, Y/d, Z/d, C)
with d = data.downscale; locations (B, N, 3) voxel coordinates of that grid, integer indices or real
values (patches sampled trilinearly, models/patches.py; the location encodings take the real value);
logits (B, N) for one output
(binary), (B, N, O) for several (multi-class, regions; see data/labels.py).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.data.labels import label_spec
from ossnet_jax.errors import ConfigError
from ossnet_jax.models.decoder import Decoder, decoder_inputs
from ossnet_jax.models.encoder import Encoder
from ossnet_jax.models.patches import (
    PatchEncoder,
    gather_large_patches,
    gather_patches,
    pooled_parity_volumes,
)

FOURIER_KEY = 0  # fixed seed of the random Fourier frequencies (they are not trained)


def _train_call(patch_net: PatchEncoder, patches: jax.Array) -> jax.Array:
    return patch_net(patches, True)


class OSSNet(nn.Module):
    """Occupancy network with local patch observations, skip latents and a segmentation head.

    `dtype` is the computation dtype (jnp.float32 or jnp.bfloat16); parameters, batch-norm statistics,
    latents and logits stay float32.
    """

    grid_shape: tuple[int, int, int]
    encoder: str = "skip"
    encoder_channels: Sequence[int] = (16, 32, 64, 128)
    decoder_width: int = 512
    decoder_blocks: int = 5
    patches: bool = True
    patch_size: int = 7
    seg_head: bool = True
    activation: str = "pau"
    dropout: float = 0.0
    fourier_features: int = 0
    fourier_scale: float = 4.0
    location_encoding: str = "normalized"
    num_outputs: int = 1
    seg_channels: int = 1
    dtype: Any = jnp.float32
    # train.remat: which parts store only their inputs for the backward pass and run again there:
    # 'decoder' (its blocks), 'all' (the patch encoder and the encoder's first convolution too) or
    # 'none'; see `remat_mode`
    remat: str = "none"
    # the resolved kernel set, 'xla' or 'cpu' (ossnet_jax/kernels; build_model resolves model.kernels)
    kernels: str = "xla"

    def setup(self):
        self.encoder_net = Encoder(
            self.encoder,
            tuple(self.encoder_channels),
            self.decoder_blocks + 1,
            self.seg_head,
            self.activation,
            self.dropout,
            self.seg_channels,
            self.dtype,
            recompute_stem=self.remat == "all",
            kernels=self.kernels,
        )
        if self.patches:
            self.patch_net = PatchEncoder(
                self.patch_size, self.activation, self.dropout, self.dtype, self.kernels
            )
        self.decoder_net = Decoder(
            self.decoder_width,
            self.decoder_blocks,
            self.num_outputs,
            self.activation,
            self.dropout,
            self.dtype,
            self.remat in ("decoder", "all"),
            self.kernels,
        )

    def encode(self, volume_low: jax.Array, train: bool) -> tuple[jax.Array, Optional[jax.Array]]:
        """(B, x, y, z, C) -> latents (B, K, L) and segmentation logits (B, sx, sy, sz) or None."""
        return self.encoder_net(volume_low, train)

    def decode(
        self, locations: jax.Array, patches: Optional[jax.Array], latents: jax.Array, train: bool
    ) -> jax.Array:
        """Logits (B, N[, O]) for locations (B, N, 3), patches (B, N, S, S, S, Cp), latents (B, K, L)."""
        features = None
        if self.patches and self.remat == "all" and train and not self.is_initializing():
            recomputed = kernel_sets.get(self.kernels).recomputed
            features = recomputed(self.patch_net, _train_call, patches)
        elif self.patches:
            features = self.patch_net(patches, train)
        fourier = None
        if self.fourier_features:
            fourier = self.fourier_scale * jax.random.normal(
                jax.random.key(FOURIER_KEY), (3, self.fourier_features), jnp.float32
            )
        inputs = decoder_inputs(
            locations, self.grid_shape, features, self.location_encoding, fourier
        )
        logits = self.decoder_net(inputs, latents, train)
        return logits[..., 0] if self.num_outputs == 1 else logits

    def __call__(
        self, volume_low: jax.Array, locations: jax.Array, patches: Optional[jax.Array], train: bool
    ) -> tuple[jax.Array, Optional[jax.Array]]:
        latents, seg = self.encode(volume_low, train)
        return self.decode(locations, patches, latents, train), seg


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """The jnp dtype of a train.dtype / eval.dtype value; ValueError for others."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(config: ml_collections.ConfigDict, dtype: Optional[str] = None) -> OSSNet:
    """The model described by config.model for the grid and label mode of config.data.

    It computes in `dtype` ('float32' | 'bfloat16'), by default config.train.dtype, with the kernel
    set model.kernels resolves to on this process's backend ('auto' when the key is absent).
    """
    m = config.model
    if m.name != "oss_net":
        raise ConfigError(f"model.name {m.name!r} is not an occupancy network model")
    if m.patches and m.patch_size % 2 == 0:
        raise ConfigError(
            f"model.patch_size must be odd (the patch encoder's 'same' kernels), got {m.patch_size}"
        )
    spec = label_spec(config.data)
    return OSSNet(
        grid_shape=tuple(config.data.grid_shape),
        num_outputs=spec.num_outputs,
        seg_channels=spec.num_channels,
        encoder=m.encoder,
        encoder_channels=tuple(m.encoder_channels),
        decoder_width=m.decoder_width,
        decoder_blocks=m.decoder_blocks,
        patches=m.patches,
        patch_size=m.patch_size,
        seg_head=m.seg_head,
        activation=m.activation,
        dropout=m.dropout,
        fourier_features=m.fourier_features,
        fourier_scale=m.fourier_scale,
        location_encoding=m.location_encoding,
        dtype=compute_dtype(config.train.get("dtype", "float32") if dtype is None else dtype),
        remat=remat_mode(config.train.get("remat", "none")),
        kernels=kernel_sets.of_config(config),
    )


def grid_multiple(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """What divides each axis of data.grid_shape: data.downscale x 2^(encoder blocks), each halving."""
    return (config.data.downscale * 2 ** len(config.model.encoder_channels),) * 3


REMAT_MODES = ("none", "decoder", "all")


def remat_mode(value: Any) -> str:
    """train.remat as one of REMAT_MODES; True and False (configs before the modes) read as 'all' and
    'none'. ValueError for anything else."""
    if isinstance(value, bool):
        return "all" if value else "none"
    if value not in REMAT_MODES:
        raise ConfigError(f"train.remat must be one of {REMAT_MODES} (or a bool), got {value!r}")
    return value


def downscale(volume: jax.Array, factor: int, train: bool = False, kernels: str = "xla") -> jax.Array:
    """Average-pools (B, X, Y, Z, C) by `factor` along every spatial axis: the encoder's input.

    In training (prepare_inputs) it is the kernel set's `mean_pool`; elsewhere XLA's reduce-window,
    which needs no temporary in forward-only programs. Both agree up to float rounding.
    """
    if factor == 1:
        return volume
    if train:
        return kernel_sets.get(kernels).mean_pool(volume, factor)
    return nn.avg_pool(volume, (factor,) * 3, strides=(factor,) * 3)


def patch_source(volume: jax.Array, large_patches: bool) -> dict:
    """What patches are cut from, computed once per volume: {'volume'[, 'parity']}. volume: (X, Y, Z, C)."""
    source = {"volume": volume}
    if large_patches:
        source["parity"] = pooled_parity_volumes(volume)
    return source


def observe(source: dict, locations: jax.Array, size: int) -> jax.Array:
    """Patches (N, S, S, S, Cp) of one volume around (N, 3) locations (integer indices, or real voxel
    coordinates sampled trilinearly); large patches add C channels."""
    patches = gather_patches(source["volume"], locations, size)
    if "parity" in source:
        large = gather_large_patches(source["parity"], locations, size)
        patches = jnp.concatenate([patches, large], axis=-1)
    return patches


def patch_channels(config: ml_collections.ConfigDict) -> int:
    """Channels of a location's patch: the volume's, doubled with large patches."""
    return config.data.num_channels * (2 if config.model.large_patches else 1)


def model_inputs(
    config: ml_collections.ConfigDict, image: jax.Array, locations: jax.Array
) -> tuple[jax.Array, Optional[jax.Array]]:
    """Encoder input (B, X/d, Y/d, Z/d, C) and patches (B, N, 7, 7, 7, Cp) (None without patches).

    Patches are cast to train.dtype (bfloat16 halves their memory); the model casts the rest.
    """
    low = downscale(image, config.data.downscale, True, kernel_sets.of_config(config))
    if not config.model.patches:
        return low, None
    size, large = config.model.patch_size, config.model.large_patches
    patches = jax.vmap(lambda v, loc: observe(patch_source(v, large), loc, size))(image, locations)
    return low, patches.astype(compute_dtype(config.train.get("dtype", "float32")))
