"""The training loop of train.py for every model family (ossnet_jax/families).

train_and_evaluate resolves the data, checks a resumed workdir's configuration, and runs the host loop:
the family's pure jitted step (for OSS-Net split into prepare_inputs, run ahead in the prefetch thread,
and update_step), logging, validation, checkpoints, the non-finite guard and SIGINT/SIGTERM handling,
then the dense evaluation (evaluation.py). The cases of a step are a pure function of the step, so a
resumed run draws exactly what an uninterrupted one would.
"""

import collections
import contextlib
import functools
import json
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from ossnet_jax import (
    checkpointing,
    curves,
    distributed,
    evaluation,
    families,
    files,
    metrics,
    parallel,
)
from ossnet_jax.data import dataset, planning, schedule
from ossnet_jax.data.prefetch import Prefetcher
from ossnet_jax.errors import ConfigError
from ossnet_jax.train_state import (
    make_optimizer,
)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint of the current step was saved.

    exit_code is the shell's status for that signal (130, 143); train.py exits with it.
    """

    def __init__(self, signum: int, step: int, directory: pathlib.Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step}, saved as checkpoint {directory / str(step)}; "
            "rerun the same command to resume"
        )
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Yields a list that SIGINT and SIGTERM append their number to instead of stopping the process.

    The host loop checks it after each step (several processes: at the steps they read the device,
    _stop_requested), so a checkpoint of that step is saved before stopping; the previous handlers are
    restored on exit. Handlers can only be set in the main thread; elsewhere
    the list stays empty and the signals keep their behaviour.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        note = (
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping\n"
        )
        os.write(2, note.encode())  # not print: the handler may run in the middle of a print

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def drop_log_rows_after(path: pathlib.Path, step: int) -> None:
    """Rewrites the JSON-lines log `path` (atomically) without rows of steps after `step`.

    Called with the step training resumes from, so rows a killed run logged after its last checkpoint
    are not duplicated when those steps run again; a torn last line of a killed write is dropped too.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        files.write_text(path, "".join(f"{line}\n" for line in kept))


RESUME_DATA_KEYS = (
    "grid_shape",
    "num_channels",
    "downscale",
    "label_mode",
    "labels",
    "region_labels",
)


def _resume_keys(config: dict) -> dict:
    """Dotted key -> value of the JSON config entries that change the parameters or the data."""
    # model.kernels picks a formulation, not parameters: a run may resume with the other kernel set
    keys = {f"model.{k}": v for k, v in config.get("model", {}).items() if k != "kernels"}
    data = config.get("data", {})
    keys.update({f"data.{k}": data[k] for k in RESUME_DATA_KEYS if k in data})
    return keys


def config_differences(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of each model/data key that differs between two JSON configs.

    Both configs are compared after a JSON round trip (tuples and lists are equal); a key present in
    only one of them shows '<absent>' on the other side.
    """
    old_keys = _resume_keys(json.loads(json.dumps(saved)))
    new_keys = _resume_keys(json.loads(json.dumps(new)))
    return [
        (key, old_keys.get(key, "<absent>"), new_keys.get(key, "<absent>"))
        for key in sorted(old_keys.keys() | new_keys.keys())
        if old_keys.get(key, "<absent>") != new_keys.get(key, "<absent>")
    ]


def check_resume_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Raises ValueError if WORKDIR/config.json differs from `config` on a model/data key.

    Only called when WORKDIR/checkpoints holds a checkpoint; train.allow_config_change skips the check.
    """
    saved_path = workdir / "config.json"
    if config.train.allow_config_change or not saved_path.exists():
        return
    differences = config_differences(
        json.loads(saved_path.read_text()), json.loads(config.to_json())
    )
    if differences:
        lines = "\n".join(
            f"  {key}: {old!r} (saved) -> {new!r} (new)" for key, old, new in differences
        )
        raise ConfigError(
            f"{workdir} holds checkpoints of a different configuration:\n{lines}\n"
            "Train in a new --workdir, or set --config.train.allow_config_change=True to resume anyway."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from WORKDIR/checkpoints if present), then evaluates densely; returns eval metrics.

    data.labels / num_channels are first resolved from the dataset (MSD dataset.json), then every case
    this process uses is read and preprocessed: a bad file raises DataError listing every bad case
    before the workdir is touched. Resuming refuses (ValueError, before anything is written) a config whose model or data keys differ
    from WORKDIR/config.json, unless train.allow_config_change; config.json is only overwritten once the
    checkpoint is restored. An update with a NaN/Inf loss or gradient
    is skipped (parameters unchanged) and logged as {"step", "skipped_nonfinite": 1} in metrics.jsonl;
    train.max_nonfinite_steps consecutive skips raise FloatingPointError without saving. Checkpoints
    are only written after an applied update, except at the last step, whose parameters are those of
    the last applied one, and on SIGINT/SIGTERM, which save the step being run and raise
    TrainingInterrupted.

    The host does not wait for each step: it dispatches step k + 1 while step k runs and reads the
    device (metrics and the skipped flags of every step since the last read, in one transfer) only
    every train.log_every steps, at the last step, at validation and checkpoint steps and on a stop.
    So skipped steps are logged, and max_nonfinite_steps consecutive ones detected, at the next read,
    up to log_every - 1 steps late (the error names the step the limit was reached at); no checkpoint
    is written in between. One process checks for SIGINT/SIGTERM after every step; several processes
    agree on stopping only at the steps they read the device, so there a signal stops the run at the
    next such step.

    Before training: the workdir must be writable and have room for the checkpoints (OSError naming
    it otherwise); a corrupt latest checkpoint is moved aside and the previous one resumed; rows of
    metrics.jsonl after the resumed step are dropped, since those steps run again.

    With several processes (distributed.py) every process calls this: each reads only its shards of
    the training cases (data/schedule.py), the primary alone the validation cases; the primary writes
    the logs and config.json, validates and evaluates, and the others return {}.
    """
    preparation = config.train.get("prepare", "device")
    if preparation not in PREPARE_MODES:  # before anything is read or written
        raise ConfigError(f"train.prepare must be one of {PREPARE_MODES}, got {preparation!r}")
    resolved = dataset.resolve_data_config(config, check_fit=True)
    planned = planning.describe(config.data, resolved.data)
    if planned and distributed.is_primary():
        print(planned)
    config = resolved
    workdir = pathlib.Path(workdir)
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        check_resume_config(config, workdir)
    batches, val_cases, validating = _process_cases(config)  # data problems surface here
    files.ensure_writable_dir(workdir)
    ckpt = checkpointing.Checkpoints(workdir, writer=True)
    try:
        _train(config, workdir, ckpt, ckpt.latest_step() or 0, batches, val_cases, validating)
    finally:
        ckpt.close()
    if not distributed.is_primary():
        return {}
    return evaluation.evaluate(config, workdir, val_cases)


def _process_cases(
    config: ml_collections.ConfigDict,
) -> tuple[schedule.ProcessBatches, list, bool]:
    """This process's batches (its shards of the training split, prepared), the prepared validation
    cases (on the primary; [] elsewhere) and whether the split has validation cases."""
    t = config.train
    train_split, val_split = dataset.split_cases(config)
    validating = bool(val_split)
    process, processes = jax.process_index(), jax.process_count()
    shards = schedule.resolve_shards(t.case_shards, t.batch_size, len(train_split), processes)
    mine = schedule.process_cases(len(train_split), shards, process, processes)
    val_split = val_split if distributed.is_primary() else []
    prepared = dataset.prepare_cases(
        [train_split[i] for i in mine] + val_split,
        config,
        dataset.cache_dir_for(config),
    )
    batches = schedule.ProcessBatches(
        dict(zip(mine, prepared[: len(mine)])),
        len(train_split),
        shards,
        t.batch_size,
        t.seed,
        process,
        processes,
    )
    return batches, prepared[len(mine) :], validating


VAL_KEYS = ("val_dice", "val_iou")  # what a Family's validator returns


class _Log:
    """metrics.jsonl rows, their TensorBoard scalars and curves.png (curves.py), and progress notes;
    written by the primary process only. `start`: the step training resumes from."""

    def __init__(self, workdir: pathlib.Path, start: int, enabled: bool):
        self.workdir = workdir
        self.file = open(workdir / "metrics.jsonl", "a") if enabled else None
        self.events = curves.EventLog(workdir, start) if enabled else None

    def row(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.events.add(record)

    def plot(self) -> None:
        """Redraws WORKDIR/curves.png from every row of metrics.jsonl; flushes the event file."""
        if self.file is not None:
            curves.curves_png(self.workdir / "curves.png", curves.read_rows(self.file.name))
            self.events.flush()

    def note(self, text: str) -> None:
        if self.file is not None:
            tqdm.write(text)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.events.close()


# Updates the host loop lets the device hold at once: it waits (reading nothing) for step k-2 to
# finish before it dispatches step k, so step k-1 still runs meanwhile, while the inputs queued on
# the device stay those of two steps (not of every step since the last read).
IN_FLIGHT_STEPS = 2


def _read(tree: Any) -> Any:
    """The host copy of a pytree of device arrays: the loop's one blocking read of device values."""
    return jax.device_get(tree)


def _stop_requested(stop: list[int], exchange: bool) -> bool:
    """Whether the loop stops after this step for a SIGINT/SIGTERM recorded in `stop`.

    One process reads its own list every step, with no device work. Several agree through
    distributed.any_process, a collective, so only at the steps where `exchange`, the same on every
    process, is true (the steps the loop reads the device anyway); a signal waits until then.
    """
    if jax.process_count() == 1:
        return bool(stop)
    return exchange and distributed.any_process(bool(stop))


def _record_skips(
    flags: list,
    first: int,
    consecutive: int,
    limit: int,
    log: _Log,
    ckpt: checkpointing.Checkpoints,
) -> int:
    """Logs the skipped updates among the steps first, first + 1, ... of `flags` (1: skipped);
    returns the consecutive skips at the last of them, counting on from `consecutive` before them.

    Raises FloatingPointError if the count reached `limit` at one of the steps: the loop saves no
    checkpoint between reads, so the last one written is still the latest.
    """
    reached = None
    for offset, flag in enumerate(flags):
        step = first + offset
        consecutive = consecutive + 1 if flag else 0
        if flag:
            log.row({"step": step, "skipped_nonfinite": 1})
            log.note(f"step {step}: non-finite loss or gradients, update skipped")
        if consecutive >= limit and reached is None:
            reached = step
    if reached is not None:
        last = ckpt.latest_step()
        kept = (
            f"the last good checkpoint (step {last}) in {ckpt.directory} is intact"
            if last is not None
            else f"no checkpoint was written to {ckpt.directory}"
        )
        seen = first + len(flags) - 1
        read = f" (read at step {seen})" if seen != reached else ""
        raise FloatingPointError(
            f"{limit} consecutive non-finite steps (loss or gradients) at step {reached}{read}; "
            f"training stopped without saving, {kept}"
        )
    return consecutive


def compiled_memory(stats: Any) -> dict[str, int]:
    """Bytes per device of a compiled program's XLA memory analysis: 'argument', 'output', 'temp',
    'alias' and their 'total' (arguments + outputs + temporaries - what the outputs alias of the
    donated arguments)."""
    sizes = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    sizes["total"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return sizes


def memory_note(stats: Any) -> str:
    """The device memory a compiled training step needs (compiled_memory), as one line."""
    if stats is None:
        return "training step: this backend reports no memory analysis"
    sizes = compiled_memory(stats)
    mib = lambda n: f"{n / 2**20:,.0f} MiB"
    return (
        f"training step: {mib(sizes['total'])} of device memory per device (inputs and state "
        f"{mib(sizes['argument'])}, temporaries {mib(sizes['temp'])})"
    )


PREPARE_MODES = ("device", "host")


def _host_preparation(
    family: families.Family,
    config: ml_collections.ConfigDict,
    make_batch: schedule.ProcessBatches,
    rng: jax.Array,
    mesh: Any,
) -> Callable[[int], dict]:
    """step -> the update's inputs, prepared by the family's prepare_inputs on the host's first CPU
    device (train.prepare = 'host') and then placed as the device path places them.

    The whole volumes, their augmentation and the patch gathering then occupy host memory only; the
    accelerator holds what the update reads (downscaled volumes, locations, patches). The program
    is the device path's, with the same kernel set, so the draws are the same. One process only:
    with several, each holds only its rows of the global batch, which the draws are a function of.
    """
    if jax.process_count() > 1:
        raise ConfigError("train.prepare = 'host' supports one process; use 'device' with several")
    host = jax.local_devices(backend="cpu")[0]
    prepare = jax.jit(functools.partial(family.prepare_inputs, config=config))
    key = jax.device_put(rng, host)
    target = jax.local_devices()[0]

    def inputs_of(step: int) -> dict:
        with jax.default_device(host):
            inputs = prepare(make_batch(step), key, jnp.asarray(step, jnp.int32))
        placement = target if mesh is None else parallel.input_shardings(inputs, mesh)
        return jax.device_put(inputs, placement)

    return inputs_of


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    ckpt: checkpointing.Checkpoints,
    start: int,
    make_batch: schedule.ProcessBatches,
    val_cases: list,
    validating: bool,
) -> None:
    """The host loop of train_and_evaluate from step `start` to train.steps.

    `make_batch(step)` gives this process's rows of the step's global batch; `val_cases` are validated
    on the primary every train.eval_every steps when `validating` (the split has validation cases).

    The loop dispatches each step without reading its results: the 'skipped' flags stay on the
    device and are read, with the metrics, in one transfer (`_read`) only at the steps that need
    them: every train.log_every steps and the last (metrics), validation and checkpoint steps (a
    checkpoint is written only after an applied update), and a stop. Between reads the loop keeps
    IN_FLIGHT_STEPS updates on the device.
    """
    t = config.train
    primary = distributed.is_primary()
    family = families.get_family(config)
    model = family.build_model(config)
    tx = make_optimizer(config)
    splits_points = family.prepare_inputs is not None
    mesh = parallel.data_mesh(  # None on one device of one process: nothing changes
        t.batch_size,
        num_points=t.num_points if splits_points else 0,
        points_devices=t.get("points_devices", 0) if splits_points else 1,  # 0: auto
    )
    state = parallel.replicate(family.init_state(config, model, tx, jax.random.key(t.seed)), mesh)
    if ckpt.latest_step() is not None:  # step 0 too: a converted checkpoint (ossnet_jax.official)
        start, state = ckpt.restore_latest(state)
        if primary:
            print(f"resuming from step {start} of {workdir / 'checkpoints'}")
    checkpointing.check_free_space(
        ckpt.directory,
        shutil.disk_usage(ckpt.directory).free,
        sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
        ckpt.copies_to_fit(),
    )
    if primary:
        files.write_json(workdir / "config.json", json.loads(config.to_json()))
    rng = jax.random.key(t.seed)
    batch_of = lambda s: parallel.shard_batch(make_batch(s), mesh)
    preparation = t.get("prepare", "device")
    if family.prepare_inputs is None:
        inputs_of, update = batch_of, family.train_step
    elif preparation == "host":  # the same program on the host's CPU
        inputs_of = _host_preparation(family, config, make_batch, rng, mesh)
        update = family.update_step
    else:  # the grid-sized stage runs in the prefetch thread, the update sees its outputs only
        prepare = jax.jit(
            lambda batch, key, s: parallel.shard_inputs(
                family.prepare_inputs(batch, key, s, config=config), mesh
            )
        )
        inputs_of = lambda s: prepare(batch_of(s), rng, jnp.asarray(s, jnp.int32))
        update = family.update_step
    step_fn = jax.jit(
        functools.partial(update, model=model, tx=tx, config=config), donate_argnums=0
    )
    validate = family.validator(val_cases, config, model) if primary and validating else None
    log_path = workdir / "metrics.jsonl"
    if primary:
        drop_log_rows_after(log_path, start)
    tick, wait, since = time.perf_counter(), 0.0, start  # the current logging window
    nonfinite = 0  # consecutive skipped updates up to the last read of the device
    unread: list = []  # the () int32 'skipped' flags, on the device, of the steps since then
    running: collections.deque = collections.deque()  # those of the updates that may still run
    compiled = None  # step_fn compiled for the loop's arguments
    log = _Log(workdir, start, primary)
    with (
        Prefetcher(inputs_of, start, t.steps) as batches,
        tqdm(
            total=t.steps, initial=start, desc="train", dynamic_ncols=True, disable=not primary
        ) as bar,
        contextlib.closing(log),
        _stop_requests() as stop,
    ):
        for step in range(start, t.steps):
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            if len(running) == IN_FLIGHT_STEPS:
                running.popleft().block_until_ready()
            if compiled is None:  # ahead of the first update, so its memory is known before it runs
                compiled = step_fn.lower(state, batch, rng).compile()
                if primary:
                    tqdm.write(memory_note(compiled.memory_analysis()))
            state, out = compiled(state, batch, rng)
            running.append(out["skipped"])
            unread.append(out["skipped"])
            done = step + 1
            logged = done % t.log_every == 0 or done == t.steps
            validating_now = validating and (done % t.eval_every == 0 or done == t.steps)
            periodic = validating_now or done % t.checkpoint_every == 0
            # read once: a signal arriving after this line is handled after the next step
            stopping = _stop_requested(stop, exchange=logged or periodic)
            if not (logged or periodic or stopping):
                continue
            seen = _read({"skipped": unread, "out": out if logged else {}})
            nonfinite = _record_skips(
                seen["skipped"], done - len(unread) + 1, nonfinite, t.max_nonfinite_steps, log, ckpt
            )
            unread = []
            if logged:
                out = seen["out"]
                elapsed = time.perf_counter() - tick
                record = {
                    "step": done,
                    "loss": float(out["loss"]),
                    **{k: float(v) for k, v in out.items() if k.endswith("_loss")},
                    "learning_rate": float(out["learning_rate"]),
                    "dice": metrics.channel_mean(out, metrics.dice_from_counts),
                    "points_per_s": family.outputs_per_step(config) * (done - since) / elapsed,
                    "input_wait_fraction": wait / elapsed,
                }
                log.row(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    dice=f"{record['dice']:.3f}",
                    pts_s=f"{record['points_per_s']:.0f}",
                )
                bar.update(done - since)
            val = None
            if validating_now:
                val = (
                    validate(parallel.local_copy(state))
                    if primary
                    else dict.fromkeys(VAL_KEYS, 0.0)
                )
                val = distributed.from_primary(val)
                log.row({"step": done, **val})
                log.note(
                    f"step {done}: validation Dice {val['val_dice']:.4f} IoU {val['val_iou']:.4f}"
                    f" ({family.validator.scope})"
                )
            if validating_now or done == t.steps:
                log.plot()
            if (periodic and not nonfinite) or done == t.steps or stopping:
                ckpt.save(done, state, val)
            if stopping:
                raise TrainingInterrupted(stop[0] if stop else signal.SIGTERM, done, ckpt.directory)
            if logged:  # a window was just logged: time the next one from here
                tick, wait, since = time.perf_counter(), 0.0, done
