"""Tests for BraTS 2020 layout discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ossnet_jax.data.layouts import Case, find_brats_cases
from ossnet_jax.data.nifti import DataError, load_nifti, save_nifti
from ossnet_jax.data.synthetic import DATASET_DIR, MODALITIES, write_synthetic_brats


def _make_case(
    folder: Path,
    case_id: str,
    ext: str = ".nii.gz",
    seg_name: str | None = "default",
    skip: str | None = None,
) -> Path:
    """Write a tiny case folder; ``seg_name`` None omits the label, "default" uses ``<id>_seg``."""
    case = folder / case_id
    volume = np.zeros((4, 4, 3), np.int16)
    for mod in MODALITIES:
        if mod != skip:
            save_nifti(case / f"{case_id}_{mod}{ext}", volume, np.eye(4))
    if seg_name is not None:
        name = f"{case_id}_seg{ext}" if seg_name == "default" else seg_name
        save_nifti(case / name, volume.astype(np.uint8), np.eye(4))
    return case


def test_synthetic_layout_from_parent_and_dataset_folder(tmp_path: Path) -> None:
    folder = write_synthetic_brats(tmp_path, 2, 0, (24, 24, 16))
    cases = find_brats_cases(tmp_path)
    assert cases == find_brats_cases(folder)
    assert [c.id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    first = cases[0]
    assert isinstance(first, Case)
    assert first.image_paths == tuple(
        folder / first.id / f"{first.id}_{m}.nii.gz" for m in MODALITIES
    )
    assert first.label_path == folder / first.id / f"{first.id}_seg.nii.gz"
    label, _ = load_nifti(first.label_path)
    assert set(np.unique(label)) == {0, 1, 2, 4}
    with pytest.raises(AttributeError):
        first.id = "other"  # type: ignore[misc]


def test_sorted_ignores_other_entries_and_accepts_nii(tmp_path: Path) -> None:
    root = tmp_path / DATASET_DIR
    for case_id in ("BraTS20_Training_010", "BraTS20_Training_002"):
        _make_case(root, case_id, ext=".nii")
    (root / "notes").mkdir()
    (root / "name_mapping.csv").write_text("id\n")
    cases = find_brats_cases(root)
    assert [c.id for c in cases] == ["BraTS20_Training_002", "BraTS20_Training_010"]
    assert all(p.suffix == ".nii" for c in cases for p in (*c.image_paths, c.label_path))


def test_differently_named_label(tmp_path: Path) -> None:
    case = _make_case(
        tmp_path, "BraTS20_Training_355", ext=".nii", seg_name="W39_1998.09.19_Segm.nii"
    )
    (cases,) = find_brats_cases(tmp_path)
    assert cases.label_path == case / "W39_1998.09.19_Segm.nii"
    assert cases.image_paths[2] == case / "BraTS20_Training_355_t1ce.nii"


def test_ambiguous_labels_raise(tmp_path: Path) -> None:
    case = _make_case(tmp_path, "BraTS20_Training_001", seg_name="a_seg_v1.nii.gz")
    save_nifti(case / "b_seg_v2.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="several") as info:
        find_brats_cases(tmp_path)
    assert str(case) in str(info.value)


def test_validation_cases_have_no_label(tmp_path: Path) -> None:
    root = tmp_path / "MICCAI_BraTS2020_ValidationData"
    _make_case(root, "BraTS20_Validation_001", seg_name=None)
    (case,) = find_brats_cases(root)
    assert case.id == "BraTS20_Validation_001"
    assert case.label_path is None
    assert len(case.image_paths) == len(MODALITIES)


def test_missing_modality_names_case_and_modality(tmp_path: Path) -> None:
    _make_case(tmp_path, "BraTS20_Training_001")
    case = _make_case(tmp_path, "BraTS20_Training_002", skip="t1ce")
    with pytest.raises(DataError, match="t1ce") as info:
        find_brats_cases(tmp_path)
    assert str(case) in str(info.value)


def test_empty_or_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        find_brats_cases(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / DATASET_DIR).mkdir()
    with pytest.raises(DataError, match="no BraTS20_"):
        find_brats_cases(tmp_path)
    missing = tmp_path / "absent"
    with pytest.raises(DataError, match="not found") as info:
        find_brats_cases(missing)
    assert str(missing) in str(info.value)
