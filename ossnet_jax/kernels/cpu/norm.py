"""CPU kernels of the normalisations, PAU and pooling: custom backward rules in the forms XLA:CPU runs fast.

Each function equals its namesake in kernels/xla.py (values and gradients, tests/test_kernels.py); the
backward rules take their sums in one pass, recompute instead of storing, and wait for the incoming
gradient (`_after_gradient`) so that XLA:CPU does not schedule backward work during the forward pass.
The techniques and their measurements are in docs/performance.md.
"""

import itertools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ossnet_jax.kernels import BN_EPSILON
from ossnet_jax.kernels.cpu.conv import conv3d
from ossnet_jax.kernels.cpu.recompute import after_gradient
from ossnet_jax.kernels.xla import pau_terms as _pau_terms

# The PAU backward's coefficient sums keep at least this many rows (leading values of x, or a reshape
# into rows): XLA:CPU reduces one row per thread, where a reduction to a scalar ran on one core
# (docs/performance.md, "PAU custom backward").
REDUCTION_ROWS = 16


def _sums_over(arrays: tuple[jax.Array, ...], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums of same-shaped float32 arrays over `axes`, as one variadic reduction (one pass)."""
    return jax.lax.reduce(
        arrays,
        tuple(jnp.zeros((), jnp.float32) for _ in arrays),
        lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)),
        axes,
    )


def _leading_axes(shape: tuple[int, ...]) -> int:
    """How many leading axes the PAU coefficient sums keep: the fewest whose sizes multiply to at least
    REDUCTION_ROWS, leaving at least one axis to reduce; 0 if there are none (then x is reshaped)."""
    rows = 1
    for k, n in enumerate(shape[:-1]):
        rows *= n
        if rows >= REDUCTION_ROWS:
            return k + 1
    return 0


@jax.custom_vjp
def pau(x: jax.Array, numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """Safe Pade activation unit: P(x) / (1 + sum_j |b_j x^j|), P of degree 5, Q of degree 4.

    The backward pass is hand-written so that the ten coefficient gradients are one variadic
    reduction (a single pass over x, accumulated in float32) instead of ten, over rows so that all
    cores work on it. The rows are x's leading axes where they hold REDUCTION_ROWS values or more, a
    reshape of x otherwise: with the reshape, the fused producers (pooling backward, batch norm) index
    x through a flat index, and the encoder's forward + backward ran slower (docs/performance.md).

    Args:
      x: any shape.
      numerator: (6,) coefficients a0..a5 of P.
      denominator: (4,) coefficients b1..b4 of Q.
    """
    p, q = _pau_terms(x, numerator, denominator)
    return p / q


def _pau_fwd(x, numerator, denominator):
    return pau(x, numerator, denominator), (x, numerator, denominator)


def _pau_input_grad(
    x: jax.Array, g: jax.Array, numerator: jax.Array, denominator: jax.Array
) -> tuple[jax.Array, list[jax.Array]]:
    """The PAU's gradient with respect to its input, and the ten float32 terms whose sums over all
    values are the coefficient gradients (a_0..a_5, then b_1..b_4); all shaped like x.

    d/dx = (P' - P Q' / Q) / Q; d/da_i = x^i / Q; d/db_j = -P / Q^2 s_j x^j, with s_j = sign(b_j x^j)
    and sign(0) = +1, the convention of JAX's derivative of |.|, so this equals autodiff of the formula
    everywhere, including x = 0 (zero-padded patches) and b_j = 0. The sign is folded into powers of
    |x|: s_j x^j = sign(b_j) |x|^j where b_j != 0 (x^j where b_j = 0), and Q' = sign(x) sum_j j |b_j|
    |x|^(j-1), with sign(0) = sign(b_1), the only term left at x = 0. Written as running products,
    the terms fuse into one loop over x and g; with the powers shared between the terms, signs and Q',
    XLA:CPU wrote x^3 and x^4 to memory first, a slower form (docs/performance.md).
    """
    p, q = _pau_terms(x, numerator, denominator)
    dp = 5.0 * numerator[5]
    for i in range(4, 0, -1):
        dp = dp * x + i * numerator[i]
    x32 = x.astype(jnp.float32)
    den32 = denominator.astype(jnp.float32)
    ax = jnp.abs(x32)
    magnitude = 4.0 * jnp.abs(den32[3])
    for j in range(2, -1, -1):
        magnitude = magnitude * ax + (j + 1) * jnp.abs(den32[j])
    sign_at_zero = jnp.where(den32[0] >= 0, 1.0, -1.0)
    sign = jnp.where(x32 > 0, 1.0, jnp.where(x32 < 0, -1.0, sign_at_zero))
    inv_q = 1.0 / q
    dx = g * (dp - p * inv_q * (sign * magnitude).astype(x.dtype)) * inv_q
    u = (g * inv_q).astype(jnp.float32)
    v = (-g * p * inv_q * inv_q).astype(jnp.float32)
    terms = [u]
    for _ in range(5):
        terms.append(terms[-1] * x32)  # u x^i
    signed, absolute = v, v
    for j in range(4):
        signed, absolute = signed * x32, absolute * ax  # v x^j, v |x|^j
        b_sign = jnp.where(den32[j] >= 0, 1.0, -1.0)
        terms.append(jnp.where(den32[j] == 0, signed, b_sign * absolute))
    return dx, terms


def _coefficient_sums(terms: list[jax.Array]) -> jax.Array:
    """(10,) float32 sums of `_pau_input_grad`'s terms, over rows so that all cores work on them."""
    keep = _leading_axes(terms[0].shape)
    if keep == 0:
        rows = math.gcd(terms[0].size, REDUCTION_ROWS)
        terms = [t.reshape(rows, -1) for t in terms]
        keep = 1
    row_sums = _sums_over(tuple(terms), tuple(range(keep, terms[0].ndim)))
    return jnp.stack([r.sum() for r in row_sums])


def _after_gradient(g: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """A backward rule's residuals, tied to its incoming gradient g (`after_gradient`).

    Every large value of the backward pass is then computable only once g exists. Untied, XLA:CPU
    computed the PAU's 1 / Q during the forward pass and kept it until the backward, at the update
    step's memory peak. Tying only the coefficients was worse: the backward's powers of x were then
    shared with the forward's and kept, so `pau` ties x as well (docs/performance.md, "Gradient
    ties").
    """
    return tuple(after_gradient(a, g) for a in arrays)


def _pau_bwd(residuals, g):
    x, numerator, denominator = _after_gradient(g, *residuals)
    dx, terms = _pau_input_grad(x, g, numerator, denominator)
    sums = _coefficient_sums(terms)
    return dx, sums[:6].astype(numerator.dtype), sums[6:].astype(denominator.dtype)


pau.defvjp(_pau_fwd, _pau_bwd)


def _cbn_affine(
    mean: jax.Array, inv: jax.Array, gamma: jax.Array, beta: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x - mean) inv gamma + beta as x a + c: a = inv gamma, c = beta - mean a, both (B, F)."""
    a = inv * gamma
    return a, beta - mean * a


def _location_sums(v: jax.Array) -> jax.Array:
    """(B, N, F) -> (B, F) float32 sums over the N locations, as a GEMV with ones (see scale_shift)."""
    ones = jnp.ones(v.shape[:2], v.dtype)
    return jnp.einsum("bn,bnf->bf", ones, v, preferred_element_type=jnp.float32)


@jax.custom_vjp
def conditional_batch_norm_train(
    x: jax.Array, gamma: jax.Array, beta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode conditional batch norm: one mean and variance over all of x, then gamma, beta.

    The backward pass is one pass over x and g for the input gradient, dx = g a + k1 x + k0 with
    per-volume a and scalar k0, k1, after two location sums; autodiff of the statistics added three
    contributions there, each a pass over memory (docs/performance.md, "Conditional batch norm").

    Args:
      x: (B, N, F) location features, any float dtype; statistics in float32.
      gamma, beta: (B, F) float32 per-volume scale and shift.
    Returns:
      (y (B, N, F) in x's dtype, mean (), biased variance ()), float32 statistics.
    """
    return _cbn_fwd(x, gamma, beta)[0]


def _cbn_fwd(x, gamma, beta):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32)
    var = jnp.mean(jnp.square(x32 - mean))
    inv = jax.lax.rsqrt(var + BN_EPSILON)
    a, c = _cbn_affine(mean, inv, gamma, beta)
    y = x * a[:, None, :].astype(x.dtype) + c[:, None, :].astype(x.dtype)
    return (y, mean, var), (x, gamma, mean, inv)


def _cbn_bwd(residuals, cotangents):
    x, gamma, mean, inv = residuals
    g, g_mean, g_var = cotangents
    gamma, mean, inv = _after_gradient(g, gamma, mean, inv)
    sum_g, sum_gx = _location_sums(g), _location_sums(g * x)  # (B, F)
    d_a = sum_gx - mean * sum_g  # sum over locations of g (x - mean)
    a = inv * gamma
    d_var = -0.5 * inv**3 * jnp.sum(gamma * d_a) + g_var
    d_mean = -jnp.sum(a * sum_g) + g_mean
    count = x.size
    k1 = 2.0 * d_var / count
    k0 = d_mean / count - k1 * mean
    dx = g * a[:, None, :].astype(g.dtype) + (k1 * x.astype(jnp.float32) + k0).astype(g.dtype)
    return dx, (inv * d_a).astype(gamma.dtype), sum_g.astype(gamma.dtype)


conditional_batch_norm_train.defvjp(_cbn_fwd, _cbn_bwd)


@jax.custom_vjp
def scale_shift(x: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
    """x * a + c per volume: x (B, N, F), a and c (B, F). Returns (B, N, F).

    The backward pass sums over the N locations with a product by a vector of ones, a GEMV, where
    XLA:CPU's own reduction over a non-minor axis ran many times slower (docs/performance.md).
    """
    return x * a[:, None, :] + c[:, None, :]


def _scale_shift_fwd(x, a, c):
    return scale_shift(x, a, c), (x, a)


def _scale_shift_bwd(residuals, g):
    x, a = residuals
    ones = jnp.ones(g.shape[:2], g.dtype)
    column_sums = lambda v: jnp.einsum("bn,bnf->bf", ones, v, preferred_element_type=jnp.float32)
    return g * a[:, None, :], column_sums(g * x).astype(a.dtype), column_sums(g).astype(a.dtype)


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def mean_pool(x: jax.Array, factor: int) -> jax.Array:
    """Mean over factor^3 cells of (B, X, Y, Z, C), each axis divisible by factor: (B, X/f, Y/f, Z/f, C).

    Equal to nn.avg_pool(x, (f, f, f), strides=(f, f, f)) up to float rounding, as a sum of the f^3
    strided slices, which XLA:CPU fuses into one pass, faster than its reduce-window
    (docs/performance.md). Used on the input volume (prepare_inputs).
    """
    if any(n % factor for n in x.shape[1:4]):
        raise ValueError(f"cannot mean-pool spatial shape {x.shape[1:4]} by {factor}")
    total = None
    for i, j, k in itertools.product(range(factor), repeat=3):
        cell = x[:, i::factor, j::factor, k::factor]
        total = cell if total is None else total + cell
    return total * jnp.asarray(1.0 / factor**3, x.dtype)


@jax.custom_vjp
def avg_pool2(x: jax.Array) -> jax.Array:
    """Average pooling by 2 along every spatial axis of (B, X, Y, Z, C); X, Y, Z must be even.

    The forward pass is a sum over the cell axes of a reshape: after encoder block 0's BN + PAU it
    runs faster than `mean_pool`'s strided slices, and as a reduction XLA:CPU does not fuse it into
    the pooled value's consumers, so the kernel gradient of the next convolution reads the pooled
    array instead of keeping the 8x larger PAU output. The backward pass spreads each gradient over
    its 2^3 cell as a broadcast, which XLA:CPU fuses into the consumer, where the transpose of the
    pooling window it derives itself is a slow padded, dilated reduce-window. Measurements:
    docs/performance.md, "`mean_pool` and `avg_pool2`".
    """
    if any(n % 2 for n in x.shape[1:4]):
        raise ValueError(f"avg_pool2 needs even spatial sizes, got {x.shape[1:4]}")
    b, nx, ny, nz, c = x.shape
    cells = x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c)
    return cells.sum((2, 4, 6)) * jnp.asarray(0.125, x.dtype)


def _avg_pool2_fwd(x):
    return avg_pool2(x), None


def _avg_pool2_bwd(_, g):
    b, nx, ny, nz, c = g.shape
    cells = jnp.broadcast_to(g[:, :, None, :, None, :, None, :], (b, nx, 2, ny, 2, nz, 2, c))
    return ((cells * jnp.asarray(0.125, g.dtype)).reshape(b, 2 * nx, 2 * ny, 2 * nz, c),)


avg_pool2.defvjp(_avg_pool2_fwd, _avg_pool2_bwd)


def _channel_sums(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Per-channel float32 sums of (B, X, ..., C) arrays over every axis but the last, in one pass.

    One variadic reduction that keeps the leading (B, X) axes as rows, then a small sum: XLA:CPU
    splits a reduction to (C,) into a tree of reduce-windows, one per statistic, slower than both
    this way (docs/performance.md, "One-pass batch norm").
    """
    arrays = tuple(a.astype(jnp.float32) for a in arrays)
    keep = min(2, arrays[0].ndim - 1)
    rows = _sums_over(arrays, tuple(range(keep, arrays[0].ndim - 1)))
    return tuple(r.reshape(-1, r.shape[-1]).sum(0) for r in rows)


@jax.custom_vjp
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over all axes of x but the last, as nn.BatchNorm computes it.

    Args:
      x: (B, X, ..., C), any float dtype; statistics in float32.
      scale, bias: (C,) float32.
    Returns:
      (y in x's dtype, batch mean (C,), biased batch variance (C,)): var = max(0, E[x^2] - E[x]^2).
    The backward pass takes its two per-channel sums (of g and g * x) in one pass as well.
    """
    return _batch_norm_fwd(x, scale, bias)[0]


def _normalise(
    x: jax.Array, mean: jax.Array, inv: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """(x - mean) * inv * scale + bias as one multiply-add per value, in x's dtype; the rest (C,)."""
    a = scale * inv
    return x * a.astype(x.dtype) + (bias - mean * a).astype(x.dtype)


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel batch mean, biased variance max(0, E[x^2] - E[x]^2) and 1 / sqrt(var + eps), (C,)
    float32 each, from one pass over x (B, X, ..., C)."""
    n = x.size // x.shape[-1]
    total, squares = _channel_sums((x, jnp.square(x.astype(jnp.float32))))
    mean = total / n
    var = jnp.maximum(squares / n - jnp.square(mean), 0.0)
    return mean, var, jax.lax.rsqrt(var + BN_EPSILON)


def _batch_norm_fwd(x, scale, bias):
    mean, var, inv = _statistics(x)
    return (_normalise(x, mean, inv, scale, bias), mean, var), (x, scale, mean, inv)


def _batch_norm_input_grad(
    x: jax.Array,
    g: jax.Array,
    g_mean: jax.Array,
    g_var: jax.Array,
    scale: jax.Array,
    mean: jax.Array,
    inv: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of training-mode batch norm with respect to x (x's shape and dtype), scale and bias
    ((C,) float32), given the gradient g of its output and the cotangents of the returned mean and
    variance.

    With x_hat = (x - m) r: d bias = sum g, d scale = sum g x_hat, d x = scale r (g - d bias / n -
    x_hat d scale / n), plus the cotangents of the mean (1/n) and variance (2 (x - m) / n). The two
    per-channel sums are one pass.
    """
    n = x.size // x.shape[-1]
    sum_g, sum_gx = _channel_sums((g, g.astype(jnp.float32) * x.astype(jnp.float32)))
    d_bias = sum_g
    d_scale = inv * (sum_gx - mean * sum_g)
    a = scale * inv
    # d x = a g + k1 x + k0 per channel: the normalisation terms folded into one multiply-add
    k1 = -a * inv * d_scale / n + 2.0 * g_var / n
    k0 = -a * d_bias / n - k1 * mean + g_mean / n
    dt = x.dtype
    dx = g.astype(dt) * a.astype(dt) + x * k1.astype(dt) + k0.astype(dt)
    return dx, d_scale, d_bias


def _batch_norm_bwd(residuals, cotangents):
    x, scale, mean, inv = residuals
    g, g_mean, g_var = cotangents
    dx, d_scale, d_bias = _batch_norm_input_grad(x, g, g_mean, g_var, scale, mean, inv)
    return dx, d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@jax.custom_vjp
def batch_norm_pau(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    numerator: jax.Array,
    denominator: jax.Array,
    shortcut: Optional[jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """pau(batch_norm_train(x) + shortcut) as one operation whose backward pass keeps only x.

    The normalised x is recomputed in the backward pass (one multiply-add per value) instead of being
    stored, which lowers the update step's compiled memory (docs/performance.md, "One-pass batch
    norm").

    Args:
      x: (B, X, ..., C), any float dtype; statistics in float32.
      scale, bias: (C,) float32 batch-norm parameters.
      numerator, denominator: (6,) and (4,) float32 PAU coefficients (cast to x's dtype to compute).
      shortcut: None, or an array of x's shape added after the normalisation.
    Returns:
      (y in x's dtype, batch mean (C,), biased batch variance (C,)), equal to batch_norm_train then
      `pau` (gradients included).
    """
    return _batch_norm_pau_fwd(x, scale, bias, numerator, denominator, shortcut)[0]


def _pau_input(x, mean, inv, scale, bias, shortcut):
    t = _normalise(x, mean, inv, scale, bias)
    return t if shortcut is None else t + shortcut.astype(t.dtype)


def _batch_norm_pau_fwd(x, scale, bias, numerator, denominator, shortcut):
    mean, var, inv = _statistics(x)
    t = _pau_input(x, mean, inv, scale, bias, shortcut)
    p, q = _pau_terms(t, numerator.astype(x.dtype), denominator.astype(x.dtype))
    residuals = (x, scale, bias, mean, inv, numerator, denominator, shortcut)
    return (p / q, mean, var), residuals


def _batch_norm_pau_bwd(residuals, cotangents):
    x, scale, bias, mean, inv, numerator, denominator, shortcut = residuals
    g, g_mean, g_var = cotangents
    scale, bias, mean, inv, numerator, denominator = _after_gradient(
        g, scale, bias, mean, inv, numerator, denominator
    )
    t = _pau_input(x, mean, inv, scale, bias, shortcut)
    dt, terms = _pau_input_grad(t, g, numerator.astype(x.dtype), denominator.astype(x.dtype))
    sums = _coefficient_sums(terms)
    dx, d_scale, d_bias = _batch_norm_input_grad(x, dt, g_mean, g_var, scale, mean, inv)
    d_shortcut = None if shortcut is None else dt.astype(shortcut.dtype)
    return (
        dx,
        d_scale.astype(scale.dtype),
        d_bias.astype(bias.dtype),
        sums[:6].astype(numerator.dtype),
        sums[6:].astype(denominator.dtype),
        d_shortcut,
    )


batch_norm_pau.defvjp(_batch_norm_pau_fwd, _batch_norm_pau_bwd)


@jax.custom_vjp
def conv_batch_norm_pau(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    numerator: jax.Array,
    denominator: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """batch_norm_pau(conv3d(x, kernel)) whose backward pass runs the convolution again.

    Only x and the kernel are kept, not the convolution's output: at the encoder's first layer that
    is 4 instead of 16 channels on the largest grid, less memory at the update step's peak for one
    more 4 -> 16 convolution per step (docs/performance.md, "One-pass batch norm").

    Args:
      x: (B, X, Y, Z, Cin), any float dtype.
      kernel: (k, k, k, Cin, C) in x's dtype; scale, bias, numerator, denominator as batch_norm_pau.
    Returns:
      as batch_norm_pau of the (B, X, Y, Z, C) convolution output.
    """
    return _conv_batch_norm_pau_fwd(x, kernel, scale, bias, numerator, denominator)[0]


def _conv_batch_norm_pau_fwd(x, kernel, scale, bias, numerator, denominator):
    h = conv3d(x, kernel)
    outputs, residuals = _batch_norm_pau_fwd(h, scale, bias, numerator, denominator, None)
    return outputs, (x, kernel) + residuals[1:]


def _conv_batch_norm_pau_bwd(residuals, cotangents):
    x, kernel = _after_gradient(cotangents[0], *residuals[:2])
    h, conv_vjp = jax.vjp(conv3d, x, kernel)
    dh, *rest = _batch_norm_pau_bwd((h,) + residuals[2:], cotangents)
    dx, d_kernel = conv_vjp(dh)
    return (dx, d_kernel, *rest[:-1])


conv_batch_norm_pau.defvjp(_conv_batch_norm_pau_fwd, _conv_batch_norm_pau_bwd)
