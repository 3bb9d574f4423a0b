"""The CPU kernel set, as kernels.get('cpu') returns it: every function of kernels/xla.py's interface."""


from ossnet_jax.kernels import OPERATIONS

__all__ = list(OPERATIONS)  # the interface every kernel set provides
