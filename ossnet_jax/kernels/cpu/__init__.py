"""The CPU kernel set: the operations of kernels/xla.py in the forms XLA:CPU runs fast.

ops.py gathers the operations: the same functions, signatures and results as kernels/xla.py (tests/test_kernels.py checks values and
gradients); selected by ossnet_jax/kernels/__init__.py only. Process set-up for the CPU backend (XLA:CPU
flags, transparent huge pages) lives in xla_flags.py and hostmem.py beside these.
"""
