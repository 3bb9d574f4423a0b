"""Tests for coarse-to-fine band refinement with analytic decoders."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from ossnet_jax.inference.octree import (
    BandRefinement,
    dense,
    lattice_mask,
    refine,
    seed_from_segmentation,
)

GRID = (32, 32, 24)
GRID_SIZE = int(np.prod(GRID))


def ellipsoid(centre, semi_axes):
    """Decoder: 1.0 inside the axis-aligned ellipsoid (voxel units), else 0.0."""
    centre = np.asarray(centre, dtype=np.float64)
    semi_axes = np.asarray(semi_axes, dtype=np.float64)

    def decode(locations: np.ndarray) -> np.ndarray:
        r2 = (((locations - centre) / semi_axes) ** 2).sum(axis=1)
        return (r2 <= 1.0).astype(np.float32)

    return decode


def union(*decoders):
    def decode(locations: np.ndarray) -> np.ndarray:
        return np.maximum.reduce([d(locations) for d in decoders])

    return decode


BALL = ellipsoid((15.5, 16.5, 11.5), (7.0, 7.0, 7.0))
TWO_ELLIPSOIDS = union(
    ellipsoid((10.0, 12.0, 10.0), (6.0, 4.0, 3.5)),
    ellipsoid((22.3, 20.0, 14.6), (4.0, 7.0, 5.0)),
)


def recording(decode):
    """Wrap ``decode`` so that every location it is called with is kept."""
    calls: list[np.ndarray] = []

    def wrapped(locations: np.ndarray) -> np.ndarray:
        assert locations.dtype == np.int32 and locations.ndim == 2 and locations.shape[1] == 3
        assert len(locations) > 0
        calls.append(locations.copy())
        return decode(locations)

    return wrapped, calls


@pytest.mark.parametrize("decode", [BALL, TWO_ELLIPSOIDS], ids=["ball", "two_ellipsoids"])
def test_unseeded_matches_dense_with_fewer_evaluations(decode):
    reference = dense(decode, GRID)
    assert reference.any()
    mask, evaluations = refine(decode, GRID, strides=(4, 2, 1))
    np.testing.assert_array_equal(mask, reference)
    assert evaluations < GRID_SIZE


@pytest.mark.parametrize("decode", [BALL, TWO_ELLIPSOIDS], ids=["ball", "two_ellipsoids"])
def test_seeded_matches_dense_with_fewer_evaluations(decode):
    reference = dense(decode, GRID)
    _, unseeded = refine(decode, GRID)
    seed = ndimage.binary_dilation(reference, iterations=1)
    mask, evaluations = refine(decode, GRID, seed_mask=seed)
    np.testing.assert_array_equal(mask, reference)
    assert evaluations < unseeded < GRID_SIZE


def test_seed_from_block_segmentation_covers_shapes():
    reference = dense(TWO_ELLIPSOIDS, GRID)
    blocks = reference.reshape(8, 4, 8, 4, 6, 4).max(axis=(1, 3, 5)).astype(np.float64)
    seed = seed_from_segmentation(blocks, GRID, threshold=0.0)
    assert seed[reference].all()
    mask, _ = refine(TWO_ELLIPSOIDS, GRID, seed_mask=seed)
    np.testing.assert_array_equal(mask, reference)


def test_final_stage_evaluates_every_neighbour_of_a_positive():
    wrapped, calls = recording(TWO_ELLIPSOIDS)
    mask, _ = refine(wrapped, GRID)
    evaluated = np.zeros(GRID, dtype=bool)
    evaluated[tuple(np.concatenate(calls).T)] = True
    near_positive = ndimage.maximum_filter(mask.view(np.uint8), size=3) > 0
    assert evaluated[near_positive].all()


def test_thin_sheet_between_lattice_points_is_lost():
    # A one-voxel sheet at x == 2 contains no stride-4 lattice point (x in
    # {0, 4, ..., 28, 31}), so stage 0 finds nothing and nothing is refined.
    def sheet(locations: np.ndarray) -> np.ndarray:
        return (locations[:, 0] == 2).astype(np.float32)

    assert dense(sheet, GRID).sum() == 32 * 24
    mask, evaluations = refine(sheet, GRID)
    assert not mask.any()
    assert evaluations == int(lattice_mask(GRID, 4).sum()) == 9 * 9 * 7


def test_far_corner_is_on_the_lattice():
    corner = np.array(GRID) - 1

    def point(locations: np.ndarray) -> np.ndarray:
        return (locations == corner).all(axis=1).astype(np.float32)

    mask, _ = refine(point, GRID)
    np.testing.assert_array_equal(mask, dense(point, GRID))


def test_all_false_seed_gives_empty_result_without_evaluations():
    decode, calls = recording(BALL)
    mask, evaluations = refine(decode, GRID, seed_mask=np.zeros(GRID, dtype=bool))
    assert not mask.any() and evaluations == 0 and calls == []
    state = BandRefinement(GRID, seed_mask=np.zeros(GRID, dtype=bool))
    assert state.done and state.query().shape == (0, 3)


@pytest.mark.parametrize("decode", [BALL, TWO_ELLIPSOIDS], ids=["ball", "two_ellipsoids"])
def test_never_evaluates_a_voxel_twice(decode):
    wrapped, calls = recording(decode)
    _, evaluations = refine(wrapped, GRID)
    locations = np.concatenate(calls)
    assert len(np.unique(locations, axis=0)) == len(locations) == evaluations


def test_query_is_stable_and_update_checks_shape():
    state = BandRefinement(GRID)
    first = state.query()
    np.testing.assert_array_equal(state.query(), first)
    with pytest.raises(ValueError, match="shape"):
        state.update(np.zeros(len(first) + 1))
    with pytest.raises(ValueError, match="shape"):
        state.update(np.zeros((len(first), 1)))
    while not state.done:
        state.update(np.zeros(len(state.query())))
    with pytest.raises(RuntimeError):
        state.update(np.zeros(0))


@pytest.mark.parametrize(
    "strides", [(), (4, 2), (2, 4, 1), (4, 4, 1), (4, 0), (4, 2.0, 1), (True,)]
)
def test_invalid_strides_raise(strides):
    with pytest.raises(ValueError, match="strides"):
        BandRefinement(GRID, strides=strides)


def test_seed_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="seed_mask"):
        BandRefinement(GRID, seed_mask=np.ones((32, 32, 23), dtype=bool))


def _slow_upsample(seg: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Independent float64 cell-centred trilinear upsampling with explicit loops."""
    out = np.zeros(grid_shape, dtype=np.float64)
    for voxel in itertools.product(*(range(n) for n in grid_shape)):
        corners = []
        for axis, i in enumerate(voxel):
            factor = grid_shape[axis] // seg.shape[axis]
            x = min(max((i + 0.5) / factor - 0.5, 0.0), seg.shape[axis] - 1.0)
            lo = int(np.floor(x))
            hi = min(lo + 1, seg.shape[axis] - 1)
            corners.append(((lo, 1.0 - (x - lo)), (hi, x - lo)))
        value = 0.0
        for (a, wa), (b, wb), (c, wc) in itertools.product(*corners):
            value += wa * wb * wc * seg[a, b, c]
        out[voxel] = value
    return out


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_seed_from_segmentation_matches_slow_reference(threshold):
    seg = np.random.default_rng(0).uniform(size=(2, 2, 2))
    expected = _slow_upsample(seg, (8, 8, 8)) > threshold
    np.testing.assert_array_equal(seed_from_segmentation(seg, (8, 8, 8), threshold), expected)


def test_seed_from_segmentation_anisotropic_matches_slow_reference():
    seg = np.random.default_rng(1).uniform(size=(3, 2, 4))
    expected = _slow_upsample(seg, (6, 8, 8)) > 0.5
    np.testing.assert_array_equal(seed_from_segmentation(seg, (6, 8, 8)), expected)


@pytest.mark.parametrize("value, expected", [(0.8, True), (0.2, False)])
def test_constant_segmentation_gives_constant_seed(value, expected):
    seed = seed_from_segmentation(np.full((2, 3, 2), value), (8, 9, 6))
    assert seed.shape == (8, 9, 6) and seed.dtype == bool
    assert (seed == expected).all()


def test_seed_from_segmentation_requires_divisible_grid():
    with pytest.raises(ValueError, match="divisible"):
        seed_from_segmentation(np.zeros((3, 2, 2)), (8, 8, 8))
