"""Cases on disk -> preprocessed arrays on the padded grid, cached once, split deterministically.

Reading a case: every image file is validated (nifti.load_nifti), channels are stacked (BraTS: one file
per modality; MSD: a 4D file), the label must have the image's shape and affine and only declared label
values, then image and label are reoriented to RAS (preprocess.to_canonical), intensities are clipped
(data.clip_range, CT) and z-scored, and the volume is either padded into data.grid_shape (MRI) or
resampled to it (data.resample, LiTS). Labels are stored as class indices into data.labels.

The cache holds, per case, `image.npy` (X, Y, Z, C) float32, `target.npy` (X, Y, Z) uint8 class indices,
`band.npy` (X, Y, Z) bool, for resampled cases `label.npy` (the class indices in the original geometry,
for metrics), and `meta.json` (what maps a prediction back to the file's geometry). Its folder name holds
a hash of the source files' contents and of the preprocessing settings, so a changed file or setting
never reuses a stale entry; entries are written to a temporary folder and renamed into place (two runs may
build the same cache at once) and memory-mapped on load.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional

import ml_collections
import numpy as np
from tqdm import tqdm

from ossnet_jax import families
from ossnet_jax.data import (
    labels,
    layouts,
    nifti,
    planning,
    preprocess,
    synthetic,
    synthetic_vessels,
)
from ossnet_jax.errors import ConfigError

CACHE_VERSION = 2
AFFINE_TOLERANCE_MM = 1e-3  # image files and label of one case must agree to this (world mm)
# data.synthetic_kind -> the layout its files are written in
SYNTHETIC_LAYOUTS = {"tumour": "brats", "vessels": "msd"}


@dataclasses.dataclass(frozen=True)
class PreparedCase:
    """One case on the padded grid, in RAS voxel order.

    Attributes:
      id: case identifier (folder name for BraTS, lits-N for LiTS, file stem for MSD).
      image: (X, Y, Z, C) float32, normalised, zero outside the original volume.
      target: (X, Y, Z) uint8 class indices into data.labels, or None when the case has no label.
      band: (X, Y, Z) bool border band of the target, or None.
      affine: (4, 4) voxel-to-world (mm) affine of the original image file.
      file_shape: (x, y, z) shape of the original image file (its voxel order).
      ornt: the reorientation applied (rows [axis, flip]; preprocess.from_canonical undoes it).
      shape: (x, y, z) shape of the reoriented volume before padding or resampling.
      offsets: where that volume starts inside the grid (zeros when resampled).
      resampled: whether the volume was resampled to the grid (else padded).
      spacing: (3,) voxel size in mm of the reoriented volume's axes.
      label: (x, y, z) uint8 class indices in the reoriented original geometry; only for resampled cases.
    """

    id: str
    image: np.ndarray
    target: Optional[np.ndarray]
    band: Optional[np.ndarray]
    affine: np.ndarray
    file_shape: tuple[int, int, int]
    ornt: tuple
    shape: tuple[int, int, int]
    offsets: tuple[int, int, int]
    resampled: bool = False
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    label: Optional[np.ndarray] = None

    def to_file_geometry(self, grid_array: np.ndarray) -> np.ndarray:
        """A grid-shaped (X, Y, Z) label/mask array in the original file's shape and voxel order.

        Padded cases are cropped, resampled ones resized back with nearest neighbour; then the
        reorientation is undone, so the result lines up with the file's affine.
        """
        if self.resampled:
            array = preprocess.resize(np.asarray(grid_array), self.shape, order=0)
        else:
            array = preprocess.crop_from_grid(np.asarray(grid_array), self.shape, self.offsets)
        return preprocess.from_canonical(array, self.ornt)

    def target_in_file_geometry(self) -> Optional[np.ndarray]:
        """The label's class indices (x, y, z) in the file's geometry (the original label, not resized)."""
        if self.target is None:
            return None
        if self.label is not None:
            return preprocess.from_canonical(np.asarray(self.label), self.ornt)
        return self.to_file_geometry(self.target)


def _msd_task(config: ml_collections.ConfigDict) -> layouts.MsdTask:
    return layouts.read_msd_task(dataset_root(config))


def resolve_data_config(
    config: ml_collections.ConfigDict, check_fit: bool = False
) -> ml_collections.ConfigDict:
    """A copy of `config` whose data settings that can come from the data do (data/planning.py).

    MSD and the synthetic vessels (written on first use): data.labels / label_names / num_channels
    from dataset.json. data.num_channels = 0: from the format (BraTS and the synthetic tumours 4,
    LiTS 1) or else the first case. data.grid_shape = 'auto': the smallest grid holding every case
    that the model family's grid_multiple divides. Case headers are read only where a value needs
    them (never for the synthetic data, planned from its settings);
    with `check_fit` always, and then an explicit grid (padded, not data.resample) too small for
    some cases raises DataError naming them and the grid that would hold every case, and a case
    whose channels differ from the others' raises DataError naming it. Cases whose headers cannot
    be read are left out of the plan: reading the cases (prepare_cases, data.check) reports each of
    them with every other problem. Call it once before building a model; config.json then holds the
    resolved values.
    """
    values = config.to_dict()
    d = values["data"]
    if layout_format(config) == "msd":
        task = _msd_task(config)
        d["num_channels"] = len(task.modalities)
        d["labels"] = task.labels
        d["label_names"] = task.label_names
    labels.label_spec(ml_collections.ConfigDict(d))  # validates the label settings early
    grid = planning.parse_grid(d["grid_shape"])
    known_channels = d["num_channels"] or planning.format_channels(ml_collections.ConfigDict(d))
    if grid is not None and known_channels and not check_fit:
        d["grid_shape"], d["num_channels"] = grid, known_channels
        return ml_collections.ConfigDict(values)
    geometries = _case_geometries(config)
    d["num_channels"] = known_channels or planning.inferred_channels(d["format"], geometries)
    if check_fit:
        planning.check_channels(geometries, d["num_channels"])
    fitting = planning.grid_for(
        [g.shape for g in geometries], families.get_family(config).grid_multiple(config)
    )
    if grid is None:
        grid = fitting
    elif check_fit and not d.get("resample", False):
        bad = planning.too_small(geometries, grid)
        if bad:
            listed = "; ".join(f"{g.path} {'x'.join(map(str, g.shape))}" for g in bad[:10])
            raise nifti.DataError(
                f"{len(bad)} of {len(geometries)} cases do not fit data.grid_shape {grid} after "
                f"reorientation: {listed}. A grid that holds every case: {fitting} (or set "
                "data.grid_shape='auto', or data.resample=True)"
            )
    d["grid_shape"] = tuple(grid)
    return ml_collections.ConfigDict(values)


def _case_geometries(config: ml_collections.ConfigDict) -> list[planning.CaseGeometry]:
    """The reoriented shape and channels of every case whose headers can be read (the synthetic data:
    from its settings); DataError naming the dataset if there is none."""
    if config.data.format == "synthetic":
        d = config.data
        kind = planning.synthetic_kind(d)
        return [planning.synthetic_geometry(pathlib.Path(d.root), d.synthetic_shape, kind)]
    geometries = []
    for case in find_cases(config):
        try:
            geometries.append(planning.case_geometry(case, bool(config.data.get("reorient", True))))
        except nifti.DataError:
            continue  # named with the other problems when the cases are read
    if not geometries:
        raise nifti.DataError(f"{config.data.root}: no case has a readable image header")
    return geometries


def synthetic_folder(data: ml_collections.ConfigDict) -> pathlib.Path:
    """Where the synthetic data of `data` (config.data, format 'synthetic') lives: a subfolder of
    data.root named by its kind and generator settings; nothing is written."""
    shape = tuple(int(s) for s in data.synthetic_shape)
    seed = int(data.get("synthetic_seed", 0))
    module = synthetic_vessels if planning.synthetic_kind(data) == "vessels" else synthetic
    return pathlib.Path(data.root) / module.settings_folder(data.synthetic_cases, seed, shape)


def dataset_root(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The folder of cases; the synthetic data (data.synthetic_kind: BraTS-like tumours or vessels in
    an MSD task) is written on first use into its synthetic_folder, so that datasets of different
    settings live side by side."""
    d = config.data
    if d.format != "synthetic":
        return pathlib.Path(d.root)
    shape = tuple(int(s) for s in d.synthetic_shape)
    seed = int(d.get("synthetic_seed", 0))
    write = (
        synthetic_vessels.write_synthetic_vessels
        if planning.synthetic_kind(d) == "vessels"
        else synthetic.write_synthetic_brats
    )
    return write(synthetic_folder(d), d.synthetic_cases, seed, shape)


def layout_format(config: ml_collections.ConfigDict) -> str:
    """The layout of data.format's files: 'brats', 'lits' or 'msd' (the synthetic data: its kind's)."""
    if config.data.format == "synthetic":
        return SYNTHETIC_LAYOUTS[planning.synthetic_kind(config.data)]
    return config.data.format


def find_cases(config: ml_collections.ConfigDict) -> list[layouts.Case]:
    """All cases of the configured dataset (data.format, data.root, data.subset), sorted by id."""
    return layouts.find_cases(
        layout_format(config), dataset_root(config), config.data.get("subset", "training")
    )


def split_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: a seeded permutation, the first round(n f) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def read_split_file(path: str | os.PathLike[str], ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) ids from a JSON file {"train": [...], "val": [...]}; every id must be a known case."""
    path = pathlib.Path(path)
    try:
        split = json.loads(path.read_text())
        train, val = [str(i) for i in split["train"]], [str(i) for i in split["val"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise nifti.DataError(
            f"{path}: not a split file with 'train' and 'val' lists of case ids ({err})"
        ) from err
    unknown = sorted(set(train + val) - set(ids))
    if unknown:
        raise nifti.DataError(f"{path}: case ids not in the dataset: {', '.join(unknown[:10])}")
    both = sorted(set(train) & set(val))
    if both:
        raise nifti.DataError(f"{path}: case ids in both train and val: {', '.join(both[:10])}")
    return sorted(train), sorted(val)


def _file_digest(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha1").hexdigest()


PREPROCESSING_KEYS = (
    "grid_shape",
    "label_mode",
    "labels",
    "band_size",
    "clip_range",
    "normalize",
    "reorient",
    "pad_remainder",
    "resample_border",
)


def _cache_key(case: layouts.Case, config: ml_collections.ConfigDict) -> str:
    """Hash of the case's file contents and of every setting that changes the cached arrays."""
    files = list(case.image_paths) + ([case.label_path] if case.label_path else [])
    settings = {
        "version": CACHE_VERSION,
        "data": {k: config.data.get(k) for k in PREPROCESSING_KEYS},
        "resample": bool(config.data.get("resample", False)),
        "files": [_file_digest(p) for p in files],
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_affine(
    path: pathlib.Path, affine: np.ndarray, reference: pathlib.Path, ref_affine
) -> None:
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
        worst = float(np.abs(affine - ref_affine).max())
        raise nifti.DataError(
            f"{path}: affine differs from {reference.name}'s by up to {worst:.4g} mm; image and "
            "label files of a case must share one voxel grid"
        )


def read_image(case: layouts.Case, num_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The case's image (x, y, z, C) float32 in file voxel order and its affine; DataError names the file."""
    channels, affine = [], None
    for path in case.image_paths:
        data, aff = nifti.load_nifti(path)
        if data.ndim == 4:
            parts = [data[..., c] for c in range(data.shape[-1])]
        elif data.ndim == 3:
            parts = [data]
        else:
            raise nifti.DataError(f"{path}: expected a 3D or 4D image, got shape {data.shape}")
        if channels and parts[0].shape != channels[0].shape:
            raise nifti.DataError(
                f"{path}: shape {parts[0].shape} differs from {case.image_paths[0].name} "
                f"{channels[0].shape}"
            )
        if affine is None:
            affine = aff
        else:
            _check_affine(path, aff, case.image_paths[0], affine)
        channels.extend(np.asarray(p, np.float32) for p in parts)
    if len(channels) != num_channels:
        raise nifti.DataError(
            f"{case.image_paths[0]}: case {case.id} has {len(channels)} channels, the config expects "
            f"data.num_channels = {num_channels}"
        )
    return np.stack(channels, axis=-1), affine


def read_label(case: layouts.Case, shape: tuple, affine: np.ndarray, values) -> np.ndarray:
    """The case's label as class indices (x, y, z) uint8 in file voxel order; checked against the image."""
    label, label_affine = nifti.load_nifti(case.label_path)
    if label.shape != tuple(shape):
        raise nifti.DataError(
            f"{case.label_path}: label shape {label.shape} differs from image shape {tuple(shape)} "
            f"of {case.image_paths[0].name}"
        )
    _check_affine(case.label_path, label_affine, case.image_paths[0], affine)
    return labels.to_index(label, tuple(values), case.label_path)


def _read_case(case: layouts.Case, config: ml_collections.ConfigDict) -> dict:
    """Reads and preprocesses one case from NIfTI; errors name the file."""
    d = config.data
    spec = labels.label_spec(d)
    image, affine = read_image(case, d.num_channels)
    file_shape = image.shape[:3]
    index = None
    if case.label_path is not None:
        index = read_label(case, file_shape, affine, spec.values)
    reorient = bool(d.get("reorient", True))
    image, canonical_affine, ornt = preprocess.orient(image, affine, reorient)
    image = preprocess.normalize(
        image, tuple(d.get("clip_range", ())), d.get("normalize", "nonzero")
    )
    grid = tuple(d.grid_shape)
    resample = bool(d.get("resample", False))
    if resample:
        offsets = (0, 0, 0)
        fitted = preprocess.resize(image, grid, 1, d.get("resample_border", "zero")).astype(
            np.float32
        )
    else:
        try:
            offsets = preprocess.centre_offsets(
                image.shape[:3], grid, d.get("pad_remainder", "after")
            )
        except ValueError as err:
            raise nifti.DataError(
                f"{case.image_paths[0]}: {err} (after reorientation to RAS); enlarge "
                "data.grid_shape or set data.resample=True"
            ) from err
        fitted = preprocess.pad_to_grid(image, grid, offsets)
    out = {
        "image": fitted,
        "meta": {
            "id": case.id,
            "affine": np.asarray(affine).tolist(),
            "file_shape": list(file_shape),
            "ornt": ornt,
            "shape": list(image.shape[:3]),
            "offsets": list(offsets),
            "resampled": resample,
            "spacing": list(nifti.voxel_spacing(canonical_affine)),
        },
    }
    if index is not None:
        index = preprocess.orient(index, affine, reorient)[0]
        if resample:
            target = preprocess.resize(index, grid, order=0)
            out["label"] = index
        else:
            target = preprocess.pad_to_grid(index, grid, offsets)
        out["target"] = target
        out["band"] = preprocess.label_band(target, d.band_size, spec.mode != "binary")
    return out


def _write_cached(folder: pathlib.Path, arrays: dict) -> None:
    """Writes one case's arrays to a temporary sibling folder and renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in ("image", "target", "band", "label"):
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


def _as_prepared(meta: dict, arrays: dict) -> PreparedCase:
    """A PreparedCase from a case's meta (as in meta.json) and its arrays by name (absent: None)."""
    return PreparedCase(
        id=meta["id"],
        image=arrays["image"],
        target=arrays.get("target"),
        band=arrays.get("band"),
        affine=np.asarray(meta["affine"]),
        file_shape=tuple(meta["file_shape"]),
        ornt=tuple(tuple(row) for row in meta["ornt"]),
        shape=tuple(meta["shape"]),
        offsets=tuple(meta["offsets"]),
        resampled=bool(meta["resampled"]),
        spacing=tuple(meta["spacing"]),
        label=arrays.get("label"),
    )


def _load_cached(folder: pathlib.Path) -> PreparedCase:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r")
        for name in ("image", "target", "band", "label")
        if (folder / f"{name}.npy").exists()
    }
    return _as_prepared(meta, arrays)


def read_case(case: layouts.Case, config: ml_collections.ConfigDict) -> PreparedCase:
    """One case read and preprocessed in memory, bypassing the cache (new scans, predicted once).

    The same arrays as prepare_cases gives; a bad file raises DataError naming it.
    """
    arrays = _read_case(case, config)
    return _as_prepared(arrays["meta"], arrays)


def prepare_cases(
    cases: list[layouts.Case], config: ml_collections.ConfigDict, cache_dir: pathlib.Path
) -> list[PreparedCase]:
    """Preprocessed cases, built into `cache_dir` on first use (with a progress bar) and mmapped after.

    Every case is tried before failing: one DataError lists the problem of each bad case (file and
    what is wrong), so a dataset is fixed in one pass; nothing is cached for the bad cases.
    """
    problems = []
    folders = {}
    for c in tqdm(cases, desc="hashing", disable=len(cases) < 50, leave=False):
        try:
            folders[c.id] = cache_dir / f"{c.id}-{_cache_key(c, config)}"
        except OSError as err:
            problems.append(f"{err.filename}: cannot be read ({err.strerror})")
    missing = [c for c in cases if c.id in folders and not (folders[c.id] / "meta.json").exists()]
    for case in tqdm(missing, desc="preprocessing", disable=not missing):
        try:
            arrays = _read_case(case, config)
        except nifti.DataError as err:
            problems.append(str(err))
            continue
        _write_cached(folders[case.id], arrays)
    if problems:
        raise nifti.DataError(
            f"{len(problems)} of {len(cases)} cases cannot be used:\n  " + "\n  ".join(problems)
        )
    return [_load_cached(folders[c.id]) for c in cases]


def cache_dir_for(config: ml_collections.ConfigDict) -> pathlib.Path:
    """data.cache_dir if set, else `.ossnet_cache` inside data.root."""
    return pathlib.Path(
        config.data.get("cache_dir") or pathlib.Path(config.data.root) / ".ossnet_cache"
    )


def split_cases(config: ml_collections.ConfigDict) -> tuple[list[layouts.Case], list[layouts.Case]]:
    """(train, validation) cases on disk, not yet read: data.split_file if set, else a data.seed split.

    Raises DataError if a training case has no label file.
    """
    cases = find_cases(config)
    ids = [c.id for c in cases]
    if config.data.get("split_file"):
        train_ids, val_ids = read_split_file(config.data.split_file, ids)
    else:
        train_ids, val_ids = split_ids(ids, config.data.val_fraction, config.data.seed)
    by_id = {c.id: c for c in cases}
    train = [by_id[i] for i in train_ids]
    unlabeled = [c.image_paths[0].name for c in train if c.label_path is None]
    if unlabeled:
        raise nifti.DataError(
            f"{config.data.root}: training cases without a label file: {', '.join(unlabeled[:5])}"
        )
    return train, [by_id[i] for i in val_ids]


def load_split(config: ml_collections.ConfigDict) -> tuple[list[PreparedCase], list[PreparedCase]]:
    """(train, validation) preprocessed cases of split_cases."""
    train, val = split_cases(config)
    prepared = prepare_cases(train + val, config, cache_dir_for(config))
    return prepared[: len(train)], prepared[len(train) :]


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
