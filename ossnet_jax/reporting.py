"""Per-case scores and the files people look at, from label maps in the input file's geometry.

Scores (score): for each label channel of the mode (foreground; each class; each BraTS region) the
metrics of surface.case_metrics (Dice, IoU, sensitivity, precision, HD95, ASD, surface Dice in mm,
volumes in ml); a single channel's metrics are the row itself, several are listed under "regions" or
"classes" and the row holds their mean (metrics that are undefined for a channel, None, are left out
of the mean; None if undefined for all). Means over cases skip None the same way.
"""

import pathlib
from typing import Any, Optional

import numpy as np

from ossnet_jax import outputs, surface
from ossnet_jax.data import labels
from ossnet_jax.data.dataset import PreparedCase
from ossnet_jax.data.nifti import voxel_spacing

SUMMARY_KEYS = (
    "dice",
    "iou",
    "sensitivity",
    "precision",
    "hd95",
    "asd",
    "surface_dice",
    "pred_volume_ml",
    "true_volume_ml",
)


def _mean_of(values: list) -> Optional[float]:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def score(
    spec: labels.LabelSpec,
    pred: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    tolerance_mm: float = 1.0,
    surface_metrics: str = "standard",
) -> dict[str, Any]:
    """Metrics of two label maps (X, Y, Z) in label values with voxel `spacing` (mm) per axis;
    `surface_metrics` picks the definition of HD95, ASD and surface Dice (surface.case_metrics)."""
    per_channel = {
        name: surface.case_metrics(p, t, spacing, tolerance_mm, surface_metrics)
        for name, p, t in zip(spec.names, spec.value_masks(pred), spec.value_masks(target))
    }
    if spec.num_channels == 1:
        return dict(per_channel[spec.names[0]])
    row = {k: _mean_of([c[k] for c in per_channel.values()]) for k in SUMMARY_KEYS}
    row["regions" if spec.mode == "brats_regions" else "classes"] = per_channel
    return row


def mean_over_cases(rows: list[dict]) -> dict:
    """Mean over cases of every metric, nested dicts included; None values are skipped."""
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = mean_over_cases([r[key] for r in rows])
        else:
            out[key] = _mean_of([r.get(key) for r in rows])
    return out


def canonical_view(case: PreparedCase, grid_array: np.ndarray) -> tuple[np.ndarray, tuple]:
    """A grid array cut to the case's RAS volume (padded cases), and the voxel spacing (mm) to show it.

    Resampled cases stay on the grid, whose spacing is the original spacing times shape / grid.
    """
    array = np.asarray(grid_array)
    if case.resampled:
        spacing = tuple(s * n / g for s, n, g in zip(case.spacing, case.shape, array.shape[:3]))
        return array, spacing
    crop = tuple(slice(o, o + n) for o, n in zip(case.offsets, case.shape))
    return array[crop], tuple(case.spacing)


def write_case_files(
    out_dir: pathlib.Path,
    case: PreparedCase,
    grid_pred: np.ndarray,
    pred_file: np.ndarray,
    target_file: Optional[np.ndarray],
    meshes: bool,
    pictures: bool,
    field_mesh: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> None:
    """Meshes (PLY + OBJ, world mm) of prediction and label foreground, and slice/mesh PNGs of a case.

    pred_file / target_file: label maps in the input file's geometry (meshes use its affine);
    grid_pred: the prediction on the RAS grid (pictures show the RAS image: axial, coronal, sagittal).
    field_mesh: the prediction's surface from the occupancy field (OSS-Net, eval.mesh_source
    'field'): then the prediction mesh and its PNG, the binary mask's mesh being kept as
    <id>_prediction_mask.{ply,obj} for comparison.
    """
    mesh = mask = None
    if meshes or pictures:
        pred_fg = pred_file > 0
        mask = outputs.mask_mesh(pred_fg, case.affine) if pred_fg.any() else None
        mesh = mask if field_mesh is None else field_mesh
    if meshes:
        pairs = [("prediction", mesh)]
        if field_mesh is not None:
            pairs.append(("prediction_mask", mask))
        if target_file is not None and (target_file > 0).any():
            pairs.append(("label", outputs.mask_mesh(target_file > 0, case.affine)))
        for kind, pair in pairs:
            if pair is None:
                continue
            outputs.write_ply(out_dir / "meshes" / f"{case.id}_{kind}.ply", *pair)
            outputs.write_obj(out_dir / "meshes" / f"{case.id}_{kind}.obj", *pair)
    if pictures:
        image, spacing = canonical_view(case, np.asarray(case.image)[..., 0])
        pred, _ = canonical_view(case, grid_pred > 0)
        target = None
        if case.target is not None:
            target = canonical_view(case, np.asarray(case.target) > 0)[0]
        outputs.slices_png(
            out_dir / "pictures" / f"{case.id}_slices.png",
            image,
            pred,
            target,
            spacing,
            f"{case.id}: prediction (yellow), label (green)",
        )
        if mesh is not None:
            outputs.mesh_png(
                out_dir / "pictures" / f"{case.id}_mesh.png", *mesh, f"{case.id}: predicted surface"
            )


def file_spacing(case: PreparedCase) -> tuple[float, float, float]:
    """Voxel size (mm) along the axes of the input file."""
    return voxel_spacing(case.affine)
