"""Tests for validated NIfTI loading and atomic saving."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet_jax.data import nifti
from ossnet_jax.data.nifti import DataError, load_nifti, save_nifti, voxel_spacing

AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def _write_valid(path: Path) -> np.ndarray:
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    save_nifti(path, data, AFFINE)
    return data


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii"])
def test_round_trip(tmp_path: Path, dtype: type, name: str) -> None:
    data = (np.random.default_rng(0).random((7, 6, 5)) * 100).astype(dtype)
    path = tmp_path / "sub" / "dir" / name
    save_nifti(path, data, AFFINE)
    loaded, affine = load_nifti(path)
    assert loaded.dtype == dtype
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_allclose(affine, AFFINE)
    assert affine.dtype == np.float64
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


def test_bool_saved_as_uint8(tmp_path: Path) -> None:
    path = tmp_path / "mask.nii.gz"
    save_nifti(path, np.eye(4, dtype=bool)[..., None], np.eye(4))
    loaded, _ = load_nifti(path)
    assert loaded.dtype == np.uint8
    assert loaded.sum() == 4


def test_scaled_data_loads_as_float32(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    loaded, _ = load_nifti(path)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, 10.5)


def test_big_endian_file_loads_native(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4), header=nib.Nifti1Header(endianness=">"), dtype=np.int16)
    path = tmp_path / "be.nii"
    nib.save(img, str(path))
    loaded, _ = load_nifti(path)
    assert loaded.dtype == np.int16 and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, data)


def test_voxel_spacing() -> None:
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert voxel_spacing(affine) == pytest.approx((2.0, 1.0, 3.0))
    assert voxel_spacing(AFFINE) == pytest.approx((1.0, 1.0, 1.0))


def _assert_error_names(path: Path, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_nifti(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _assert_error_names(tmp_path / "absent.nii.gz", "not found")


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gzip(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.nii.gz"
    _write_valid(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    _assert_error_names(path, "corrupt|not a readable")


def test_truncated_uncompressed(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii"
    _write_valid(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    _assert_error_names(path, "corrupt")


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii"])
def test_garbage_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    _assert_error_names(path, "not a readable NIfTI")


def test_gzip_of_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 50))
    _assert_error_names(path, "not a readable NIfTI")


def test_nan_and_inf_voxels(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = tmp_path / "nan.nii.gz"
    save_nifti(path, data, AFFINE)
    _assert_error_names(path, "2 of 64 voxels are NaN or Inf")


def test_header_claiming_huge_size_is_refused(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    _assert_error_names(path, "32000000000 bytes")


def test_max_bytes_limit(tmp_path: Path) -> None:
    path = tmp_path / "small.nii.gz"
    _write_valid(path)
    assert load_nifti(path, max_bytes=6 * 5 * 4 * 4)[0].shape == (6, 5, 4)
    with pytest.raises(DataError, match="limit of 100 bytes") as info:
        load_nifti(path, max_bytes=100)
    assert str(path) in str(info.value)


def test_save_rejects_bad_name_and_affine(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.nii"):
        save_nifti(tmp_path / "vol.npy", np.zeros((2, 2, 2)), AFFINE)
    with pytest.raises(DataError, match="affine"):
        save_nifti(tmp_path / "vol.nii.gz", np.zeros((2, 2, 2)), np.eye(3))
    assert list(tmp_path.iterdir()) == []


def test_unconvertible_data_leaves_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.nii.gz"
    original = _write_valid(path)
    before = path.read_bytes()
    with pytest.raises(DataError, match="could not write") as info:
        save_nifti(path, np.array([[["a"]]], dtype=object), AFFINE)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    np.testing.assert_array_equal(load_nifti(path)[0], original)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    path = tmp_path / "keep.nii.gz"
    _write_valid(path)
    before = path.read_bytes()
    written: list[str] = []

    def partial_save(img: nib.Nifti1Image, filename: str) -> None:
        written.append(filename)
        Path(filename).write_bytes(b"\x1f\x8b half a file")
        raise failure

    monkeypatch.setattr(nifti.nib, "save", partial_save)
    with pytest.raises((DataError, KeyboardInterrupt)):
        save_nifti(path, np.zeros((6, 5, 4), np.float32), AFFINE)
    assert written and Path(written[0]).parent == tmp_path
    assert Path(written[0]).name.endswith(".nii.gz") and Path(written[0]).name.startswith(".keep")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]
