"""Cases on disk -> preprocessed arrays on the padded grid, cached once, split deterministically.

The cache holds, per case, `image.npy` (X, Y, Z, C) float32 z-scored, `target.npy` (X, Y, Z) uint8,
`band.npy` (X, Y, Z) bool and `meta.json` (affine, original shape, offsets). It is keyed by the
preprocessing settings and each source file's size and modification time, written to a temporary
folder and renamed into place, and memory-mapped on load, so the second epoch (and the next run) reads
no NIfTI and datasets larger than memory still work.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import ml_collections
import numpy as np
from tqdm import tqdm

from ossnet_jax.data import layouts, nifti, preprocess, synthetic

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PreparedCase:
    """One case on the padded grid.

    Attributes:
      id: case identifier (folder name for BraTS).
      image: (X, Y, Z, C) float32, z-scored per channel, zero outside the original volume.
      target: (X, Y, Z) uint8 0/1, or None when the case has no label.
      band: (X, Y, Z) bool border band of the target, or None.
      affine: (4, 4) voxel-to-world (mm) affine of the original files.
      shape: (x, y, z) shape of the original volume.
      offsets: where the original volume starts inside the grid.
    """

    id: str
    image: np.ndarray
    target: np.ndarray | None
    band: np.ndarray | None
    affine: np.ndarray
    shape: tuple[int, int, int]
    offsets: tuple[int, int, int]


def dataset_root(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The folder of cases; writes the synthetic dataset there on first use."""
    root = pathlib.Path(config.data.root)
    if config.data.format == "synthetic":
        return synthetic.write_synthetic_brats(
            root, config.data.synthetic_cases, config.data.seed, tuple(config.data.synthetic_shape)
        )
    if config.data.format == "brats":
        return root
    raise ValueError(
        f"data.format {config.data.format!r} is not supported yet; use 'synthetic' or 'brats'"
    )


def find_cases(config: ml_collections.ConfigDict) -> list[layouts.Case]:
    """All cases of the configured dataset, sorted by id."""
    return layouts.find_brats_cases(dataset_root(config))


def split_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: a seeded permutation, the first round(n f) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def _cache_key(case: layouts.Case, config: ml_collections.ConfigDict) -> str:
    files = [p for p in case.image_paths + ((case.label_path,) if case.label_path else ())]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    settings = {
        "version": CACHE_VERSION,
        "grid": list(config.data.grid_shape),
        "label_mode": config.data.label_mode,
        "band": config.data.band_size,
        "files": stats,
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_case(case: layouts.Case, config: ml_collections.ConfigDict) -> dict:
    """Reads and preprocesses one case from NIfTI; errors name the file."""
    channels, affine = [], None
    for path in case.image_paths:
        data, aff = nifti.load_nifti(path)
        if data.ndim != 3:
            raise nifti.DataError(f"{path}: expected a 3D image, got shape {data.shape}")
        if channels and data.shape != channels[0].shape:
            raise nifti.DataError(
                f"{path}: shape {data.shape} differs from {case.image_paths[0]} {channels[0].shape}"
            )
        channels.append(data)
        affine = aff if affine is None else affine
    image = np.stack(channels, axis=-1)
    if image.shape[-1] != config.data.num_channels:
        raise nifti.DataError(
            f"case {case.id}: {image.shape[-1]} channels, config expects "
            f"data.num_channels = {config.data.num_channels}"
        )
    grid = tuple(config.data.grid_shape)
    try:
        offsets = preprocess.centre_offsets(image.shape[:3], grid)
    except ValueError as err:
        raise nifti.DataError(f"{case.image_paths[0]}: {err}") from err
    out = {
        "image": preprocess.pad_to_grid(preprocess.zscore(image), grid, offsets),
        "meta": {
            "affine": np.asarray(affine).tolist(),
            "shape": list(image.shape[:3]),
            "offsets": list(offsets),
            "id": case.id,
        },
    }
    if case.label_path is not None:
        label, _ = nifti.load_nifti(case.label_path)
        if label.shape != image.shape[:3]:
            raise nifti.DataError(
                f"{case.label_path}: label shape {label.shape} differs from image shape "
                f"{image.shape[:3]}"
            )
        target = preprocess.pad_to_grid(preprocess.binary_target(label), grid, offsets)
        out["target"] = target
        out["band"] = preprocess.border_band(target, config.data.band_size)
    return out


def _write_cached(folder: pathlib.Path, arrays: dict) -> None:
    """Writes one case's arrays to a temporary sibling folder and renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in ("image", "target", "band"):
            if name in arrays:
                np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "meta.json").write_text(json.dumps(arrays["meta"]))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # else another run renamed the same case first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: pathlib.Path) -> PreparedCase:
    meta = json.loads((folder / "meta.json").read_text())
    load = lambda name: (
        np.load(folder / f"{name}.npy", mmap_mode="r")
        if (folder / f"{name}.npy").exists()
        else None
    )
    return PreparedCase(
        id=meta["id"],
        image=load("image"),
        target=load("target"),
        band=load("band"),
        affine=np.asarray(meta["affine"]),
        shape=tuple(meta["shape"]),
        offsets=tuple(meta["offsets"]),
    )


def prepare_cases(
    cases: list[layouts.Case], config: ml_collections.ConfigDict, cache_dir: pathlib.Path
) -> list[PreparedCase]:
    """Preprocessed cases, built into `cache_dir` on first use (with a progress bar) and mmapped after."""
    folders = [cache_dir / f"{c.id}-{_cache_key(c, config)}" for c in cases]
    missing = [(c, f) for c, f in zip(cases, folders) if not (f / "meta.json").exists()]
    for case, folder in tqdm(missing, desc="preprocessing", disable=not missing):
        _write_cached(folder, _read_case(case, config))
    return [_load_cached(f) for f in folders]


def cache_dir_for(config: ml_collections.ConfigDict) -> pathlib.Path:
    """data.cache_dir if set, else `.ossnet_cache` inside data.root."""
    return pathlib.Path(
        config.data.get("cache_dir") or pathlib.Path(config.data.root) / ".ossnet_cache"
    )


def load_split(config: ml_collections.ConfigDict) -> tuple[list[PreparedCase], list[PreparedCase]]:
    """(train, validation) preprocessed cases of the configured dataset."""
    cases = find_cases(config)
    train_ids, val_ids = split_ids(
        [c.id for c in cases], config.data.val_fraction, config.data.seed
    )
    by_id = {c.id: c for c in cases}
    chosen = [by_id[i] for i in train_ids + val_ids]
    prepared = {p.id: p for p in prepare_cases(chosen, config, cache_dir_for(config))}
    unlabeled = [i for i in train_ids if prepared[i].target is None]
    if unlabeled:
        raise nifti.DataError(f"training cases without a label file: {', '.join(unlabeled[:5])}")
    return [prepared[i] for i in train_ids], [prepared[i] for i in val_ids]


def case_indices(step: int, batch_size: int, num_cases: int, seed: int) -> np.ndarray:
    """Case indices of a step's batch: epoch-wise seeded permutations, a pure function of the step."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, within = np.divmod(positions, num_cases)
    return np.array(
        [
            np.random.default_rng([seed, int(e)]).permutation(num_cases)[w]
            for e, w in zip(epochs, within)
        ]
    )


def stack_batch(cases: list[PreparedCase]) -> dict[str, np.ndarray]:
    """{'image' (B, X, Y, Z, C) float32, 'target' (B, X, Y, Z) uint8, 'band' (B, X, Y, Z) bool}."""
    return {
        "image": np.stack([c.image for c in cases]),
        "target": np.stack([c.target for c in cases]),
        "band": np.stack([c.band for c in cases]),
    }
