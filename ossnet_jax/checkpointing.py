"""Orbax checkpoints in WORKDIR/checkpoints: the last `keep` steps plus the best by validation Dice.

A checkpoint holds the train state as arrays (OCDBT/Zarr) and its metrics as JSON; no pickle, so loading
a checkpoint someone shared cannot run code.
"""

import logging
import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

BEST_METRIC = "val_dice"


class _NoMetricsNote(logging.Filter):
    """Drops orbax's warning for checkpoints saved between evaluations (they carry no metrics)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNote())


def _metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


class Checkpoints:
    """Saves and restores train states of one workdir."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3):
        policy = managers.AnyPreservationPolicy(
            [
                managers.LatestN(keep),
                managers.BestN(get_metric_fn=_metric, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_metric,
            best_mode="max",
            create=True,
            enable_async_checkpointing=False,
        )
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, metrics: Optional[dict] = None) -> None:
        """Writes `state` (a pytree of arrays) at `step`; `metrics` with 'val_dice' ranks it for 'best'."""
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The saved step with the highest validation Dice; the latest step if none has metrics."""
        best = self.manager.best_step()
        return best if best is not None else self.latest_step()

    def restore(self, step: int, target: Any) -> Any:
        """The state saved at `step`, with the structure, shapes and dtypes of `target`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def close(self) -> None:
        self.manager.close()
