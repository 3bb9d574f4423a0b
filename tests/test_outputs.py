"""Meshes, mesh files, PNG figures and CSV tables written for people to look at."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from matplotlib.image import imread

from ossnet_jax.outputs import (
    dice_summary_png,
    mask_mesh,
    mesh_png,
    slices_png,
    write_csv,
    write_obj,
    write_ply,
)

# Voxel axes permuted (x->world y, y->world z, z->world x), world x flipped,
# anisotropic spacing and a translation: determinant -2.4 (a mirroring affine).
MIRRORING = np.array(
    [
        [0.0, 0.0, -2.0, 10.0],
        [1.5, 0.0, 0.0, -5.0],
        [0.0, 0.8, 0.0, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# Plain anisotropic scaling with a translation: determinant +2.4.
SCALING = np.array(
    [
        [1.5, 0.0, 0.0, -7.0],
        [0.0, 0.8, 0.0, 2.0],
        [0.0, 0.0, 2.0, 4.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _sphere(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((grid[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def _assert_watertight(faces: np.ndarray) -> None:
    """Every undirected edge is used by exactly two faces."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, counts = np.unique(np.sort(edges, axis=1), axis=0, return_counts=True)
    assert counts.min() == 2 and counts.max() == 2


def _face_normals(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return np.cross(b - a, c - a), (a + b + c) / 3


def _signed_volume(vertices, faces) -> float:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.sum(a * np.cross(b, c)) / 6)


@pytest.mark.parametrize("affine", [np.eye(4), SCALING, MIRRORING], ids=["eye", "scale", "mirror"])
def test_sphere_mesh_is_watertight_outward_and_in_world_coordinates(affine):
    centre, radius = np.array([8.0, 7.5, 9.0]), 5.0
    vertices, faces = mask_mesh(_sphere((17, 16, 19), centre, radius), affine)
    assert vertices.dtype == np.float64 and vertices.shape[1] == 3
    assert np.issubdtype(faces.dtype, np.integer) and faces.shape[1] == 3
    _assert_watertight(faces)

    normals, face_centres = _face_normals(vertices, faces)
    outward = np.sum(normals * (face_centres - vertices.mean(axis=0)), axis=1)
    assert np.all(outward > 0)

    centroid_voxel = np.linalg.solve(affine[:3, :3], vertices.mean(axis=0) - affine[:3, 3])
    assert np.linalg.norm(centroid_voxel - centre) < 0.5
    world_extent = vertices.max(axis=0) - vertices.min(axis=0)
    spacing_along_world = np.abs(affine[:3, :3]).max(axis=1)  # one voxel axis per world axis
    # The surface lies half a voxel beyond the outermost inside voxel centres.
    np.testing.assert_array_less(
        np.abs(world_extent - 2 * radius * spacing_along_world), 1.01 * spacing_along_world
    )


@pytest.mark.parametrize("affine", [np.eye(4), MIRRORING], ids=["eye", "mirror"])
def test_mask_touching_the_border_gives_a_closed_outward_mesh(affine):
    mask = np.zeros((6, 5, 7), dtype=bool)
    mask[0:4, 0:5, 3:7] = True  # touches five of the six volume faces
    mask[0, 0, 2] = True
    vertices, faces = mask_mesh(mask, affine)
    _assert_watertight(faces)
    volume = _signed_volume(vertices, faces)
    voxel_volume = abs(np.linalg.det(affine[:3, :3]))
    assert 0.8 * mask.sum() * voxel_volume < volume < mask.sum() * voxel_volume
    voxel_coords = np.linalg.solve(affine[:3, :3], (vertices - affine[:3, 3]).T).T
    np.testing.assert_allclose(voxel_coords.min(axis=0), [-0.5, -0.5, 1.5])
    np.testing.assert_allclose(voxel_coords.max(axis=0), [3.5, 4.5, 6.5])


def test_empty_mask_gives_empty_mesh_and_bad_arguments_raise():
    vertices, faces = mask_mesh(np.zeros((3, 4, 5), dtype=bool), np.eye(4))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)
    with pytest.raises(ValueError, match="singular"):
        mask_mesh(np.ones((2, 2, 2), dtype=bool), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="level"):
        mask_mesh(np.ones((2, 2, 2), dtype=bool), np.eye(4), level=1.0)


def _read_ply(path) -> tuple[np.ndarray, np.ndarray]:
    lines = path.read_text(encoding="ascii").splitlines()
    assert lines[:2] == ["ply", "format ascii 1.0"]
    end = lines.index("end_header")
    header = lines[:end]
    n_vertices = int(next(line for line in header if line.startswith("element vertex")).split()[2])
    n_faces = int(next(line for line in header if line.startswith("element face")).split()[2])
    body = lines[end + 1 :]
    assert len(body) == n_vertices + n_faces
    vertices = np.array([[float(x) for x in line.split()] for line in body[:n_vertices]])
    face_rows = [[int(x) for x in line.split()] for line in body[n_vertices:]]
    assert all(row[0] == 3 for row in face_rows)
    return vertices.reshape(-1, 3), np.array([row[1:] for row in face_rows]).reshape(-1, 3)


def _read_obj(path) -> tuple[np.ndarray, np.ndarray]:
    vertices, faces = [], []
    for line in path.read_text(encoding="ascii").splitlines():
        kind, *values = line.split()
        if kind == "v":
            vertices.append([float(x) for x in values])
        elif kind == "f":
            faces.append([int(x) - 1 for x in values])
        else:
            assert kind == "#"
    return np.array(vertices).reshape(-1, 3), np.array(faces).reshape(-1, 3)


def test_ply_and_obj_read_back_exactly(tmp_path):
    vertices, faces = mask_mesh(_sphere((9, 9, 9), (4.0, 4.0, 4.0), 3.0), MIRRORING)
    vertices = vertices + np.pi * 1e-3  # digits that a short fixed format would lose
    write_ply(tmp_path / "mesh.ply", vertices, faces)
    write_obj(tmp_path / "sub" / "mesh.obj", vertices, faces)
    for read, path in (
        (_read_ply, tmp_path / "mesh.ply"),
        (_read_obj, tmp_path / "sub" / "mesh.obj"),
    ):
        got_vertices, got_faces = read(path)
        np.testing.assert_array_equal(got_vertices, vertices)
        np.testing.assert_array_equal(got_faces, faces)
    assert sorted(os.listdir(tmp_path)) == ["mesh.ply", "sub"]
    assert os.listdir(tmp_path / "sub") == ["mesh.obj"]


def test_empty_mesh_files_and_bad_meshes(tmp_path):
    empty_v, empty_f = np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    write_ply(tmp_path / "empty.ply", empty_v, empty_f)
    write_obj(tmp_path / "empty.obj", empty_v, empty_f)
    assert _read_ply(tmp_path / "empty.ply")[0].shape == (0, 3)
    assert _read_obj(tmp_path / "empty.obj")[1].shape == (0, 3)
    with pytest.raises(ValueError, match="face indices"):
        write_ply(tmp_path / "bad.ply", np.zeros((3, 3)), np.array([[0, 1, 3]]))
    with pytest.raises(ValueError, match="vertices"):
        write_obj(tmp_path / "bad.obj", np.full((3, 3), np.nan), np.array([[0, 1, 2]]))
    assert not (tmp_path / "bad.ply").exists() and not (tmp_path / "bad.obj").exists()


def _assert_png(path) -> None:
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.01


def _case(shape=(24, 20, 12)):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape) + 3 * _sphere(shape, (12, 10, 6), 6)
    target = _sphere(shape, (12, 10, 6), 5)
    pred = _sphere(shape, (13, 10, 6), 5)
    return image, pred, target


def _tinted_pixels(path) -> tuple[int, int]:
    """Pixels tinted yellow (prediction) and green (label) over the grey image: a fill blends its
    colour with the grey (0.25 opaque), a contour is the pure colour. Where the two fills overlap
    the pixel counts as neither."""
    pixels = imread(path)[..., :3].astype(np.float64)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    yellow = (r - b > 0.15) & (np.abs(r - g) < 0.08)
    green = (g - r > 0.15) & (g - b > 0.15) & (np.abs(r - b) < 0.08)
    return int(yellow.sum()), int(green.sum())


# (yellow, green) pixel bounds: the overlays cover thousands of pixels; the legend's short coloured
# lines (present whenever a mask is given, empty or not) about 60 of each colour
@pytest.mark.parametrize(
    "which, yellow, green",
    [
        ("both", (2000, None), (2000, None)),
        ("pred_only", (2000, None), (0, 0)),
        ("none", (0, 0), (0, 0)),
        ("empty", (1, 200), (1, 200)),
    ],
    ids=["both", "pred_only", "none", "empty"],
)
def test_slices_png_draws_prediction_and_label_overlays(tmp_path, which, yellow, green):
    image, pred, target = _case()
    if which == "pred_only":
        target = None
    elif which == "none":
        pred = target = None
    elif which == "empty":
        pred, target = np.zeros_like(pred), np.zeros_like(target)
    path = tmp_path / "slices.png"
    slices_png(path, image, pred, target, (1.0, 1.2, 2.5), f"case {which}")
    _assert_png(path)
    assert os.listdir(tmp_path) == ["slices.png"]
    for count, (low, high) in zip(_tinted_pixels(path), (yellow, green)):
        assert count >= low and (high is None or count <= high), (which, count)


def test_slices_png_rejects_mismatched_shapes(tmp_path):
    image, pred, _ = _case()
    with pytest.raises(ValueError, match="target"):
        slices_png(tmp_path / "x.png", image, pred, pred[:-1], (1, 1, 1), "bad")
    assert not (tmp_path / "x.png").exists()


def test_mesh_png_renders_full_decimated_and_empty_meshes(tmp_path):
    vertices, faces = mask_mesh(_sphere((12, 12, 12), (6.0, 6.0, 6.0), 4.0), SCALING)
    mesh_png(tmp_path / "mesh.png", vertices, faces, "sphere")
    mesh_png(tmp_path / "decimated.png", vertices, faces, "decimated", max_faces=50)
    for name in ("mesh.png", "decimated.png"):
        _assert_png(tmp_path / name)
    mesh_png(tmp_path / "empty.png", np.zeros((0, 3)), np.zeros((0, 3), dtype=int), "empty")
    assert imread(tmp_path / "empty.png").ndim == 3


def test_dice_summary_png_with_regions(tmp_path):
    rows = [
        {
            "id": f"case{i}",
            "dice": 0.5 + 0.04 * i,
            "regions": {"whole_tumour": {"dice": 0.9 - 0.03 * i, "iou": 0.8}},
        }
        for i in range(8)
    ]
    rows.append({"id": "missing_region", "dice": None})
    dice_summary_png(tmp_path / "dice.png", rows)
    _assert_png(tmp_path / "dice.png")
    dice_summary_png(tmp_path / "none.png", [])
    assert imread(tmp_path / "none.png").ndim == 3


def test_csv_round_trip_flattens_nested_dicts(tmp_path):
    rows = [
        {"id": "a", "dice": 0.1 + 0.2, "regions": {"whole_tumour": {"dice": 0.5, "iou": 1 / 3}}},
        {"id": "b", "dice": 1.0, "hd95": None, "regions": {"enhancing": {"dice": 0.25}}},
    ]
    path = tmp_path / "cases.csv"
    write_csv(path, rows)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [
            "id",
            "dice",
            "regions.whole_tumour.dice",
            "regions.whole_tumour.iou",
            "hd95",
            "regions.enhancing.dice",
        ]
        got = list(reader)
    assert got[0]["id"] == "a" and float(got[0]["dice"]) == 0.1 + 0.2
    assert float(got[0]["regions.whole_tumour.iou"]) == 1 / 3
    assert got[0]["hd95"] == "" and got[0]["regions.enhancing.dice"] == ""
    assert got[1]["hd95"] == "" and float(got[1]["regions.enhancing.dice"]) == 0.25
    assert got[1]["regions.whole_tumour.dice"] == ""


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("cannot format")

    path = tmp_path / "cases.csv"
    write_csv(path, [{"id": "old"}])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot format"):
        write_csv(path, [{"id": "new"}, {"id": Unprintable()}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cases.csv"]
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == ""
