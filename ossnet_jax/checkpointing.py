"""Orbax checkpoints in WORKDIR/checkpoints: the last `keep` steps plus the best by validation Dice.

A checkpoint holds the train state as arrays (OCDBT/Zarr) and its metrics as JSON; no pickle, so loading
a checkpoint someone shared cannot run code. A save is written to a temporary folder and renamed, so a
killed save leaves only that temporary folder, which the training process removes on start. A finished
checkpoint that cannot be read back (a truncated or deleted file) is moved aside by the training run to
checkpoints/corrupt-<step>-<time>, where orbax no longer sees it, and the previous one is used.
"""

import errno
import logging
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from ossnet_jax import distributed
from ossnet_jax.errors import ConfigError, UserError

BEST_METRIC = "val_dice"
MAX_SHOWN_MISMATCHES = 5
MAX_REASON_CHARS = 400  # the first line of an error; tensorstore's go on with a whole JSON spec
FREE_SPACE_MARGIN_BYTES = 64 << 20  # checkpoint metadata, logs and predictions on top of the arrays


class CorruptCheckpointError(UserError, RuntimeError):
    """Finished checkpoints (`path`: one step folder, or the checkpoints folder for all of them) whose
    arrays or metadata cannot be read, e.g. a truncated or deleted file."""

    def __init__(self, path: pathlib.Path, reason: str):
        super().__init__(f"{path} cannot be read: {reason}")
        self.path = path


def _reason(error: BaseException) -> str:
    """'TypeName: first line' of the innermost cause, at most MAX_REASON_CHARS characters.

    orbax wraps tensorstore's error (e.g. 'OUT_OF_RANGE: Error reading "params...kernel/0.0" in OCDBT
    database at local file ...: Requested byte range ...') in a generic one; the cause names the file.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:MAX_REASON_CHARS]


def is_failed_read_aftermath(exc_value: Optional[BaseException], obj: Any) -> bool:
    """Whether an unraisable exception is the aftermath of a failed orbax restore.

    When one array read fails, orbax closes its event loop while other reads are in flight; they then
    complete on tensorstore threads into the closed loop ('Event loop is closed'), and their coroutines
    are collected still holding a read error. Each prints a traceback with a whole TensorStore spec,
    thousands of lines in all that would bury the message naming the corrupt checkpoint.
    """
    code = getattr(obj, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    return isinstance(exc_value, RuntimeError) and str(exc_value) == "Event loop is closed"


class _NoFailedReadTasks(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' for tensorstore reads of a failed restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and "tensorstore" in message.lower())


def _quiet_failed_read_aftermath() -> None:
    """From the first restore on, drops the aftermath of failed reads (see is_failed_read_aftermath)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_failed_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not is_failed_read_aftermath(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    hook.drops_failed_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_NoFailedReadTasks())


def check_free_space(
    directory: pathlib.Path, free_bytes: int, state_bytes: int, copies: int
) -> None:
    """Raises OSError (ENOSPC) unless `free_bytes` exceed `copies` checkpoints of `state_bytes` + margin.

    Pure (the caller measures the numbers), so a run fails with the sizes spelled out before training
    rather than with an orbax write error at its first checkpoint.
    """
    needed = copies * state_bytes + FREE_SPACE_MARGIN_BYTES
    if free_bytes < needed:
        mib = lambda n: f"{n / 2**20:.1f} MiB"
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for checkpoints in {directory}: {mib(free_bytes)} free, about "
            f"{mib(needed)} needed ({copies} x {mib(state_bytes)} of parameters and optimizer state "
            f"+ {mib(FREE_SPACE_MARGIN_BYTES)} margin); free some space or choose another --workdir",
        )


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
    """Saves and restores train states of one workdir.

    `writer=True` (the training process, the only one that saves) removes unfinished checkpoint writes
    left by a killed run; readers such as evaluate.py leave them alone, since they may belong to a run
    that is still saving. With several processes (distributed.py) every process holds a writer and
    calls save and restore (orbax writes each array once, from the primary); a reader belongs to the
    process that made it alone, so the primary can evaluate while the others wait.
    """

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, writer: bool = False):
        self.keep = keep
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        alone = not writer and jax.process_count() > 1
        me = jax.process_index()
        if alone:  # orbax creates the folder only with every process taking part
            self.directory.mkdir(parents=True, exist_ok=True)
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
            create=not alone,
            cleanup_tmp_directories=writer,
            enable_async_checkpointing=False,
            multiprocessing_options=(
                ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
                if alone
                else ocp.options.MultiprocessingOptions()
            ),
        )
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

    def copies_to_fit(self) -> int:
        """Checkpoints that still have to fit on disk: the last `keep`, the best and the one being
        written before the oldest is deleted, less those already saved; at least one."""
        return max(1, self.keep + 2 - len(self.manager.all_steps()))

    def restore(self, step: int, target: Any) -> Any:
        """The state saved at `step`, with the structure, shapes and dtypes of `target`.

        Raises ValueError naming the checkpoint and the first mismatched paths (saved vs expected shape)
        if the saved arrays do not fit `target`, e.g. a checkpoint of another model configuration, and
        CorruptCheckpointError if its metadata or arrays cannot be read.
        """
        path = self.directory / str(step)
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {path}")
        try:
            metadata = self.manager.item_metadata(step)
        except Exception as error:  # orbax/tensorstore raise many types for unreadable files
            raise CorruptCheckpointError(path, _reason(error)) from error
        if metadata is None:
            raise CorruptCheckpointError(path, "its array metadata (default/_METADATA) is missing")
        mismatches = self._mismatches(metadata, target)
        if mismatches:
            shown = "\n".join(
                f"  {path}: saved {saved}, expected {expected}"
                for path, saved, expected in mismatches[:MAX_SHOWN_MISMATCHES]
            )
            more = len(mismatches) - MAX_SHOWN_MISMATCHES
            raise ConfigError(
                f"checkpoint {self.directory / str(step)} does not match the model: "
                f"{len(mismatches)} arrays differ in shape or are missing, first ones:\n{shown}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )
        _quiet_failed_read_aftermath()  # before: the aftermath can print before the error reaches us
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:
            raise CorruptCheckpointError(path, _reason(error)) from error

    def restore_latest(self, target: Any) -> tuple[int, Any]:
        """(step, state) of the newest checkpoint that can be read; see `_restore_first`."""
        return self._restore_first(sorted(self.manager.all_steps(), reverse=True), target, True)

    def restore_best(self, target: Any) -> tuple[int, Any]:
        """(step, state) of the best checkpoint, or of the newest readable one if the best is corrupt.

        For readers: a corrupt checkpoint is reported but left in place (training moves it aside).
        """
        best = self.best_step()
        rest = sorted((s for s in self.manager.all_steps() if s != best), reverse=True)
        return self._restore_first([best, *rest] if best is not None else [], target, False)

    def _restore_first(self, steps: list[int], target: Any, set_aside: bool) -> tuple[int, Any]:
        """Restores the first of `steps` that can be read, reporting each corrupt one before it.

        With `set_aside`, the corrupt ones are renamed to checkpoints/corrupt-<step>-<time> once a
        readable one is found. If none can be read, nothing is moved (a systematic failure, e.g. an
        unreadable format, should not hide every checkpoint) and CorruptCheckpointError lists them all;
        without checkpoints FileNotFoundError. A ValueError for another model configuration propagates.
        """
        failures = []
        for step in steps:
            try:
                state = self.restore(step, target)
            except CorruptCheckpointError as error:
                failures.append(error)
                continue
            moves = set_aside and distributed.is_primary()
            for error in failures:
                action = self._set_aside(error.path) if moves else "left it in place"
                if distributed.is_primary():
                    print(f"{error}; {action}; using step {step} instead", flush=True)
            if failures and set_aside:
                distributed.barrier("checkpoints-set-aside")
                self.manager.reload()
            return step, state
        if failures:
            listed = "\n".join(f"  {error}" for error in failures)
            raise CorruptCheckpointError(
                self.directory,
                f"none of its checkpoints can be read:\n{listed}\nMove them out of "
                f"{self.directory} to start from scratch, or use another --workdir",
            )
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _set_aside(self, path: pathlib.Path) -> str:
        """Renames a checkpoint folder to corrupt-<step>-<time> beside it; says where it went."""
        moved = path.with_name(f"corrupt-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(moved)
        return f"moved it to {moved}"

    def _mismatches(self, metadata: Any, target: Any) -> list[tuple[str, Any, Any]]:
        """(dotted path, saved shape, expected shape) of arrays that differ; None where one is absent."""
        saved = {
            _dotted(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]
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
