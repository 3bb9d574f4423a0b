"""Which formulation of the shared operations runs: the one place that reads the backend.

  'xla'  kernels/xla.py: the plain formulation (3D convolutions, autodiff, jax.checkpoint,
         jax.random). What GPUs and TPUs run, and the reference every other form is tested against.
  'cpu'  kernels/cpu/: the same operations in the forms XLA:CPU runs fast (folded and slab
         convolutions, hand-written backward rules, a hand-written threefry), plus the process set-up
         of the CPU backend (XLA:CPU flags, transparent huge pages).
  'auto' 'cpu' on the CPU backend, 'xla' on every other (config.model.kernels' default).

A model resolves its kernel set once, when it is built (`resolve`), and its modules call the functions
of `get(name)`. Both sets take the same parameters, so a checkpoint trained with one evaluates with the
other. Nothing else imports kernels.cpu.
"""

import importlib
import importlib.metadata
import os
from types import ModuleType
from typing import Any, Optional

from ossnet_jax.errors import ConfigError

BN_EPSILON = 1e-5  # batch norm and conditional batch norm, as PyTorch and nn.BatchNorm
NAMES = ("auto", "xla", "cpu")
OPERATIONS = (
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
)
# distributions that bring a JAX accelerator backend (PJRT plugins and libtpu)
_ACCELERATOR_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")

__all__ = ["BN_EPSILON", "NAMES", "OPERATIONS", "get", "of_config", "prepare_process", "resolve"]


def resolve(name: str = "auto", platform: Optional[str] = None) -> str:
    """'xla' or 'cpu' for a model.kernels value; 'auto' picks 'cpu' where `platform` (by default
    jax.default_backend()) is 'cpu'. ValueError for anything but NAMES."""
    if name not in NAMES:
        raise ConfigError(f"model.kernels must be one of {NAMES}, got {name!r}")
    if name != "auto":
        return name
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "cpu" if platform == "cpu" else "xla"


def of_config(config: Any) -> str:
    """The resolved kernel set of a run's config: config.model.kernels, 'auto' where the key is absent
    (configs written before it existed)."""
    return resolve(config.model.get("kernels", "auto"))


def get(name: str = "auto") -> ModuleType:
    """The kernel set of a model.kernels value: a module with every function in OPERATIONS."""
    module = {"xla": "ossnet_jax.kernels.xla", "cpu": "ossnet_jax.kernels.cpu.ops"}[resolve(name)]
    return importlib.import_module(module)


def _expects_accelerator(environ: dict[str, str]) -> bool:
    """Whether JAX will run on an accelerator here, judged without starting a backend: JAX_PLATFORMS
    when set (its first entry), otherwise whether an accelerator plugin or libtpu is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().startswith(_ACCELERATOR_PREFIXES) for n in names)


def prepare_process() -> None:
    """Process set-up of the CPU backend, called first by every entry point (before any JAX
    computation): XLA:CPU's flags, then a re-execution with transparent huge pages where they apply
    (it does not return then). Does nothing where JAX will run on an accelerator."""
    if _expects_accelerator(dict(os.environ)):
        return
    from ossnet_jax.kernels.cpu import hostmem, xla_flags

    xla_flags.configure()
    hostmem.relaunch_with_huge_pages()
