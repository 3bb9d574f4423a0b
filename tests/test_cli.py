"""User-facing errors end an entry point with their message alone and exit status 2 (ossnet_jax/cli.py)."""

import contextlib
import errno
import io
import pathlib

import pytest
from absl import flags

from ossnet_jax import checkpointing, cli, errors, files
from ossnet_jax.data import nifti


def run_guarded(raise_it) -> tuple[int, str]:
    """(exit status, stderr) of an entry point whose main calls `raise_it`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stop:
        cli.guarded(lambda argv: raise_it())([])
    return stop.value.code, stderr.getvalue()


def raiser(error: BaseException):
    def raise_it():
        raise error

    return raise_it


@pytest.mark.parametrize(
    "error",
    [
        nifti.DataError("/data/case_1/flair.nii.gz: 2 of 12544 voxels are NaN or Inf"),
        errors.ConfigError("train.prepare must be one of ('device', 'host'), got 'gpu'"),
        checkpointing.CorruptCheckpointError(
            pathlib.Path("/run/checkpoints/4"), "ValueError: truncated"
        ),
        FileNotFoundError("/run/config.json not found: is /run a training workdir?"),
        OSError(errno.ENOSPC, "not enough free space for checkpoints in /run/checkpoints"),
    ],
    ids=["data", "config", "checkpoint", "missing-file", "disk"],
)
def test_user_errors_print_the_message_alone_and_exit_2(error, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    code, stderr = run_guarded(raiser(error))
    assert code == cli.EXIT_USER_ERROR == 2
    assert stderr == f"{error}\n" and "Traceback" not in stderr


def test_an_unwritable_workdir_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, stderr = run_guarded(lambda: files.ensure_writable_dir(blocker / "run"))
    assert code == 2 and f"cannot write to {blocker / 'run'}" in stderr
    assert "Traceback" not in stderr


def test_the_environment_variable_shows_the_traceback_too(monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    code, stderr = run_guarded(raiser(nifti.DataError("/data/x.nii: corrupt")))
    assert (
        code == 2 and stderr.startswith("Traceback") and stderr.endswith("/data/x.nii: corrupt\n")
    )
    monkeypatch.setenv(cli.TRACEBACK_ENV, "0")
    assert "Traceback" not in run_guarded(raiser(nifti.DataError("/data/x.nii: corrupt")))[1]


def test_verbosity_1_shows_the_traceback(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(flags.FLAGS["verbosity"], "value", 1)
    code, stderr = run_guarded(raiser(errors.ConfigError("data.labels must list ...")))
    assert code == 2 and stderr.startswith("Traceback") and "ConfigError" in stderr
    monkeypatch.setattr(flags.FLAGS["verbosity"], "value", 0)
    assert run_guarded(raiser(errors.ConfigError("x")))[1] == "x\n"


def test_other_exceptions_propagate_with_their_traceback(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    with pytest.raises(ZeroDivisionError):
        cli.guarded(lambda argv: 1 / 0)([])
    with pytest.raises(KeyError):  # a bug's KeyError is not a user's mistake
        cli.guarded(lambda argv: {}["missing"])([])
    assert cli.guarded(lambda argv: argv)(["x"]) == ["x"]
