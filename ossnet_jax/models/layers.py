"""Building blocks shared by the encoders and the decoder: PAU, conditional batch norm, residual 3D block.

Arrays are channels-last everywhere: volumes (B, X, Y, Z, C), location features (B, N, F).
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Least-squares fit of P(x) / (1 + |b1 x| + ... + |b4 x^4|) to leaky ReLU (slope 0.01) on [-3, 3];
# maximum error 0.03, RMS error 0.005 (see tests/test_layers.py).
PAU_INIT_NUMERATOR = (0.029803, 0.618385, 2.322323, 3.04922, 1.483393, 0.250562)
PAU_INIT_DENOMINATOR = (1.141535, 4.389166, -0.870326, 0.346548)

BN_MOMENTUM = 0.9  # running average keeps 90 %: PyTorch's momentum 0.1
BN_EPSILON = 1e-5


def pau(x: jax.Array, numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """Safe Pade activation unit: P(x) / (1 + sum_j |b_j x^j|), P of degree 5, Q of degree 4.

    Args:
      x: any shape.
      numerator: (6,) coefficients a0..a5 of P.
      denominator: (4,) coefficients b1..b4 of Q.
    """
    p = numerator[5]
    for a in numerator[4::-1]:
        p = p * x + a
    q = 1.0
    power = x
    for j in range(4):
        q = q + jnp.abs(denominator[j] * power)
        if j < 3:
            power = power * x
    return p / q


class PAU(nn.Module):
    """Learnable rational activation (Molina et al., ICLR 2020), one set of coefficients per layer."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        num = self.param("numerator", lambda _: jnp.asarray(PAU_INIT_NUMERATOR, jnp.float32))
        den = self.param("denominator", lambda _: jnp.asarray(PAU_INIT_DENOMINATOR, jnp.float32))
        return pau(x, num.astype(x.dtype), den.astype(x.dtype))


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


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine terms, then gamma(latent) * x + beta(latent).

    As in the official release, one mean and one variance are taken over all locations and all features
    of the batch (running averages at evaluation). gamma and beta are Linear maps of the latent
    initialised to the identity transform (zero weights; bias 1 and 0), so at initialisation this is
    plain normalisation.

    Attributes:
      features: F, the width of x.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, latent: jax.Array, train: bool) -> jax.Array:
        """x: (B, N, F) location features; latent: (B, L) per-volume condition. Returns (B, N, F)."""
        mean_var = self.variable("batch_stats", "mean", lambda: jnp.zeros((), jnp.float32))
        var_var = self.variable("batch_stats", "var", lambda: jnp.ones((), jnp.float32))
        if train:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32)
            var = jnp.mean(jnp.square(x32 - mean))
            if not self.is_initializing():
                mean_var.value = BN_MOMENTUM * mean_var.value + (1 - BN_MOMENTUM) * mean
                var_var.value = BN_MOMENTUM * var_var.value + (1 - BN_MOMENTUM) * var
        else:
            mean, var = mean_var.value, var_var.value
        scale = jax.lax.rsqrt(var + BN_EPSILON)
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
        x = (x - mean.astype(x.dtype)) * scale.astype(x.dtype)
        return x * gamma[:, None, :].astype(x.dtype) + beta[:, None, :].astype(x.dtype)


def avg_pool2(x: jax.Array) -> jax.Array:
    """Average pooling by 2 along every spatial axis of (B, X, Y, Z, C); X, Y, Z must be even."""
    return nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))


class ResidualBlock3D(nn.Module):
    """conv3^3 -> BN -> act -> avgpool2 -> dropout -> conv3^3 -> BN, plus a pooled (1^3 conv) shortcut.

    Halves every spatial axis: (B, X, Y, Z, Cin) -> (B, X/2, Y/2, Z/2, features).
    """

    features: int
    activation: str = "pau"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = make_activation(self.activation)
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
        )
        h = nn.Conv(self.features, (3, 3, 3), use_bias=False, name="conv1")(x)
        h = act(name="act1")(norm("bn1")(h))
        h = avg_pool2(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.features, (3, 3, 3), use_bias=False, name="conv2")(h)
        h = norm("bn2")(h)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = nn.Conv(self.features, (1, 1, 1), name="shortcut")(shortcut)
        return act(name="act2")(h + avg_pool2(shortcut))


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
