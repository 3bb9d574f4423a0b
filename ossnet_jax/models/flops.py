"""Analytic multiply-add work per decoder location of an OSS-Net config, counted as the official release.

A multiply-add counts 2 FLOPs. Per location: the decoder's Linear layers (the CBN blocks and the output
layer) and the two 7^3 patch convolutions counted densely, i.e. every one of the S^3 x S^3 taps of the
'same' convolution on an S^3 patch (the work of our GEMM form; zero padding not subtracted). Per-volume
work (encoder, CBN gamma/beta of the latents) and elementwise work (PAU, normalisation) are not counted.
For OSS-Net C at the BraTS sizes this is 8.44 MFLOP: 6.08 in the CBN blocks, 2.35 in the patch convs.
"""

import math

import ml_collections

from ossnet_jax.models.layers import spatial_shape_after


def latent_size(config: ml_collections.ConfigDict) -> int:
    """L, the values of one latent: the product of the encoder's last spatial shape (320 for BraTS)."""
    d = config.data
    grid = spatial_shape_after(tuple(d.grid_shape), d.downscale, len(config.model.encoder_channels))
    return math.prod(grid)


def decoder_input_width(config: ml_collections.ConfigDict) -> int:
    """Fin = location code (3 [+ 2 fourier]) + patch features (S^3 if patches) + latent 0 (L)."""
    m = config.model
    width = 3 + 2 * m.fourier_features + latent_size(config)
    if m.patches:
        width += m.patch_size**3
    return width


def flops_per_point(config: ml_collections.ConfigDict, outputs: int = 1) -> dict[str, int]:
    """{'cbn_blocks', 'patch_convs', 'output', 'total'}: forward FLOPs per location (ints)."""
    m = config.model
    w = m.decoder_width
    fin = decoder_input_width(config)
    blocks = 0
    for b in range(m.decoder_blocks):
        width_in = fin if b == 0 else w
        blocks += 2 * width_in * w + 2 * w * w  # dense1, dense2
        if width_in != w:
            blocks += 2 * width_in * w  # shortcut
    patch = 0
    if m.patches:
        cells = m.patch_size**3
        channels = config.data.num_channels * (2 if m.large_patches else 1)
        middle = max(channels // 2, 1)
        patch = 2 * cells * cells * (channels * middle + middle * 1)
    out = 2 * w * outputs
    return {
        "cbn_blocks": blocks,
        "patch_convs": patch,
        "output": out,
        "total": blocks + patch + out,
    }
