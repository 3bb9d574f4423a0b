"""Label maps at any voxel spacing: the occupancy field sampled on a grid finer (or coarser) than the
input's, in the input file's voxel order, with its affine.

Geometry. A case's model grid (the padded or resampled RAS grid the network sees) relates to its input
file by `grid_affine` (model grid voxel -> world mm). An output grid at spacing s' (mm per axis of the
input file) keeps the file's axes and its first voxel centre (the convention of SimpleITK and nnU-Net
resampling): along a file axis of n voxels of spacing s it has round(n s / s') voxels, voxel k lying
at file coordinate k s' / s. Its affine is the file's with the columns scaled by s' / s, and each
output voxel has a real coordinate on the model grid (`OutputGrid.to_grid`) where the field is
evaluated (trilinear patches, models/patches.py). At the input's spacing the output grid is the
file's own.

Refinement. The configured eval.strategy runs on the output grid's voxel indices, the decoder seeing
their model-grid coordinates: 'octree' with its coarse stride multiplied by the refinement factor
(the least over the axes, rounded to a power of two), so its coarse lattice keeps its spacing in mm
(isotropic refinement) and the decoder
evaluations grow with the surface, not the volume; 'band' and 'dense' as configured (their cost grows
with the volume). Seeding samples the encoder's segmentation, upsampled to the model grid, at each
output voxel's nearest model-grid voxel. eval.min_component_voxels counts input-sized voxels.
"""

import dataclasses
import math
import time
import weakref
from typing import Callable, Sequence

import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np

from ossnet_jax import postprocess
from ossnet_jax.data.dataset import PreparedCase
from ossnet_jax.data.nifti import voxel_spacing
from ossnet_jax.families.oss_net import field
from ossnet_jax.families.oss_net.predictor import Predictor, extract
from ossnet_jax.inference import field_mesh
from ossnet_jax.inference.octree import seed_from_segmentation


@dataclasses.dataclass(frozen=True)
class OutputGrid:
    """A label map's grid in the input file's voxel order.

    Attributes:
      shape: (x, y, z) voxels.
      affine: (4, 4) output voxel -> world mm.
      to_grid: (4, 4) output voxel -> model-grid voxel coordinate (axis permutation, flips, scales).
      factors: (3,) input spacing / output spacing per file axis (2 for twice as fine).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    to_grid: np.ndarray
    factors: tuple[float, float, float]

    def grid_coordinates(self, index: np.ndarray) -> np.ndarray:
        """(M, 3) output voxel indices (or real coordinates) -> (M, 3) float64 model-grid coordinates."""
        return np.asarray(index, np.float64) @ self.to_grid[:3, :3].T + self.to_grid[:3, 3]


def canonical_affine(case: PreparedCase) -> np.ndarray:
    """(4, 4) voxel -> world mm of the case's RAS volume (before padding or resampling)."""
    return np.asarray(case.affine, np.float64) @ nib.orientations.inv_ornt_aff(
        np.asarray(case.ornt, np.float64), case.file_shape
    )


def grid_affine(case: PreparedCase, grid_shape: Sequence[int]) -> np.ndarray:
    """(4, 4) model-grid voxel -> world mm of a case on a grid of `grid_shape`.

    Padded cases: the RAS volume starts at case.offsets. Resampled cases (preprocess.resize, voxel
    edges aligned): grid voxel g lies at RAS voxel (g + 0.5) n / G - 0.5.
    """
    canonical = canonical_affine(case)
    inner = np.eye(4)
    if case.resampled:
        scale = np.asarray(case.shape, np.float64) / np.asarray(grid_shape, np.float64)
        inner[:3, :3] = np.diag(scale)
        inner[:3, 3] = 0.5 * scale - 0.5
    else:
        inner[:3, 3] = -np.asarray(case.offsets, np.float64)
    return canonical @ inner


def _spacing(value: float | Sequence[float]) -> np.ndarray:
    spacing = np.broadcast_to(np.asarray(value, np.float64), (3,)).copy()
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing must be one or three positive numbers (mm), got {value!r}")
    return spacing


def is_native(case: PreparedCase, spacing: float | Sequence[float] | None) -> bool:
    """Whether `spacing` (None or empty: the input's) is the input file's own, to 1e-6 mm."""
    if spacing is None or (not np.isscalar(spacing) and len(spacing) == 0):
        return True
    return bool(np.allclose(_spacing(spacing), voxel_spacing(case.affine), rtol=0, atol=1e-6))


def output_grid(
    case: PreparedCase, grid_shape: Sequence[int], spacing: float | Sequence[float]
) -> OutputGrid:
    """The grid of spacing `spacing` (mm, one value or one per file axis) over the case's file."""
    native = np.asarray(voxel_spacing(case.affine), np.float64)
    factors = native / _spacing(spacing)
    shape = tuple(max(int(round(n * f)), 1) for n, f in zip(case.file_shape, factors))
    scale = np.diag(np.append(1.0 / factors, 1.0))
    affine = np.asarray(case.affine, np.float64) @ scale
    to_grid = np.linalg.inv(grid_affine(case, grid_shape)) @ affine
    to_grid[np.abs(to_grid) < 1e-9] = 0.0  # exact zeros off the permutation
    return OutputGrid(shape, affine, to_grid, tuple(float(f) for f in factors))


def _seed_on_output(seed: np.ndarray, grid: OutputGrid) -> np.ndarray:
    """A model-grid mask sampled at each output voxel's nearest model-grid voxel: (x, y, z) bool."""
    perm = np.argmax(
        np.abs(grid.to_grid[:3, :3]), axis=0
    )  # output axis j runs along grid axis perm[j]
    index = []
    for j, n in enumerate(grid.shape):
        a = perm[j]
        coords = grid.to_grid[a, j] * np.arange(n) + grid.to_grid[a, 3]
        index.append(np.clip(np.rint(coords), 0, seed.shape[a] - 1).astype(np.int64))
    return seed.transpose(tuple(perm))[np.ix_(*index)]


def refined_eval(
    ev: ml_collections.ConfigDict, factors: Sequence[float]
) -> ml_collections.ConfigDict:
    """eval settings for an output grid refined by `factors`: the octree's coarse stride times the
    least refinement over the axes (rounded to a power of two, at least 1, so the coarse lattice is
    nowhere coarser in mm than configured), eval.min_component_voxels in output voxels."""
    out = ml_collections.ConfigDict(ev.to_dict())
    least = min(factors)
    scale = 2 ** max(int(round(math.log2(least))), 0) if least > 1 else 1
    out.octree_stride = ev.get("octree_stride", 8) * scale
    out.min_component_voxels = int(round(ev.get("min_component_voxels", 0) * np.prod(factors)))
    return out


def predict_at(
    predictor: Predictor,
    encoded: tuple,
    case: PreparedCase,
    spacing: float | Sequence[float],
    ev: ml_collections.ConfigDict,
) -> tuple[np.ndarray, OutputGrid, int]:
    """A case's label map at `spacing`: (x', y', z') int32 in label values in the file's voxel order,
    its OutputGrid (affine), and the decoder evaluations.

    `encoded` is predictor.encode's output for the case's image; `ev` the eval settings (strategy,
    seeding, octree, post-processing), adapted by `refined_eval`.
    """
    grid_shape = tuple(np.asarray(case.image).shape[:3])
    grid = output_grid(case, grid_shape, spacing)
    latents, seg_prob, source = encoded
    upper = np.asarray(grid_shape, np.float64) - 1.0

    def decode(index: np.ndarray) -> np.ndarray:
        coords = np.clip(grid.grid_coordinates(index), 0.0, upper).astype(np.float32)
        return predictor.decode_all(latents, source, coords)

    refined = refined_eval(ev, grid.factors)
    seed = None
    if refined.seeded and seg_prob is not None:
        on_grid = seed_from_segmentation(np.asarray(seg_prob), grid_shape, refined.threshold)
        seed = _seed_on_output(on_grid, grid)
    labels, evaluations = extract(decode, predictor.spec, grid.shape, refined, seed=seed)
    if refined.min_component_voxels:
        keep = postprocess.remove_small_components(
            labels > 0, refined.min_component_voxels, refined.get("component_connectivity", 26)
        )
        labels = np.where(keep, labels, 0)
    return labels, grid, evaluations


def to_input_grid(labels: np.ndarray, grid: OutputGrid, file_shape: Sequence[int]) -> np.ndarray:
    """An output-grid label map resampled by nearest neighbour to the input file's voxels: each file
    voxel k takes output voxel round(k * factor) per axis (the one whose centre is nearest).
    Returns `file_shape` (the case's file_shape)."""
    index = []
    for n_out, f, n_in in zip(grid.shape, grid.factors, file_shape):
        index.append(np.clip(np.rint(np.arange(n_in) * f), 0, n_out - 1).astype(np.int64))
    return labels[np.ix_(*index)]


@dataclasses.dataclass(frozen=True)
class SpacedPrediction:
    """evaluate.py's prediction of a case at eval.output_spacing.

    Attributes:
      labels: (x', y', z') int32 label values at the output spacing, file voxel order.
      affine: (4, 4) its voxel -> world mm.
      on_input: (x, y, z) the same resampled to the input file's voxels by nearest neighbour (what
        the metrics compare with the label at its own resolution).
      evaluations: decoder evaluations on the output grid.
      seconds: wall time of the prediction.
    """

    labels: np.ndarray
    affine: np.ndarray
    on_input: np.ndarray
    evaluations: int
    seconds: float


def predict_spaced(
    predictor: Predictor, case: PreparedCase, ev: ml_collections.ConfigDict
) -> SpacedPrediction:
    """A case predicted at ev.output_spacing (`predict_at`, encoding the image once)."""
    start = time.perf_counter()
    encoded = predictor.encode(predictor.variables, jnp.asarray(np.asarray(case.image)))
    labels, grid, evaluations = predict_at(predictor, encoded, case, ev.output_spacing, ev)
    seconds = time.perf_counter() - start
    on_input = to_input_grid(labels, grid, case.file_shape)
    return SpacedPrediction(labels, grid.affine, on_input, evaluations, seconds)


_GRADIENTS: "weakref.WeakKeyDictionary[Predictor, Callable]" = weakref.WeakKeyDictionary()


def foreground_callbacks(
    predictor: Predictor, encoded: tuple, grid_shape: Sequence[int], grid: OutputGrid
) -> tuple[Callable, Callable]:
    """The foreground probability (field.foreground) on an output grid's real voxel coordinates:
    (M, 3) -> (M,), and (M, 3) -> ((M,), gradient (M, 3) per output voxel), for field_mesh."""
    latents, _, source = encoded
    upper = np.asarray(grid_shape, np.float64) - 1.0

    def coords(index: np.ndarray) -> np.ndarray:
        return np.clip(grid.grid_coordinates(index), 0.0, upper).astype(np.float32)

    def probability(index: np.ndarray) -> np.ndarray:
        probs = predictor.decode_all(latents, source, coords(index))
        return np.asarray(field.foreground(predictor.spec, probs))

    if predictor not in _GRADIENTS:
        _GRADIENTS[predictor] = field.foreground_gradient_fn(predictor.model, predictor.config)
    both = _GRADIENTS[predictor]

    def gradient(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        run = lambda batch: both(predictor.variables, latents, source, batch)
        p, g = field.in_batches(run, coords(index), predictor.batch_sizes[1])
        return p, g @ grid.to_grid[:3, :3]  # d/d(output voxel) = d/d(grid) times the Jacobian

    return probability, gradient


def case_mesh(
    predictor: Predictor,
    encoded: tuple,
    case: PreparedCase,
    labels: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    level: float = 0.5,
    refine_steps: int = 0,
    normals: bool = False,
) -> tuple[np.ndarray, ...]:
    """field_mesh.field_mesh of a case's field around `labels`, its label map at `spacing` (None:
    the input's) in the file's voxel order: (vertices world mm, faces[, normals])."""
    grid_shape = tuple(np.asarray(case.image).shape[:3])
    native = voxel_spacing(case.affine) if spacing is None else spacing
    grid = output_grid(case, grid_shape, native)
    probability, gradient = foreground_callbacks(predictor, encoded, grid_shape, grid)
    return field_mesh.field_mesh(
        probability, labels > 0, grid.affine, level, gradient, refine_steps, normals
    )


def prediction_mesh(
    predictor: Predictor,
    case: PreparedCase,
    labels: np.ndarray,
    spacing: float | Sequence[float] | None,
    level: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """evaluate's prediction mesh from the field (`case_mesh`, encoding the image), or None when
    `labels` (the written label map at `spacing`) has no foreground."""
    if not np.any(labels > 0):
        return None
    encoded = predictor.encode(predictor.variables, jnp.asarray(np.asarray(case.image)))
    return case_mesh(predictor, encoded, case, labels, spacing or None, level)
