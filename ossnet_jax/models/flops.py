"""FLOPs of the decoder's forward pass (evaluation mode), counted as the kernel set executes them.

A multiply-add counts 2 FLOPs, any other arithmetic operation on one value 1: XLA's convention, so the
count can be checked against `jax.jit(f).lower(...).compile().cost_analysis()['flops']`
(`compiled_flops`; tests/test_flops.py holds the two equal within 1 % for both kernel sets with PAU;
with ReLU XLA duplicates the cheap elementwise producers of a value into each consumer's fusion, work
this count leaves out). What `OSSNet.decode` runs for B volumes of N locations in float32:

  per location (`flops_per_point`)
    dense        the decoder blocks' Linear layers on the location features. The first block's input
                 is [features | latent 0], but `SplitDense` multiplies only the Fl feature rows of its
                 kernel at each location; latent 0's rows are per-volume work (below).
    patch_convs  the patch encoder's two 'same' k^3 convolutions of an S^3 patch (k = S), which the two
                 kernel sets execute differently:
                   'cpu'  one dense (S^3 Cin, S^3 Cout) matrix per layer (kernels/cpu/patch_conv.py):
                          S^3 x S^3 multiply-adds per channel pair, the matrix's zeros (voxel pairs the
                          kernel does not connect) included: for 7^3 patches 343 x 343 = 117,649, 2.3x
                          the taps that read the patch;
                   'xla'  a 3D convolution with zero padding (kernels/xla.py): the taps of each output
                          voxel that read inside the patch (37^3 = 50,653 for 7^3 patches), which is what
                          XLA's cost analysis counts; an implementation that also multiplies the padding
                          executes up to S^3 k^3, so on accelerators this is a lower bound.
    fourier      the random Fourier features' (3, F) product.
    output       the output layer.
    matmul       the sum of the four above: the work of matrix products and convolutions.
    elementwise  bias adds, conditional batch norm (x a + c: 2 per value), residual adds and the
                 activations (ACTIVATION_FLOPS per value). The location code, the sine and cosine of
                 the Fourier features and casts are not counted (a few FLOPs per location).
  per volume (`flops_per_volume`)
    latent 0's rows of the first block's Linear and shortcut (`SplitDense`), the conditional batch
    norms' gamma and beta (Linear maps of a latent) and their folding into x a + c.

`decoder_flops` is the forward's total, B (N flops_per_point + flops_per_volume), of one part:
'matmul', 'elementwise' or 'total'. A utilisation of a measured GEMM rate compares that rate with the
'matmul' part (benchmarks/throughput.py): the elementwise work runs in fused loops, not in GEMMs. The
encoder and the patch gathering are not part of the decoder's forward. bfloat16 adds casts, which are
not counted.

`official_flops_per_point` is the count of the official release's definition of the model (latent 0
at every location, the patch convolutions as S^3 x S^3 taps, no per-volume or elementwise work). It
is not what this code executes.
"""

import math
from typing import Optional

import ml_collections

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.data.labels import label_spec
from ossnet_jax.models.layers import spatial_shape_after

# elementwise operations per value as XLA counts the activations' formulas (kernels/xla.pau: P by
# Horner 5 + 5, Q's four terms 4 products with the coefficient, 4 abs, 4 adds and 3 powers, P / Q 1)
ACTIVATION_FLOPS = {"pau": 26, "relu": 1}


def latent_size(config: ml_collections.ConfigDict) -> int:
    """L, the values of one latent: the product of the encoder's last spatial shape (320 for BraTS)."""
    d = config.data
    grid = spatial_shape_after(tuple(d.grid_shape), d.downscale, len(config.model.encoder_channels))
    return math.prod(grid)


def decoder_input_width(config: ml_collections.ConfigDict) -> int:
    """Fin = location code (3 [+ 2 fourier]) + patch features (S^3 if patches) + latent 0 (L)."""
    return location_width(config) + latent_size(config)


def location_width(config: ml_collections.ConfigDict) -> int:
    """Fl = location code (3 [+ 2 fourier]) + patch features (S^3 if patches): the per-location part of
    the first decoder block's input."""
    m = config.model
    width = 3 + 2 * m.fourier_features
    if m.patches:
        width += m.patch_size**3
    return width


def _outputs(config: ml_collections.ConfigDict, outputs: Optional[int]) -> int:
    return label_spec(config.data).num_outputs if outputs is None else outputs


def _kernels(config: ml_collections.ConfigDict, kernels: Optional[str]) -> str:
    return kernel_sets.of_config(config) if kernels is None else kernel_sets.resolve(kernels)


def same_conv_taps(size: int, kernel: int) -> int:
    """Taps of a 'same' k^3 convolution on an S^3 patch, zero padded, that read inside the patch,
    summed over the S^3 output voxels (per input and output channel pair)."""
    c = kernel // 2
    per_axis = sum(min(o + kernel - c, size) - max(o - c, 0) for o in range(size))
    return per_axis**3


def _patch_channels(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(Cin, middle channels) of the patch encoder: C (2C with large patches) -> max(Cin / 2, 1) -> 1."""
    channels = config.data.num_channels * (2 if config.model.large_patches else 1)
    return channels, max(channels // 2, 1)


def flops_per_point(
    config: ml_collections.ConfigDict,
    outputs: Optional[int] = None,
    kernels: Optional[str] = None,
) -> dict[str, int]:
    """Forward FLOPs per location as executed: {'dense', 'patch_convs', 'fourier', 'output',
    'elementwise', 'total'} (ints; see the module docstring).

    outputs: logits per location, by default the config's label mode's. kernels: 'xla' or 'cpu' (or
    'auto'), by default the set config.model.kernels resolves to on this process's backend.
    """
    m = config.model
    kernels = _kernels(config, kernels)
    outputs = _outputs(config, outputs)
    w = m.decoder_width
    act = ACTIVATION_FLOPS[m.activation]
    fl, fin = location_width(config), decoder_input_width(config)
    dense = elementwise = 0
    for b in range(m.decoder_blocks):
        rows = fl if b == 0 else w  # rows of dense1 multiplied at each location
        width_in = fin if b == 0 else w
        dense += 2 * rows * w + 2 * w * w  # dense1, dense2
        # dense1 and dense2 bias (or SplitDense's per-volume term), two CBN x a + c, residual add, two
        # activations
        elementwise += w * (1 + 1 + 2 * 2 + 1 + 2 * act)
        if width_in != w:
            dense += 2 * rows * w  # shortcut
            elementwise += w  # its bias
    patch = 0
    if m.patches:
        cells = m.patch_size**3
        cin, middle = _patch_channels(config)
        taps = cells * cells if kernels == "cpu" else same_conv_taps(m.patch_size, m.patch_size)
        patch = 2 * taps * (cin * middle + middle * 1)
        elementwise += cells * (middle + 1) * (1 + act)  # bias add and activation of both layers
    fourier = 2 * 3 * m.fourier_features
    out = 2 * w * outputs
    matmul = dense + patch + fourier + out
    return {
        "dense": dense,
        "patch_convs": patch,
        "fourier": fourier,
        "output": out,
        "matmul": matmul,
        "elementwise": elementwise,
        "total": matmul + elementwise,
    }


def flops_per_volume(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Forward FLOPs done once per volume, {'matmul', 'elementwise', 'total'}: latent 0's product with
    the first block's Linear and shortcut (SplitDense), and each conditional batch norm's gamma and
    beta (Linear maps of a latent), with their bias adds and the folding into a = gamma / sqrt(var +
    eps), c = beta - mean a."""
    m = config.model
    w, lat = m.decoder_width, latent_size(config)
    split = 1 + (decoder_input_width(config) != w)  # dense1, and the shortcut unless it is the identity
    cbns = 2 * m.decoder_blocks
    matmul = (split + 2 * cbns) * 2 * lat * w
    elementwise = (split + 2 * cbns) * w + cbns * 3 * w
    return {"matmul": matmul, "elementwise": elementwise, "total": matmul + elementwise}


PARTS = ("matmul", "elementwise", "total")


def decoder_flops(
    config: ml_collections.ConfigDict,
    points: int,
    volumes: int = 1,
    outputs: Optional[int] = None,
    kernels: Optional[str] = None,
    part: str = "total",
) -> int:
    """FLOPs of one decoder forward (OSSNet.decode, evaluation mode) of `volumes` x `points` locations
    as the kernel set executes them: `part` 'matmul' (matrix products and convolutions),
    'elementwise' or 'total' (both; what XLA's cost analysis counts)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    per_point = flops_per_point(config, outputs, kernels)[part]
    return volumes * (points * per_point + flops_per_volume(config)[part])


def compiled_flops(compiled) -> float:
    """XLA's own FLOP count of a compiled program (`jax.jit(f).lower(...).compile()`): 'flops' of its
    cost analysis, a dict in current jax, a list of one dict per program in older versions. XLA counts
    the body of a loop once."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        return float(sum(a.get("flops", 0.0) for a in analysis))
    return float(analysis["flops"])


def official_flops_per_point(config: ml_collections.ConfigDict, outputs: int = 1) -> dict[str, int]:
    """{'cbn_blocks', 'patch_convs', 'output', 'total'}: the official release's count per location,
    for comparison only: the Linear layers with latent 0 at every location and the patch convolutions
    as S^3 x S^3 taps; no per-volume or elementwise work."""
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
        cin, middle = _patch_channels(config)
        patch = 2 * cells * cells * (cin * middle + middle * 1)
    out = 2 * w * outputs
    return {
        "cbn_blocks": blocks,
        "patch_convs": patch,
        "output": out,
        "total": blocks + patch + out,
    }
