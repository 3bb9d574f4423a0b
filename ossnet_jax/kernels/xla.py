"""The plain formulation of the operations the models share: what GPUs and TPUs run.

Each function is the textbook form, differentiated by JAX's autodiff: 3D convolutions are one
`lax.conv_general_dilated`, batch norm follows nn.BatchNorm's semantics, PAU and conditional batch norm
are jnp expressions, recomputation is `jax.checkpoint` / `nn.checkpoint`, noise is `jax.random.normal`.
XLA's GPU and TPU compilers map these onto cuDNN / the TPU convolution emitter and fuse the rest.

The CPU kernel set (kernels/cpu/) provides the same functions with the same signatures and results;
tests/test_kernels.py checks every one against this module, values and gradients.

Arrays are channels-last: volumes (B, X, Y, Z, C), location features (B, N, F).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax.kernels import BN_EPSILON


def conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel, k odd.

    Returns (B, X, Y, Z, Cout) in x's dtype (nn.Conv's convention, NDHWC / DHWIO).
    """
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


def pau_terms(
    x: jax.Array, numerator: jax.Array, denominator: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """P(x) = sum_i a_i x^i (degree 5) and Q(x) = 1 + sum_j |b_j x^j| (j = 1..4), elementwise."""
    p = numerator[5]
    for a in numerator[4::-1]:
        p = p * x + a
    q = 1.0
    power = x
    for j in range(4):
        q = q + jnp.abs(denominator[j] * power)
        power = power * x
    return p, q


def _per_value(coefficients: jax.Array, x: jax.Array) -> list[jax.Array]:
    """Each coefficient as an array of x's shape and dtype, broadcast in float32 and then cast: the
    gradient of a coefficient is a sum over all of x, and autodiff takes it in the broadcast's dtype
    (in bfloat16 that sum lost the coefficient gradients; tests/test_mixed_precision.py)."""
    wide = coefficients.astype(jnp.float32)
    return [jnp.broadcast_to(wide[i], x.shape).astype(x.dtype) for i in range(wide.shape[0])]


def pau(x: jax.Array, numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """Safe Pade activation unit P(x) / Q(x) (Molina et al., ICLR 2020) of any shape.

    numerator: (6,) a_0..a_5; denominator: (4,) b_1..b_4, both in x's dtype. Computed in x's dtype;
    the coefficient gradients are accumulated in float32 (`_per_value`).
    """
    p, q = pau_terms(x, _per_value(numerator, x), _per_value(denominator, x))
    return p / q


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance max(0, E[x^2] - E[x]^2) of (B, X, ..., C) over every axis
    but the last, in float32 (nn.BatchNorm's statistics). Returns two (C,) arrays."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axes)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
    return mean, var


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm of (B, X, ..., C) with the batch's statistics.

    scale, bias: (C,) float32. Returns (y in x's dtype, batch mean (C,), biased variance (C,)).
    """
    mean, var = batch_statistics(x)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + bias
    return y.astype(x.dtype), mean, var


def batch_norm_pau(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    numerator: jax.Array,
    denominator: jax.Array,
    shortcut: Optional[jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """pau(batch_norm_train(x) + shortcut): (y, batch mean (C,), biased variance (C,)).

    numerator, denominator: float32 PAU coefficients, applied in x's dtype; shortcut: None or x's shape.
    """
    y, mean, var = batch_norm_train(x, scale, bias)
    if shortcut is not None:
        y = y + shortcut.astype(y.dtype)
    return pau(y, numerator.astype(y.dtype), denominator.astype(y.dtype)), mean, var


def _conv_batch_norm_pau(x, kernel, scale, bias, numerator, denominator):
    return batch_norm_pau(conv3d(x, kernel), scale, bias, numerator, denominator, None)


# Only the inputs are kept for the backward pass, where the convolution runs again (train.remat 'all').
_conv_batch_norm_pau_remat = jax.checkpoint(_conv_batch_norm_pau)


def conv_batch_norm_pau(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    numerator: jax.Array,
    denominator: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """batch_norm_pau(conv3d(x, kernel)), recomputed in the backward pass (jax.checkpoint).

    x: (B, X, Y, Z, Cin); kernel: (k, k, k, Cin, C) in x's dtype. Returns as batch_norm_pau.
    """
    return _conv_batch_norm_pau_remat(x, kernel, scale, bias, numerator, denominator)


def conditional_batch_norm_train(
    x: jax.Array, gamma: jax.Array, beta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode conditional batch norm: one mean and variance over all of x, then per volume
    gamma * x_hat + beta.

    x: (B, N, F); gamma, beta: (B, F) float32. Returns (y (B, N, F) in x's dtype, mean (), biased
    variance ()), float32 statistics.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32)
    var = jnp.mean(jnp.square(x32 - mean))
    y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPSILON) * gamma[:, None, :] + beta[:, None, :]
    return y.astype(x.dtype), mean, var


def scale_shift(x: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
    """x * a + c per volume: x (B, N, F), a and c (B, F). Returns (B, N, F)."""
    return x * a[:, None, :] + c[:, None, :]


def mean_pool(x: jax.Array, factor: int) -> jax.Array:
    """Mean over factor^3 cells of (B, X, Y, Z, C): (B, X/f, Y/f, Z/f, C); each axis divisible by f."""
    if any(n % factor for n in x.shape[1:4]):
        raise ValueError(f"cannot mean-pool spatial shape {x.shape[1:4]} by {factor}")
    return nn.avg_pool(x, (factor,) * 3, strides=(factor,) * 3)


def avg_pool2(x: jax.Array) -> jax.Array:
    """Mean over 2^3 cells of (B, X, Y, Z, C) with even X, Y, Z: (B, X/2, Y/2, Z/2, C)."""
    if any(n % 2 for n in x.shape[1:4]):
        raise ValueError(f"avg_pool2 needs even spatial sizes, got {x.shape[1:4]}")
    return mean_pool(x, 2)


def recomputed(
    module: nn.Module, call: Callable[..., jax.Array], x: jax.Array, *rest: Any
) -> jax.Array:
    """call(module, x, *rest), storing only its inputs and variables for the backward pass, where it
    runs again (nn.checkpoint). Collections other than 'params' (batch-norm statistics) are updated
    by the forward pass."""
    return nn.checkpoint(call)(module, x, *rest)


def gaussian_noise(key: jax.Array, x: jax.Array, std: float) -> jax.Array:
    """x + std * z with z standard normal (float32, jax.random.normal); x's shape and dtype."""
    return x + std * jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)


def searchsorted(a: jax.Array, v: jax.Array, side: str = "left") -> jax.Array:
    """Insertion indices of v (any shape) in the sorted 1-D a, as jnp.searchsorted, with an unrolled
    binary search (method 'scan_unrolled', no while loop)."""
    return jnp.searchsorted(a, v, side=side, method="scan_unrolled")


def patch_conv(x: jax.Array, kernel: jax.Array, size: int) -> jax.Array:
    """'same' k^3 convolution of flattened S^3 patches: (..., S^3 Cin) -> (..., S^3 Cout).

    Each patch (flattened row-major from (S, S, S, Cin)) is convolved on its own, zero outside it.
    kernel: (k, k, k, Cin, Cout) in x's dtype.
    """
    cin = kernel.shape[3]
    lead = x.shape[:-1]
    patches = x.reshape(-1, size, size, size, cin)
    y = conv3d(patches, kernel)
    return y.reshape(*lead, size**3 * kernel.shape[4])
