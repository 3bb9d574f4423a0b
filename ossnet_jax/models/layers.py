"""Building blocks shared by the encoders, the decoder and the U-Nets: PAU, batch norms, 3D convolution,
residual block.

Arrays are channels-last everywhere: volumes (B, X, Y, Z, C), slices (B, X, Y, C), location features
(B, N, F).

Every module takes `kernels`, the resolved kernel set ('xla' or 'cpu', see ossnet_jax/kernels): the
arithmetic of each operation is the kernel set's function of the same name, whose plain form is
kernels/xla.py. Parameter and statistics names and shapes do not depend on it (nn.Conv's and
nn.BatchNorm's), so checkpoints move between kernel sets.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.errors import ConfigError
from ossnet_jax.kernels import BN_EPSILON

# Least-squares fit of P(x) / (1 + |b1 x| + ... + |b4 x^4|) to leaky ReLU (slope 0.01) on [-3, 3];
# maximum error 0.03, RMS error 0.005 (see tests/test_layers.py).
PAU_INIT_NUMERATOR = (0.029803, 0.618385, 2.322323, 3.04922, 1.483393, 0.250562)
PAU_INIT_DENOMINATOR = (1.141535, 4.389166, -0.870326, 0.346548)

BN_MOMENTUM = 0.9  # running average keeps 90 %: PyTorch's momentum 0.1

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "BatchNorm",
    "ConditionalBatchNorm",
    "Conv3D",
    "PAU",
    "ReLU",
    "ResidualBlock",
    "make_activation",
    "over_rows",
    "spatial_shape_after",
]


class PAU(nn.Module):
    """Learnable rational activation (Molina et al., ICLR 2020), one set of coefficients per layer:
    P(x) / (1 + sum_j |b_j x^j|), P of degree 5 (numerator a_0..a_5), Q of degree 4 (b_1..b_4)."""

    kernels: str = "xla"

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
        ops = kernel_sets.get(self.kernels)
        return ops.pau(x, self.numerator.astype(x.dtype), self.denominator.astype(x.dtype))


class ReLU(nn.Module):
    """ReLU as a module so both activations are built the same way."""

    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


def make_activation(name: str) -> Callable[..., nn.Module]:
    """Returns the activation module class for 'pau' or 'relu'."""
    table = {"pau": PAU, "relu": ReLU}
    if name not in table:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


def over_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """fn applied to x (..., F) viewed as (rows, F), its (rows, G) result viewed as (..., G).

    For products of location features with a weight matrix: one row axis lets the weight gradient
    contract in place instead of over two axes.
    """
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Conv3D(nn.Module):
    """nn.Conv(features, (k, k, k), padding='SAME') on (B, X, Y, Z, Cin), through the kernel set.

    Parameters 'kernel' (k, k, k, Cin, features) and 'bias' (features,) as nn.Conv, float32; the
    computation runs in `dtype`.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def parameters(self, in_features: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """The float32 kernel (k, k, k, Cin, features) and bias (features,) or None, without running
        the convolution: for callers that fuse it into another operation."""
        shape = (self.kernel_size,) * 3 + (in_features, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, X, Y, Z, Cin) -> (B, X, Y, Z, features) in `dtype`."""
        kernel, bias = self.parameters(x.shape[-1])
        ops = kernel_sets.get(self.kernels)
        y = ops.conv3d(x.astype(self.dtype), kernel.astype(self.dtype))
        return y if bias is None else y + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON) over all axes but the last, with its
    variables ('scale', 'bias'; batch_stats 'mean', 'var'), so checkpoints are interchangeable.

    Optionally followed by a shortcut (added) and an activation, and preceded by a 3D convolution;
    a PAU in training is applied with the normalisation as one kernel-set operation
    (`batch_norm_pau`, `conv_batch_norm_pau`), which the CPU kernels fuse.

    Attributes:
      dtype: dtype of the output (statistics and parameters float32).
    """

    dtype: Any = jnp.float32
    kernels: str = "xla"

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
        With a (k, k, k, Cin, C) kernel (a Conv3D's `parameters`), x is that convolution's
        (B, X, Y, Z, Cin) input; with a PAU in training the convolution is recomputed in the backward
        pass (`conv_batch_norm_pau`) instead of storing its output.
        """
        ops = kernel_sets.get(self.kernels)
        fused = train and isinstance(activation, PAU)
        if kernel is not None:
            kernel = kernel.astype(self.dtype)
            if not (fused and shortcut is None):
                x, kernel = ops.conv3d(x.astype(self.dtype), kernel), None
        c = x.shape[-1] if kernel is None else kernel.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(self.dtype)
        shortcut = None if shortcut is None else shortcut.astype(self.dtype)
        if kernel is not None:
            y, mean, var = ops.conv_batch_norm_pau(x, kernel, scale, bias, *activation.coefficients())
        elif fused:
            y, mean, var = ops.batch_norm_pau(x, scale, bias, *activation.coefficients(), shortcut)
        else:
            if train:
                y, mean, var = ops.batch_norm_train(x, scale, bias)
            else:
                inv = jax.lax.rsqrt(ra_var.value + BN_EPSILON)
                y = ((x - ra_mean.value) * inv * scale + bias).astype(self.dtype)
            y = y if shortcut is None else y + shortcut
            y = y if activation is None else activation(y)
        if train and not self.is_initializing():
            ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
            ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var
        return y


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
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, latent: jax.Array, train: bool) -> jax.Array:
        """x: (B, N, F) location features; latent: (B, L) per-volume condition. Returns (B, N, F)."""
        ops = kernel_sets.get(self.kernels)
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
            y, mean, var = ops.conditional_batch_norm_train(x, gamma, beta)
            if not self.is_initializing():
                mean_var.value = BN_MOMENTUM * mean_var.value + (1 - BN_MOMENTUM) * mean
                var_var.value = BN_MOMENTUM * var_var.value + (1 - BN_MOMENTUM) * var
            return y
        a = jax.lax.rsqrt(var_var.value + BN_EPSILON) * gamma  # (B, F): x a + c
        c = beta - mean_var.value * a
        return ops.scale_shift(x, a.astype(self.dtype), c.astype(self.dtype))


class ResidualBlock(nn.Module):
    """conv3 -> BN -> act -> avgpool2 -> dropout -> conv3 -> BN, plus a pooled (1-conv) shortcut, -> act:
    OSS-Net's encoder block and the U-Nets' residual unit.

    The rank comes from the input: (B, X, Y, Z, Cin) convolves 3^3 through the kernel set's Conv3D,
    (B, X, Y, Cin) 3^2 through nn.Conv; the variables are nn.Conv's and nn.BatchNorm's either way:
    conv1/kernel (3, .., Cin, features), conv2/kernel (3, .., features, features), bn1 and bn2
    (scale, bias; batch_stats mean, var, (features,)), shortcut/kernel (1, .., Cin, features) and
    shortcut/bias (features,) where Cin != features, act1 and act2 (a PAU's coefficients).

    With `downsample`, every spatial axis is halved (each must be even): (B, *S, Cin) ->
    (B, *S/2, features); without, (B, *S, Cin) -> (B, *S, features). Computed in `dtype` (BatchNorm
    statistics in float32).
    """

    features: int
    activation: str = "pau"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = "xla"
    # training: run conv1 again in the backward pass instead of storing its output (`BatchNorm`'s
    # kernel); 3D inputs only
    recompute_conv1: bool = False
    downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        rank = x.ndim - 2
        if rank not in (2, 3):
            raise ValueError(f"expected a (B, X, Y[, Z], C) input, got shape {x.shape}")
        if self.recompute_conv1 and rank != 3:
            raise ValueError("recompute_conv1 needs a 3D input (the kernel set's conv3d)")
        ops = kernel_sets.get(self.kernels)
        act = make_activation(self.activation)

        def norm_act(name: str, h: jax.Array, act_name: str, shortcut=None, kernel=None):
            return BatchNorm(self.dtype, self.kernels, name=name)(
                h, train, act(self.kernels, name=act_name), shortcut, kernel
            )

        def conv(features: int, size: int, name: str, use_bias: bool = False) -> nn.Module:
            if rank == 3:
                return Conv3D(features, size, use_bias, self.dtype, self.kernels, name=name)
            return nn.Conv(features, (size,) * rank, use_bias=use_bias, dtype=self.dtype, name=name)

        def pool(v: jax.Array) -> jax.Array:
            if not self.downsample:
                return v
            if rank == 3 and train:
                return ops.avg_pool2(v)
            return nn.avg_pool(v, (2,) * rank, strides=(2,) * rank)

        conv1 = conv(self.features, 3, "conv1")
        if self.recompute_conv1 and train:
            h = norm_act("bn1", x, "act1", kernel=conv1.parameters(x.shape[-1])[0])
        else:
            h = norm_act("bn1", conv1(x), "act1")
        h = pool(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.features, 3, "conv2")(h)
        # pooling and the 1^k convolution commute: pooling the narrower input first moves less data
        shortcut = pool(x)
        if x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, "shortcut", use_bias=True)(shortcut)
        return norm_act("bn2", h, "act2", shortcut)


def spatial_shape_after(
    grid_shape: tuple[int, ...], downscale: int, blocks: int
) -> tuple[int, ...]:
    """Spatial shape of the encoder's last block for a full-resolution grid; checks divisibility."""
    factor = downscale * 2**blocks
    if any(s % factor for s in grid_shape):
        raise ConfigError(
            f"data.grid_shape {tuple(grid_shape)} must be divisible by downscale x 2^blocks"
            f" = {factor} along every axis"
        )
    return tuple(int(s) // factor for s in grid_shape)
