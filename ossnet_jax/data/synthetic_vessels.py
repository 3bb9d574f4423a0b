"""Deterministic synthetic angiography-like cases whose target is a thin, branching vessel tree.

Each case is one channel (:data:`MODALITIES`, a time-of-flight MRA-like contrast) of an ellipsoidal
head of textured tissue holding 2-3 vessel trees (label 1). A tree grows from a root of radius
2.2-2.7 voxels (at most a quarter of the head's smallest semi-axis) by a smooth random walk that
turns along the head's surface when it comes near, bifurcates into children of Murray's-law radii
(r^3 = r1^3 + r2^3) and tapers along each branch, down to terminal branches of radius 0.5-0.7
voxel: most of the target is 1-3 voxels thick. A voxel's vessel signal is the fraction of it the
vessel occupies, computed analytically from its distance to the centre line (partial volume: thin
vessels are dimmer than thick ones), seen through a Gaussian point-spread function. Unlabelled
confounders, bright spots of at least vessel intensity and a bright fat rim at the head's edge,
defeat a threshold; a smooth multiplicative bias field and Rician noise complete the image.

Volumes use 1 mm voxels in RAS order; intensities are arbitrary MRA-like units, mostly below 1500,
with background exactly 0 outside the head. Datasets are written in the Medical Segmentation
Decathlon layout (data/layouts.py, format 'msd').
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ossnet_jax.data import synthetic
from ossnet_jax.data.nifti import save_nifti
from ossnet_jax.data.synthetic import _smooth_noise, _soft, _spots

GENERATOR_VERSION = 1
MODALITIES = ("MRA",)
LABEL_NAMES = ("background", "vessel")
TASK_DIR = "Task80_SyntheticVessels"
CASE_PREFIX = "vessels"
MIN_SIDE = 16
ROOT_RADIUS = (2.2, 2.7)  # voxels
END_RADIUS = (0.5, 0.7)  # voxels
STEP = 0.8  # centre-line sample spacing, voxels
_HEAD = 0.88  # head semi-axes as a fraction of the half sides
_VOXEL_DISC = 1.0 / np.sqrt(np.pi)  # radius of the unit-area disc standing in for a voxel's section


def _unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1."""
    return v / np.sqrt(v @ v)


def _turn(direction: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """``direction`` rotated by ``angle`` (radians) about the unit ``axis`` perpendicular to it."""
    return direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)


def _branch(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radii: tuple[float, float],
    length: float,
    centre: np.ndarray,
    semi: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """One branch's centre line: a smooth random walk of ``STEP``-voxel steps in the head ellipsoid.

    The direction drifts by a smoothed (AR(1)) random bend, stronger for thinner vessels, and
    slightly outwards; within 6 voxels of the head's edge it turns along the surface instead, and
    the branch stops early where its wall would come within 2 voxels of the edge. The margin to
    the edge is measured by ``(1 - |(p - centre) / semi|) min(semi)``, a lower bound of the
    distance to the surface.

    Returns:
        ``(points, radius, complete)``: ``(n, 3)`` float64 voxel coordinates, ``(n,)`` radii
        tapering linearly from ``radii[0]`` to ``radii[1]``, and whether the full length was grown.
    """
    from scipy.signal import lfilter  # here: importing scipy.signal takes about a second

    n = max(2, int(length / STEP))
    bends = lfilter([0.05 / (0.5 + radii[0])], [1.0, -0.9], rng.standard_normal((n, 3)), axis=0)
    radius = np.linspace(radii[0], radii[1], n + 1)
    smallest = float(semi.min())
    points, p, d = [start], start, direction
    for k in range(n):
        x = (p - centre) / semi
        margin = (1.0 - np.sqrt(x @ x)) * smallest
        outward = _unit(x / semi + 1e-9)
        if margin < radius[k] + 6.0:
            d = d - (max(d @ outward, 0.0) + 0.05) * outward
        else:
            d = d + 0.08 * outward
        d = _unit(d + bends[k])
        p = p + STEP * d
        x = (p - centre) / semi
        if (1.0 - np.sqrt(x @ x)) * smallest < radius[k + 1] + 2.0:
            return np.array(points), radius[: len(points)], False
        points.append(p)
    return np.array(points), radius, True


def _vessel_tree(
    rng: np.random.Generator, centre: np.ndarray, semi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre-line segments of 2-3 vessel trees inside the head ellipsoid.

    Branches bifurcate until their tip radius falls below 1.2 end radii; each generation is at most
    0.95 x 0.92 times as thick as the one before, so the trees are finite.

    Args:
        centre: ``(3,)`` head centre, voxels.
        semi: ``(3,)`` head semi-axes, voxels.

    Returns:
        ``(starts, ends, radii)``: ``(S, 3)``, ``(S, 3)`` voxel coordinates of each segment's
        ends and ``(S, 2)`` the vessel radius (voxels) there.
    """
    end_radius = rng.uniform(*END_RADIUS)
    pending = []
    for _ in range(int(rng.integers(2, 4))):
        radius = min(rng.uniform(*ROOT_RADIUS), 0.25 * semi.min())
        offset = np.array(
            [rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35), rng.uniform(-0.6, -0.3)]
        )
        reach = 1.0 - (radius + 3.0) / semi.min()  # keeps the root's wall 3 voxels inside the head
        offset *= min(1.0, reach / np.sqrt(offset @ offset))
        heading = _unit(np.array([0.0, 0.0, 0.6]) + rng.standard_normal(3))
        pending.append((centre + offset * semi, heading, radius))
    starts, ends, radii = [], [], []
    while pending:
        start, heading, radius = pending.pop()
        tip_radius = max(end_radius, radius * rng.uniform(0.85, 0.95))
        length = rng.uniform(0.7, 1.1) * semi.mean() * (0.45 + 0.35 * radius)
        points, along, complete = _branch(
            rng, start, heading, (radius, tip_radius), length, centre, semi
        )
        starts.append(points[:-1])
        ends.append(points[1:])
        radii.append(np.stack([along[:-1], along[1:]], axis=1))
        if not complete or tip_radius < 1.2 * end_radius:
            continue
        share = rng.uniform(0.75, 0.92)  # Murray's law: tip^3 = first^3 + second^3
        children = (tip_radius * share, tip_radius * (1.0 - share**3) ** (1.0 / 3.0))
        heading = _unit(points[-1] - points[-2])
        axis = _unit(np.cross(heading, rng.standard_normal(3)))
        angles = (rng.uniform(0.25, 0.6), -rng.uniform(0.6, 1.2))  # radians; the thinner turns more
        for child, angle in zip(children, angles):
            pending.append((points[-1], _turn(heading, axis, angle), max(end_radius, child)))
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(radii)


def _occupied_fraction(radius: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Fraction of a voxel a vessel of ``radius`` occupies at ``distance`` from its centre line.

    Exact for a cylinder crossing a voxel whose section is the unit-area disc (radius 1/sqrt(pi)):
    the area of the two discs' lens, in [0, min(1, pi radius^2)]. Arrays broadcast; voxels.
    """
    rho = _VOXEL_DISC
    d = np.maximum(distance, 1e-6)
    r = np.maximum(radius, 1e-6)
    a = r * r * np.arccos(np.clip((d * d + r * r - rho * rho) / (2.0 * d * r), -1.0, 1.0))
    b = rho * rho * np.arccos(np.clip((d * d + rho * rho - r * r) / (2.0 * d * rho), -1.0, 1.0))
    k = (r + rho - d) * (d + r - rho) * (d - r + rho) * (d + r + rho)
    return a + b - 0.5 * np.sqrt(np.maximum(k, 0.0))


def _rasterise(
    shape: tuple[int, int, int], starts: np.ndarray, ends: np.ndarray, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Occupied fractions and labels of centre-line segments, each only within its bounding box.

    A voxel is labelled if its centre lies inside a vessel or the centre line passes through it, so
    the label of a vessel thinner than a voxel stays a connected line.

    Args:
        starts, ends: ``(S, 3)`` segment ends, voxel coordinates.
        radii: ``(S, 2)`` vessel radius (voxels) at the segment ends, linear in between.

    Returns:
        ``(fraction, label)``: float32 ``(X, Y, Z)`` in [0, 1] (largest over the segments) and
        bool ``(X, Y, Z)``.
    """
    fraction = np.zeros(int(np.prod(shape)), np.float32)
    label = np.zeros(fraction.shape, bool)
    halves = np.ceil(0.5 * STEP + radii.max(axis=1) + _VOXEL_DISC).astype(int)
    for half in np.unique(halves):
        pick = halves == half
        a, b, r = starts[pick][:, None, :], ends[pick][:, None, :], radii[pick]
        span = np.arange(-half, half + 1)
        offsets = np.stack(np.meshgrid(span, span, span, indexing="ij"), -1).reshape(-1, 3)
        voxels = np.rint(0.5 * (a + b)).astype(np.int64) + offsets  # (S, K, 3)
        t = np.clip(((voxels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0.0, 1.0)
        distance = np.linalg.norm(voxels - (a + t[..., None] * (b - a)), axis=-1)
        radius = r[:, :1] + t * (r[:, 1:] - r[:, :1])
        near = (distance < radius + _VOXEL_DISC) & np.all((voxels >= 0) & (voxels < shape), -1)
        flat = np.ravel_multi_index(tuple(voxels[near].T), shape)
        np.maximum.at(fraction, flat, _occupied_fraction(radius[near], distance[near]))
        label[flat[distance[near] <= radius[near]]] = True
    label = label.reshape(shape)
    along = np.linspace(0.0, 1.0, int(np.ceil(STEP / 0.25)) + 1)[:, None, None]
    line = np.rint(starts + along * (ends - starts)).astype(np.int64).reshape(-1, 3)
    label[tuple(line[np.all((line >= 0) & (line < shape), axis=-1)].T)] = True
    return fraction.reshape(shape), label


def _render(
    rng: np.random.Generator,
    margin: np.ndarray,
    fraction: np.ndarray,
    label: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """The MRA-like image of a head and its vessels.

    Args:
        margin: ``(X, Y, Z)`` approximate depth (voxels) below the head's surface, < 0 outside.
        fraction: ``(X, Y, Z)`` occupied vessel fraction from :func:`_rasterise`.
        label: ``(X, Y, Z)`` bool vessel label (kept clear of the confounding spots).
        noise: ``(5, X, Y, Z)`` unit-variance smooth fields: tissue texture (medium, fine), dark
            pockets, vessel brightness, bias field.

    Returns:
        float32 ``(X, Y, Z)`` non-negative intensities, exactly 0 outside the head.
    """
    tissue = 0.3 * (1.0 + 0.1 * noise[0]) * (1.0 + 0.05 * noise[1])
    tissue *= 1.0 - 0.5 * _soft(noise[2] - 1.2, 0.15)  # darker CSF-like pockets
    vessel = 1.0 + 0.05 * noise[3]
    clear = (margin > 4.0) & ~ndimage.binary_dilation(label, iterations=3)
    spots = _spots(rng, clear, int(rng.integers(4, 9)), (1.5, 2.5)) * (1.0 - fraction)
    rim = _soft(rng.uniform(1.5, 2.5) - margin, 0.5) * (1.0 - fraction - spots)
    levels = (rng.uniform(0.5, 0.7), vessel * rng.uniform(1.1, 1.3))  # fat rim, spots
    signal = (
        tissue * (1.0 - fraction - spots - rim)
        + levels[0] * rim
        + levels[1] * spots
        + vessel * fraction
    ) * _soft(margin, 0.4)
    signal = ndimage.gaussian_filter(signal, 0.5)  # point-spread function
    bias = np.exp(rng.uniform(0.1, 0.2) * noise[4])
    sigma = rng.uniform(0.02, 0.035)
    real = signal * bias + sigma * rng.standard_normal(margin.shape, np.float32)
    noisy = np.hypot(real, sigma * rng.standard_normal(margin.shape, np.float32))
    return np.where(margin > 0.0, noisy * rng.uniform(700.0, 900.0), 0.0).astype(np.float32)


def generate_case(
    seed: int, index: int, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic vessel case; reproducible from ``(seed, index)`` alone.

    Args:
        seed: dataset seed.
        index: case index within the dataset.
        shape: ``(X, Y, Z)`` volume shape in 1 mm voxels, each side >= 16.

    Returns:
        ``(image, label)``: ``image`` ``(X, Y, Z)`` float32, non-negative, roughly 0..1200,
        exactly 0 outside the head; ``label`` ``(X, Y, Z)`` uint8 in {0, 1} (1: vessel),
        non-empty and inside the head.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIDE:
        raise ValueError(f"shape must be three sides >= {MIN_SIDE}, got {shape}")
    rng = np.random.default_rng([seed, index])
    centre = (np.array(shape) - 1.0) / 2.0
    semi = _HEAD * centre * rng.uniform(0.95, 1.02, 3)
    starts, ends, radii = _vessel_tree(rng, centre, semi)
    fraction, label = _rasterise(shape, starts, ends, radii)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    q = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi)))
    margin = ((1.0 - q) * semi.min()).astype(np.float32)
    noise = np.concatenate(
        [
            _smooth_noise(rng, shape, 1, min(shape) / 6.0),
            _smooth_noise(rng, shape, 1, 2.0),
            _smooth_noise(rng, shape, 2, min(shape) / 6.0),
            _smooth_noise(rng, shape, 1, min(shape) / 3.0),
        ]
    )
    image = _render(rng, margin, fraction, label, noise)
    return image, label.astype(np.uint8)


def settings_folder(num_cases: int, seed: int, shape: Sequence[int]) -> str:
    """The folder name of a dataset's generator settings, e.g. 'vessels-cases40-seed0-88x88x58'."""
    return f"{CASE_PREFIX}-{synthetic.settings_folder(num_cases, seed, shape)}"


def _dataset_json(num_cases: int) -> dict:
    """The MSD ``dataset.json`` of ``num_cases`` training cases."""
    ids = [f"{CASE_PREFIX}_{i:03d}" for i in range(1, num_cases + 1)]
    return {
        "name": "SyntheticVessels",
        "description": "Synthetic angiography-like volumes with thin branching vessels "
        "(ossnet_jax.data.synthetic_vessels)",
        "tensorImageSize": "3D",
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
        "numTraining": num_cases,
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids
        ],
        "test": [],
    }


def write_synthetic_vessels(
    root: str | os.PathLike[str], num_cases: int, seed: int, shape: tuple[int, int, int]
) -> Path:
    """Write a synthetic vessel dataset as an MSD task, atomically and idempotently.

    Files: ``root/Task80_SyntheticVessels/`` holding ``dataset.json`` (modality MRA, labels
    background and vessel), ``imagesTr/vessels_{i:03d}.nii.gz`` (int16, the :func:`generate_case`
    image rounded) and ``labelsTr/vessels_{i:03d}.nii.gz`` (uint8) for ``i = 1..num_cases``, with
    an identity affine (RAS, 1 mm voxels), plus ``synthetic.json`` recording the arguments and
    :data:`GENERATOR_VERSION`. The folder is built as a hidden sibling and renamed into place, so it
    is either complete or absent. An existing folder with matching ``synthetic.json`` is returned
    untouched.

    Returns:
        Path of the ``Task80_SyntheticVessels`` folder.

    Raises:
        ValueError: ``num_cases`` < 1, a bad ``shape``, or the folder exists but was written with
            other arguments or is not a synthetic dataset.
    """
    root = Path(root)
    target = root / TASK_DIR
    num_cases = int(num_cases)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    shape = tuple(int(s) for s in shape)
    meta = {
        "generator": "vessels",
        "num_cases": num_cases,
        "seed": int(seed),
        "shape": list(shape),
        "generator_version": GENERATOR_VERSION,
    }

    def fill(tmp: Path) -> None:
        for i in range(1, num_cases + 1):
            image, label = generate_case(seed, i, shape)
            stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
            name = f"{CASE_PREFIX}_{i:03d}.nii.gz"
            save_nifti(tmp / "imagesTr" / name, stored, np.eye(4))
            save_nifti(tmp / "labelsTr" / name, label, np.eye(4))
        (tmp / "dataset.json").write_text(json.dumps(_dataset_json(num_cases), indent=2) + "\n")

    return synthetic.write_atomically(target, meta, fill)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m ossnet_jax.data.synthetic_vessels --root DIR --cases N``."""
    parser = argparse.ArgumentParser(description="Write a synthetic vessel dataset (MSD layout).")
    parser.add_argument("--root", required=True, help=f"folder to hold {TASK_DIR}")
    parser.add_argument("--cases", type=int, required=True, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(88, 88, 58),
        metavar=("X", "Y", "Z"),
        help="voxels per axis",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_synthetic_vessels(args.root, args.cases, args.seed, tuple(args.shape))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    elapsed = time.perf_counter() - start
    print(
        f"synthetic vessel dataset ({args.cases} cases, seed {args.seed}) at {path} "
        f"[{elapsed:.1f} s]"
    )


if __name__ == "__main__":
    main()
