"""The CPU kernel set, as kernels.get('cpu') returns it: every function of kernels/xla.py's interface."""


from ossnet_jax.kernels.cpu.conv import conv3d
from ossnet_jax.kernels.cpu.noise import gaussian_noise
from ossnet_jax.kernels.cpu.norm import (
    avg_pool2,
    batch_norm_pau,
    batch_norm_train,
    conditional_batch_norm_train,
    conv_batch_norm_pau,
    mean_pool,
    pau,
    scale_shift,
)
from ossnet_jax.kernels.cpu.patch_conv import patch_conv
from ossnet_jax.kernels.cpu.recompute import recomputed
from ossnet_jax.kernels.cpu.search import searchsorted

__all__ = [
    "avg_pool2",
    "batch_norm_pau",
    "batch_norm_train",
    "conditional_batch_norm_train",
    "conv3d",
    "conv_batch_norm_pau",
    "gaussian_noise",
    "mean_pool",
    "patch_conv",
    "pau",
    "recomputed",
    "scale_shift",
    "searchsorted",
]
