"""Several training processes (hosts) as one JAX program: start-up, the primary process, shared values.

A run on P processes starts the same train.py command on every host, in one of two modes (train.py's
--distributed flag):
  'manual' (default): with the coordinator's address (host:port of process 0, reachable from all), P
    and the process's id in [0, P), given as flags (--coordinator_address, --num_processes,
    --process_id) or as the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID (flags win). Without a coordinator address the run is a single process and
    nothing here changes it.
  'auto': jax.distributed.initialize() without those arguments: JAX reads them from the cluster the
    processes were started in (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes; see
    jax.distributed.initialize), and the three flags must be left out.

Process 0 is the primary: it alone writes logs, config.json and evaluation outputs; every process
takes part in each train step and checkpoint save.
"""

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from ossnet_jax.errors import ConfigError

# Non-primary processes wait at shutdown while the primary evaluates every validation case.
SHUTDOWN_TIMEOUT_S = 6 * 3600
MODES = ("manual", "auto")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the coordinator listens ('host:port'), how many processes take part, and which one this
    is; all three None: JAX detects them from the cluster environment ('auto')."""

    coordinator_address: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]


def settings(
    coordinator_address: str = "",
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    environ: Optional[dict] = None,
    mode: str = "manual",
) -> Optional[Settings]:
    """The settings of `mode` (MODES); None for a single-process run.

    'manual': from the arguments, each missing one from JAX_* environment variables; None without a
    coordinator address anywhere. 'auto': Settings(None, None, None), JAX detects the cluster.

    Raises ValueError if a coordinator is given but the process count or id is missing or out of
    range, if 'auto' is given any of the three, or for an unknown mode.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown distributed mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        given = [
            name
            for name, value in (
                ("--coordinator_address", coordinator_address or None),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"--distributed=auto detects the cluster itself: leave out {', '.join(given)}, "
                "or use --distributed=manual"
            )
        return Settings(None, None, None)
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not address:
        return None
    count = num_processes if num_processes is not None else environ.get("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else environ.get("JAX_PROCESS_ID")
    if count is None or index is None:
        raise ConfigError(
            f"coordinator {address} given: also give --num_processes and --process_id "
            "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    count, index = int(count), int(index)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"process id {index} is not in [0, {count}) processes")
    return Settings(address, count, index)


def initialize(config: Optional[Settings]) -> None:
    """Joins the processes into one JAX runtime (jax.distributed.initialize); nothing for None.

    Must run before any JAX computation. CPU collectives across processes use gloo. With
    Settings(None, None, None) JAX finds the coordinator, process count and id in the cluster
    environment; a ValueError says so where it finds none.
    """
    if config is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except ValueError as error:
        if config.coordinator_address is not None:
            raise
        raise ConfigError(
            f"--distributed=auto: JAX found no cluster environment (Cloud TPU, SLURM, Open MPI, "
            f"Kubernetes) to start from ({error}); give --distributed=manual with "
            "--coordinator_address, --num_processes and --process_id instead"
        ) from error


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs and evaluation outputs."""
    return jax.process_index() == 0


def from_primary(tree: Any) -> Any:
    """The primary's value of a pytree of scalars/arrays (same shapes on every process), on every process.

    Unchanged with one process; across processes the leaves travel as float32/int32 (JAX without x64),
    so every process, the primary included, gets the same rounded values.
    """
    if jax.process_count() == 1:
        return tree
    shared = multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, tree))
    return jax.tree.map(lambda leaf: leaf.item() if leaf.ndim == 0 else leaf, shared)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on some process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
