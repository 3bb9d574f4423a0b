"""Surface distances and case metrics against a brute-force numpy reference and hand values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from ossnet_jax.surface import case_metrics, surface_distances


def _reference_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxel indices (N, 3): mask voxels with a 6-neighbour outside, border outside."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_inside = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            all_inside &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & ~all_inside)


def _reference_distances(pred, target, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: all pairwise distances between surface voxel centres in mm."""
    a = _reference_surface(pred).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    b = _reference_surface(target).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return pairwise.min(axis=1), pairwise.min(axis=0)


def _reference_metrics(pred, target, spacing, tolerance) -> dict:
    d_pt, d_tp = _reference_distances(pred, target, spacing)
    both = np.concatenate([d_pt, d_tp])
    tp = np.sum(pred & target, dtype=np.float64)
    return {
        "dice": 2 * tp / (pred.sum() + target.sum()),
        "iou": tp / np.sum(pred | target),
        "sensitivity": tp / target.sum(),
        "precision": tp / pred.sum(),
        "hd95": np.percentile(both, 95),
        "asd": both.mean(),
        "surface_dice": np.mean(both <= tolerance),
        "pred_volume_ml": pred.sum() * np.prod(spacing) / 1000,
        "true_volume_ml": target.sum() * np.prod(spacing) / 1000,
    }


def _blob(rng: np.random.Generator, shape, threshold: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) > threshold


def _sphere(shape, centre, radius_mm, spacing) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    offsets = [(grid[i] - centre[i]) * spacing[i] for i in range(3)]
    return sum(o**2 for o in offsets) <= radius_mm**2


def _assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    spacing = (0.8, 1.3, 2.1)
    pred, target = _blob(rng, (14, 12, 10), 0.05), _blob(rng, (14, 12, 10), 0.05)
    assert pred.any() and target.any()
    d_pt, d_tp = surface_distances(pred, target, spacing)
    ref_pt, ref_tp = _reference_distances(pred, target, spacing)
    np.testing.assert_allclose(d_pt, ref_pt, rtol=1e-12)
    np.testing.assert_allclose(d_tp, ref_tp, rtol=1e-12)
    _assert_same(
        case_metrics(pred, target, spacing), _reference_metrics(pred, target, spacing, 1.0)
    )


def test_spheres_with_anisotropic_spacing_match_brute_force():
    spacing = (0.5, 1.0, 2.5)
    shape = (30, 16, 8)
    pred = _sphere(shape, (13.0, 8.0, 3.5), 5.0, spacing)
    target = _sphere(shape, (16.0, 7.0, 4.0), 6.0, spacing)
    expected = _reference_metrics(pred, target, spacing, 2.0)
    _assert_same(case_metrics(pred, target, spacing, tolerance_mm=2.0), expected)
    assert 0 < expected["hd95"] < 10 and 0 < expected["surface_dice"] < 1


def test_two_single_voxels_at_a_known_distance():
    pred = np.zeros((6, 7, 3), dtype=bool)
    target = np.zeros_like(pred)
    pred[1, 1, 1] = True
    target[4, 5, 1] = True
    distance = math.hypot(3 * 2.0, 4 * 1.0)
    d_pt, d_tp = surface_distances(pred, target, (2.0, 1.0, 3.0))
    assert d_pt.tolist() == [distance] and d_tp.tolist() == [distance]
    result = case_metrics(pred, target, (2.0, 1.0, 3.0))
    assert result["hd95"] == pytest.approx(distance) and result["asd"] == pytest.approx(distance)
    assert result["dice"] == 0.0 and result["surface_dice"] == 0.0
    assert result["sensitivity"] == 0.0 and result["precision"] == 0.0


def test_cube_shifted_by_one_voxel_with_2mm_spacing():
    # Each 4^3 cube has 56 surface voxels. Shifting by one voxel along x (2 mm):
    # per direction 16 face voxels are 2 mm away, 4 are 1 mm away (a y/z neighbour
    # on the other surface), the other 36 coincide. Union: 32 x 2, 8 x 1, 72 x 0 (mm).
    target = np.zeros((10, 8, 8), dtype=bool)
    target[2:6, 2:6, 2:6] = True
    pred = np.roll(target, 1, axis=0)
    spacing = (2.0, 1.0, 1.0)
    d_pt, d_tp = surface_distances(pred, target, spacing)
    for d in (d_pt, d_tp):
        assert sorted(d.tolist()) == [0.0] * 36 + [1.0] * 4 + [2.0] * 16
    result = case_metrics(pred, target, spacing, tolerance_mm=1.0)
    assert result["hd95"] == 2.0
    assert result["asd"] == pytest.approx(72 / 112)
    assert result["surface_dice"] == pytest.approx(80 / 112)
    assert result["dice"] == pytest.approx(0.75) and result["iou"] == pytest.approx(0.6)
    assert result["sensitivity"] == pytest.approx(0.75) and result["precision"] == pytest.approx(
        0.75
    )
    assert case_metrics(pred, target, spacing, tolerance_mm=2.0)["surface_dice"] == 1.0


def test_volumes_in_millilitres():
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[:10, :10, :10] = True  # 1000 voxels of 0.5 x 2 x 3 mm = 3 mm^3 each
    target = np.zeros_like(mask)
    target[:5, :4, :1] = True  # 20 voxels
    result = case_metrics(mask, target, (0.5, 2.0, 3.0))
    assert result["pred_volume_ml"] == pytest.approx(3.0)
    assert result["true_volume_ml"] == pytest.approx(0.06)


def test_both_empty_is_perfect():
    empty = np.zeros((5, 5, 5), dtype=bool)
    d_pt, d_tp = surface_distances(empty, empty, (1.0, 1.0, 1.0))
    assert d_pt.shape == (0,) and d_tp.shape == (0,)
    result = case_metrics(empty, empty, (1.0, 2.0, 3.0))
    assert result == {
        "dice": 1.0,
        "iou": 1.0,
        "sensitivity": 1.0,
        "precision": 1.0,
        "hd95": 0.0,
        "asd": 0.0,
        "surface_dice": 1.0,
        "pred_volume_ml": 0.0,
        "true_volume_ml": 0.0,
    }


def test_one_empty_gives_none_distances_and_is_valid_json():
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = np.zeros_like(empty)
    full[1:4, 1:4, 1:4] = True
    d_pt, d_tp = surface_distances(full, empty, (1.0, 1.0, 1.0))
    assert d_pt.shape == (26,) and np.all(np.isinf(d_pt)) and d_tp.shape == (0,)

    missed = case_metrics(empty, full, (1.0, 1.0, 1.0))
    assert missed["dice"] == missed["iou"] == missed["surface_dice"] == missed["sensitivity"] == 0.0
    assert missed["precision"] is None and missed["hd95"] is None and missed["asd"] is None
    assert missed["pred_volume_ml"] == 0.0 and missed["true_volume_ml"] == pytest.approx(0.027)

    false_alarm = case_metrics(full, empty, (1.0, 1.0, 1.0))
    assert false_alarm["dice"] == false_alarm["surface_dice"] == false_alarm["precision"] == 0.0
    assert false_alarm["sensitivity"] is None and false_alarm["hd95"] is None
    for result in (missed, false_alarm):
        assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_mask_touching_the_border_has_a_surface_there():
    # A full volume has only border voxels on its surface; the border counts as outside.
    full = np.ones((4, 4, 4), dtype=bool)
    d_pt, _ = surface_distances(full, full, (1.0, 1.0, 1.0))
    assert d_pt.shape == (4**3 - 2**3,) and np.all(d_pt == 0)


def test_bad_inputs_raise():
    mask = np.zeros((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        surface_distances(mask, np.zeros((3, 3, 4), dtype=bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="pred"):
        case_metrics(np.full((3, 3, 3), 0.5), mask, (1, 1, 1))
    with pytest.raises(ValueError, match="tolerance"):
        case_metrics(mask, mask, (1, 1, 1), tolerance_mm=-1.0)
