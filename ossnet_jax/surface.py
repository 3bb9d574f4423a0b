"""Surface distances and per-case segmentation metrics of one binary mask pair, in millimetres.

Definitions (all distances in mm, using the voxel spacing ``(sx, sy, sz)``):

* Surface: the mask voxels with at least one of their 6 face neighbours outside the
  mask; voxels beyond the volume border count as outside, so a mask touching the
  border has a closed surface there.
* Directed distances ``d(A -> B)``: for every surface voxel of ``A``, the Euclidean
  distance between voxel centres to the nearest surface voxel of ``B``.
* HD95: the 95th percentile (``numpy.percentile``, linear interpolation) of the union
  (concatenation) of both directed distance sets. This is the "percentile of all
  distances" definition of ``medpy.metric.binary.hd95``; it is not the maximum of the
  two directed 95th percentiles, which other tools report and which is never smaller.
* ASD (average symmetric surface distance): the mean of that same union, i.e. every
  surface voxel of both masks weighs the same; it equals the mean of the two directed
  means only when both surfaces have the same number of voxels.
* Surface Dice at tolerance ``tau`` (after Nikolov et al., 2018, computed on voxel
  surfaces with every surface voxel weighing 1 instead of by surfel area):
  ``(#{d(P -> T) <= tau} + #{d(T -> P) <= tau}) / (|surface P| + |surface T|)``.

Empty masks: when both are empty the prediction is perfect: dice, iou, sensitivity,
precision and surface_dice are 1.0 and hd95 and asd are 0.0. When exactly one is
empty, dice, iou and surface_dice are 0.0 and hd95 and asd are ``None`` (JSON
``null``; a distance to nothing is undefined and NaN is not valid JSON).
Sensitivity is ``None`` whenever the target is empty and precision is ``None``
whenever the prediction is empty (except both empty, above).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ossnet_jax import metrics


def _check_pair(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Return both masks as bool and the spacing as floats after validating them."""
    pred_arr, target_arr = np.asarray(pred), np.asarray(target)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"pred shape {pred_arr.shape} does not match target shape {target_arr.shape}"
        )
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred_arr.ndim:
        raise ValueError(f"spacing {spacing} needs one entry per axis of shape {pred_arr.shape}")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive, got {spacing}")
    return _as_bool("pred", pred_arr), _as_bool("target", target_arr), spacing


def _as_bool(name: str, array: np.ndarray) -> np.ndarray:
    """Return ``array`` as bool, requiring bool dtype or only values 0 and 1."""
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return array.astype(bool)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface of a bool mask ``(X, Y, Z)``: a bool array of the same shape marking the mask
    voxels with at least one face (6-)neighbour outside the mask or beyond the volume border."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Distances (mm) from each voxel of ``from_surface`` to the nearest of ``to_surface``.

    The distance transform runs on the bounding box of both surfaces only: every
    source and every target voxel lies inside it, so the result is exact.
    """
    if not from_surface.any():
        return np.zeros(0, dtype=np.float64)
    if not to_surface.any():
        return np.full(int(np.count_nonzero(from_surface)), np.inf)
    coords = np.argwhere(from_surface | to_surface)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(coords.min(axis=0), coords.max(axis=0)))
    distance = ndimage.distance_transform_edt(~to_surface[box], sampling=spacing)
    return np.asarray(distance[from_surface[box]], dtype=np.float64)


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two binary masks.

    Args:
        pred: predicted mask ``(X, Y, Z)``, bool or 0/1 values.
        target: ground-truth mask of the same shape.
        spacing: voxel size in mm along each axis, ``(sx, sy, sz)``.

    Returns:
        ``(d_pred_to_target, d_target_to_pred)``: float64 arrays in mm, one entry per
        surface voxel of ``pred`` (resp. ``target``) in C order of the voxels. A mask
        with no voxels gives an empty array; distances to an empty mask are ``inf``.

    Raises:
        ValueError: different shapes, non-binary values, or a bad spacing.
    """
    p, t, spacing = _check_pair(pred, target, spacing)
    surface_p, surface_t = surface_voxels(p), surface_voxels(t)
    return _directed(surface_p, surface_t, spacing), _directed(surface_t, surface_p, spacing)


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
) -> dict[str, float | None]:
    """Overlap, surface-distance and volume metrics of one case (definitions: module docstring).

    Args:
        pred: predicted mask ``(X, Y, Z)``, bool or 0/1 values.
        target: ground-truth mask of the same shape.
        spacing: voxel size in mm along each axis, ``(sx, sy, sz)``.
        tolerance_mm: surface Dice tolerance in mm (a distance equal to it counts as within).

    Returns:
        JSON-ready dict of Python floats or ``None``: ``dice``, ``iou``, ``sensitivity``,
        ``precision`` (unitless, in [0, 1]), ``hd95``, ``asd`` (mm), ``surface_dice``
        (unitless) and ``pred_volume_ml``, ``true_volume_ml`` (voxel count times the voxel
        volume ``sx * sy * sz`` in mm^3, divided by 1000).

    Raises:
        ValueError: different shapes, non-binary values, a bad spacing or a negative tolerance.
    """
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    p, t, spacing = _check_pair(pred, target, spacing)
    counts = metrics.overlap_counts(p, t)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    result: dict[str, float | None] = {
        "dice": metrics.dice_from_counts(counts),
        "iou": metrics.iou_from_counts(counts),
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
    }
    pred_empty, target_empty = tp + fp == 0, tp + fn == 0
    if pred_empty and target_empty:
        result.update(sensitivity=1.0, precision=1.0, hd95=0.0, asd=0.0, surface_dice=1.0)
    elif pred_empty or target_empty:
        result.update(hd95=None, asd=None, surface_dice=0.0)
    else:
        d_pt, d_tp = surface_distances(p, t, spacing)
        both = np.concatenate([d_pt, d_tp])
        result.update(
            hd95=float(np.percentile(both, 95)),
            asd=float(both.mean()),
            surface_dice=float(np.count_nonzero(both <= tolerance_mm) / both.size),
        )
    result["pred_volume_ml"] = (tp + fp) * voxel_ml
    result["true_volume_ml"] = (tp + fn) * voxel_ml
    return result
