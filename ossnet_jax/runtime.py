"""Process set-up that every entry point runs first, before any JAX computation.

The backend's process-level settings come from the kernel sets (ossnet_jax/kernels.prepare_process:
XLA:CPU flags and transparent huge pages on CPU hosts, nothing on accelerator hosts).
"""

from ossnet_jax import kernels


def prepare() -> None:
    """Backend settings of this process; may re-execute it (see kernels.prepare_process)."""
    kernels.prepare_process()
