"""Which training cases each step uses, and which of them each process reads.

The training split (n cases, sorted by id) is cut into K contiguous shards (train.case_shards; 0 means
one per process) and the global batch of B cases into K contiguous blocks of B / K slots: block k of
step s draws from shard k, epoch by epoch in seeded permutations (dataset.case_indices with seed
train.seed + k). With K = 1 this is exactly dataset.case_indices over the whole split.

Process p of P supplies the p-th contiguous block of B / P slots, which are the blocks of shards
[p K / P, (p + 1) K / P), so it reads only those shards' cases. The global batch of a step depends on
K, never on P: a single process with train.case_shards = K draws the batches a K-process run draws.
Shards differ in size by at most one case; a case of a smaller shard is drawn slightly more often.
"""

import dataclasses

import numpy as np

from ossnet_jax.data import dataset
from ossnet_jax.errors import ConfigError


def resolve_shards(case_shards: int, batch_size: int, num_cases: int, processes: int) -> int:
    """K: `case_shards`, or `processes` for 0; ValueError unless P | K, K | B and K <= n."""
    shards = case_shards or processes
    if shards % processes or batch_size % shards or shards > num_cases:
        raise ConfigError(
            f"train.case_shards {shards} must be a multiple of the {processes} processes, divide "
            f"train.batch_size {batch_size} and be at most the {num_cases} training cases"
        )
    return shards


def shard_bounds(num_cases: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `shards` contiguous shards of `num_cases` cases, sizes differing by <= 1."""
    edges = [k * num_cases // shards for k in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def batch_indices(step: int, batch_size: int, num_cases: int, seed: int, shards: int) -> np.ndarray:
    """(batch_size,) indices into the training split of the global batch of `step`."""
    per_shard = batch_size // shards
    return np.concatenate(
        [
            start + dataset.case_indices(step, per_shard, stop - start, seed + k)
            for k, (start, stop) in enumerate(shard_bounds(num_cases, shards))
        ]
    )


def process_cases(num_cases: int, shards: int, process: int, processes: int) -> range:
    """The indices into the training split that `process` reads: its shards' cases."""
    per_process = shards // processes
    bounds = shard_bounds(num_cases, shards)
    return range(bounds[process * per_process][0], bounds[(process + 1) * per_process - 1][1])


def process_slots(batch_size: int, process: int, processes: int) -> slice:
    """The rows of the global batch that `process` supplies."""
    share = batch_size // processes
    return slice(process * share, (process + 1) * share)


@dataclasses.dataclass(frozen=True)
class ProcessBatches:
    """This process's block of each step's global batch, from the cases it reads.

    Attributes:
      cases: this process's shards' prepared cases, by index into the training split.
      num_cases: n, the size of the training split.
      shards: K (resolve_shards).
      batch_size: B, the global batch.
      seed: train.seed.
      process, processes: p and P.
    """

    cases: dict[int, dataset.PreparedCase]
    num_cases: int
    shards: int
    batch_size: int
    seed: int
    process: int = 0
    processes: int = 1

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """dataset.stack_batch of the B / P cases of this process's rows of the batch of `step`."""
        indices = batch_indices(step, self.batch_size, self.num_cases, self.seed, self.shards)
        rows = indices[process_slots(self.batch_size, self.process, self.processes)]
        return dataset.stack_batch([self.cases[int(i)] for i in rows])
