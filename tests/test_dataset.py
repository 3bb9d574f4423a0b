"""Preprocessing, the cache (data.cache_dir; two processes building it at once), the split and batch
order."""

import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from ossnet_jax.data import dataset, layouts, nifti, preprocess
from tests.conftest import TINY_GRID, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_zscore_per_channel_over_nonzero_voxels():
    rng = np.random.default_rng(0)
    image = np.zeros((6, 6, 6, 2))
    image[1:5, 1:5, 1:5, 0] = rng.normal(100, 10, (4, 4, 4))
    image[1:5, 1:5, 1:5, 1] = rng.normal(-3, 2, (4, 4, 4))
    out = preprocess.zscore(image)
    inside = out[1:5, 1:5, 1:5]
    np.testing.assert_allclose(inside.reshape(-1, 2).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(inside.reshape(-1, 2).std(0), 1, atol=1e-5)
    assert out[0].max() == 0 and out[0].min() == 0


def test_pad_and_crop_round_trip():
    array = np.arange(5 * 4 * 3).reshape(5, 4, 3)
    offsets = preprocess.centre_offsets(array.shape, (8, 8, 4))
    assert offsets == (1, 2, 0)
    padded = preprocess.pad_to_grid(array, (8, 8, 4), offsets)
    assert padded.shape == (8, 8, 4) and padded.sum() == array.sum()
    np.testing.assert_array_equal(preprocess.crop_from_grid(padded, array.shape, offsets), array)
    with pytest.raises(ValueError, match="does not fit"):
        preprocess.centre_offsets((9, 4, 3), (8, 8, 4))


def test_split_is_deterministic_and_disjoint():
    ids = [f"case{i:02d}" for i in range(20)]
    train, val = dataset.split_ids(ids, 0.2, seed=3)
    assert (train, val) == dataset.split_ids(ids, 0.2, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == ids
    assert dataset.split_ids(ids, 0.2, seed=4)[1] != val


def test_case_indices_cover_each_epoch_once():
    seen = np.concatenate([dataset.case_indices(s, 3, 9, seed=0) for s in range(3)])
    assert sorted(seen) == list(range(9))
    np.testing.assert_array_equal(
        dataset.case_indices(5, 3, 9, 0), dataset.case_indices(5, 3, 9, 0)
    )


def test_cache_is_built_once_and_read_without_nifti(synthetic_root, monkeypatch):
    config = tiny_config(synthetic_root)
    train, val = dataset.load_split(config)
    assert len(train) == 4 and len(val) == 2
    case = train[0]
    assert case.image.shape == TINY_GRID + (4,) and case.image.dtype == np.float32
    # class indices into data.labels (0, 1, 2, 4); the synthetic tumours hold all three labels
    assert case.target.shape == TINY_GRID and set(np.unique(case.target)) == {0, 1, 2, 3}
    assert case.shape == (28, 28, 16) and case.offsets == (2, 2, 0)
    assert case.band[case.target.astype(bool)].any()

    def no_reads(path, **kwargs):
        raise AssertionError(f"NIfTI read from {path}")

    monkeypatch.setattr(nifti, "load_nifti", no_reads)
    again, _ = dataset.load_split(config)
    np.testing.assert_array_equal(np.asarray(again[0].image), np.asarray(case.image))


def test_cache_key_changes_with_preprocessing_and_file_contents(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root)
    case = dataset.find_cases(config)[0]
    key = dataset._cache_key(case, config)
    config.data.band_size = 7
    assert dataset._cache_key(case, config) != key
    config.data.band_size = 5
    assert dataset._cache_key(case, config) == key
    copy = tmp_path / case.id
    shutil.copytree(case.label_path.parent, copy)
    moved = layouts.Case(
        case.id, tuple(copy / p.name for p in case.image_paths), copy / case.label_path.name
    )
    assert dataset._cache_key(moved, config) == key  # contents, not paths or times, decide
    label, affine = nifti.load_nifti(moved.label_path)
    label[0, 0, 0] = 2
    nifti.save_nifti(moved.label_path, label, affine)
    assert dataset._cache_key(moved, config) != key


def test_volume_too_large_for_grid_names_the_file(synthetic_root):
    config = tiny_config(synthetic_root)
    config.data.grid_shape = (16, 32, 16)
    with pytest.raises(nifti.DataError, match="flair.nii.gz.*does not fit"):
        dataset.load_split(config)


def _two_cases(synthetic_root, folder: pathlib.Path) -> ml_collections.ConfigDict:
    """tiny_config on a BraTS folder holding two of the synthetic cases (no cache yet)."""
    source = dataset.dataset_root(tiny_config(synthetic_root))
    for case in dataset.find_cases(tiny_config(synthetic_root))[:2]:
        shutil.copytree(source / case.id, folder / case.id)
    config = tiny_config(folder)
    config.data.format = "brats"
    return config


def test_data_cache_dir_holds_the_cache_instead_of_the_data_folder(synthetic_root, tmp_path):
    config = _two_cases(synthetic_root, tmp_path / "data")
    config.data.cache_dir = str(tmp_path / "cache")
    train, val = dataset.load_split(config)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [name.split("-")[0] for name in entries] == sorted(c.id for c in train + val)
    assert not (tmp_path / "data" / ".ossnet_cache").exists()


# Prepares every case of argv[1] into the cache argv[2]; after reading its first case it marks
# argv[3] and waits for the other process's mark argv[4], so both find that case missing and
# write it, and one of the two renames meets the other's finished folder.
CACHE_CHILD = """
import pathlib, sys, time
from ossnet_jax.data import dataset
from tests.conftest import tiny_config

config = tiny_config(pathlib.Path(sys.argv[1]))
config.data.format = "brats"
config.data.cache_dir = sys.argv[2]
mine, other = pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
read = dataset._read_case


def read_together(case, config):
    arrays = read(case, config)
    mine.touch()
    deadline = time.monotonic() + 60
    while not other.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return arrays


dataset._read_case = read_together
prepared = dataset.prepare_cases(dataset.find_cases(config), config, dataset.cache_dir_for(config))
print(" ".join(case.id for case in prepared))
"""


@pytest.mark.slow
def test_two_processes_build_one_cache_at_once(synthetic_root, tmp_path):
    """Both processes preprocess the same cases into one cache at the same time: both succeed, the
    cache holds one finished folder per case and no temporary one, with the arrays of a read."""
    config = _two_cases(synthetic_root, tmp_path / "data")
    cache = tmp_path / "cache"
    marks = [tmp_path / "first", tmp_path / "second"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_CHILD, str(tmp_path / "data"), str(cache), str(a), str(b)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a, b in (marks, marks[::-1])
    ]
    results = [run.communicate(timeout=300) for run in runs]
    ids = [case.id for case in dataset.find_cases(config)]
    for run, (out, err) in zip(runs, results):
        assert run.returncode == 0, err[-3000:]
        assert out.split() == ids
    entries = sorted(cache.iterdir())
    assert [p.name.split("-")[0] for p in entries] == ids  # no temporary folder left
    for case, folder in zip(dataset.find_cases(config), entries):
        cached, fresh = dataset._load_cached(folder), dataset.read_case(case, config)
        np.testing.assert_array_equal(np.asarray(cached.image), fresh.image)
        np.testing.assert_array_equal(np.asarray(cached.target), fresh.target)
