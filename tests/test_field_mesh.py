"""Smooth meshes of an occupancy field against an analytic ball (inference/field_mesh.py)."""

import numpy as np
import pytest

from ossnet_jax import outputs
from ossnet_jax.inference import field_mesh

CENTRE = np.array([15.3, 16.1, 14.7])
RADIUS = 8.3


def _ball(width: float):
    """A stand-in decoder: p(x) = sigmoid((R - |x - c|) / w) in voxel coordinates, and its gradient."""

    def probability(x):
        return 1.0 / (1.0 + np.exp(-(RADIUS - np.linalg.norm(x - CENTRE, axis=-1)) / width))

    def gradient(x):
        d = x - CENTRE
        p = probability(x)
        r = np.linalg.norm(d, axis=-1, keepdims=True)
        return p, -(p * (1 - p) / width)[:, None] * d / r

    return probability, gradient


def _inside(probability, shape=(32, 32, 32)):
    index = np.argwhere(np.ones(shape, bool)).astype(np.float64)
    return (probability(index) > 0.5).reshape(shape)


@pytest.mark.parametrize("width", [0.5, 2.0])
def test_ball_mesh_vertices_lie_within_a_twentieth_voxel_of_the_sphere(width):
    probability, _ = _ball(width)
    inside = _inside(probability)
    vertices, faces = field_mesh.field_mesh(probability, inside, np.eye(4))
    assert len(faces) > 1000
    error = np.abs(np.linalg.norm(vertices - CENTRE, axis=1) - RADIUS)
    assert error.max() < 0.05
    # the binary mask's mesh, kept for comparison, has the voxel staircase
    staircase, _ = outputs.mask_mesh(inside, np.eye(4))
    assert np.abs(np.linalg.norm(staircase - CENTRE, axis=1) - RADIUS).max() > 0.3


def test_world_mesh_refinement_and_outward_normals_of_an_anisotropic_grid():
    """Voxels of 0.5 x 1 x 2 mm flipped along x: the mesh in mm is the ellipsoid's image, refined
    vertices sit on the level set, normals are unit and point away from the centre, faces outward."""
    probability, gradient = _ball(1.0)
    inside = _inside(probability)
    affine = np.diag([-0.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [40.0, -3.0, 7.0]
    vertices, faces, normals = field_mesh.field_mesh(
        probability, inside, affine, 0.5, gradient, refine_steps=2, normals=True
    )
    voxels = (vertices - affine[:3, 3]) / np.diag(affine)[:3]
    np.testing.assert_allclose(probability(voxels), 0.5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, rtol=1e-9)
    centre_mm = affine[:3, :3] @ CENTRE + affine[:3, 3]
    assert np.all(np.sum(normals * (vertices - centre_mm), axis=1) > 0)
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    assert np.einsum("ij,ij->", a - centre_mm, np.cross(b - a, c - a)) > 0  # wound outward


def test_band_is_every_voxel_next_to_the_other_label_and_empty_masks_give_empty_meshes():
    inside = np.zeros((6, 6, 6), bool)
    inside[2:4, 2:4, 2:4] = True
    band = field_mesh.surface_band(inside)
    assert band.sum() == 4**3  # the cube and its one-voxel shell, every inside voxel on the border
    empty = np.zeros((6, 6, 6), bool)
    vertices, faces = field_mesh.field_mesh(lambda x: np.zeros(len(x)), empty, np.eye(4))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)
    with pytest.raises(ValueError, match="gradient"):
        field_mesh.field_mesh(lambda x: np.zeros(len(x)), empty, np.eye(4), normals=True)
