"""Orbax checkpoints in WORKDIR/checkpoints: the last `keep` steps plus the best by validation Dice.

A checkpoint holds the train state as arrays (OCDBT/Zarr) and its metrics as JSON; no pickle, so loading
a checkpoint someone shared cannot run code.
"""

import logging
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

BEST_METRIC = "val_dice"
MAX_SHOWN_MISMATCHES = 5


class _NoMetricsNote(logging.Filter):
    """Drops orbax's warning for checkpoints saved between evaluations (they carry no metrics)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNote())


def _dotted(path: tuple) -> str:
    """'params.fast.decoder_net.block0.dense1.kernel' for a pytree key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )  # one item handler: item_metadata(step) reads a saved tree before any save or restore

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
        """The state saved at `step`, with the structure, shapes and dtypes of `target`.

        Raises ValueError naming the checkpoint and the first mismatched paths (saved vs expected shape)
        if the saved arrays do not fit `target`, e.g. a checkpoint of another model configuration.
        """
        mismatches = self._mismatches(step, target)
        if mismatches:
            shown = "\n".join(
                f"  {path}: saved {saved}, expected {expected}"
                for path, saved, expected in mismatches[:MAX_SHOWN_MISMATCHES]
            )
            more = len(mismatches) - MAX_SHOWN_MISMATCHES
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not match the model: "
                f"{len(mismatches)} arrays differ in shape or are missing, first ones:\n{shown}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def _mismatches(self, step: int, target: Any) -> list[tuple[str, Any, Any]]:
        """(dotted path, saved shape, expected shape) of arrays that differ; None where one is absent."""
        saved = {
            _dotted(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                self.manager.item_metadata(step)
            )[0]
        }
        expected = {
            _dotted(path): tuple(leaf.shape if hasattr(leaf, "shape") else jnp.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
        }
        mismatches = [
            (path, saved.get(path), shape)
            for path, shape in expected.items()
            if saved.get(path) != shape
        ]
        return mismatches + [
            (path, shape, None) for path, shape in saved.items() if path not in expected
        ]

    def close(self) -> None:
        self.manager.close()
