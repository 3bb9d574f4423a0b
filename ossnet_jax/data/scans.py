"""New scans to predict, without labels: what `evaluate.py --input PATH` finds at PATH.

PATH is one of:
* an image file (``.nii`` / ``.nii.gz``): one scan holding every channel (3D: one channel; 4D:
  channels on the 4th axis, as MSD images);
* a case folder, holding image files directly: one scan. In the BraTS layout (one file per
  modality: the 'brats' format and the synthetic tumours) its channels are the files named
  ``*_flair``, ``*_t1``, ``*_t1ce``, ``*_t2`` (in that order, any prefix); in the others it holds one
  image file;
* a folder of these: every image file directly in it (formats with one file per case), or every
  subfolder holding image files, each a case folder.

Files with "seg" in their name are labels and are skipped, hidden files too. A scan's id is its file
name without the NIfTI extension, or its case folder's name. Only paths are read here.
"""

from __future__ import annotations

import os
from pathlib import Path

from ossnet_jax.data.layouts import Case
from ossnet_jax.data.nifti import DataError
from ossnet_jax.data.synthetic import MODALITIES

ONE_FILE_PER_MODALITY = ("brats",)  # layouts (dataset.layout_format) whose channels are files
_EXTENSIONS = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    """The file name without its .nii / .nii.gz extension (any case)."""
    name = path.name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _images(folder: Path) -> list[Path]:
    """NIfTI files directly in `folder` that are not labels or hidden, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.name.lower().endswith(_EXTENSIONS)
        and "seg" not in p.name.lower()
        and not p.name.startswith(".")
    )


def _case_folder(folder: Path, modalities: tuple[str, ...]) -> Case:
    """One scan from a folder of image files: a file per modality, or its one image file."""
    files = _images(folder)
    if not modalities:
        if len(files) != 1:
            names = ", ".join(p.name for p in files)
            raise DataError(
                f"{folder}: a case folder holds one image file here, found {len(files)} ({names}); "
                "give the files themselves or a folder of them"
            )
        return Case(folder.name, (files[0],), None)
    paths = []
    for modality in modalities:
        matches = [p for p in files if _stem(p).lower().endswith(f"_{modality}")]
        if len(matches) != 1:
            found = "none" if not matches else ", ".join(p.name for p in matches)
            raise DataError(
                f"{folder}: needs one image file named *_{modality}.nii.gz (or .nii) for modality "
                f"'{modality}', found {found}"
            )
        paths.append(matches[0])
    return Case(folder.name, tuple(paths), None)


def find_scans(path: str | os.PathLike[str], fmt: str) -> list[Case]:
    """The scans at `path` (see the module docstring) in the layout `fmt` of the model's data
    (dataset.layout_format: 'brats', 'lits' or 'msd').

    Returns:
        Cases without labels, sorted by id; each ``image_paths`` holds one file per modality
        (BraTS layout) or the one image file.

    Raises:
        DataError: `path` does not exist or holds no image, a case folder lacks a modality (or holds
            several images where one is expected), or two scans share an id (e.g. ``a.nii`` and
            ``a.nii.gz``); each message names the path.
    """
    path = Path(path)
    modalities = MODALITIES if fmt in ONE_FILE_PER_MODALITY else ()
    if path.is_file():
        if not path.name.lower().endswith(_EXTENSIONS):
            raise DataError(f"{path}: not a NIfTI image (.nii or .nii.gz)")
        return [Case(_stem(path), (path,), None)]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = _images(path)
    if files and modalities:
        scans = [_case_folder(path, modalities)]
    elif files:
        scans = [Case(_stem(p), (p,), None) for p in files]
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        scans = [_case_folder(p, modalities) for p in folders if _images(p)]
    if not scans:
        raise DataError(f"{path}: no NIfTI images (.nii or .nii.gz) here or in its subfolders")
    ids = [scan.id for scan in scans]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"{path}: several scans would be named {', '.join(repeated)}")
    return sorted(scans, key=lambda scan: scan.id)
