"""Small connected components are removed, large ones kept, per connectivity."""

from __future__ import annotations

import numpy as np
import pytest

from ossnet_jax.postprocess import remove_small_components


def test_small_component_removed_and_large_kept():
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[6:11, 6:11, 6:9] = True  # 75 voxels
    mask[0, 11, 11] = True  # 1 voxel
    cleaned = remove_small_components(mask, min_voxels=28)
    expected = np.zeros_like(mask)
    expected[6:11, 6:11, 6:9] = True
    np.testing.assert_array_equal(cleaned, expected)
    assert cleaned.dtype == bool
    np.testing.assert_array_equal(
        remove_small_components(mask, min_voxels=27), mask & ~_single(mask)
    )


def _single(mask: np.ndarray) -> np.ndarray:
    single = np.zeros_like(mask)
    single[0, 11, 11] = True
    return single


def test_default_threshold_is_12_cubed():
    mask = np.zeros((14, 14, 14), dtype=bool)
    mask[:12, :12, :12] = True
    np.testing.assert_array_equal(remove_small_components(mask), mask)
    mask[0, 0, 0] = False
    assert not remove_small_components(mask).any()


def test_diagonal_pair_depends_on_connectivity():
    # Two 2x2x2 cubes touching only at one corner: one component for 26, two for 6 and 18.
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0:2, 0:2, 0:2] = True
    mask[2:4, 2:4, 2:4] = True
    np.testing.assert_array_equal(remove_small_components(mask, 16, connectivity=26), mask)
    assert not remove_small_components(mask, 16, connectivity=18).any()
    assert not remove_small_components(mask, 16, connectivity=6).any()
    np.testing.assert_array_equal(remove_small_components(mask, 8, connectivity=6), mask)


def test_empty_mask_and_input_untouched():
    empty = np.zeros((4, 5, 6), dtype=np.uint8)
    cleaned = remove_small_components(empty)
    assert cleaned.dtype == bool and cleaned.shape == (4, 5, 6) and not cleaned.any()
    mask = np.ones((3, 3, 3), dtype=bool)
    remove_small_components(mask, min_voxels=100)
    assert mask.all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="connectivity"):
        remove_small_components(np.zeros((2, 2, 2), dtype=bool), connectivity=8)
    with pytest.raises(ValueError, match="3D"):
        remove_small_components(np.zeros((2, 2), dtype=bool))
