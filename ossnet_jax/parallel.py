"""Data parallelism over devices with jax.sharding: the batch is split, parameters replicated.

The jitted train step is one program over the global batch; XLA partitions it along the mesh axis
"data", so batch-norm statistics, losses and gradients are those of the global batch (the result equals
the one-device step on the same batch, to float32 rounding). With several processes (distributed.py)
the mesh spans the devices of every process, process p's devices holding the p-th contiguous block of
the batch, and each process supplies only that block.
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(batch_size: int, devices: Optional[list] = None) -> Optional[Mesh]:
    """A 1-D mesh splitting `batch_size` evenly; None for a single device of a single process.

    Each process contributes the same number c of its devices (a prefix of `devices`, default
    jax.local_devices(), on this process), the largest c for which the process's share of the batch,
    batch_size / jax.process_count(), divides by c: a batch of 2 on 8 devices uses 2 of them rather
    than failing. Raises ValueError if the batch does not divide by the process count.
    """
    processes = jax.process_count()
    if batch_size % processes:
        raise ValueError(
            f"train.batch_size {batch_size} must be a multiple of the {processes} processes"
        )
    local = list(jax.local_devices() if devices is None else devices)
    share = batch_size // processes
    count = max(n for n in range(1, len(local) + 1) if share % n == 0)
    if count * processes == 1:
        return None
    by_process: dict[int, list] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    by_process[jax.process_index()] = local
    chosen = [d for p in sorted(by_process) for d in by_process[p][:count]]
    return Mesh(np.array(chosen), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
    """The global batch, split along B over `mesh`, from this process's block of it (unchanged
    without a mesh).

    `batch` is a pytree of (B / processes, ...) host arrays: rows [p B / P, (p + 1) B / P) of the
    global batch for process p (the whole batch with one process).
    """
    if mesh is None:
        return batch
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Places a pytree on every device of `mesh` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def local_copy(tree: Any) -> Any:
    """This process's copy of a replicated pytree, on its first device holding it.

    For work only one process does on its own devices (validation); a view, no transfer.
    """
    return jax.tree.map(lambda leaf: leaf.addressable_data(0), tree)
