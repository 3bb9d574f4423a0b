"""Surface distances and case metrics against brute-force float64 numpy references and hand values.

'standard' (the default) and 'voxel' are the two definitions of ossnet_jax/surface.py's docstring.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from ossnet_jax.surface import case_metrics, surface_distances, surfel_distances, surfels


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


def _reference_surfels(mask, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: walk every face of every mask voxel; a face whose neighbour is outside (or
    beyond the border) adds a quarter of its area to each of its 4 corners. Returns the corner
    positions (N, 3) in mm (voxel (0, 0, 0)'s centre at the origin) and their areas (N,) in mm^2."""
    areas: dict[tuple[int, int, int], float] = {}
    for voxel in map(tuple, np.argwhere(mask)):
        for axis in range(3):
            for step in (-1, 1):
                neighbour = list(voxel)
                neighbour[axis] += step
                inside = all(0 <= n < size for n, size in zip(neighbour, mask.shape))
                if inside and mask[tuple(neighbour)]:
                    continue
                others = [a for a in range(3) if a != axis]
                face_area = float(spacing[others[0]]) * float(spacing[others[1]])
                for u in (-1, 1):
                    for v in (-1, 1):
                        doubled = [2 * c for c in voxel]  # corner in half-voxel units
                        doubled[axis] += step
                        doubled[others[0]] += u
                        doubled[others[1]] += v
                        key = tuple(doubled)
                        areas[key] = areas.get(key, 0.0) + face_area / 4
    keys = sorted(areas)
    points = np.array(keys, dtype=np.float64).reshape(-1, 3) / 2 * np.asarray(spacing, np.float64)
    return points, np.array([areas[k] for k in keys], dtype=np.float64)


def _reference_surfel_distances(pred, target, spacing):
    """Brute force in float64: nearest-surfel distances (mm) and areas of both masks."""
    a, w_a = _reference_surfels(pred, spacing)
    b, w_b = _reference_surfels(target, spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return pairwise.min(axis=1), w_a, pairwise.min(axis=0), w_b


def _reference_overlap(pred, target) -> dict:
    tp = np.sum(pred & target, dtype=np.float64)
    return {
        "dice": 2 * tp / (pred.sum() + target.sum()),
        "iou": tp / np.sum(pred | target),
        "sensitivity": tp / target.sum(),
        "precision": tp / pred.sum(),
    }


def _reference_metrics(pred, target, spacing, tolerance, definition="standard") -> dict:
    d_pt, d_tp = _reference_distances(pred, target, spacing)
    if definition == "voxel":
        both = np.concatenate([d_pt, d_tp])
        hd95, asd, nsd = np.percentile(both, 95), both.mean(), np.mean(both <= tolerance)
    else:
        hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
        e_pt, w_p, e_tp, w_t = _reference_surfel_distances(pred, target, spacing)
        asd = (np.sum(w_p * e_pt) / np.sum(w_p) + np.sum(w_t * e_tp) / np.sum(w_t)) / 2
        within = np.sum(w_p[e_pt <= tolerance]) + np.sum(w_t[e_tp <= tolerance])
        nsd = within / (np.sum(w_p) + np.sum(w_t))
    return {
        **_reference_overlap(pred, target),
        "hd95": hd95,
        "asd": asd,
        "surface_dice": nsd,
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
    voxel = case_metrics(pred, target, spacing, surface_metrics="voxel")
    _assert_same(voxel, _reference_metrics(pred, target, spacing, 1.0, "voxel"))
    standard = case_metrics(pred, target, spacing)
    _assert_same(standard, _reference_metrics(pred, target, spacing, 1.0))
    assert standard["hd95"] >= voxel["hd95"]


def test_spheres_with_anisotropic_spacing_match_brute_force():
    spacing = (0.5, 1.0, 2.5)
    shape = (30, 16, 8)
    pred = _sphere(shape, (13.0, 8.0, 3.5), 5.0, spacing)
    target = _sphere(shape, (16.0, 7.0, 4.0), 6.0, spacing)
    for definition in ("voxel", "standard"):
        expected = _reference_metrics(pred, target, spacing, 2.0, definition)
        actual = case_metrics(pred, target, spacing, tolerance_mm=2.0, surface_metrics=definition)
        _assert_same(actual, expected)
        assert 0 < expected["hd95"] < 10 and 0 < expected["surface_dice"] < 1


def test_two_single_voxels_at_a_known_distance():
    pred = np.zeros((6, 7, 3), dtype=bool)
    target = np.zeros_like(pred)
    pred[1, 1, 1] = True
    target[4, 5, 1] = True
    distance = math.hypot(3 * 2.0, 4 * 1.0)
    d_pt, d_tp = surface_distances(pred, target, (2.0, 1.0, 3.0))
    assert d_pt.tolist() == [distance] and d_tp.tolist() == [distance]
    result = case_metrics(pred, target, (2.0, 1.0, 3.0), surface_metrics="voxel")
    assert result["hd95"] == pytest.approx(distance) and result["asd"] == pytest.approx(distance)
    assert result["dice"] == 0.0 and result["surface_dice"] == 0.0
    # Standard: HD95 stays on voxel centres. The 8 corners of each voxel, of equal area, are 2 or 3
    # voxels (x, 2 mm each) and 3 or 4 voxels (y, 1 mm) from the other voxel's nearest corner, the
    # same set in both directions; ASD is their mean.
    result = case_metrics(pred, target, (2.0, 1.0, 3.0))
    corners = [math.hypot(2.0 * dx, 1.0 * dy) for dx in (2, 3) for dy in (3, 4)]
    assert result["hd95"] == pytest.approx(distance)
    assert result["asd"] == pytest.approx(sum(corners) / 4, rel=1e-12)
    assert result["surface_dice"] == 0.0
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
    result = case_metrics(pred, target, spacing, tolerance_mm=1.0, surface_metrics="voxel")
    assert result["hd95"] == 2.0
    assert result["asd"] == pytest.approx(72 / 112)
    assert result["surface_dice"] == pytest.approx(80 / 112)
    assert result["dice"] == pytest.approx(0.75) and result["iou"] == pytest.approx(0.6)
    assert result["sensitivity"] == pytest.approx(0.75) and result["precision"] == pytest.approx(
        0.75
    )
    for definition in ("voxel", "standard"):
        tolerant = case_metrics(pred, target, spacing, tolerance_mm=2.0, surface_metrics=definition)
        assert tolerant["surface_dice"] == 1.0


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
    with pytest.raises(ValueError, match="surface_metrics"):
        case_metrics(mask, mask, (1, 1, 1), surface_metrics="medpy")


def test_offset_cubes_standard_by_hand():
    # A 4^3-voxel cube and the same cube one voxel further along x, spacing (2, 1, 1) mm: each is an
    # 8 x 4 x 4 mm box of area 2 * 16 + 4 * 32 = 160 mm^2 (x faces 1 mm^2 each, y and z faces 2).
    target = np.zeros((10, 8, 8), dtype=bool)
    target[2:6, 2:6, 2:6] = True
    pred = np.roll(target, 1, axis=0)
    spacing = (2.0, 1.0, 1.0)
    areas = surfels(pred, spacing)
    assert areas.shape == (11, 9, 9) and np.count_nonzero(areas) == 5**3 - 3**3
    assert areas.sum() == pytest.approx(160.0)
    # Corners of pred on its far x face (x = 6 in corner indices) lie 2 mm beyond target's face at
    # x = 5; they carry the face (16 mm^2) and half of the side squares touching it (16 x 2 / 2):
    # 32 mm^2 at 2 mm. Its near x face (x = 3) lies inside target: its border corners are on
    # target's sides (0 mm), its 8 inner corners (1 mm^2 each) 1 mm from a side, its centre 2 mm
    # from both target's x face and its sides. All other corners lie on target's sides (0 mm).
    # By symmetry target -> pred is the same.
    d_pt, w_p, d_tp, w_t = surfel_distances(pred, target, spacing)
    for d, w in ((d_pt, w_p), (d_tp, w_t)):
        assert w.sum() == pytest.approx(160.0)
        assert w[d == 2.0].sum() == pytest.approx(33.0) and w[d == 1.0].sum() == pytest.approx(8.0)
        assert w[d == 0.0].sum() == pytest.approx(119.0)
    result = case_metrics(pred, target, spacing, tolerance_mm=1.5)
    assert result["surface_dice"] == pytest.approx(127 / 160, rel=1e-12)
    assert result["asd"] == pytest.approx((33 * 2.0 + 8 * 1.0) / 160, rel=1e-12)
    assert result["hd95"] == 2.0  # the offset: 16 of 56 surface voxels per direction are 2 mm away


def test_a_distant_fragment_sets_the_standard_hd95_only():
    # A 4^3 cube as target; pred adds 4 voxels 7 voxels beyond its x face (1.5 mm each). Pred's 60
    # surface voxels: 56 at 0 mm, 4 at 10.5 mm, so its directed 95th percentile (rank 0.95 * 59)
    # is 10.5 mm; target -> pred is all 0. Pooled, 4 of 116 distances are not 0: 95th percentile 0.
    target = np.zeros((13, 6, 6), dtype=bool)
    target[1:5, 1:5, 1:5] = True
    pred = target.copy()
    pred[11, 2:4, 2:4] = True
    spacing = (1.5, 1.0, 0.8)
    assert case_metrics(pred, target, spacing)["hd95"] == pytest.approx(7 * 1.5, rel=1e-12)
    assert case_metrics(pred, target, spacing, surface_metrics="voxel")["hd95"] == 0.0


def test_sphere_against_shifted_sphere_at_anisotropic_spacing():
    spacing = (0.7, 0.7, 2.5)
    pred = _sphere((20, 20, 8), (9.0, 9.5, 3.5), 4.5, spacing)
    target = _sphere((20, 20, 8), (10.5, 9.0, 4.0), 4.0, spacing)
    standard = case_metrics(pred, target, spacing, tolerance_mm=1.0)
    expected = _reference_metrics(pred, target, spacing, 1.0)
    _assert_same(standard, expected)
    voxel = case_metrics(pred, target, spacing, tolerance_mm=1.0, surface_metrics="voxel")
    assert standard["hd95"] >= voxel["hd95"]
    assert abs(standard["surface_dice"] - voxel["surface_dice"]) > 0.05  # area weights matter here


def test_voxel_definition_keeps_the_values_it_gave_before():
    # Recorded from the implementation before 'standard' existed (case_metrics' default then).
    spacing = (0.7, 0.7, 2.5)
    pred = _sphere((20, 20, 8), (9.0, 9.5, 3.5), 4.5, spacing)
    target = _sphere((20, 20, 8), (10.5, 9.0, 4.0), 4.0, spacing)
    result = case_metrics(pred, target, spacing, tolerance_mm=1.0, surface_metrics="voxel")
    _assert_same(
        result,
        {
            "dice": 0.6911764705882353,
            "iou": 0.5280898876404494,
            "sensitivity": 0.8392857142857143,
            "precision": 0.5875,
            "hd95": 2.5,
            "asd": 0.7571764720099745,
            "surface_dice": 0.7376237623762376,
            "pred_volume_ml": 0.392,
            "true_volume_ml": 0.2744,
        },
    )
    cube = np.zeros((9, 8, 8), dtype=bool)
    cube[2:5, 2:5, 2:5] = True
    result = case_metrics(np.roll(cube, 2, axis=0), cube, (1.5, 1.0, 0.8), surface_metrics="voxel")
    assert (result["hd95"], result["asd"]) == (3.0, 1.5)
    assert result["surface_dice"] == pytest.approx(0.34615384615384615, rel=1e-12)


def test_surfel_distances_of_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=bool)
    voxel = empty.copy()
    voxel[1, 2, 3] = True
    assert all(a.shape == (0,) for a in surfel_distances(empty, empty, (1.0, 1.0, 1.0)))
    d_pt, w_p, d_tp, w_t = surfel_distances(voxel, empty, (1.0, 2.0, 3.0))
    assert d_pt.shape == (8,) and np.all(np.isinf(d_pt)) and d_tp.shape == w_t.shape == (0,)
    assert w_p.sum() == pytest.approx(2 * (2 * 3 + 1 * 3 + 1 * 2))
