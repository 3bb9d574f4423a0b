"""Smooth surfaces of an occupancy field: marching cubes on probabilities near the surface.

A binary label map's mesh (outputs.mask_mesh of the mask) puts every vertex half-way between an
inside and an outside voxel centre: the voxel staircase. Here the field's probabilities are evaluated
at the voxel centres of the surface band, the voxels with a 26-neighbour of the other label (every
corner of a marching-cubes cell the surface can cross), and the rest of the grid holds 1 inside and
0 outside. Marching cubes at the decision level then places each vertex where the linear
interpolation of the field along a cell edge crosses the level, and optionally `refine_steps` Newton
steps along the field's gradient move each vertex onto the level set itself (as Occupancy Networks'
mesh refinement). Everything runs on one grid of voxel coordinates; `affine` maps them to world mm.

The field is a callback: `probability` maps (M, 3) voxel coordinates to (M,) foreground
probabilities; `gradient` maps them to (probabilities (M,), gradients (M, 3) per voxel).
"""

from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from ossnet_jax import outputs

Probability = Callable[[np.ndarray], np.ndarray]
Gradient = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
MAX_NEWTON_STEP = 0.5  # voxels: a refinement step never moves a vertex further


def surface_band(inside: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels with a 26-neighbour of the other value (beyond the array: outside)."""
    inside = np.asarray(inside, bool)
    any_inside = ndimage.maximum_filter(inside, size=3, mode="constant", cval=False)
    all_inside = ndimage.minimum_filter(inside, size=3, mode="constant", cval=False)
    return any_inside & ~all_inside


def band_probabilities(probability: Probability, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """(X, Y, Z) float32: the field at the surface band's voxel centres, 1 inside and 0 outside
    elsewhere; and the number of field evaluations (band voxels)."""
    inside = np.asarray(inside, bool)
    band = surface_band(inside)
    values = inside.astype(np.float32)
    points = np.argwhere(band)
    if len(points):
        values[band] = np.asarray(probability(points.astype(np.float64)), np.float32)
    return values, len(points)


def _to_voxels(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def refine_vertices(
    vertices: np.ndarray, gradient: Gradient, level: float, steps: int
) -> np.ndarray:
    """`steps` Newton steps v <- v - (p(v) - level) g / |g|^2 on (V, 3) voxel coordinates, each at
    most MAX_NEWTON_STEP voxels long; vertices where the gradient vanishes stay."""
    v = np.asarray(vertices, np.float64).copy()
    for _ in range(steps):
        p, g = gradient(v)
        g = np.asarray(g, np.float64)
        norm2 = np.sum(g * g, axis=-1)
        ok = norm2 > 1e-12
        step = np.zeros_like(v)
        step[ok] = -((np.asarray(p, np.float64)[ok] - level) / norm2[ok])[:, None] * g[ok]
        length = np.linalg.norm(step, axis=-1, keepdims=True)
        v += step * np.minimum(1.0, MAX_NEWTON_STEP / np.maximum(length, 1e-12))
    return v


def field_mesh(
    probability: Probability,
    inside: np.ndarray,
    affine: np.ndarray,
    level: float = 0.5,
    gradient: Optional[Gradient] = None,
    refine_steps: int = 0,
    normals: bool = False,
) -> tuple[np.ndarray, ...]:
    """The field's level set near the boundary of `inside` as a triangle mesh in world mm.

    Args:
      probability: (M, 3) voxel coordinates of the grid -> (M,) foreground probabilities.
      inside: (X, Y, Z) bool foreground of the label map on that grid (its boundary locates the band).
      affine: (4, 4) voxel -> world mm of the grid.
      level: decision level in (0, 1).
      gradient: (M, 3) voxel coordinates -> (probabilities (M,), gradients (M, 3) per voxel); needed
        for refine_steps > 0 and normals.
      refine_steps: Newton steps moving each vertex onto the level set (0: marching cubes' vertices);
        vertices outside the grid's voxel centres (the caps closing the mesh at its border) stay.
      normals: also return unit outward vertex normals (minus the field's gradient) in world space.
    Returns:
      (vertices (V, 3) float64 world mm, faces (F, 3) int64 wound outward[, normals (V, 3)]); empty
      arrays when `inside` is empty.
    """
    if (refine_steps or normals) and gradient is None:
        raise ValueError("refine_steps and normals need the field's gradient")
    affine = np.asarray(affine, np.float64)
    values, _ = band_probabilities(probability, inside)
    world, faces = outputs.mask_mesh(values, affine, level)
    if len(world) and refine_steps:
        voxels = _to_voxels(world, affine)
        # vertices of the caps that close the mesh at the grid's border are not on the level set
        sampled = np.all((voxels >= 0) & (voxels <= np.asarray(values.shape) - 1), axis=1)
        voxels[sampled] = refine_vertices(voxels[sampled], gradient, level, refine_steps)
        world = voxels @ affine[:3, :3].T + affine[:3, 3]
    if not normals:
        return world, faces
    out = np.zeros_like(world)
    if len(world):
        _, g = gradient(_to_voxels(world, affine))
        # p(world) = f(voxel(world)): the world gradient is A^-T times the voxel gradient
        g_world = np.asarray(g, np.float64) @ np.linalg.inv(affine[:3, :3])
        out = -g_world / np.maximum(np.linalg.norm(g_world, axis=-1, keepdims=True), 1e-12)
    return world, faces, out
