"""Bad input stops a run before training with an error naming the file, leaving the workdir untouched.

Every fault is a real file on disk: a copy of the tiny synthetic BraTS dataset is damaged per test.
Each runs train.py's main path in-process (cli.guarded around train_and_evaluate): exit status 2 and
the message alone on stderr; one test runs train.py itself.
"""

import contextlib
import gzip
import io
import os
import pathlib
import shutil
import subprocess
import sys
from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from ossnet_jax import cli, training
from ossnet_jax.data import dataset, nifti
from tests.conftest import tiny_config
from tests.dataset_writers import write_msd


@pytest.fixture
def brats(synthetic_root, tmp_path):
    """(config, dataset folder, workdir with earlier outputs) on a private copy of the dataset."""
    source = dataset.dataset_root(tiny_config(synthetic_root))
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns(".*"))
    config = tiny_config(root)
    config.data.format = "brats"
    workdir = tmp_path / "run"
    (workdir / "eval").mkdir(parents=True)
    (workdir / "config.json").write_text('{"earlier": "run"}')
    (workdir / "eval" / "metrics.json").write_text('{"mean": {"dice": 0.5}}')
    return config, root, workdir


def stops_before_training(config, workdir, *fragments) -> str:
    """Runs train_and_evaluate as train.py does (cli.guarded): expects exit status 2 for a DataError
    whose message, containing every fragment, ends stderr without a traceback; checks nothing changed."""
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    stderr = io.StringIO()
    with (
        mock.patch.dict(os.environ, {cli.TRACEBACK_ENV: "0"}),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as stop,
    ):
        cli.guarded(lambda argv: training.train_and_evaluate(config, workdir))([])
    error = stop.value.__context__
    assert stop.value.code == 2 and isinstance(error, nifti.DataError), error
    message = str(error)
    assert stderr.getvalue().endswith(f"\n{message}\n") or stderr.getvalue() == f"{message}\n"
    assert "Traceback" not in stderr.getvalue()
    for fragment in fragments:
        assert fragment in message, message
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before and not (workdir / "checkpoints").exists()
    return message


def case_file(root, number: int, kind: str):
    case = f"BraTS20_Training_{number:03d}"
    return root / case / f"{case}_{kind}.nii.gz"


def rewrite(path, change):
    data, affine = nifti.load_nifti(path)
    data, affine = change(data.copy(), affine.copy())
    nifti.save_nifti(path, data, affine)


def test_missing_modality_file(brats):
    config, root, workdir = brats
    case_file(root, 2, "t1ce").unlink()
    stops_before_training(config, workdir, "BraTS20_Training_002", "missing modality 't1ce'")


def test_truncated_gzip(brats):
    config, root, workdir = brats
    path = case_file(root, 3, "flair")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    stops_before_training(config, workdir, str(path), "corrupt")


def test_corrupt_gzip_stream(brats):
    config, root, workdir = brats
    path = case_file(root, 3, "t2")
    path.write_bytes(gzip.compress(b"not a nifti header" * 40))
    stops_before_training(config, workdir, str(path))


def test_label_of_a_different_shape(brats):
    config, root, workdir = brats
    path = case_file(root, 1, "seg")
    rewrite(path, lambda d, a: (d[:, :, :-1], a))
    stops_before_training(config, workdir, str(path), "label shape (28, 28, 15) differs")


def test_label_with_a_different_affine(brats):
    config, root, workdir = brats
    path = case_file(root, 1, "seg")

    def shift(data, affine):
        affine[0, 3] += 2.0
        return data, affine

    rewrite(path, shift)
    stops_before_training(config, workdir, str(path), "affine differs", "by up to 2 mm")


def test_nan_and_inf_voxels(brats):
    config, root, workdir = brats
    path = case_file(root, 4, "t2")

    def poison(data, affine):
        data = data.astype(np.float32)
        data[3, 4, 5], data[5, 4, 3] = np.nan, np.inf
        return data, affine

    rewrite(path, poison)
    stops_before_training(config, workdir, str(path), "2 of 12544 voxels are NaN or Inf")


def test_label_values_outside_the_declared_set(brats):
    config, root, workdir = brats
    path = case_file(root, 5, "seg")

    def add_three(data, affine):
        data[0, 0, 0] = 3
        return data, affine

    rewrite(path, add_three)
    stops_before_training(config, workdir, str(path), "label values [3] are not in", "(0, 1, 2, 4)")


def test_header_claiming_an_absurd_size_is_refused_before_reading(brats):
    config, root, workdir = brats
    case_file(root, 6, "t1").unlink()
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = root / "BraTS20_Training_006" / "BraTS20_Training_006_t1.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4096)
    stops_before_training(config, workdir, str(path), "256000000000 bytes")


def test_every_bad_case_is_reported_at_once(brats):
    config, root, workdir = brats
    truncated = case_file(root, 3, "flair")
    truncated.write_bytes(truncated.read_bytes()[:100])
    label = case_file(root, 5, "seg")
    rewrite(label, lambda d, a: (np.where(d == 4, 7, d).astype(np.uint8), a))
    stops_before_training(
        config, workdir, "2 of 6 cases cannot be used", str(truncated), str(label)
    )


def test_dataset_root_without_cases(brats, tmp_path):
    config, _, workdir = brats
    empty = tmp_path / "empty"
    empty.mkdir()
    config.data.root = str(empty)
    stops_before_training(config, workdir, str(empty), "no BraTS20_* case folders")


def test_msd_dataset_json_that_is_not_json(tmp_path):
    task = write_msd(tmp_path, four_d=False, cases=2, test_cases=0)
    (task / "dataset.json").write_text("{'training': ")
    config = tiny_config(task)
    config.data.format = "msd"
    workdir = tmp_path / "run"
    workdir.mkdir()
    stops_before_training(
        config, workdir, str(task / "dataset.json"), "not a valid MSD dataset.json"
    )


def test_empty_label_is_a_valid_case(brats):
    config, root, _ = brats
    rewrite(case_file(root, 2, "seg"), lambda d, a: (np.zeros_like(d), a))
    train, val = dataset.load_split(config)
    case = next(c for c in train + val if c.id == "BraTS20_Training_002")
    assert not np.asarray(case.target).any() and not np.asarray(case.band).any()


REPO = pathlib.Path(__file__).resolve().parents[1]
BAD_CONFIG = """import pathlib

from tests.conftest import tiny_config


def get_config():
    config = tiny_config(pathlib.Path({root!r}))
    config.data.format = "brats"
    return config
"""


@pytest.mark.slow
def test_train_py_exits_2_with_the_message_alone(brats, tmp_path):
    """The program itself, in a real process, on a dataset with label value 7: exit status 2 and the
    message naming the file on stderr, without a traceback."""
    _, root, workdir = brats
    label = case_file(root, 5, "seg")
    rewrite(label, lambda d, a: (np.where(d == 4, 7, d).astype(np.uint8), a))
    config_file = tmp_path / "bad.py"
    config_file.write_text(BAD_CONFIG.format(root=str(root)))
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    command = [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"{label}: label values [7] are not in" in done.stderr
    assert "Traceback" not in done.stderr
