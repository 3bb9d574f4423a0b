"""Per-case preprocessing on the host (numpy): normalisation, padding to the grid, targets, border band."""

import numpy as np
from scipy import ndimage


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


def centre_offsets(shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Where a volume of `shape` starts inside the grid when padded symmetrically (extra voxel after)."""
    if len(shape) != 3 or any(s > g for s, g in zip(shape, grid_shape)):
        raise ValueError(
            f"volume of shape {tuple(shape)} does not fit data.grid_shape {tuple(grid_shape)}"
        )
    return tuple((g - s) // 2 for s, g in zip(shape, grid_shape))


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


def binary_target(label: np.ndarray) -> np.ndarray:
    """Foreground = label > 0 (BraTS whole tumour, LiTS liver) as uint8 0/1."""
    return (label > 0).astype(np.uint8)


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
