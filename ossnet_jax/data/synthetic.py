"""Deterministic synthetic BraTS-like multi-modal MRI cases.

Each case is a head phantom (scalp, skull, CSF, grey/white matter, ventricles,
deep nuclei) imaged in four contrasts (:data:`MODALITIES`, BraTS channel order)
with a 1-2 lobe glioma: necrotic core (label 1) inside an enhancing rim
(label 4) inside oedema of irregular extent (label 2). Small white-matter
hyperintensities and enhancing vessels act as non-tumour confounders; a
multiplicative bias field, partial-volume blur and Rician noise complete the
image. Volumes use 1 mm voxels; intensities are arbitrary MRI-like units in
roughly 0..1000 with background exactly 0 outside the head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ossnet_jax.data.nifti import save_nifti

GENERATOR_VERSION = 1
MODALITIES = ("flair", "t1", "t1ce", "t2")
DATASET_DIR = "MICCAI_BraTS2020_TrainingData"
METADATA_FILE = "synthetic.json"
MIN_SIDE = 16

# Relative signal per tissue (rows) and modality (columns, MODALITIES order).
_CONTRAST = np.array(
    [
        [0.50, 0.85, 0.85, 0.50],  # scalp (fat)
        [0.05, 0.08, 0.10, 0.05],  # skull
        [0.10, 0.18, 0.20, 1.00],  # CSF
        [0.55, 0.50, 0.52, 0.62],  # grey matter
        [0.45, 0.72, 0.72, 0.42],  # white matter
        [0.50, 0.20, 0.22, 0.92],  # necrotic core
        [0.72, 0.48, 1.00, 0.68],  # enhancing tumour
        [0.85, 0.42, 0.44, 0.66],  # oedema, FLAIR-dominant
        [0.62, 0.42, 0.44, 0.86],  # oedema, T2-dominant
        [0.78, 0.62, 0.64, 0.66],  # white-matter hyperintensity (confounder)
        [0.40, 0.45, 0.95, 0.30],  # enhancing vessel (confounder)
    ],
    dtype=np.float32,
)
_SCALE = np.array([500.0, 650.0, 700.0, 850.0], dtype=np.float32)


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """Smooth step from 0 (x << 0) to 1 (x >> 0) over about ``width``."""
    return (0.5 + 0.5 * np.tanh(x / (2.0 * width))).astype(np.float32)


def _blur(mask: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a boolean mask: Gaussian blur, sigma 0.6 voxel, float32."""
    return ndimage.gaussian_filter(mask.astype(np.float32), 0.6)


def _upsample(fields: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of ``(n, *coarse)`` to ``(n, *shape)`` (corners aligned)."""
    out = fields
    for axis, size in enumerate(shape, start=1):
        pos = np.linspace(0.0, out.shape[axis] - 1, size, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), out.shape[axis] - 2)
        frac = (pos - lo).reshape([-1 if i == axis else 1 for i in range(out.ndim)])
        out = np.take(out, lo, axis=axis) * (1.0 - frac) + np.take(out, lo + 1, axis=axis) * frac
    return out


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], n: int, cell: float
) -> np.ndarray:
    """``n`` unit-variance smooth random fields, shape ``(n, *shape)``, feature size ``cell`` voxels."""
    coarse = tuple(max(3, int(round(s / cell))) for s in shape)
    fields = ndimage.gaussian_filter(rng.standard_normal((n, *coarse)), (0, 1, 1, 1), mode="wrap")
    fields /= fields.std(axis=(1, 2, 3), keepdims=True)
    return _upsample(fields.astype(np.float32), shape)


def _ellipsoid(
    p: list[np.ndarray], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) on broadcastable coordinates ``p``."""
    return np.sqrt(sum(((pi - c) / r) ** 2 for pi, c, r in zip(p, centre, radii)))


def _spots(
    rng: np.random.Generator, where: np.ndarray, count: int, radius: tuple[float, float]
) -> np.ndarray:
    """``count`` soft spheres, radius uniform in ``radius`` (voxels), centred in boolean ``where``.

    Returns a float32 array shaped like ``where`` with values in [0, 1].
    """
    shape = where.shape
    out = np.zeros(shape, np.float32)
    candidates = np.flatnonzero(where)
    if candidates.size == 0:
        return out
    for flat in rng.choice(candidates, size=count):
        centre = np.unravel_index(flat, shape)
        rad = rng.uniform(*radius)
        box = tuple(
            slice(max(0, c - int(rad) - 2), min(s, c + int(rad) + 3)) for c, s in zip(centre, shape)
        )
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[box], centre)))
        out[box] = np.maximum(out[box], _soft(rad - dist, 0.4))
    return out


def _axes(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Broadcastable coordinates in [-1, 1] along each axis: shapes ``(X,1,1)``, ``(1,Y,1)``, ``(1,1,Z)``."""
    return [
        np.linspace(-1.0, 1.0, s, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
        for k, s in enumerate(shape)
    ]


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], noise: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normal head anatomy.

    Args:
        noise: ``(3, X, Y, Z)`` smooth fields: head outline, gyri (fine), ventricle outline.

    Returns:
        ``(fractions, depth)``: float32 ``(5, X, Y, Z)`` tissue fractions (scalp,
        skull, CSF, GM, WM) summing to the soft head mask, and ``(X, Y, Z)``
        approximate depth below the brain surface in voxels (<= 0 outside).
    """
    radii = np.array([0.84, 0.93, 0.9]) * rng.uniform(0.96, 1.04, 3)
    p = [a / rad for a, rad in zip(_axes(shape), radii)]
    w = 1.2 / min(shape)
    r = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2) * (1.0 + 0.02 * noise[0])
    head, inner_skull, inner_csf, brain = (_soft(edge - r, w) for edge in (1.0, 0.93, 0.87, 0.84))
    depth = (0.84 - r) / 0.84
    gyri = noise[1]

    vent_size = rng.uniform(0.8, 1.4)
    lateral = [
        _ellipsoid(p, (sx * 0.12 * vent_size, 0.0, 0.1), (0.06 * vent_size, 0.32, 0.12 * vent_size))
        for sx in (-1, 1)
    ]
    third = _ellipsoid(p, (0.0, -0.02, -0.12), (0.02, 0.12, 0.1))
    vent = np.minimum.reduce([*lateral, third]) * (1.0 + 0.12 * noise[2])
    sulci = _soft(-gyri - 1.0, 0.12) * _soft(0.2 - depth, w)
    fissure = _soft(0.015 - np.abs(p[0]), w) * _soft(0.45 - depth, w) * _soft(p[2] + 0.2, 0.05)
    csf_in = np.maximum.reduce([_soft(1.0 - vent, 0.08), sulci, fissure])
    nuclei = np.minimum(
        *(_ellipsoid(p, (sx * 0.24, -0.02, -0.02), (0.1, 0.15, 0.13)) for sx in (-1, 1))
    )
    nuclei = _soft(1.0 - nuclei, 0.1)
    wm = _soft(depth - 0.15 + 0.07 * gyri, 0.02) * (1.0 - nuclei)
    parenchyma = brain * (1.0 - csf_in)
    csf = inner_csf - brain + brain * csf_in
    fractions = np.stack(
        [head - inner_skull, inner_skull - inner_csf, csf, parenchyma * (1.0 - wm), parenchyma * wm]
    )
    depth_vox = (0.84 - r) * min((s - 1) / 2.0 * rad for s, rad in zip(shape, radii))
    return np.clip(fractions, 0.0, 1.0), depth_vox


def _tumour(
    rng: np.random.Generator, depth: np.ndarray, csf: np.ndarray, wm: np.ndarray, noise: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tumour labels and oedema signal strength.

    Args:
        depth: ``(X, Y, Z)`` approximate distance (voxels) inside the brain surface, <= 0 outside.
        csf, wm: ``(X, Y, Z)`` CSF and white-matter fractions.
        noise: ``(4, X, Y, Z)`` unit-variance smooth fields deforming core, necrosis and oedema.

    Returns:
        ``(labels, strength)``: uint8 ``(X, Y, Z)`` in {0, 1, 2, 4}; float32 ``(X, Y, Z)`` in [0.5, 1].
    """
    shape = depth.shape
    grid = [g.astype(np.float32) for g in np.ogrid[tuple(slice(0, s) for s in shape)]]
    n_vox = float(np.prod(shape))
    wt_fraction = np.exp(rng.uniform(np.log(0.006), np.log(0.035)))
    swell = rng.uniform(1.15, 1.55)
    n_lobes = int(rng.integers(1, 3))
    weights = rng.dirichlet(np.full(n_lobes, 3.0))
    core_volume = wt_fraction * n_vox / swell**3
    radii = [max(2.6, (3.0 * w * core_volume / (4.0 * np.pi)) ** (1.0 / 3.0)) for w in weights]
    wt_radius = (3.0 * wt_fraction * n_vox / (4.0 * np.pi)) ** (1.0 / 3.0)
    allowed = (depth >= min(0.8 * wt_radius, 0.6 * depth.max())) & (csf < 0.3)
    centre = np.array(
        np.unravel_index(rng.choice(np.flatnonzero(allowed)), shape), dtype=np.float64
    )
    core = np.full(shape, np.inf, np.float32)
    necrotic = np.zeros(shape, bool)
    for lobe, radius in enumerate(radii):
        stretch = np.exp(rng.normal(0.0, 0.18, 3))
        axes_len = radius * stretch / np.prod(stretch) ** (1.0 / 3.0)
        rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        if lobe:
            direction = rng.standard_normal(3)
            offset = (radius + radii[0]) * rng.uniform(0.5, 0.9)
            centre = centre + direction / np.linalg.norm(direction) * offset
        delta = [g - c for g, c in zip(grid, centre)]
        rotated = [sum(rot[i, j] * delta[j] for j in range(3)) / axes_len[i] for i in range(3)]
        dist = np.sqrt(sum(q**2 for q in rotated)) * (1.0 + 0.2 * noise[0])
        core = np.minimum(core, dist)
        if lobe == 0 or rng.random() < 0.6:
            inner = min(0.8, max(1.0 - rng.uniform(1.2, 2.2) / radius, 1.3 / radius))
            necrotic |= dist < np.minimum(inner * (1.0 + 0.12 * noise[1]), 1.0 - 1.0 / radius)
    inside = depth > 0
    core_mask = (core < 1.0) & inside
    oedema_dist = core / swell * (1.0 + 0.3 * noise[2]) - 0.15 * (wm - 0.5)
    oedema_mask = (oedema_dist < 1.0) & inside & (csf < 0.5) & ~core_mask
    labels = np.zeros(shape, np.uint8)
    labels[oedema_mask] = 2
    labels[core_mask] = 4
    labels[ndimage.binary_erosion(core_mask) & necrotic] = 1
    strength = np.clip(0.5 + 1.1 * (1.0 - oedema_dist) + 0.1 * noise[3], 0.5, 1.0)
    return labels, strength.astype(np.float32)


def _render(
    rng: np.random.Generator,
    tissues: np.ndarray,
    labels: np.ndarray,
    strength: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """MR images from tissue fractions and tumour labels.

    Args:
        tissues: ``(5, X, Y, Z)`` normal-tissue fractions from :func:`_anatomy`.
        labels, strength: tumour labels and oedema strength from :func:`_tumour`.
        noise: ``(2, X, Y, Z)`` smooth fields: oedema FLAIR/T2 mix, fine texture.

    Returns:
        float32 ``(X, Y, Z, 4)`` non-negative intensities, 0 outside the head.
    """
    shape = labels.shape
    oedema = _blur(labels == 2) * strength
    mix = _soft(noise[0], 0.5)
    wmh = _spots(rng, (tissues[4] > 0.8) & (labels == 0), int(rng.integers(2, 7)), (1.0, 2.3))
    vessels = _spots(
        rng, (tissues[2] > 0.5) | (tissues[3] > 0.7), int(rng.integers(3, 9)), (0.7, 1.4)
    )
    extra = [_blur(labels == 1), _blur(labels == 4), oedema * mix, oedema * (1.0 - mix)]
    extra = np.stack([*extra, 0.9 * wmh * tissues[4], vessels * (labels == 0)])
    head = tissues.sum(0) + extra.sum(0) > 0.5
    tissues = tissues * np.clip(1.0 - extra.sum(0), 0.0, 1.0)
    contrast = _CONTRAST * rng.uniform(0.9, 1.1, _CONTRAST.shape).astype(np.float32)
    signal = np.tensordot(contrast.T, np.concatenate([tissues, extra]), axes=1) * (
        1.0 + 0.04 * noise[1]
    )
    signal = ndimage.gaussian_filter(signal, (0, 0.6, 0.6, 0.6))

    u = _axes(shape)
    terms = u + [a * b for i, a in enumerate(u) for b in u[i:]]
    sigma = rng.uniform(0.02, 0.04)
    image = np.empty((*shape, len(MODALITIES)), np.float32)
    for m in range(len(MODALITIES)):
        bias = np.exp(sum(c * t for c, t in zip(rng.normal(0.0, 0.08, len(terms)), terms)))
        real = signal[m] * bias + sigma * rng.standard_normal(shape, np.float32)
        noisy = np.hypot(real, sigma * rng.standard_normal(shape, np.float32))
        image[..., m] = np.where(head, noisy * _SCALE[m] * rng.uniform(0.85, 1.15), 0.0)
    return image


def generate_case(
    seed: int, index: int, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic case; reproducible from ``(seed, index)`` alone.

    Args:
        seed: dataset seed.
        index: case index within the dataset.
        shape: ``(X, Y, Z)`` volume shape in 1 mm voxels, each side >= 16.

    Returns:
        ``(image, label)``: ``image`` ``(X, Y, Z, 4)`` float32 in :data:`MODALITIES`
        order, non-negative, roughly 0..1000, exactly 0 outside the head;
        ``label`` ``(X, Y, Z)`` uint8 in {0, 1, 2, 4} with 1, 2 and 4 all present.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIDE:
        raise ValueError(f"shape must be three sides >= {MIN_SIDE}, got {shape}")
    rng = np.random.default_rng([seed, index])
    medium = _smooth_noise(rng, shape, 7, min(shape) / 8.0)
    fine = _smooth_noise(rng, shape, 2, 2.2)
    tissues, depth = _anatomy(rng, shape, np.stack([medium[0], fine[0], medium[1]]))
    for _ in range(20):
        labels, strength = _tumour(rng, depth, tissues[2], tissues[4], medium[2:6])
        counts = np.bincount(labels.ravel(), minlength=5)
        if min(counts[1], counts[2], counts[4]) >= max(1.0, 0.01 * counts[1:].sum()):
            break
    else:
        raise ValueError(f"shape {shape} too small to hold a tumour with all three labels")
    return _render(rng, tissues, labels, strength, np.stack([medium[6], fine[1]])), labels


def settings_folder(num_cases: int, seed: int, shape: Sequence[int]) -> str:
    """The folder name of a dataset's generator settings, e.g. 'cases40-seed0-88x88x58'."""
    return f"cases{int(num_cases)}-seed{int(seed)}-{'x'.join(str(int(s)) for s in shape)}"


def write_synthetic_brats(
    root: str | os.PathLike[str], num_cases: int, seed: int, shape: tuple[int, int, int]
) -> Path:
    """Write a synthetic dataset in the BraTS 2020 training layout, atomically and idempotently.

    Files: ``root/MICCAI_BraTS2020_TrainingData/<id>/<id>_<mod>.nii.gz`` with
    ``<id> = BraTS20_Training_{i:03d}`` for ``i = 1..num_cases`` and ``<mod>``
    in flair, t1, t1ce, t2 (int16, the :func:`generate_case` image rounded) and
    seg (uint8), with the BraTS affine ``diag(-1, -1, 1, 1)`` translated by
    ``(0, Y - 1, 0)`` (1 mm voxels), plus ``synthetic.json``
    recording the arguments and :data:`GENERATOR_VERSION`. The folder is
    built as a hidden sibling and renamed into place, so it is either complete
    or absent. An existing folder with matching ``synthetic.json`` is returned
    untouched.

    Returns:
        Path of the ``MICCAI_BraTS2020_TrainingData`` folder.

    Raises:
        ValueError: ``num_cases`` < 1, a bad ``shape``, or the folder exists
            but was written with other arguments or is not a synthetic dataset.
    """
    root = Path(root)
    target = root / DATASET_DIR
    num_cases = int(num_cases)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    shape = tuple(int(s) for s in shape)
    meta = {
        "num_cases": num_cases,
        "seed": int(seed),
        "shape": list(shape),
        "generator_version": GENERATOR_VERSION,
    }
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1

    def fill(tmp: Path) -> None:
        for i in range(1, num_cases + 1):
            case_id = f"BraTS20_Training_{i:03d}"
            image, label = generate_case(seed, i, shape)
            stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
            for m, mod in enumerate(MODALITIES):
                save_nifti(tmp / case_id / f"{case_id}_{mod}.nii.gz", stored[..., m], affine)
            save_nifti(tmp / case_id / f"{case_id}_seg.nii.gz", label, affine)

    return write_atomically(target, meta, fill)


def write_atomically(target: Path, meta: dict, fill: Callable[[Path], None]) -> Path:
    """``target`` built by ``fill(tmp)`` in a hidden sibling ``tmp``, with ``METADATA_FILE`` holding
    ``meta``, then renamed into place: it is either complete or absent, and of two processes writing
    the same dataset at once the first rename wins and the other returns it. An existing ``target``
    is checked against ``meta`` (:func:`_check_existing`) and returned untouched."""
    if target.exists():
        return _check_existing(target, meta)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        fill(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, target)
    except OSError:
        if target.exists():
            return _check_existing(target, meta)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_existing(target: Path, meta: dict) -> Path:
    """Return ``target`` if its ``synthetic.json`` equals ``meta``; raise ValueError otherwise."""
    try:
        found = json.loads((target / METADATA_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{target} exists but is not a synthetic dataset (no valid {METADATA_FILE}: {err})"
        ) from err
    diff = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{target} already holds a different synthetic dataset ({detail})")
    return target


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m ossnet_jax.data.synthetic --root DIR --cases N --seed S``."""
    parser = argparse.ArgumentParser(description="Write a synthetic BraTS 2020-style dataset.")
    parser.add_argument(
        "--root", required=True, help="folder to hold MICCAI_BraTS2020_TrainingData"
    )
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
        path = write_synthetic_brats(args.root, args.cases, args.seed, tuple(args.shape))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    elapsed = time.perf_counter() - start
    print(
        f"synthetic BraTS dataset ({args.cases} cases, seed {args.seed}) at {path} [{elapsed:.1f} s]"
    )


if __name__ == "__main__":
    main()
