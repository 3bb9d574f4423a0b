"""Octree (multiresolution surface) extraction against dense evaluation of analytic label maps."""

import numpy as np
import pytest
from scipy import ndimage

from ossnet_jax.inference.mise import OctreeRefinement, upsample2


def run(refinement: OctreeRefinement, labels_at) -> tuple[np.ndarray, list[np.ndarray]]:
    queries = []
    while not refinement.done:
        query = refinement.query()
        queries.append(query)
        refinement.update(labels_at(query))
    return refinement.to_labels(), queries


def ball(centre, radius, value=1):
    def labels_at(q):
        return np.where(np.linalg.norm(q - np.asarray(centre), axis=-1) <= radius, value, 0)

    return labels_at


def dense_of(labels_at, grid):
    return labels_at(np.argwhere(np.ones(grid, bool))).reshape(grid)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
@pytest.mark.parametrize("margin", [0, 1])
def test_balls_equal_dense_and_no_location_is_queried_twice(stride, margin):
    grid = (37, 30, 21)  # not multiples of the stride: the lattice sticks out of the grid
    labels_at = ball((17.3, 14.2, 10.6), 7.5)
    out, queries = run(OctreeRefinement(grid, stride, margin), labels_at)
    np.testing.assert_array_equal(out, dense_of(labels_at, grid))
    everything = np.concatenate(queries)
    assert len(np.unique(everything, axis=0)) == len(everything)
    assert (everything >= 0).all() and (everything < np.array(grid)).all()


def test_nested_labels_and_cost_grows_with_surface_not_volume():
    grid = (64, 64, 48)

    def labels_at(q):
        d = np.linalg.norm(q - np.array([36.0, 36.0, 20.0]), axis=-1)
        return np.select([d <= 6, d <= 11, d <= 18], [4, 1, 2], 0)

    dense = dense_of(labels_at, grid)
    out, queries = run(OctreeRefinement(grid, 4, 0), labels_at)  # radius 6 holds a 4-lattice point
    np.testing.assert_array_equal(out, dense)
    # off the first lattice, only points within one coarse cell of a label change are evaluated
    change = np.zeros(grid, bool)
    for axis in range(3):
        differs = np.diff(dense, axis=axis) != 0
        change[tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))] |= differs
    distance = ndimage.distance_transform_edt(~change)
    later = np.concatenate(queries[1:])
    assert distance[tuple(later.T)].max() <= 4 * np.sqrt(3)
    assert len(later) < 3.5 * np.count_nonzero(
        change
    )  # a shell around the surfaces, not the inside


def test_a_ball_between_coarse_lattice_points_is_found_only_when_marked_uncertain():
    grid = (32, 32, 32)
    labels_at = ball((12.0, 20.0, 12.0), 3.0)  # an 8-cell centre: no 8-lattice point inside
    dense = dense_of(labels_at, grid)
    missed, _ = run(OctreeRefinement(grid, 8, 1), labels_at)
    assert not missed.any() and dense.sum() > 100
    hinted, _ = run(OctreeRefinement(grid, 8, 0, uncertain=dense.astype(bool)), labels_at)
    np.testing.assert_array_equal(hinted, dense)  # found when e.g. the encoder marks it


def test_a_thin_sheet_between_lattice_points_needs_the_margin():
    grid = (33, 33, 33)

    def labels_at(
        q,
    ):  # a ball plus a one-voxel sheet at x = 20 attached to nothing the lattice sees
        sheet = (q[:, 0] == 28) & (np.abs(q[:, 1] - 16) <= 6) & (np.abs(q[:, 2] - 16) <= 6)
        inside = np.linalg.norm(q - 16.0, axis=-1) <= 5.5
        return (sheet | inside).astype(int)

    dense = dense_of(labels_at, grid)
    plain, _ = run(OctreeRefinement(grid, 8, 0), labels_at)
    assert np.count_nonzero(plain != dense) > 0  # missed without a margin: documented limitation
    safe, _ = run(OctreeRefinement(grid, 8, 3), labels_at)
    np.testing.assert_array_equal(safe, dense)


def test_uncertain_voxels_are_evaluated_and_region_skips_the_rest():
    grid = (24, 24, 24)
    labels_at = ball((12.5, 11.5, 12.2), 7.5)  # holds 8-lattice points: found from the lattice
    uncertain = np.zeros(grid, bool)
    uncertain[2:4, 2:4, 2:4] = True
    refinement = OctreeRefinement(grid, 8, 0, uncertain=uncertain)
    out, queries = run(refinement, labels_at)
    seen = {tuple(q) for q in np.concatenate(queries)}
    on_lattice = [v for v in np.argwhere(uncertain) if not (v % 2).any()]  # strides >= 2 only
    assert on_lattice and all(tuple(v) in seen for v in on_lattice)
    region = np.zeros(grid, bool)
    region[4:20, 4:20, 4:20] = True
    refinement = OctreeRefinement(grid, 8, 0, region=region)
    out, queries = run(refinement, labels_at)
    np.testing.assert_array_equal(out, dense_of(labels_at, grid))
    first = queries[0]
    assert region[tuple(first.T)].all() and len(first) == 8  # only (8, 16)^3 of the 8-lattice


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        OctreeRefinement((8, 8, 8), 6)
    refinement = OctreeRefinement((8, 8, 8), 4)
    with pytest.raises(ValueError, match="shape"):
        refinement.update(np.zeros(3))


def test_upsample2_linear_is_the_support_mean_and_cubic_is_exact_for_cubics():
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(4, 5, 3, 2))
    fine = upsample2(coarse)
    assert fine.shape == (7, 9, 5, 2)
    for i, j, k in np.ndindex(*fine.shape[:3]):  # mean of the 1, 2, 4 or 8 corners (float64)
        corners = [
            coarse[a, b, c]
            for a in {i // 2, (i + 1) // 2}
            for b in {j // 2, (j + 1) // 2}
            for c in {k // 2, (k + 1) // 2}
        ]
        np.testing.assert_allclose(fine[i, j, k], np.mean(corners, axis=0), rtol=1e-5, atol=1e-6)
    # Catmull-Rom midpoints reproduce a cubic in each axis away from the clamped ends
    x = np.arange(8.0)
    poly = lambda t: 0.3 * t**3 - t**2 + 2 * t - 1
    values = poly(x)[:, None, None] * poly(x)[None, :, None] * np.ones((1, 1, 2))
    fine = upsample2(values, cubic=True)
    t = np.arange(15) / 2.0
    expected = poly(t)[:, None, None] * poly(t)[None, :, None] * np.ones((1, 1, 3))
    np.testing.assert_allclose(fine[2:-2, 2:-2], expected[2:-2, 2:-2], rtol=1e-4)


def _sdf_ball(centre, radius, slope=3.0):
    """Labels and logits (slope x signed distance, positive inside) of a smooth analytic ball."""

    def scores_at(q):
        return slope * (radius - np.linalg.norm(q - np.asarray(centre), axis=-1))[:, None]

    return scores_at


def _decide(scores):
    return (scores[:, 0] > 0).astype(np.int32), np.abs(scores[:, 0])


@pytest.mark.parametrize("cubic, confident", [(False, None), (True, None), (True, 2.0)])
def test_interpolated_finest_level_is_close_to_dense_at_a_fraction_of_the_cost(cubic, confident):
    grid = (48, 44, 40)
    scores_at = _sdf_ball((23.3, 21.6, 19.2), 13.7)
    dense = (scores_at(np.argwhere(np.ones(grid, bool)))[:, 0] > 0).reshape(grid)
    exact = OctreeRefinement(grid, 8, 0, grow_connectivity=6)
    fast = OctreeRefinement(
        grid,
        8,
        0,
        grow_connectivity=6,
        finest_stride=2,
        confident=confident,
        cubic=cubic,
        background=np.array([-10.0]),
        decide=_decide,
    )
    out, _ = run(exact, lambda q: _decide(scores_at(q))[0])
    np.testing.assert_array_equal(out, dense)
    queries = []
    while not fast.done:
        query = fast.query()
        queries.append(query)
        scores = scores_at(query)
        fast.update(_decide(scores)[0], scores)
    everything = np.concatenate(queries)
    assert len(np.unique(everything, axis=0)) == len(everything) == fast.num_evaluated
    assert (everything % 2 == 0).all()  # nothing finer than stride 2 is evaluated
    assert fast.num_evaluated < (0.2 if confident else 0.3) * exact.num_evaluated
    surface = np.count_nonzero(dense ^ ndimage.binary_erosion(dense))
    wrong = np.count_nonzero(fast.to_labels() != dense)
    assert wrong <= (0.02 if cubic else 0.06) * surface, (wrong, surface)


def test_interpolation_needs_scores_and_a_decision():
    with pytest.raises(ValueError, match="power of two <= coarse_stride"):
        OctreeRefinement((8, 8, 8), 4, finest_stride=8, decide=_decide)
    with pytest.raises(ValueError, match="needs `decide`"):
        OctreeRefinement((8, 8, 8), 4, finest_stride=2)
    refinement = OctreeRefinement((8, 8, 8), 4, finest_stride=2, decide=_decide)
    with pytest.raises(ValueError, match="needs the scores"):
        refinement.update(np.zeros(len(refinement.query()), np.int32))
