"""Files people look at: surface meshes (PLY, OBJ), PNG figures and a per-case CSV table.

Every writer creates the parent folder, writes to a hidden temporary file next to the
destination, flushes it to disk and renames it onto the destination with ``os.replace``,
so an interrupted or failed write never leaves a partial file and never alters a file
already there. Figures are drawn with matplotlib's object-oriented API and rendered by
its Agg (PNG) renderer, without pyplot: the caller's backend and open figures are left
alone.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import pathlib
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from skimage import measure

PREDICTION_COLOUR = "yellow"
LABEL_COLOUR = "lime"
MAX_RENDERED_FACES = 20000


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike, mode: str, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success flush, fsync and rename it to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_png(path: str | os.PathLike, fig: Figure) -> None:
    with _atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def mask_mesh(
    mask: np.ndarray, affine: np.ndarray, level: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Closed triangle mesh of a mask's boundary in world coordinates.

    Marching cubes (scikit-image, Lewiner) runs on the mask padded by one voxel of
    zeros, so masks touching the volume border still give closed meshes; vertices are
    shifted back by the padding (voxel index coordinates, voxel centres at integers)
    and mapped through ``affine``. Faces are wound counter-clockwise seen from outside
    (right-hand normals point out of the object) in world space: the winding is chosen
    so that the mesh's signed volume is positive in voxel space and reversed when the
    affine has a negative determinant (it mirrors space).

    Args:
        mask: ``(X, Y, Z)`` bool mask, or occupancy probabilities in ``[0, 1]``.
        affine: ``(4, 4)`` voxel-to-world transform in mm.
        level: iso-value in ``(0, 1)``; 0.5 puts a bool mask's surface half-way between
            inside and outside voxel centres.

    Returns:
        ``(vertices, faces)``: ``(V, 3)`` float64 world coordinates in mm and ``(F, 3)``
        int64 vertex indices; both empty (``(0, 3)``) when no voxel exceeds ``level``.

    Raises:
        ValueError: ``mask`` not 3D, a singular or non-finite affine, or ``level``
            outside ``(0, 1)``.
    """
    volume = np.asarray(mask)
    if volume.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {volume.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite (4, 4) array, got shape {affine.shape}")
    determinant = np.linalg.det(affine[:3, :3])
    if determinant == 0:
        raise ValueError("affine is singular")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    padded = np.pad(volume.astype(np.float32), 1)
    if not padded.max() > level:
        return np.zeros((0, 3), dtype=np.float64), np.zeros((0, 3), dtype=np.int64)
    vertices, faces, _, _ = measure.marching_cubes(padded, level=level)
    vertices = vertices.astype(np.float64) - 1.0
    faces = faces.astype(np.int64)
    if (_signed_volume(vertices, faces) < 0) != (determinant < 0):
        faces = faces[:, ::-1].copy()
    world = vertices @ affine[:3, :3].T + affine[:3, 3]
    return world, faces


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed mesh, positive when its faces are wound outward."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


def _check_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a mesh: finite ``(V, 3)`` vertices, ``(F, 3)`` integer faces indexing them."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.all(np.isfinite(vertices)):
        raise ValueError(f"vertices must be finite with shape (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integers with shape (F, 3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"face indices must lie in [0, {len(vertices)})")
    return vertices, faces.astype(np.int64)


def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh as ASCII PLY: double x/y/z vertices, 0-based int index lists.

    Args:
        path: destination file, e.g. ``case.ply``.
        vertices: ``(V, 3)`` finite coordinates (mm for meshes from :func:`mask_mesh`);
            written with Python's shortest round-trip repr, so reading gives them back exactly.
        faces: ``(F, 3)`` integer vertex indices.
    """
    vertices, faces = _check_mesh(vertices, faces)
    header = (
        "ply\nformat ascii 1.0\ncomment written by ossnet_jax\n"
        f"element vertex {len(vertices)}\n"
        "property double x\nproperty double y\nproperty double z\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    )
    with _atomic_open(path, "w", encoding="ascii", newline="\n") as handle:
        handle.write(header)
        handle.writelines(f"{x!r} {y!r} {z!r}\n" for x, y, z in vertices.tolist())
        handle.writelines(f"3 {i} {j} {k}\n" for i, j, k in faces.tolist())


def write_obj(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh as Wavefront OBJ (``v x y z`` lines, then 1-based ``f i j k``).

    Args:
        path: destination file, e.g. ``case.obj``.
        vertices: ``(V, 3)`` finite coordinates, written with Python's shortest round-trip repr.
        faces: ``(F, 3)`` 0-based integer vertex indices (written 1-based).
    """
    vertices, faces = _check_mesh(vertices, faces)
    with _atomic_open(path, "w", encoding="ascii", newline="\n") as handle:
        handle.write("# written by ossnet_jax\n")
        handle.writelines(f"v {x!r} {y!r} {z!r}\n" for x, y, z in vertices.tolist())
        handle.writelines(f"f {i} {j} {k}\n" for i, j, k in (faces + 1).tolist())


def _slice_centre(
    shape: tuple[int, ...], masks: Sequence[np.ndarray | None], spacing: np.ndarray
) -> tuple[int, int, int]:
    """Voxel the three views cut through: the voxel of the first non-empty mask closest (in mm)
    to that mask's centre of mass, so every view shows the mask; the volume centre if none."""
    for mask in masks:
        if mask is not None and mask.any():
            coords = np.argwhere(mask)
            offsets = (coords - coords.mean(axis=0)) * spacing
            i, j, k = coords[np.argmin((offsets**2).sum(axis=1))]
            return int(i), int(j), int(k)
    return shape[0] // 2, shape[1] // 2, shape[2] // 2


def _draw_mask(ax, mask2d: np.ndarray, extent: tuple, colour: str) -> None:
    """Overlay a (horizontal, vertical) bool slice: a translucent fill and its contour."""
    if not mask2d.any():
        return
    rgba = np.zeros(mask2d.T.shape + (4,))
    rgba[mask2d.T] = (*to_rgb(colour), 0.25)
    ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest")
    if not mask2d.all():
        n_h, n_v = mask2d.shape
        xs = np.linspace(extent[0], extent[1], 2 * n_h + 1)[1::2]
        ys = np.linspace(extent[2], extent[3], 2 * n_v + 1)[1::2]
        ax.contour(xs, ys, mask2d.T.astype(np.float32), levels=[0.5], colors=[colour])


def slices_png(
    path: str | os.PathLike,
    image: np.ndarray,
    pred: np.ndarray | None,
    target: np.ndarray | None,
    spacing: Sequence[float],
    title: str,
) -> None:
    """Axial, coronal and sagittal slices of an image with prediction and label overlays.

    The slices cut through the target voxel closest to the target's centre of mass (the
    prediction's when the target is missing or empty, the volume centre when both are).
    Axis order is taken as given; for RAS-ordered volumes the views are: axial = (x, y) at
    fixed z, coronal = (x, z) at fixed y, sagittal = (y, z) at fixed x, each drawn with the
    first axis to the right and the second up (neurological convention), scaled in mm so
    anisotropic voxels keep their true shape. Grey levels span the 0.5-99.5 percentiles of
    the image; the prediction is yellow and the label green (translucent fill and contour).

    Args:
        path: destination PNG file.
        image: ``(X, Y, Z)`` intensities, e.g. one MRI channel or CT in HU.
        pred: ``(X, Y, Z)`` bool prediction, or None.
        target: ``(X, Y, Z)`` bool label, or None.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        title: figure title, e.g. the case id and its Dice.

    Raises:
        ValueError: wrong dimensions or shapes, or a bad spacing.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D (X, Y, Z), got shape {image.shape}")
    masks = {}
    for name, mask in (("pred", pred), ("target", target)):
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != image.shape:
                raise ValueError(f"{name} shape {mask.shape} does not match image {image.shape}")
        masks[name] = mask
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")

    cx, cy, cz = _slice_centre(image.shape, (masks["target"], masks["pred"]), spacing)
    views = (
        (f"axial z={cz}", np.s_[:, :, cz], (0, 1)),
        (f"coronal y={cy}", np.s_[:, cy, :], (0, 2)),
        (f"sagittal x={cx}", np.s_[cx, :, :], (1, 2)),
    )
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    high = max(high, low + 1e-6)

    fig = Figure(figsize=(13, 5))
    for index, (name, cut, (h_axis, v_axis)) in enumerate(views):
        ax = fig.add_subplot(1, 3, index + 1)
        extent = (
            0.0,
            image.shape[h_axis] * spacing[h_axis],
            0.0,
            image.shape[v_axis] * spacing[v_axis],
        )
        ax.imshow(
            image[cut].T,
            cmap="gray",
            vmin=low,
            vmax=high,
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
        for key, colour in (("target", LABEL_COLOUR), ("pred", PREDICTION_COLOUR)):
            if masks[key] is not None:
                _draw_mask(ax, masks[key][cut], extent, colour)
        ax.set_title(name)
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=colour, label=label)
        for key, colour, label in (
            ("pred", PREDICTION_COLOUR, "prediction"),
            ("target", LABEL_COLOUR, "label"),
        )
        if masks[key] is not None
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    _save_png(path, fig)


def mesh_png(
    path: str | os.PathLike,
    vertices: np.ndarray,
    faces: np.ndarray,
    title: str,
    max_faces: int = MAX_RENDERED_FACES,
) -> None:
    """A shaded 3D rendering of a triangle mesh (e.g. from :func:`mask_mesh`) as PNG.

    Faces must be wound outward (counter-clockwise seen from outside, as
    :func:`mask_mesh` returns them): faces turned away from the viewer are culled, which
    hides the back of the object that matplotlib's painter's algorithm would otherwise
    mix into the front, and the rest are flat-shaded by the angle between their normal
    and the viewing direction. When more than ``max_faces`` faces remain, every k-th of
    them is drawn (k = ceil(remaining / max_faces)): fast, but with visible gaps.

    Args:
        path: destination PNG file.
        vertices: ``(V, 3)`` coordinates in mm.
        faces: ``(F, 3)`` integer vertex indices; an empty mesh gives a labelled empty plot.
        title: figure title.
        max_faces: most faces drawn (after culling).
    """
    vertices, faces = _check_mesh(vertices, faces)
    elevation, azimuth = 25.0, -60.0
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    ax.view_init(elev=elevation, azim=azimuth)
    if len(faces) == 0:
        ax.text2D(0.5, 0.5, "empty mesh", transform=ax.transAxes, ha="center")
    else:
        triangles = vertices[faces]
        normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        el, az = np.radians(elevation), np.radians(azimuth)
        towards_viewer = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        facing = normals @ towards_viewer
        visible = np.flatnonzero(facing > 0)
        visible = visible[:: max(1, math.ceil(len(visible) / max_faces))]
        colours = (0.3 + 0.7 * facing[visible])[:, None] * np.array(to_rgb("orange"))
        ax.add_collection3d(
            Poly3DCollection(
                triangles[visible], facecolors=colours, edgecolors=colours, linewidths=0.2
            )
        )
        low, high = vertices.min(axis=0), vertices.max(axis=0)
        centre, half = (low + high) / 2, np.maximum((high - low) / 2, 1e-3)
        ax.set_xlim(centre[0] - half[0], centre[0] + half[0])
        ax.set_ylim(centre[1] - half[1], centre[1] + half[1])
        ax.set_zlim(centre[2] - half[2], centre[2] + half[2])
        ax.set_box_aspect(tuple(half))
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_zlabel("z (mm)")
    ax.set_title(title)
    _save_png(path, fig)


def _dice_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Finite Dice values per series: "dice", then "<key>.<name>" for every nested
    ``row[key][name]["dice"]`` (e.g. "regions.whole_tumour"), in first-seen order."""
    series: dict[str, list[float]] = {"dice": []}

    def add(name: str, value: Any) -> None:
        values = series.setdefault(name, [])
        if value is not None and math.isfinite(float(value)):
            values.append(float(value))

    for row in rows:
        if "dice" in row:
            add("dice", row["dice"])
        for key, group in row.items():
            if isinstance(group, Mapping):
                for name, entry in group.items():
                    if isinstance(entry, Mapping) and "dice" in entry:
                        add(f"{key}.{name}", entry["dice"])
    return {name: values for name, values in series.items() if values}


def dice_summary_png(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Box plot with the individual cases as jittered points of the Dice over cases.

    Args:
        path: destination PNG file.
        rows: one dict per case with ``"id"`` and ``"dice"``, optionally nested per-region
            or per-class dicts such as ``{"regions": {"whole_tumour": {"dice": ...}}}``,
            each drawn as its own column. Missing, None and NaN values are left out; each
            column's label gives its mean and number of cases.
    """
    series = _dice_series(rows)
    fig = Figure(figsize=(max(4.0, 1.6 * len(series) + 1.5), 5))
    ax = fig.add_subplot()
    if not series:
        ax.text(0.5, 0.5, "no Dice values", transform=ax.transAxes, ha="center")
    else:
        positions = np.arange(1, len(series) + 1)
        values = list(series.values())
        ax.boxplot(values, positions=positions, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0)
        for position, column in zip(positions, values):
            xs = position + jitter.uniform(-0.15, 0.15, size=len(column))
            ax.scatter(xs, column, s=12, alpha=0.7, color="tab:blue", zorder=3)
        labels = [f"{name}\nmean {np.mean(v):.3f}, n={len(v)}" for name, v in series.items()]
        ax.set_xticks(positions, labels)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice over {len(rows)} cases")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_png(path, fig)


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write one CSV row per case, nested dicts flattened to dotted column names.

    Columns are the union of the flattened keys in first-seen order, e.g. ``id, dice,
    regions.whole_tumour.dice``; a value missing from a row, or None, is an empty cell.
    Floats are written with Python's shortest round-trip repr.

    Args:
        path: destination CSV file.
        rows: one dict per case; an empty sequence gives an empty file.
    """
    flat = [_flatten(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    with _atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        if columns:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(flat)
