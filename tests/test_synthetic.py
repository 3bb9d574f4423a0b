"""Tests for the synthetic BraTS-like generator and dataset writer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ossnet_jax.data.synthetic import (
    DATASET_DIR,
    GENERATOR_VERSION,
    MODALITIES,
    generate_case,
    main,
    write_synthetic_brats,
)

TINY = (24, 24, 16)
FULL = (88, 88, 58)


@pytest.fixture(scope="module")
def full_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [generate_case(0, i, FULL) for i in range(4)]


def _best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of ``values >= t`` or ``values <= t`` against ``target`` over all thresholds ``t``."""
    best = 0.0
    for sign in (1.0, -1.0):
        hits = np.cumsum(target[np.argsort(-sign * values, kind="stable")])
        dice = 2.0 * hits / (np.arange(1, hits.size + 1) + target.sum())
        best = max(best, float(dice.max()))
    return best


def test_deterministic_per_index() -> None:
    image_a, label_a = generate_case(3, 5, TINY)
    image_b, label_b = generate_case(3, 5, TINY)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    image_c, label_c = generate_case(3, 6, TINY)
    image_d, _ = generate_case(4, 5, TINY)
    assert not np.array_equal(image_a, image_c)
    assert not np.array_equal(label_a, label_c)
    assert not np.array_equal(image_a, image_d)


@pytest.mark.parametrize("index", range(6))
def test_shapes_dtypes_and_labels(index: int) -> None:
    image, label = generate_case(1, index, TINY)
    assert image.shape == (*TINY, len(MODALITIES)) and image.dtype == np.float32
    assert label.shape == TINY and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 4}
    assert np.all(np.isfinite(image)) and image.min() >= 0.0
    head = image[..., 1] > 0
    assert np.all(image[~head] == 0.0)
    assert 0.1 < head.mean() < 0.9
    assert np.all(head[label > 0])


def test_rejects_tiny_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, 0, (8, 24, 24))


@pytest.mark.slow
def test_full_size_cases(full_cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, label in full_cases:
        assert set(np.unique(label)) == {0, 1, 2, 4}
        assert 0.004 < np.mean(label > 0) < 0.07
        assert 100.0 < np.percentile(image[image > 0], 99) < 2000.0
        around_necrosis = ndimage.binary_dilation(label == 1)
        assert set(np.unique(label[around_necrosis])) == {1, 4}


def test_modalities_have_distinct_contrast(full_cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    image, label = full_cases[0]
    head = image[..., 1] > 0
    z = (image[head] - image[head].mean(0)) / image[head].std(0)
    corr = np.corrcoef(z.T)
    assert np.all(corr[np.triu_indices(4, 1)] < 0.95)
    flair, t1, t1ce, t2 = (image[..., m] for m in range(4))
    assert np.mean(t1ce[label == 4]) > 1.3 * np.mean(t1[label == 4])
    ring = ndimage.binary_dilation(label > 0, iterations=3) & (label == 0) & head
    oedema = label == 2
    assert np.mean(t2[oedema]) > 1.1 * np.mean(t2[ring])
    assert np.mean(flair[oedema]) > 1.2 * np.mean(flair[ring])
    assert np.mean(t1[oedema]) < np.mean(t1[ring])


def test_whole_tumour_not_single_threshold(full_cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, label in full_cases:
        target = (label > 0).ravel()
        dice = [_best_threshold_dice(image[..., m].ravel(), target) for m in range(4)]
        assert max(dice) < 0.95, dice


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_layout_round_trip_and_idempotence(tmp_path: Path) -> None:
    folder = write_synthetic_brats(tmp_path / "data", 2, 7, TINY)
    assert folder == tmp_path / "data" / DATASET_DIR
    assert [p.name for p in (tmp_path / "data").iterdir()] == [DATASET_DIR]
    meta = json.loads((folder / "synthetic.json").read_text())
    assert meta == {
        "num_cases": 2,
        "seed": 7,
        "shape": list(TINY),
        "generator_version": GENERATOR_VERSION,
    }
    for i in (1, 2):
        case = folder / f"BraTS20_Training_{i:03d}"
        names = sorted(p.name for p in case.iterdir())
        assert names == sorted(f"{case.name}_{s}.nii.gz" for s in (*MODALITIES, "seg"))
        image, label = generate_case(7, i, TINY)
        seg = nib.load(str(case / f"{case.name}_seg.nii.gz"))
        assert seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(seg.dataobj), label)
        expected_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        expected_affine[1, 3] = TINY[1] - 1
        np.testing.assert_allclose(seg.affine, expected_affine)
        for m, mod in enumerate(MODALITIES):
            img = nib.load(str(case / f"{case.name}_{mod}.nii.gz"))
            assert img.get_data_dtype() == np.int16
            stored = np.asarray(img.dataobj)
            np.testing.assert_array_equal(stored, np.rint(image[..., m]).astype(np.int16))
    before = _files(tmp_path)
    assert write_synthetic_brats(tmp_path / "data", 2, 7, TINY) == folder
    assert _files(tmp_path) == before


def test_mismatch_raises(tmp_path: Path) -> None:
    folder = write_synthetic_brats(tmp_path, 1, 0, TINY)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="num_cases") as info:
        write_synthetic_brats(tmp_path, 2, 0, TINY)
    assert str(folder) in str(info.value)
    with pytest.raises(ValueError, match="seed.*shape"):
        write_synthetic_brats(tmp_path, 1, 1, (24, 24, 20))
    assert _files(tmp_path) == before


def test_existing_non_synthetic_folder_raises(tmp_path: Path) -> None:
    (tmp_path / DATASET_DIR / "BraTS20_Training_001").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        write_synthetic_brats(tmp_path, 1, 0, TINY)


def test_main_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--root", str(tmp_path), "--cases", "1", "--seed", "2", "--shape", *map(str, TINY)])
    out = capsys.readouterr().out
    assert str(tmp_path / DATASET_DIR) in out
    assert (
        tmp_path / DATASET_DIR / "BraTS20_Training_001" / "BraTS20_Training_001_t1ce.nii.gz"
    ).is_file()


def test_main_reports_mismatch_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic_brats(tmp_path, 1, 0, TINY)
    with pytest.raises(SystemExit) as info:
        main(["--root", str(tmp_path), "--cases", "2", "--shape", *map(str, TINY)])
    assert info.value.code == 2
    assert "num_cases" in capsys.readouterr().err
