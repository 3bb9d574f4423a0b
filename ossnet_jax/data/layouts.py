"""Discovery of cases in the BraTS 2020 folder layout.

A BraTS 2020 dataset is a folder (``MICCAI_BraTS2020_TrainingData`` or the
validation counterpart) of case folders ``BraTS20_<split>_<nnn>``, each holding
``<case>_{flair,t1,t1ce,t2}.nii[.gz]`` and, for training data, the label
``<case>_seg.nii[.gz]``. Only paths are resolved here; no voxel is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ossnet_jax.data.nifti import DataError
from ossnet_jax.data.synthetic import DATASET_DIR, MODALITIES

CASE_PREFIX = "BraTS20_"
_EXTENSIONS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One subject.

    Attributes:
        id: case folder name, e.g. ``"BraTS20_Training_001"``.
        image_paths: one NIfTI file per modality, in :data:`MODALITIES` order
            (flair, t1, t1ce, t2); each volume is ``(X, Y, Z)``.
        label_path: segmentation NIfTI (labels 0, 1, 2, 4), or None when the
            case has no label (validation data).
    """

    id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None


def _is_nifti(path: Path) -> bool:
    """True if ``path`` is a file named ``*.nii`` or ``*.nii.gz`` (any case)."""
    return path.is_file() and path.name.lower().endswith(_EXTENSIONS)


def _first_existing(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists first, else None."""
    for ext in _EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _case_dirs(folder: Path) -> list[Path]:
    """Subfolders of ``folder`` named ``BraTS20_*``, sorted by name."""
    cases = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CASE_PREFIX)]
    return sorted(cases, key=lambda p: p.name)


def _find_label(folder: Path, case_id: str) -> Path | None:
    """Label file of one case folder; see :func:`find_brats_cases` for the rules."""
    label = _first_existing(folder, f"{case_id}_seg")
    if label is not None:
        return label
    matches = sorted(p for p in folder.iterdir() if _is_nifti(p) and "seg" in p.name.lower())
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{folder}: several candidate segmentation files ({names}); expected one")
    return matches[0] if matches else None


def _load_case(folder: Path) -> Case:
    """Resolve the modality and label files of one case folder."""
    case_id = folder.name
    images = []
    for mod in MODALITIES:
        path = _first_existing(folder, f"{case_id}_{mod}")
        if path is None:
            raise DataError(
                f"{folder}: missing modality '{mod}' (expected {case_id}_{mod}.nii.gz or .nii)"
            )
        images.append(path)
    return Case(id=case_id, image_paths=tuple(images), label_path=_find_label(folder, case_id))


def find_brats_cases(root: str | os.PathLike[str]) -> list[Case]:
    """List the cases of a BraTS 2020-style dataset.

    Args:
        root: a folder holding ``BraTS20_*`` case folders (e.g.
            ``MICCAI_BraTS2020_TrainingData`` itself, or a validation folder),
            or a parent folder containing ``MICCAI_BraTS2020_TrainingData``.

    Returns:
        Cases sorted by folder name. Images are ``<id>_<mod>.nii.gz`` or
        ``.nii``; the label is ``<id>_seg.nii(.gz)`` or else the single file
        whose name contains ``seg`` (any case, e.g. BraTS 2020 case 355's
        ``W39_1998.09.19_Segm.nii``), or None when there is none.

    Raises:
        DataError: ``root`` is not a folder or holds no case folders, a case
            lacks a modality file, or a case has several candidate labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    folders = _case_dirs(root)
    if not folders and (root / DATASET_DIR).is_dir():
        folders = _case_dirs(root / DATASET_DIR)
    if not folders:
        raise DataError(f"{root}: no {CASE_PREFIX}* case folders here or in {root / DATASET_DIR}")
    return [_load_case(folder) for folder in folders]
