"""Tiny real datasets on disk in the LiTS and MSD layouts, in non-canonical orientations, for tests.

Volumes come from the synthetic BraTS-like generator (labels 0/1/2/4) in RAS voxel order and are
written in a chosen orientation with an anisotropic spacing, so reading them back must reorient.
"""

import json
import pathlib

import nibabel as nib
import numpy as np

from ossnet_jax.data import synthetic
from ossnet_jax.data.nifti import save_nifti

SHAPE = (28, 28, 16)  # RAS voxel order


def oriented(ras: np.ndarray, codes: str, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """(array in the voxel order of axis `codes`, e.g. 'PIR', and its affine) of a RAS-ordered array."""
    ornt = nib.orientations.axcodes2ornt(codes)
    to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    array = nib.orientations.apply_orientation(ras, to_file)
    affine = np.diag([*spacing, 1.0]) @ np.linalg.inv(
        nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    )
    affine[:3, 3] += (10.0, -20.0, 5.0)
    return np.ascontiguousarray(array), affine


def _case(seed: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.generate_case(seed, i, SHAPE)


def write_lits(root: pathlib.Path, cases: int = 4, codes: str = "LPS") -> pathlib.Path:
    """volume-N.nii (int16 HU) / segmentation-N.nii (0 background, 1 liver, 2 tumour) over two batches."""
    for i in range(cases):
        image, label = _case(11, i)
        hu = np.round(image[..., 0] * 150.0 - 300.0).astype(np.int16)
        seg = np.where(label > 0, 1, 0).astype(np.uint8)
        seg[label == 4] = 2
        folder = root / f"Training Batch {1 + i % 2}"
        data, affine = oriented(hu, codes, (0.8, 0.8, 2.0))
        save_nifti(folder / f"volume-{i}.nii", data, affine)
        save_nifti(
            folder / f"segmentation-{i}.nii", oriented(seg, codes, (0.8, 0.8, 2.0))[0], affine
        )
    return root


def write_msd(
    root: pathlib.Path, four_d: bool, cases: int = 4, codes: str = "PIR", test_cases: int = 1
) -> pathlib.Path:
    """An MSD task: 4D 4-channel brain tumour (labels 0-3) or 3D 1-channel liver (labels 0-2)."""
    name = "Task01_BrainTumour" if four_d else "Task03_Liver"
    task = root / name
    training, test = [], []
    for i in range(cases + test_cases):
        image, label = _case(12 if four_d else 13, i)
        if four_d:
            data = image
            seg = np.zeros(label.shape, np.uint8)  # MSD: 1 oedema, 2 non-enhancing, 3 enhancing
            seg[label == 2], seg[label == 1], seg[label == 4] = 1, 2, 3
        else:
            data = image[..., 0]
            seg = np.where(label > 0, 1, 0).astype(np.uint8)
            seg[label == 4] = 2
        stem = f"{'BRATS' if four_d else 'liver'}_{i:03d}"
        file_data, affine = oriented(data, codes, (1.0, 1.2, 1.5))
        if i < cases:
            save_nifti(task / "imagesTr" / f"{stem}.nii.gz", file_data, affine)
            save_nifti(task / "labelsTr" / f"{stem}.nii.gz", oriented(seg, codes)[0], affine)
            training.append(
                {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"}
            )
        else:
            save_nifti(task / "imagesTs" / f"{stem}.nii.gz", file_data, affine)
            test.append(f"./imagesTs/{stem}.nii.gz")
    meta = {
        "name": name,
        "modality": (
            {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"} if four_d else {"0": "CT"}
        ),
        "labels": (
            {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
            if four_d
            else {"0": "background", "1": "liver", "2": "cancer"}
        ),
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task
