"""Per-case preprocessing on the host (numpy): orientation, normalisation, grid fitting, border band."""

from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

CANONICAL = "RAS"  # array axes point to the patient's Right, Anterior, Superior after reorientation
STORED_ORDER = ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0))  # the orientation transform that changes nothing
NORMALIZE_MODES = ("nonzero", "all", "all_unbiased")  # data.normalize
PAD_REMAINDERS = ("after", "before")  # data.pad_remainder
RESAMPLE_BORDERS = ("zero", "edge")  # data.resample_border


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Reorders/flips the first three axes of `array` so they are closest to RAS.

    Args:
      array: (X, Y, Z, ...) in the file's voxel order.
      affine: (4, 4) voxel-to-world of the file.
    Returns:
      (array in RAS voxel order, its (4, 4) affine, the orientation transform as a list of
      [axis, flip] rows, to undo with `from_canonical`).
    """
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return np.ascontiguousarray(out), new_affine, ornt.tolist()


def orient(
    array: np.ndarray, affine: np.ndarray, reorient: bool = True
) -> tuple[np.ndarray, np.ndarray, list]:
    """`to_canonical` (data.reorient, the default), or with `reorient` False the array in its stored
    voxel order (the official release's input): (array, affine, STORED_ORDER as rows), which
    `from_canonical` undoes as well."""
    if reorient:
        return to_canonical(array, affine)
    return np.ascontiguousarray(array), np.asarray(affine), [list(row) for row in STORED_ORDER]


def from_canonical(array: np.ndarray, ornt: Sequence[Sequence[float]]) -> np.ndarray:
    """Undoes `to_canonical` on (X, Y, Z, ...) arrays: back to the file's voxel order."""
    forward = np.asarray(ornt, dtype=np.float64)
    inverse = np.empty_like(forward)
    for axis, (target, flip) in enumerate(forward):
        inverse[int(target)] = (axis, flip)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, inverse))


def axis_codes(affine: np.ndarray) -> str:
    """Orientation of a file's voxel axes as three letters, e.g. 'LPS' for BraTS, 'RAS' canonical."""
    return "".join(nib.orientations.aff2axcodes(affine))


def normalize(image: np.ndarray, clip: Sequence[float] = (), mode: str = "nonzero") -> np.ndarray:
    """Clips (X, Y, Z, C) to `clip` = (low, high) if given (CT in HU), then z-scores each channel.

    mode (data.normalize): 'nonzero' (MRI) statistics over non-zero voxels, background stays 0; 'all'
    over all voxels (CT); 'all_unbiased' over all voxels with the n - 1 standard deviation, background
    included (the official release, BraTS and LiTS). float32.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"data.normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if len(clip):
        image = np.clip(image, clip[0], clip[1])
    if mode == "nonzero":
        return zscore(image)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c].astype(np.float64)
        std = channel.std(ddof=1 if mode == "all_unbiased" and channel.size > 1 else 0)
        out[..., c] = (channel - channel.mean()) / (std if std > 0 else 1.0)
    return out


def resize(
    array: np.ndarray, shape: Sequence[int], order: int, border: str = "zero"
) -> np.ndarray:
    """Resamples the first three axes of `array` to `shape`: order 1 trilinear (images), 0 nearest (labels).

    Voxel edges are aligned (grid_mode), so resizing there and back keeps a structure in place. Where
    an output voxel's centre lies within half an input voxel of the volume's edge, trilinear weights
    reach outside it: `border` (data.resample_border) 'zero' reads 0 there, 'edge' the edge voxel,
    which is PyTorch's trilinear interpolate with align_corners=False (the official release's LiTS).
    """
    if border not in RESAMPLE_BORDERS:
        raise ValueError(f"data.resample_border must be one of {RESAMPLE_BORDERS}, got {border!r}")
    factors = [s / n for s, n in zip(shape, array.shape[:3])] + [1.0] * (array.ndim - 3)
    mode = "grid-constant" if border == "zero" else "nearest"
    out = ndimage.zoom(array, factors, order=order, mode=mode, grid_mode=True)
    if out.shape[:3] != tuple(shape):
        raise AssertionError(f"resize produced {out.shape[:3]} instead of {tuple(shape)}")
    return out


def zscore(image: np.ndarray) -> np.ndarray:
    """Z-scores each channel of (X, Y, Z, C) over its non-zero voxels; background stays 0. float32."""
    out = np.zeros(image.shape, np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c].astype(np.float64)
        inside = channel != 0
        if not inside.any():
            continue
        values = channel[inside]
        std = values.std()
        out[..., c][inside] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def centre_offsets(
    shape: tuple[int, ...], grid_shape: tuple[int, ...], remainder: str = "after"
) -> tuple[int, int, int]:
    """Where a volume of `shape` starts inside the grid when padded symmetrically; an odd number of
    padding voxels puts the extra one `remainder` (data.pad_remainder) the volume: 'after', or
    'before' as the official release (BraTS 155 -> 160 slices: 3 before, 2 after)."""
    if remainder not in PAD_REMAINDERS:
        raise ValueError(f"data.pad_remainder must be one of {PAD_REMAINDERS}, got {remainder!r}")
    if len(shape) != 3 or any(s > g for s, g in zip(shape, grid_shape)):
        raise ValueError(
            f"volume of shape {tuple(shape)} does not fit data.grid_shape {tuple(grid_shape)}"
        )
    extra = 1 if remainder == "before" else 0
    return tuple((g - s + extra) // 2 for s, g in zip(shape, grid_shape))


def pad_to_grid(
    array: np.ndarray, grid_shape: tuple[int, ...], offsets: tuple[int, ...]
) -> np.ndarray:
    """Zero-pads the first three axes of `array` into `grid_shape` starting at `offsets`."""
    pad = [(o, g - o - s) for o, g, s in zip(offsets, grid_shape, array.shape[:3])]
    pad += [(0, 0)] * (array.ndim - 3)
    return np.pad(array, pad)


def crop_from_grid(
    array: np.ndarray, shape: tuple[int, ...], offsets: tuple[int, ...]
) -> np.ndarray:
    """Inverse of `pad_to_grid`: the (X, Y, Z, ...) region of the original volume."""
    return array[tuple(slice(o, o + s) for o, s in zip(offsets, shape))]


def border_band(target: np.ndarray, size: int) -> np.ndarray:
    """Voxels near the label's boundary: Sobel gradient magnitude > 0, dilated by a size^3 max-pool.

    Args:
      target: (X, Y, Z) 0/1 label.
      size: edge of the max-pool window (13 in the official release).
    Returns:
      (X, Y, Z) bool.
    """
    t = target.astype(np.float32)
    magnitude = sum(np.square(ndimage.sobel(t, axis=a, mode="constant")) for a in range(3))
    return ndimage.maximum_filter(magnitude > 0, size=size, mode="constant", cval=False)


def label_band(index: np.ndarray, size: int, by_class: bool) -> np.ndarray:
    """Border band of a class-index map (X, Y, Z): of the foreground, or of every class (multi-label)."""
    if not by_class:
        return border_band(index > 0, size)
    band = np.zeros(index.shape, bool)
    for c in np.unique(index):
        if c:
            band |= border_band(index == c, size)
    return band
