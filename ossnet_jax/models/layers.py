"""Building blocks shared by the encoders and the decoder: PAU, conditional batch norm, residual 3D block.

Arrays are channels-last everywhere: volumes (B, X, Y, Z, C), location features (B, N, F).
"""

import itertools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax.models.conv import Conv3D, conv3d_same
from ossnet_jax.models.recompute import after_gradient

# Least-squares fit of P(x) / (1 + |b1 x| + ... + |b4 x^4|) to leaky ReLU (slope 0.01) on [-3, 3];
# maximum error 0.03, RMS error 0.005 (see tests/test_layers.py).
PAU_INIT_NUMERATOR = (0.029803, 0.618385, 2.322323, 3.04922, 1.483393, 0.250562)
PAU_INIT_DENOMINATOR = (1.141535, 4.389166, -0.870326, 0.346548)

# The PAU backward's coefficient sums keep at least this many rows (leading values of x, or a reshape
# into rows): XLA:CPU reduces one row per thread, where a reduction to a scalar ran on one core
# (encoder block 0: 385 -> 219 ms).
REDUCTION_ROWS = 16

BN_MOMENTUM = 0.9  # running average keeps 90 %: PyTorch's momentum 0.1
BN_EPSILON = 1e-5


def _sums_over(arrays: tuple[jax.Array, ...], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums of same-shaped float32 arrays over `axes`, as one variadic reduction (one pass)."""
    return jax.lax.reduce(
        arrays,
        tuple(jnp.zeros((), jnp.float32) for _ in arrays),
        lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)),
        axes,
    )


def _pau_terms(
    x: jax.Array, numerator: jax.Array, denominator: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """P(x) and Q(x) = 1 + sum_j |b_j x^j| elementwise (Horner for P)."""
    p = numerator[5]
    for a in numerator[4::-1]:
        p = p * x + a
    q = 1.0
    power = x
    for j in range(4):
        q = q + jnp.abs(denominator[j] * power)
        if j < 3:
            power = power * x
    return p, q


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
    reduction (a single pass over x, accumulated in float32) instead of ten, over rows so that both
    cores work on it. The rows are x's leading axes where they hold REDUCTION_ROWS values or more, a
    reshape of x otherwise: with the reshape, the fused producers (pooling backward, batch norm) index
    x through a flat index, and the encoder's forward + backward ran ~5 % slower (benchmarks/NOTES.md).

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
    XLA:CPU wrote x^3 and x^4 to memory first (encoder block 0's sums 55 -> 27 ms on the 2-core CPU,
    benchmarks/NOTES.md).
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
    """(10,) float32 sums of `_pau_input_grad`'s terms, over rows so that both cores work on them."""
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
    computed the PAU's 1 / Q during the forward pass and kept it until the backward (five encoder
    layers, 120 MiB at OSS-Net C's update-step peak). Tying the coefficients alone was worse: the
    backward's powers of x were then shared with the forward's and kept (3D U-Net train step
    3,787 -> 4,766 MiB), so `pau` ties x as well (-> 2,961 MiB; benchmarks/NOTES.md).
    """
    return tuple(after_gradient(a, g) for a in arrays)


def _pau_bwd(residuals, g):
    x, numerator, denominator = _after_gradient(g, *residuals)
    dx, terms = _pau_input_grad(x, g, numerator, denominator)
    sums = _coefficient_sums(terms)
    return dx, sums[:6].astype(numerator.dtype), sums[6:].astype(denominator.dtype)


pau.defvjp(_pau_fwd, _pau_bwd)


class PAU(nn.Module):
    """Learnable rational activation (Molina et al., ICLR 2020), one set of coefficients per layer."""

    def setup(self):
        self.numerator = self.param(
            "numerator", lambda _: jnp.asarray(PAU_INIT_NUMERATOR, jnp.float32)
        )
        self.denominator = self.param(
            "denominator", lambda _: jnp.asarray(PAU_INIT_DENOMINATOR, jnp.float32)
        )

    def coefficients(self) -> tuple[jax.Array, jax.Array]:
        """The float32 parameters: numerator (6,) and denominator (4,)."""
        return self.numerator, self.denominator

    def __call__(self, x: jax.Array) -> jax.Array:
        return pau(x, self.numerator.astype(x.dtype), self.denominator.astype(x.dtype))


class ReLU(nn.Module):
    """ReLU as a module so both activations are built the same way."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


def make_activation(name: str) -> Callable[..., nn.Module]:
    """Returns the activation module class for 'pau' or 'relu'."""
    table = {"pau": PAU, "relu": ReLU}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


def over_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """fn applied to x (..., F) viewed as (rows, F), its (rows, G) result viewed as (..., G).

    For products of location features with a weight matrix: with several leading axes (volumes and
    locations) XLA:CPU takes the weight gradient as a product contracting two axes, which it
    canonicalises by writing the output gradient transposed, (G, rows); over a single row axis it
    contracts in place. At the decoder's sizes (2 x 4096 locations, 512 wide) that copy was a ~23 ms
    pass per layer, ~0.3 s of the OSS-Net C update step (benchmarks/NOTES.md).
    """
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine terms, then gamma(latent) * x + beta(latent).

    As in the official release, one mean and one variance are taken over all locations and all features
    of the batch (running averages at evaluation). gamma and beta are Linear maps of the latent
    initialised to the identity transform (zero weights; bias 1 and 0), so at initialisation this is
    plain normalisation.

    Attributes:
      features: F, the width of x.
      dtype: dtype of the output; statistics, gamma and beta are computed in float32.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latent: jax.Array, train: bool) -> jax.Array:
        """x: (B, N, F) location features; latent: (B, L) per-volume condition. Returns (B, N, F)."""
        mean_var = self.variable("batch_stats", "mean", lambda: jnp.zeros((), jnp.float32))
        var_var = self.variable("batch_stats", "var", lambda: jnp.ones((), jnp.float32))
        gamma = nn.Dense(
            self.features,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.ones,
            name="gamma",
        )(latent)
        beta = nn.Dense(
            self.features,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="beta",
        )(latent)
        x = x.astype(self.dtype)
        if train:
            y, mean, var = conditional_batch_norm_train(x, gamma, beta)
            if not self.is_initializing():
                mean_var.value = BN_MOMENTUM * mean_var.value + (1 - BN_MOMENTUM) * mean
                var_var.value = BN_MOMENTUM * var_var.value + (1 - BN_MOMENTUM) * var
            return y
        a, c = _cbn_affine(mean_var.value, jax.lax.rsqrt(var_var.value + BN_EPSILON), gamma, beta)
        return scale_shift(x, a.astype(self.dtype), c.astype(self.dtype))


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
    contributions there, each a pass over memory: OSS-Net C's decoder forward + backward at 8,192
    locations 0.88-0.92 -> 0.81-0.84 s on the 2-core CPU (benchmarks/NOTES.md).

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
    XLA:CPU's own reduction over a non-minor axis ran ~30x slower (benchmarks/NOTES.md).
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
    strided slices, which XLA:CPU fuses into one pass: 2 x 256 x 256 x 160 x 4 values in 16 ms against
    52 ms for its reduce-window (benchmarks/NOTES.md). Used on the input volume (prepare_inputs).
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

    The forward pass is a sum over the cell axes of a reshape: after encoder block 0's BN + PAU on
    2 x 128 x 128 x 80 x 16 it runs in 32 ms against 53 ms for `mean_pool`'s strided slices, and as a
    reduction XLA:CPU does not fuse it into the pooled value's consumers, so the kernel gradient of the
    next convolution reads the pooled array instead of keeping the 8x larger PAU output (OSS-Net C
    update step 851 -> 782 MiB; benchmarks/NOTES.md). The backward pass spreads each gradient over
    its 2^3 cell as a broadcast, which XLA:CPU fuses into the consumer; the transpose of the pooling
    window it derives itself took 253 ms at the encoder's first block (2 x 128 x 128 x 80 x 16) in the
    OSS-Net C update step (benchmarks/NOTES.md).
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
    splits a reduction to (C,) into a tree of reduce-windows, 2 x 51.8 ms for the two statistics of
    encoder block 0 (2 x 128 x 128 x 80 x 16) against 30.6 ms for both this way (benchmarks/NOTES.md).
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
    stored: with the PAU backward's new form, OSS-Net C's update step at 2^14 locations compiles to
    974.5 instead of 1,309.8 MiB (benchmarks/NOTES.md, twelfth run).

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
    """batch_norm_pau(conv3d_same(x, kernel)) whose backward pass runs the convolution again.

    Only x and the kernel are kept, not the convolution's output: at the encoder's first layer that
    is 4 instead of 16 channels on the largest grid (OSS-Net C update step at 2^14 locations
    781 -> 706 MiB, for one more 4 -> 16 convolution, ~105 ms on 2 volumes: the update step of
    2 x 4096 locations took 0.05-0.13 s longer in alternating runs on the 2-core CPU;
    benchmarks/NOTES.md).

    Args:
      x: (B, X, Y, Z, Cin), any float dtype.
      kernel: (k, k, k, Cin, C) in x's dtype; scale, bias, numerator, denominator as batch_norm_pau.
    Returns:
      as batch_norm_pau of the (B, X, Y, Z, C) convolution output.
    """
    return _conv_batch_norm_pau_fwd(x, kernel, scale, bias, numerator, denominator)[0]


def _conv_batch_norm_pau_fwd(x, kernel, scale, bias, numerator, denominator):
    h = conv3d_same(x, kernel)
    outputs, residuals = _batch_norm_pau_fwd(h, scale, bias, numerator, denominator, None)
    return outputs, (x, kernel) + residuals[1:]


def _conv_batch_norm_pau_bwd(residuals, cotangents):
    x, kernel = _after_gradient(cotangents[0], *residuals[:2])
    h, conv_vjp = jax.vjp(conv3d_same, x, kernel)
    dh, *rest = _batch_norm_pau_bwd((h,) + residuals[2:], cotangents)
    dx, d_kernel = conv_vjp(dh)
    return (dx, d_kernel, *rest[:-1])


conv_batch_norm_pau.defvjp(_conv_batch_norm_pau_fwd, _conv_batch_norm_pau_bwd)


class BatchNorm(nn.Module):
    """nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON) over all axes but the last, with its
    variables ('scale', 'bias'; batch_stats 'mean', 'var'), so checkpoints are interchangeable.

    Training uses `batch_norm_train` (one pass for the statistics, one for the gradient's sums), or
    `batch_norm_pau` when a PAU follows.

    Attributes:
      dtype: dtype of the output (statistics and parameters float32).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool,
        activation: Optional[nn.Module] = None,
        shortcut: Optional[jax.Array] = None,
        kernel: Optional[jax.Array] = None,
    ) -> jax.Array:
        """x: (B, X, ..., C). Returns activation(normalised x + shortcut), same shape, in `dtype`.

        activation (a module of the caller, e.g. PAU or ReLU) and shortcut (x's shape) are optional.
        A PAU in training runs fused with the normalisation (`batch_norm_pau`), which stores only x
        for the backward pass; its parameters stay the PAU module's. With a (k, k, k, Cin, C) kernel
        (a Conv3D's `parameters`), x is that convolution's (B, X, Y, Z, Cin) input; with a PAU in
        training it runs inside `conv_batch_norm_pau`, which stores x instead of its output.
        """
        if kernel is not None:
            kernel = kernel.astype(self.dtype)
            if not (train and isinstance(activation, PAU) and shortcut is None):
                x, kernel = conv3d_same(x.astype(self.dtype), kernel), None
        c = x.shape[-1] if kernel is None else kernel.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(self.dtype)
        shortcut = None if shortcut is None else shortcut.astype(self.dtype)
        if kernel is not None:
            y, mean, var = conv_batch_norm_pau(x, kernel, scale, bias, *activation.coefficients())
        elif train and isinstance(activation, PAU):
            y, mean, var = batch_norm_pau(x, scale, bias, *activation.coefficients(), shortcut)
        else:
            if train:
                y, mean, var = batch_norm_train(x, scale, bias)
            else:
                inv = jax.lax.rsqrt(ra_var.value + BN_EPSILON)
                y = _normalise(x, ra_mean.value, inv, scale, bias)
            y = y if shortcut is None else y + shortcut
            y = y if activation is None else activation(y)
        if train and not self.is_initializing():
            ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
            ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var
        return y


class ResidualBlock3D(nn.Module):
    """conv3^3 -> BN -> act -> avgpool2 -> dropout -> conv3^3 -> BN, plus a pooled (1^3 conv) shortcut,
    -> act. In training a PAU runs fused with the BN before it (`batch_norm_pau`).

    Halves every spatial axis: (B, X, Y, Z, Cin) -> (B, X/2, Y/2, Z/2, features), computed in `dtype`
    (BatchNorm statistics in float32).
    """

    features: int
    activation: str = "pau"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    # training: run conv1 again in the backward pass instead of storing its output (`BatchNorm`'s kernel)
    recompute_conv1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = make_activation(self.activation)

        def norm_act(name: str, h: jax.Array, act_name: str, shortcut=None, kernel=None):
            return BatchNorm(self.dtype, name=name)(h, train, act(name=act_name), shortcut, kernel)

        conv1 = Conv3D(self.features, 3, use_bias=False, dtype=self.dtype, name="conv1")
        if self.recompute_conv1 and train:
            h = norm_act("bn1", x, "act1", kernel=conv1.parameters(x.shape[-1])[0])
        else:
            h = norm_act("bn1", conv1(x), "act1")
        # training: a reshape-sum forward, broadcast backward (avg_pool2); evaluation: XLA's
        # reduce-window, which pools the activation without a temporary (LiTS encoder pass
        # 2,066 -> 1,810 MiB)
        pool = avg_pool2 if train else lambda v: nn.avg_pool(v, (2, 2, 2), strides=(2, 2, 2))
        h = pool(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv3D(self.features, 3, use_bias=False, dtype=self.dtype, name="conv2")(h)
        # pooling and the 1^3 convolution commute; pooling the narrower input first moves 4x less data
        # at the first block (measured: update step of OSS-Net C -0.4 s, benchmarks/NOTES.md)
        shortcut = pool(x)
        if x.shape[-1] != self.features:
            shortcut = Conv3D(self.features, 1, dtype=self.dtype, name="shortcut")(shortcut)
        return norm_act("bn2", h, "act2", shortcut)


def spatial_shape_after(
    grid_shape: tuple[int, ...], downscale: int, blocks: int
) -> tuple[int, ...]:
    """Spatial shape of the encoder's last block for a full-resolution grid; checks divisibility."""
    factor = downscale * 2**blocks
    if any(s % factor for s in grid_shape):
        raise ValueError(
            f"data.grid_shape {tuple(grid_shape)} must be divisible by downscale x 2^blocks"
            f" = {factor} along every axis"
        )
    return tuple(int(s) // factor for s in grid_shape)
