"""Reliability: non-finite updates, changed configurations, killed and signalled runs, corrupt
checkpoints, reruns of evaluation, unwritable or full workdirs, and metrics.jsonl after a resume."""

import errno
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import jax
import ml_collections
import numpy as np
import pytest

from ossnet_jax import checkpointing, evaluation, train_state, training
from ossnet_jax.data import dataset
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import build_model
from tests.conftest import mechanics_config, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _snapshot(workdir: pathlib.Path) -> dict:
    """Bytes and mtime of config.json and of every file under checkpoints/."""
    files = [workdir / "config.json", *sorted((workdir / "checkpoints").rglob("*"))]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.is_file()}


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_nonfinite_batch_skips_the_update_and_a_finite_one_applies_it(synthetic_root):
    config = mechanics_config(synthetic_root)
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(oss_net_step.train_step, model=model, tx=tx, config=config))
    batch = dataset.stack_batch(train_cases[:2])
    bad = {**batch, "image": batch["image"].copy()}
    bad["image"][0, 3, 4, 5, 0] = np.nan

    skipped, out = step(state, bad, jax.random.key(1))
    assert int(out["skipped"]) == 1 and out["skipped"].dtype == np.int32
    assert int(skipped.step) == int(state.step) + 1
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(_leaves(getattr(skipped, name)), _leaves(getattr(state, name))):
            np.testing.assert_array_equal(a, b)

    applied, out = step(skipped, batch, jax.random.key(1))
    assert int(out["skipped"]) == 0 and int(applied.step) == int(state.step) + 2
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(applied.params.fast), _leaves(state.params.fast))
    )


@pytest.fixture(scope="module")
def two_steps(synthetic_root, tmp_path_factory):
    """A 2-step run with a checkpoint at step 2; tests below only change it where they say so."""
    workdir = tmp_path_factory.mktemp("reliability")
    config = mechanics_config(synthetic_root)
    config.train.steps = 2
    training.train_and_evaluate(config, str(workdir))
    assert _checkpoint_steps(workdir) == [2]
    return config, workdir


@pytest.mark.slow
def test_resuming_with_another_model_is_refused_and_writes_nothing(two_steps):
    config, workdir = two_steps
    before = _snapshot(workdir)
    changed = mechanics_config(pathlib.Path(config.data.root), decoder_width=8)
    changed.train.steps = 4
    with pytest.raises(ValueError) as error:
        training.train_and_evaluate(changed, str(workdir))
    message = str(error.value)
    assert "model.decoder_width: 16 (saved) -> 8 (new)" in message
    assert "--workdir" in message and "allow_config_change" in message
    assert "train.steps" not in message
    assert _snapshot(workdir) == before


@pytest.mark.slow
def test_config_differences_ignore_tuples_versus_lists_and_train_keys(two_steps):
    config, workdir = two_steps
    saved = json.loads((workdir / "config.json").read_text())
    new = config.to_dict()
    new["train"]["steps"] = 100
    assert training.config_differences(saved, new) == []
    new["data"]["grid_shape"] = (64, 32, 16)
    assert training.config_differences(saved, new) == [
        ("data.grid_shape", [32, 32, 16], [64, 32, 16])
    ]


@pytest.mark.parametrize(
    "key, value",
    [
        ("label_mode", "multiclass"),
        ("labels", (0, 1, 2)),
        ("downscale", 1),
        ("region_labels", ((1, 2), (2,), (4,))),
    ],
)
def test_resuming_refuses_changed_labels_and_downscale(tmp_path, key, value):
    """What the checkpoint's parameters were trained to read and predict: a change is refused and
    named, unless train.allow_config_change."""
    config = tiny_config(tmp_path)
    (tmp_path / "config.json").write_text(config.to_json())
    training.check_resume_config(config, tmp_path)
    saved = config.data[key]
    config.data[key] = value
    with pytest.raises(ValueError) as error:
        training.check_resume_config(config, tmp_path)
    old, new = json.loads(json.dumps([saved, value]))  # as config.json holds them: lists
    assert f"data.{key}: {old!r} (saved) -> {new!r} (new)" in str(error.value)
    config.train.allow_config_change = True
    training.check_resume_config(config, tmp_path)


@pytest.mark.slow
def test_allowed_config_change_reaches_restore_which_names_the_mismatch(two_steps):
    config, workdir = two_steps
    before = _snapshot(workdir)
    changed = mechanics_config(pathlib.Path(config.data.root), decoder_width=8)
    changed.train.allow_config_change = True
    with pytest.raises(ValueError, match=r"decoder_net\..*: saved \(.*16.*\), expected \(.*8.*\)"):
        training.train_and_evaluate(changed, str(workdir))
    assert _snapshot(workdir) == before


@pytest.mark.slow
def test_restore_into_another_model_names_checkpoint_and_paths(two_steps):
    config, workdir = two_steps
    changed = mechanics_config(pathlib.Path(config.data.root), decoder_width=8)
    model = build_model(changed)
    template = oss_net_step.init_state(
        changed, model, train_state.make_optimizer(changed), jax.random.key(0)
    )
    ckpt = checkpointing.Checkpoints(workdir)
    with pytest.raises(ValueError) as error:
        ckpt.restore(2, template)
    ckpt.close()
    message = str(error.value)
    assert str(workdir / "checkpoints" / "2") in message
    assert "params.fast.decoder_net." in message and "saved (16" in message


@pytest.mark.slow
def test_a_longer_run_resumes_and_nan_batches_stop_it_keeping_the_checkpoint(
    two_steps, monkeypatch, capsys
):
    """train.steps 2 -> 6 resumes from step 2; every batch NaN stops it after 2 skipped steps."""
    config, workdir = two_steps
    before = _snapshot(workdir)
    stack_batch = training.dataset.stack_batch

    def nan_batch(cases):
        batch = stack_batch(cases)
        return {**batch, "image": np.full_like(batch["image"], np.nan)}

    monkeypatch.setattr(training.dataset, "stack_batch", nan_batch)
    longer = mechanics_config(pathlib.Path(config.data.root))
    longer.train.steps = 6
    longer.train.max_nonfinite_steps = 2
    with pytest.raises(
        FloatingPointError, match="2 consecutive non-finite steps .* at step 4"
    ) as e:
        training.train_and_evaluate(longer, str(workdir))
    assert f"resuming from step 2 of {workdir / 'checkpoints'}" in capsys.readouterr().out
    assert "checkpoint (step 2)" in str(e.value) and "is intact" in str(e.value)
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert _checkpoint_steps(workdir) == [2]
    after = _snapshot(workdir)
    del after[str(workdir / "config.json")], before[str(workdir / "config.json")]
    assert after == before
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite") == 1] == [3, 4]


@pytest.mark.slow
def test_nonfinite_steps_between_reads_are_found_at_the_next_read_without_saving(
    two_steps, tmp_path, monkeypatch
):
    """Logged every 5 steps, resumed from step 2: NaN batches reach 2 consecutive skips at step 4;
    the loop reads its flags only at step 5, then logs every skipped step so far, names step 4 and
    stops before the checkpoint or validation of any later step."""
    config, workdir = two_steps
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    before = _snapshot(copy)
    stack_batch = training.dataset.stack_batch

    def nan_batch(cases):
        batch = stack_batch(cases)
        return {**batch, "image": np.full_like(batch["image"], np.nan)}

    monkeypatch.setattr(training.dataset, "stack_batch", nan_batch)
    longer = mechanics_config(pathlib.Path(config.data.root))
    longer.train.steps = 8
    longer.train.max_nonfinite_steps = 2
    longer.train.log_every = 5
    longer.train.checkpoint_every = 6  # after the read: never reached
    longer.train.eval_every = 6
    with pytest.raises(FloatingPointError) as e:
        training.train_and_evaluate(longer, str(copy))
    assert str(e.value).startswith(
        "2 consecutive non-finite steps (loss or gradients) at step 4 (read at step 5); "
        f"training stopped without saving, the last good checkpoint (step 2) in {copy / 'checkpoints'}"
        " is intact"
    )
    after = _snapshot(copy)
    del after[str(copy / "config.json")], before[str(copy / "config.json")]
    assert after == before and _checkpoint_steps(copy) == [2]
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite") == 1] == [3, 4, 5]
    assert max(r["step"] for r in rows) == 5


def test_drop_log_rows_after_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "val_dice": 0.5}, {"step": 3, "loss": 0.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    training.drop_log_rows_after(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:2]
    inode = log.stat().st_ino
    training.drop_log_rows_after(log, 2)
    assert log.stat().st_ino == inode  # nothing to drop: not rewritten
    training.drop_log_rows_after(log, 0)
    assert log.read_text() == ""
    training.drop_log_rows_after(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()


def test_free_space_check_names_the_folder_and_the_sizes(tmp_path):
    mib = 2**20
    checkpointing.check_free_space(tmp_path, 200 * mib, 10 * mib, 5)  # 5 x 10 + 64 MiB margin fit
    with pytest.raises(OSError) as error:
        checkpointing.check_free_space(tmp_path, 100 * mib, 10 * mib, 5)
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert str(tmp_path) in message and "100.0 MiB free" in message
    assert "114.0 MiB needed" in message and "5 x 10.0 MiB" in message
    ckpt = checkpointing.Checkpoints(tmp_path)
    assert ckpt.copies_to_fit() == 5  # none saved yet: the last 3, the best, the one being written
    ckpt.close()


NOBODY = 65534  # the unprivileged user the read-only test runs as under root (CI)

# Imports as root (the interpreter and packages may be readable by root alone), then becomes NOBODY,
# for whom file permissions hold, and trains into argv[2] on the dataset at argv[1].
READ_ONLY_CHILD = """
import os, pathlib, sys
from ossnet_jax import training
from tests.conftest import tiny_config

try:
    os.setgroups([])
    os.setgid({uid})
    os.setuid({uid})
except OSError:  # no CAP_SETUID
    sys.exit(4)
try:
    training.train_and_evaluate(tiny_config(pathlib.Path(sys.argv[1])), sys.argv[2])
except PermissionError as error:
    print(f"PermissionError: {{error}}")
    sys.exit(3)
"""


def test_a_read_only_workdir_fails_before_training_and_is_named(synthetic_root, tmp_path):
    """A read-only workdir (mode 555). Root may write there anyway, so as root (how CI runs) the run
    is a child process that drops to the unprivileged user `nobody` after its imports, on a copy of
    the dataset (and its cache) that user can read; skipped only where that cannot be done."""
    if os.geteuid() != 0:
        workdir = tmp_path / "read_only"
        workdir.mkdir()
        workdir.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match=f"cannot write to {re.escape(str(workdir))}"):
                training.train_and_evaluate(tiny_config(synthetic_root), str(workdir))
        finally:
            workdir.chmod(0o755)
        assert list(workdir.iterdir()) == []
        return
    dataset.load_split(tiny_config(synthetic_root))  # written and cached: the child only reads
    # in /tmp, which nobody can reach (pytest's tmp_path lies in a folder of root's alone)
    shared = pathlib.Path(tempfile.mkdtemp(prefix="ossnet_read_only_"))
    try:
        root = shared / "data"
        shutil.copytree(synthetic_root, root)
        workdir = shared / "read_only"
        workdir.mkdir()
        for path in (shared, *shared.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        workdir.chmod(0o555)
        # folders of root's that the child may use after it became nobody: its own instead
        env = dict(os.environ, MPLCONFIGDIR=str(shared / "mpl"))
        env["JAX_COMPILATION_CACHE_DIR"] = str(shared / "jax_cache")
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_CHILD.format(uid=NOBODY), str(root), str(workdir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode == 4:
            pytest.skip("root cannot become another user here (no CAP_SETUID)")
        assert done.returncode == 3, done.stdout + done.stderr[-3000:]
        assert f"cannot write to {workdir}" in done.stdout
        assert list(workdir.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_workdir_below_a_file_fails_before_training_and_is_named(synthetic_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = blocker / "run"
    with pytest.raises(OSError, match=f"cannot write to {re.escape(str(workdir))}"):
        training.train_and_evaluate(tiny_config(synthetic_root), str(workdir))


def test_stop_requests_record_sigint_and_sigterm_then_restore_the_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with training._stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop == [signal.SIGINT, signal.SIGTERM]  # recorded; neither stopped the process
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    stopped = training.TrainingInterrupted(signal.SIGINT, 3, pathlib.Path("/w/checkpoints"))
    assert stopped.exit_code == 130
    assert "SIGINT received: stopped after step 3" in str(stopped)
    assert "/w/checkpoints/3" in str(stopped)
    assert training.TrainingInterrupted(signal.SIGTERM, 3, pathlib.Path("/w")).exit_code == 143


@pytest.mark.slow
def test_evaluate_skips_cases_done_for_the_same_step_unless_overwrite(two_steps, capsys):
    config, workdir = two_steps
    out = workdir / "eval"
    predictions = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2  # written by the run's own evaluation at step 2
    saved = json.loads((out / "metrics.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in predictions}

    assert evaluation.evaluate(config, workdir) == saved
    assert {p: p.stat().st_mtime_ns for p in predictions} == stamps
    assert "reusing 2 predictions of checkpoint step 2" in capsys.readouterr().out

    predictions[0].unlink()  # a case without its prediction file is predicted again
    again = evaluation.evaluate(config, workdir)
    assert predictions[0].exists() and predictions[1].stat().st_mtime_ns == stamps[predictions[1]]
    assert again["cases"][1] == saved["cases"][1] and again["mean"] == saved["mean"]
    assert "reusing 1 predictions" in capsys.readouterr().out

    stamps = {p: p.stat().st_mtime_ns for p in predictions}
    evaluation.evaluate(config, workdir, overwrite=True)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in predictions)
    assert "reusing" not in capsys.readouterr().out


# train.py subprocesses. They share the session's persistent JAX compilation cache (conftest.py), so
# only the first compiles.
STEPS = 6


def train_py_config(root: pathlib.Path) -> ml_collections.ConfigDict:
    """mechanics_config without validation cases, STEPS steps, a checkpoint every 2, a row per step:
    the in-process runs' update, compiled once."""
    config = mechanics_config(root)
    config.data.val_fraction = 0.0
    config.train.steps = STEPS
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.eval_every = 1000
    return config


RUN_CONFIG = """# train_py_config as a config file for train.py.

import pathlib

from tests.test_reliability import train_py_config


def get_config():
    return train_py_config(pathlib.Path({root!r}))
"""
TIMEOUT_S = 240


class TrainRun:
    """A `python train.py` subprocess; its stdout and stderr go to a file."""

    def __init__(self, command: list[str], env: dict, log_path: pathlib.Path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, condition, what: str, interval: float = 0.002) -> None:
        """Polls `condition` until true; fails if the run ends first or after TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(
                    f"train.py ended ({self.process.returncode}) before {what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"no {what} after {TIMEOUT_S} s:\n{self.output()}")
            time.sleep(interval)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(TIMEOUT_S) == -signal.SIGKILL

    def finish(self) -> int:
        return self.process.wait(TIMEOUT_S)


@pytest.fixture(scope="module")
def start_run(synthetic_root, tmp_path_factory):
    """start_run(workdir, *flags) starts train.py on the tiny STEPS-step config in WORKDIR."""
    folder = tmp_path_factory.mktemp("train_py")
    config_file = folder / "tiny.py"
    config_file.write_text(RUN_CONFIG.format(root=str(synthetic_root)))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
    }
    runs = iter(range(100))

    def start(workdir: pathlib.Path, *flags: str) -> TrainRun:
        command = [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}"]
        return TrainRun([*command, *flags], env, folder / f"run{next(runs)}.log")

    return start


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted run of the train.py runs' configuration: checkpoints at steps
    2, 4 and 6. Trained in this process, where the XLA flags are train.py's (conftest.py), since
    train.py only calls train_and_evaluate; its subprocess start would add nothing checked here."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    training.train_and_evaluate(train_py_config(synthetic_root), str(workdir))
    assert _checkpoint_steps(workdir) == [2, 4, STEPS]
    return workdir


def _restore(workdir: pathlib.Path, step: int):
    """The train state saved at `step` in WORKDIR, for the config saved there."""
    config = evaluation.load_config(workdir)
    model = build_model(config)
    template = jax.eval_shape(
        lambda: oss_net_step.init_state(
            config, model, train_state.make_optimizer(config), jax.random.key(0)
        )
    )
    ckpt = checkpointing.Checkpoints(workdir)
    state = ckpt.restore(step, template)
    ckpt.close()
    return state


def _assert_same_states(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest of the data files (OCDBT 'd/' folders) holding a checkpoint's arrays."""
    data = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(data, key=lambda p: p.stat().st_size)


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the training rows (those with a loss) of metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_killed_and_corrupted_runs_resume_to_the_uninterrupted_parameters(
    start_run, reference, tmp_path
):
    """SIGKILL after checkpoint 4; checkpoint 4 truncated on disk; the rerun says so, moves it aside
    and resumes from 2; SIGKILL while it writes checkpoint 4 again; the third run of the same command
    ends with the parameters and the metrics.jsonl steps of the uninterrupted run."""
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    first = start_run(workdir)
    first.wait_for(lambda: (checkpoints / "4").is_dir(), "checkpoint 4")
    first.kill()
    assert _checkpoint_steps(workdir) == [2, 4]

    truncated = _largest_array_file(checkpoints / "4")
    os.truncate(truncated, truncated.stat().st_size // 2)
    second = start_run(workdir)
    writing = lambda: list(checkpoints.glob("4.orbax-checkpoint-tmp*"))
    second.wait_for(writing, "the temporary folder of checkpoint 4", interval=0.001)
    second.kill()
    assert writing() and not (checkpoints / "4").exists(), "killed before or after the write"
    output = second.output()
    moved = [p for p in checkpoints.iterdir() if p.name.startswith("corrupt-4-")]
    assert len(moved) == 1 and (moved[0] / truncated.relative_to(checkpoints / "4")).exists()
    assert f"{checkpoints / '4'} cannot be read: " in output
    assert f"moved it to {moved[0]}; using step 2 instead" in output
    assert f"resuming from step 2 of {checkpoints}" in output
    assert "Event loop is closed" not in output and "Exception ignored" not in output

    third = start_run(workdir)
    assert third.finish() == 0, third.output()
    assert f"resuming from step 2 of {checkpoints}" in third.output()
    assert not writing() and _checkpoint_steps(workdir) == [2, 4, STEPS]
    _assert_same_states(_restore(workdir, STEPS), _restore(reference, STEPS))
    assert _logged_steps(workdir) == _logged_steps(reference) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_from_it(
    start_run, reference, tmp_path
):
    """SIGTERM once step 1 is logged: the run saves the step it is on (no periodic checkpoints) and
    exits 143; the rerun resumes there and ends with the parameters of the uninterrupted run."""
    workdir = tmp_path / "terminated"
    no_periodic = "--config.train.checkpoint_every=100"  # only the signal's and the last checkpoint
    first = start_run(workdir, no_periodic)
    log = workdir / "metrics.jsonl"
    first.wait_for(lambda: log.exists() and '"loss"' in log.read_text(), "step 1")
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 128 + signal.SIGTERM, first.output()
    (saved,) = _checkpoint_steps(workdir)
    assert 1 <= saved < STEPS
    assert f"SIGTERM received: stopped after step {saved}, saved as checkpoint" in first.output()

    second = start_run(workdir, no_periodic)
    assert second.finish() == 0, second.output()
    assert f"resuming from step {saved} of {workdir / 'checkpoints'}" in second.output()
    _assert_same_states(_restore(workdir, STEPS), _restore(reference, STEPS))


@pytest.mark.slow
def test_corrupt_checkpoints_are_named_and_the_newest_good_one_restored(
    reference, tmp_path, capsys
):
    """A data file of checkpoint 6 truncated, one of 4 deleted: evaluation falls back to step 2 and
    leaves them in place; training (restore_latest) moves them aside to checkpoints/corrupt-<step>-*."""
    workdir = tmp_path / "corrupt"
    shutil.copytree(reference, workdir)
    checkpoints = workdir / "checkpoints"
    truncated = _largest_array_file(checkpoints / "6")
    os.truncate(truncated, truncated.stat().st_size // 2)
    _largest_array_file(checkpoints / "4").unlink()
    expected = _restore(reference, 2)

    _, step = evaluation.restore_predictor(evaluation.load_config(workdir), workdir)
    assert step == 2 and _checkpoint_steps(workdir) == [2, 4, 6]
    output = capsys.readouterr().out
    for bad in ("6", "4"):
        assert f"{checkpoints / bad} cannot be read: ValueError: " in output
    assert output.count("left it in place; using step 2 instead") == 2
    with pytest.raises(
        checkpointing.CorruptCheckpointError, match=re.escape(str(checkpoints / "6"))
    ):
        evaluation.restore_predictor(evaluation.load_config(workdir), workdir, step=6)

    ckpt = checkpointing.Checkpoints(workdir, writer=True)
    step, state = ckpt.restore_latest(expected)
    assert step == 2 and ckpt.manager.all_steps() == [2]
    ckpt.close()
    _assert_same_states(state, expected)
    output = capsys.readouterr().out
    moved = {}
    for bad in ("6", "4"):
        (moved[bad],) = [p for p in checkpoints.iterdir() if p.name.startswith(f"corrupt-{bad}-")]
        assert f"{checkpoints / bad} cannot be read: " in output
        assert f"moved it to {moved[bad]}; using step 2 instead" in output
    assert (moved["6"] / truncated.relative_to(checkpoints / "6")).exists()  # kept, not deleted
    assert _checkpoint_steps(workdir) == [2]


def test_only_the_aftermath_of_a_failed_restore_is_silenced():
    orbax_read = types.SimpleNamespace(
        cr_code=types.SimpleNamespace(
            co_filename=os.path.join("site-packages", "orbax", "checkpoint", "serialization.py")
        )
    )
    other = types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=__file__))
    error = Exception("Encountered error while reading array index")
    assert checkpointing.is_failed_read_aftermath(error, orbax_read)
    assert checkpointing.is_failed_read_aftermath(RuntimeError("Event loop is closed"), None)
    assert not checkpointing.is_failed_read_aftermath(error, other)
    assert not checkpointing.is_failed_read_aftermath(RuntimeError("another failure"), None)


@pytest.mark.slow
def test_when_no_checkpoint_can_be_read_none_is_moved_and_all_are_named(reference, tmp_path):
    workdir = tmp_path / "all_corrupt"
    shutil.copytree(reference, workdir)
    checkpoints = workdir / "checkpoints"
    for step in (2, 4, 6):
        _largest_array_file(checkpoints / str(step)).unlink()
    ckpt = checkpointing.Checkpoints(workdir, writer=True)
    with pytest.raises(checkpointing.CorruptCheckpointError) as error:
        ckpt.restore_latest(_restore(reference, 2))
    ckpt.close()
    for step in (2, 4, 6):
        assert f"{checkpoints / str(step)} cannot be read" in str(error.value)
    assert "to start from scratch, or use another --workdir" in str(error.value)
    assert _checkpoint_steps(workdir) == [2, 4, 6]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith("corrupt-")]
