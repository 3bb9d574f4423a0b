"""Data parallelism over the local devices with jax.sharding: the batch is split, parameters replicated.

The jitted train step is one program over the global batch; XLA partitions it along the mesh axis
"data", so batch-norm statistics, losses and gradients are those of the global batch (the result equals
the one-device step on the same batch, to float32 rounding).
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(batch_size: int, devices: Optional[list] = None) -> Optional[Mesh]:
    """A 1-D mesh over the devices that evenly divide `batch_size`; None for a single device.

    Uses the largest device count (a prefix of `devices`, default jax.local_devices()) that divides
    the batch, so a batch of 2 on 8 devices uses 2 of them rather than failing.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    if count == 1:
        return None
    return Mesh(np.array(devices[:count]), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
    """Places a pytree of (B, ...) host arrays split along B over `mesh` (unchanged without a mesh)."""
    if mesh is None:
        return batch
    return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Places a pytree on every device of `mesh` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))
