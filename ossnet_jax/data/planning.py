"""Settings read from the dataset instead of set by hand: the planned grid and the channel count.

data.grid_shape = 'auto' plans the smallest grid that holds every case after reorientation to RAS and
that the model family's halvings and data.downscale divide along each axis (families.Family's
grid_multiple). data.num_channels = 0 takes the channels from the data: 4 for BraTS (one file per
modality) and the synthetic tumours, 1 for LiTS and the synthetic vessels, the modalities of an MSD
task's dataset.json, otherwise those of the first case. Only file headers are read; the synthetic data
is planned from its settings.
"""

import dataclasses
import math
import pathlib
from typing import Optional, Sequence

import ml_collections
import nibabel as nib
import numpy as np

from ossnet_jax.data import layouts, nifti, synthetic, synthetic_vessels
from ossnet_jax.errors import ConfigError

AUTO_GRID = "auto"
FORMAT_CHANNELS = {"brats": len(synthetic.MODALITIES), "lits": 1}
# data.synthetic_kind -> the channels of its cases: BraTS-like tumours, angiography-like vessels
SYNTHETIC_CHANNELS = {
    "tumour": len(synthetic.MODALITIES),
    "vessels": len(synthetic_vessels.MODALITIES),
}


@dataclasses.dataclass(frozen=True)
class CaseGeometry:
    """A case's size as training sees it, from its image headers.

    Attributes:
      id: the case id.
      path: its first image file (named in errors).
      shape: (x, y, z) voxels after reorientation to RAS.
      channels: image channels over all of its image files.
    """

    id: str
    path: pathlib.Path
    shape: tuple[int, int, int]
    channels: int


def parse_grid(value: object) -> Optional[tuple[int, int, int]]:
    """data.grid_shape as (X, Y, Z) ints, or None for 'auto'.

    Accepts a sequence of three ints, 'auto' (also as ('auto',), what a command-line override of a
    tuple-valued preset gives) and the strings '96,128,96', '(96, 128, 96)' and '96x128x96' (what
    an override of the 'auto' preset gives). ConfigError naming the key otherwise.
    """
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        text = value.strip().strip("()[]").replace("x", ",")
        if text == AUTO_GRID:
            return None
        value = [part for part in text.split(",") if part.strip()]
    try:
        grid = tuple(int(str(n).strip()) for n in value)
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ConfigError(
            f"data.grid_shape must be 'auto' or three positive ints (X, Y, Z), got {value!r}"
        )
    return grid


def canonical_shape(shape: Sequence[int], affine: np.ndarray) -> tuple[int, int, int]:
    """(x, y, z) of a file's first three axes after preprocess.to_canonical's reorientation to RAS."""
    ornt = nib.orientations.io_orientation(affine)
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = int(shape[axis])
    return tuple(out)


def _header(path: pathlib.Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel shape and affine of a 3D or 4D NIfTI file; DataError naming it otherwise."""
    shape, affine = nifti.read_header(path)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise nifti.DataError(f"{path}: expected a 3D or 4D image, got shape {shape}")
    return shape, affine


def case_geometry(case: layouts.Case, reorient: bool = True) -> CaseGeometry:
    """The shape training sees (reoriented to RAS unless not `reorient`: data.reorient) and the
    channel count of a case, from its image files' headers."""
    channels, shape = 0, None
    for path in case.image_paths:
        file_shape, affine = _header(path)
        channels += file_shape[3] if len(file_shape) == 4 else 1
        if shape is None:
            shape = canonical_shape(file_shape[:3], affine) if reorient else file_shape[:3]
    return CaseGeometry(case.id, case.image_paths[0], shape, channels)


def grid_for(shapes: Sequence[Sequence[int]], multiple: Sequence[int]) -> tuple[int, int, int]:
    """The smallest (X, Y, Z) holding every (x, y, z) in `shapes` with axis i divisible by multiple[i]."""
    return tuple(
        math.ceil(max(int(s[i]) for s in shapes) / multiple[i]) * multiple[i] for i in range(3)
    )


def too_small(geometries: Sequence[CaseGeometry], grid: Sequence[int]) -> list[CaseGeometry]:
    """The cases whose reoriented shape exceeds `grid` along some axis."""
    return [g for g in geometries if any(s > n for s, n in zip(g.shape, grid))]


def synthetic_kind(data: ml_collections.ConfigDict) -> str:
    """data.synthetic_kind ('tumour' where a config.json written before the key lacks it); ConfigError
    naming the key and the choices otherwise."""
    kind = data.get("synthetic_kind", "tumour")
    if kind not in SYNTHETIC_CHANNELS:
        raise ConfigError(
            f"data.synthetic_kind must be one of {tuple(SYNTHETIC_CHANNELS)}, got {kind!r}"
        )
    return kind


def format_channels(data: ml_collections.ConfigDict) -> Optional[int]:
    """The channels data.format (and for the synthetic data data.synthetic_kind) fixes, or None."""
    if data["format"] == "synthetic":
        return SYNTHETIC_CHANNELS[synthetic_kind(data)]
    return FORMAT_CHANNELS.get(data["format"])


def synthetic_geometry(root: pathlib.Path, shape: Sequence[int], kind: str) -> CaseGeometry:
    """What every synthetic case of data.synthetic_kind `kind` in `root` is: data.synthetic_shape
    voxels (its affine at most flips the axes), one channel per modality."""
    shape = tuple(int(s) for s in shape)
    return CaseGeometry("synthetic", root, shape, SYNTHETIC_CHANNELS[kind])


def inferred_channels(fmt: str, geometries: Sequence[CaseGeometry]) -> Optional[int]:
    """data.num_channels of a format, else of the first case; None without cases to read."""
    if fmt in FORMAT_CHANNELS:
        return FORMAT_CHANNELS[fmt]
    return geometries[0].channels if geometries else None


def check_channels(geometries: Sequence[CaseGeometry], expected: int) -> None:
    """DataError naming every case whose channel count is not `expected`."""
    odd = [g for g in geometries if g.channels != expected]
    if odd:
        listed = "; ".join(f"{g.path}: case {g.id} has {g.channels}" for g in odd[:10])
        raise nifti.DataError(
            f"{len(odd)} of {len(geometries)} cases do not have the {expected} channels of the "
            f"others (data.num_channels): {listed}"
        )


def describe(before: ml_collections.ConfigDict, after: ml_collections.ConfigDict) -> Optional[str]:
    """One line naming the data settings resolve_data_config planned or inferred, or None."""
    parts = []
    if parse_grid(before.grid_shape) is None:
        parts.append(f"data.grid_shape 'auto' -> {tuple(after.grid_shape)}")
    if not before.num_channels:
        parts.append(f"data.num_channels -> {after.num_channels}")
    return "planned from the data: " + ", ".join(parts) if parts else None
