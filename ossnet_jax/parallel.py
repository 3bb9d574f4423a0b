"""Data and location parallelism over devices with jax.sharding: a ('data', 'points') mesh.

The batch is split along the mesh axis 'data'; when the batch leaves devices idle, the N sampled
locations of each volume are split along 'points' too: the per-location inputs of an update
('locations' (B, N, 3), 'index' (B, N), 'patches' (B, N, S, S, S, C)) over ('data', 'points'), the
volume-sized ones ('low', 'coarse') over 'data' only (whole on every 'points' device). Parameters
and optimizer state are replicated. The jitted step is one program over the global batch that XLA
partitions, so batch-norm and conditional batch-norm statistics, losses and gradients are those of
the global batch: the result equals the one-device step on the same batch, to float32 rounding.
With several processes (distributed.py) the mesh spans the devices of every process, process p's
devices holding the p-th contiguous block of the batch, and each process supplies only that block.
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ossnet_jax.errors import ConfigError

AXIS = "data"  # splits the batch
POINTS_AXIS = "points"  # splits each volume's sampled locations
# prepare_inputs' arrays with a location axis 1 (B, N, ...); its other outputs are per volume.
POINT_KEYS = frozenset({"locations", "index", "patches"})


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n >= 1 that is <= at_most >= 1."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def data_mesh(
    batch_size: int,
    devices: Optional[list] = None,
    *,
    num_points: int = 0,
    points_devices: int = 1,
) -> Optional[Mesh]:
    """A ('data', 'points') mesh for a global batch of `batch_size` volumes with `num_points`
    locations each; None for a single device of a single process.

    Each process contributes the same devices: `d * p` of its own (a prefix of `devices`, default
    jax.local_devices(), on this process), a d x p block of the mesh: its share of the batch,
    batch_size / jax.process_count(), split over d rows, each volume's locations over p columns.

    Args:
      batch_size: the global batch B.
      devices: this process's devices to use; default jax.local_devices().
      num_points: N, the locations of each volume (0 where there are none: then p is 1).
      points_devices: p: 1 splits the batch only (d the largest divisor of the share that fits
        the local devices); k > 1 splits the locations over exactly k devices (N must divide by k,
        the process must have k devices) and the batch over the largest d with d * k local
        devices; 0 (auto) takes d as for 1, then gives the devices the batch leaves idle to the
        locations: p the largest divisor of N up to local devices / d.
    Raises:
      ValueError: the batch does not divide by the process count, or points_devices k > 1 does not
        divide N or exceeds the local devices, or is negative.
    """
    processes = jax.process_count()
    if batch_size % processes:
        raise ConfigError(
            f"train.batch_size {batch_size} must be a multiple of the {processes} processes"
        )
    local = list(jax.local_devices() if devices is None else devices)
    share = batch_size // processes
    if points_devices < 0:
        raise ConfigError(f"train.points_devices {points_devices} must be 0 (auto), 1 or more")
    if points_devices > 1:
        if num_points % points_devices:
            raise ConfigError(
                f"train.num_points {num_points} must divide by "
                f"train.points_devices {points_devices}"
            )
        if points_devices > len(local):
            raise ConfigError(
                f"train.points_devices {points_devices} exceeds the {len(local)} devices of "
                f"process {jax.process_index()}"
            )
        points = points_devices
        rows = _largest_divisor(share, len(local) // points)
    else:
        rows = _largest_divisor(share, len(local))
        idle = len(local) // rows
        points = _largest_divisor(num_points, idle) if points_devices == 0 and num_points else 1
    if rows * points * processes == 1:
        return None
    by_process: dict[int, list] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    by_process[jax.process_index()] = local
    chosen = [d for p in sorted(by_process) for d in by_process[p][: rows * points]]
    return Mesh(np.array(chosen).reshape(processes * rows, points), (AXIS, POINTS_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole (and whole on 'points' devices)."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def input_shardings(inputs: dict, mesh: Mesh) -> dict:
    """Shardings of an update's inputs (prepare_inputs' dict): the POINT_KEYS arrays (B, N, ...)
    split over ('data', 'points'), the others (B, ...) over 'data'."""
    return {
        key: NamedSharding(
            mesh, PartitionSpec(AXIS, POINTS_AXIS) if key in POINT_KEYS else PartitionSpec(AXIS)
        )
        for key in inputs
    }


def shard_inputs(inputs: dict, mesh: Optional[Mesh]) -> dict:
    """prepare_inputs' dict constrained to input_shardings inside a jitted function (unchanged
    without a mesh): the prepare program hands the update its per-location arrays already split
    over 'points'."""
    if mesh is None:
        return inputs
    return jax.lax.with_sharding_constraint(inputs, input_shardings(inputs, mesh))


def shard_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
    """The global batch, split along B over 'data', from this process's block of it (unchanged
    without a mesh).

    `batch` is a pytree of (B / processes, ...) host arrays: rows [p B / P, (p + 1) B / P) of the
    global batch for process p (the whole batch with one process).
    """
    if mesh is None:
        return batch
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Places a pytree on every device of `mesh`; without a mesh, commits it to the default device.

    Committed like the arrays a checkpoint restores, a fresh state lowers the train step to the same
    program as a resumed one, so a resumed run finds it in the persistent compilation cache.
    """
    if mesh is None:
        return jax.device_put(tree, jax.local_devices()[0])
    return jax.device_put(tree, replicated(mesh))


def local_copy(tree: Any) -> Any:
    """This process's copy of a replicated pytree, on its first device holding it.

    For work only one process does on its own devices (validation); a view, no transfer.
    """
    return jax.tree.map(lambda leaf: leaf.addressable_data(0), tree)
