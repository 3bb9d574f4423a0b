"""Multiresolution surface extraction of a label map (in the spirit of MISE, Occupancy Networks).

The band refinement (octree.py) evaluates every voxel within one voxel of the foreground, so its cost
grows with the structure's volume. Here the cost grows with its surface:

* Level 0 evaluates the lattice of stride S (a power of two) over the whole grid.
* Going from stride s to s/2, each new lattice point lies on an edge, a face or inside a cube of the
  stride-s lattice; the 2, 4 or 8 corners of that element are its *support*. Where the support
  carries one label the new point takes it without being evaluated (the element is filled); where it
  disagrees the point is evaluated. Points within `margin` new-lattice steps of an evaluated one, and
  points of the optional `uncertain` mask (e.g. where the encoder's segmentation changes), are
  evaluated too: the safety margin that recovers structures slipping between agreeing corners.
* At stride 1 every voxel is known: evaluated, or filled from agreeing support.
* Interpolation (optional, needs the decoder's scores, e.g. logits): a point whose support disagrees
  gets the mean of its support's scores, i.e. trilinear interpolation at the edge, face or cube
  midpoint, and `decide` turns them into a label and a confidence (e.g. |logit|). Below
  `finest_stride` F every such point takes the interpolated label; at stride F it does when the
  confidence reaches `confident`, and is evaluated otherwise. Both
  trade a sub-voxel shift of the boundary (a small, measurable disagreement with dense evaluation)
  for skipping most evaluations of the finest levels, which hold most of them.

What can be missed: a structure that fits between lattice points whose support agrees and lies more
than `margin` steps from any disagreement, e.g. a ball narrower than the coarse cell's diagonal
(sqrt(3) S) with no lattice point inside, unless `uncertain` marks it. On a label map whose structures
each hold a coarse lattice point and cross each lattice edge at most once, the result equals dense
evaluation.

Lattice convention: lattice points are multiples of the stride from voxel 0; the lattice extends past
the grid to the next multiple of S, and points outside the grid count as background, unevaluated.
All coordinates are integer voxel indices (i, j, k); labels are integers (0 = background).
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
from scipy import ndimage


def upsample2(coarse: np.ndarray, cubic: bool = False) -> np.ndarray:
    """Scores of the stride-s/2 lattice interpolated from the stride-s lattice, axis by axis.

    coarse: (m0, m1, m2, ...) values on the coarse lattice. Returns (2 m0 - 1, 2 m1 - 1, 2 m2 - 1, ...):
    coarse points keep their values; a midpoint gets (a + b) / 2 of its two neighbours along the axis
    (linear: the mean of the edge's, face's or cube's corners), or with `cubic` the Catmull-Rom value
    (9 (a + b) - (a' + b')) / 16 that also uses the next points a', b' beyond them (clamped at the
    lattice's ends).
    """
    out = np.asarray(coarse, np.float32)
    for axis in range(3):
        m = out.shape[axis]
        if m < 2:
            continue
        i = np.arange(m - 1)
        a, b = np.take(out, i, axis), np.take(out, i + 1, axis)
        mid = (a + b) / 2
        if cubic:
            before = np.take(out, np.maximum(i - 1, 0), axis)
            after = np.take(out, np.minimum(i + 2, m - 1), axis)
            mid = (9 * (a + b) - (before + after)) / 16
        shape = list(out.shape)
        shape[axis] = 2 * m - 1
        result = np.empty(shape, np.float32)
        index = [slice(None)] * out.ndim
        index[axis] = slice(0, None, 2)
        result[tuple(index)] = out
        index[axis] = slice(1, None, 2)
        result[tuple(index)] = mid
        out = result
    return out


def _support_range(
    coarse: np.ndarray, parity: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of the support corners of the fine points of one parity class.

    coarse: (m0+1, m1+1, m2+1) labels of the stride-s lattice. Fine points with even index 2k along an
    axis sit on coarse index k; with odd index 2k+1 between coarse k and k+1.
    """
    options = []
    for axis, p in enumerate(parity):
        m = coarse.shape[axis] - 1
        options.append([slice(0, m + 1)] if p == 0 else [slice(0, m), slice(1, m + 1)])
    views = [coarse[combo] for combo in itertools.product(*options)]
    return np.minimum.reduce(views), np.maximum.reduce(views)


class OctreeRefinement:
    """Query/update state machine: ``while not r.done: r.update(labels_at(r.query()))``.

    Args:
        grid_shape: (X, Y, Z) voxels.
        coarse_stride: S, a power of two: level 0 evaluates every S-th voxel along each axis.
        margin: also evaluate points within this many lattice steps (Chebyshev) of a point whose
            support disagrees, at every level (0 = evaluate only where the support disagrees).
        uncertain: optional bool grid (X, Y, Z); its points on every lattice coarser than stride 1 are
            evaluated (from there disagreements drive the refinement), so a structure the encoder sees
            is found even if it slips between coarse lattice points.
        region: optional bool grid (X, Y, Z), e.g. the encoder's segmentation dilated: level-0 lattice
            points outside it are taken as background without evaluation (seeded extraction).
        grow_connectivity: after each batch, filled points with an evaluated 6- or 26-neighbour of
            another label are evaluated too, repeatedly (0: never).
        finest_stride: the finest lattice the decoder evaluates (a power of two <= coarse_stride);
            finer points are interpolated from their support's scores. 1: every level is evaluated.
        cubic: interpolate scores with Catmull-Rom (4 points per axis) instead of linearly.
        background: (O,) scores of the points taken as background without evaluation (outside the
            grid or the seeded region), used by the interpolation; default zeros.
        confident: on the finest evaluated lattice, a point whose support disagrees is labelled from
            interpolated scores without evaluation when their confidence is >= this (None: never).
            Coarser lattices are not gated: interpolation errors grow with the square of the stride.
        decide: with interpolation (finest_stride > 1 or confident), maps scores (M, O) float to
            (labels (M,) int32, confidence (M,) float); update() must then also receive the scores of
            the evaluated points.
    """

    def __init__(
        self,
        grid_shape: tuple[int, int, int],
        coarse_stride: int = 8,
        margin: int = 1,
        uncertain: np.ndarray | None = None,
        region: np.ndarray | None = None,
        grow_connectivity: int = 26,
        finest_stride: int = 1,
        confident: float | None = None,
        cubic: bool = False,
        background: np.ndarray | None = None,
        decide: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        if coarse_stride < 1 or coarse_stride & (coarse_stride - 1):
            raise ValueError(f"coarse_stride must be a power of two, got {coarse_stride}")
        if (
            finest_stride < 1
            or finest_stride & (finest_stride - 1)
            or finest_stride > coarse_stride
        ):
            raise ValueError(
                f"finest_stride must be a power of two <= coarse_stride ({coarse_stride}),"
                f" got {finest_stride}"
            )
        self._interpolating = finest_stride > 1 or confident is not None
        if self._interpolating and decide is None:
            raise ValueError("interpolation (finest_stride > 1 or confident) needs `decide`")
        self._finest = finest_stride
        self._confident = confident
        self._decide = decide
        self._cubic = cubic
        self._background = None if background is None else np.asarray(background, np.float32)
        self._scores: np.ndarray | None = None  # (*extent, O) once the first scores arrive
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self._shape = tuple(int(n) for n in grid_shape)
        if len(self._shape) != 3 or min(self._shape) < 1:
            raise ValueError(f"grid_shape must be three positive ints, got {grid_shape}")
        extent = tuple(
            max(-(-(n - 1) // coarse_stride), 1) * coarse_stride + 1 for n in self._shape
        )
        inside = tuple(slice(0, n) for n in self._shape)
        self._uncertain = np.zeros(extent, bool)
        if uncertain is not None:
            if np.shape(uncertain) != self._shape:
                raise ValueError(
                    f"uncertain mask shape {np.shape(uncertain)} != grid {self._shape}"
                )
            self._uncertain[inside] = np.asarray(uncertain, bool)
        if grow_connectivity not in (0, 6, 26):
            raise ValueError(f"grow_connectivity must be 0, 6 or 26, got {grow_connectivity}")
        self._grow_connectivity = grow_connectivity
        self._stride = coarse_stride
        self._margin = margin
        self._values = np.zeros(extent, np.int32)
        self._evaluated = np.zeros(extent, bool)
        self._guessed = np.zeros(extent, bool)  # labelled from interpolated scores
        self._known = np.ones(extent, bool)
        self._known[inside] = False  # outside the grid: known background, never evaluated
        self._count = 0
        self._done = False
        wanted = np.zeros(extent, bool)
        wanted[::coarse_stride, ::coarse_stride, ::coarse_stride] = True
        if region is not None:
            if np.shape(region) != self._shape:
                raise ValueError(f"region mask shape {np.shape(region)} != grid {self._shape}")
            outside = np.ones(extent, bool)
            outside[inside] = ~np.asarray(region, bool)
            skipped = wanted & outside
            self._known[skipped] = True  # background by assumption
            wanted &= ~outside
        self._pending = np.argwhere(wanted & ~self._known).astype(np.int32)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def num_evaluated(self) -> int:
        """Locations passed to the decoder so far (each once)."""
        return self._count

    def query(self) -> np.ndarray:
        """Pending locations (M, 3) int32; empty only when done."""
        return self._pending.copy()

    def update(self, labels: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Records integer labels (M,) for the last query and advances to the next level.

        scores: (M, O) float, the decoder's scores of the same points; required with interpolation
        (finest_stride > 1 or confident), ignored otherwise.
        """
        if self._done:
            raise RuntimeError("update() called after refinement finished")
        labels = np.asarray(labels)
        if labels.shape != (len(self._pending),):
            raise ValueError(f"labels must have shape ({len(self._pending)},), got {labels.shape}")
        idx = tuple(self._pending.T)
        if self._interpolating:
            if scores is None:
                raise ValueError("interpolation: update() needs the scores of the queried points")
            scores = np.asarray(scores, np.float32).reshape(len(labels), -1)
            if self._scores is None:
                self._scores = np.zeros(self._values.shape + scores.shape[1:], np.float32)
                if self._background is not None:
                    self._scores[...] = self._background
            self._scores[idx] = scores
        self._values[idx] = labels
        self._known[idx] = True
        self._evaluated[idx] = True
        self._count += len(self._pending)
        if self._grow_connectivity and self._grow():
            return
        self._advance()

    def _grow(self) -> bool:
        """Queues filled points of the current lattice next to an evaluated point of another label.

        A filled label is a guess; an evaluated neighbour that disagrees means the surface passes
        between them (e.g. a convex boundary crossing an edge twice), so the guess is checked. Repeats
        until every filled point agrees with its evaluated 26-neighbours. True if points were queued.
        """
        s = self._stride
        values = self._values[::s, ::s, ::s]
        evaluated = self._evaluated[::s, ::s, ::s]
        filled = self._known[::s, ::s, ::s] & ~evaluated & ~self._guessed[::s, ::s, ::s]
        check = np.zeros(values.shape, bool)
        n = values.shape
        for d in itertools.product((-1, 0, 1), repeat=3):
            if d == (0, 0, 0) or (self._grow_connectivity == 6 and sum(map(abs, d)) != 1):
                continue
            here = tuple(slice(max(-k, 0), m - max(k, 0)) for k, m in zip(d, n))
            there = tuple(slice(max(k, 0), m - max(-k, 0)) for k, m in zip(d, n))
            check[here] |= filled[here] & evaluated[there] & (values[here] != values[there])
        inside = tuple(slice(0, -(-g // s)) for g in self._shape)
        outside_grid = np.ones(values.shape, bool)
        outside_grid[inside] = False
        check &= ~outside_grid
        if not check.any():
            return False
        self._pending = (np.argwhere(check) * s).astype(np.int32)
        return True

    def _advance(self) -> None:
        while self._stride > 1:
            s, half = self._stride, self._stride // 2
            coarse = self._values[::s, ::s, ::s]
            fine_values = self._values[::half, ::half, ::half]  # views: writes reach the grid
            fine_known = self._known[::half, ::half, ::half]
            disagree = np.zeros(fine_values.shape, bool)
            filled = np.zeros(fine_values.shape, np.int32)
            for parity in itertools.product((0, 1), repeat=3):
                target = tuple(slice(p, None, 2) for p in parity)
                lo, hi = _support_range(coarse, parity)
                disagree[target] = lo != hi
                filled[target] = lo
            guessed = np.zeros(fine_values.shape, bool)
            if self._scores is not None:
                guessed = self._interpolate(s, half, disagree, filled, fine_known)
            evaluate = disagree
            if self._margin and disagree.any():
                cube = np.ones((3, 3, 3), bool)
                evaluate = ndimage.binary_dilation(disagree, cube, iterations=self._margin)
            if half > 1:  # at stride 1 disagreements alone drive the refinement
                evaluate = evaluate | self._uncertain[::half, ::half, ::half]
            if half < self._finest:  # below the finest evaluated lattice: `filled` is interpolated
                evaluate = np.zeros_like(evaluate)
            evaluate = evaluate & ~fine_known & ~guessed
            self._guessed[::half, ::half, ::half] |= guessed & ~fine_known
            infer = ~fine_known & ~evaluate
            fine_values[infer] = filled[infer]
            fine_known[infer] = True
            self._stride = half
            if evaluate.any():
                self._pending = (np.argwhere(evaluate) * half).astype(np.int32)
                return
        self._pending = np.zeros((0, 3), np.int32)
        self._done = True

    def _interpolate(
        self,
        s: int,
        half: int,
        disagree: np.ndarray,
        filled: np.ndarray,
        fine_known: np.ndarray,
    ) -> np.ndarray:
        """Gives the unknown points of the stride-`half` lattice their support's mean scores.

        Points whose support disagrees take the label `decide` gives those scores (written into
        `filled`) below the finest evaluated stride, or on it where the confidence reaches `confident`;
        agreeing support keeps its label. Returns the bool mask (of the stride-`half` lattice) of
        the points so labelled.
        """
        fine = self._scores[::half, ::half, ::half]  # a view: writes reach the grid
        mean = upsample2(self._scores[::s, ::s, ::s], self._cubic)
        unknown = ~fine_known
        fine[unknown] = mean[unknown]
        guess = unknown & disagree
        gated = half == self._finest and self._confident is not None
        if not guess.any() or (half >= self._finest and not gated):
            return np.zeros(guess.shape, bool)
        labels, confidence = self._decide(mean[guess])
        if gated:
            sure = np.asarray(confidence) >= self._confident
            where = np.argwhere(guess)[~sure]
            guess[tuple(where.T)] = False
            labels = np.asarray(labels)[sure]
        filled[guess] = np.asarray(labels, np.int32)
        return guess

    def to_labels(self) -> np.ndarray:
        """(X, Y, Z) int32 labels: evaluated voxels' own, every other the label filled from its support."""
        return self._values[tuple(slice(0, n) for n in self._shape)].copy()
