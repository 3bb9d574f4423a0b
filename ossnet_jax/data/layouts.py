"""Discovery of cases in the BraTS 2020, LiTS and Medical Segmentation Decathlon layouts.

* BraTS 2020: a folder (``MICCAI_BraTS2020_TrainingData`` or the validation
  counterpart) of case folders ``BraTS20_<split>_<nnn>``, each holding
  ``<case>_{flair,t1,t1ce,t2}.nii[.gz]`` and, for training data, the label
  ``<case>_seg.nii[.gz]``.
* LiTS: ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` anywhere below
  the root (the release splits them over ``Training Batch 1`` and ``2``).
* MSD: ``TaskXX_Name/dataset.json`` listing ``imagesTr``/``labelsTr`` pairs
  and ``imagesTs`` images; an image is 3D (one channel) or 4D (channels last,
  e.g. Task01_BrainTumour's four modalities in one file).

Only paths (and dataset.json) are read here; no voxel is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ossnet_jax.data.nifti import DataError
from ossnet_jax.data.synthetic import DATASET_DIR, MODALITIES
from ossnet_jax.errors import ConfigError

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

    For LiTS ``image_paths`` is the one CT volume; for MSD it is the one 3D or
    4D image file (channels along its 4th axis).
    """

    id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None


@dataclass(frozen=True)
class MsdTask:
    """What an MSD ``dataset.json`` declares.

    Attributes:
        root: the task folder.
        modalities: channel names in channel order, e.g. ``("FLAIR", "T1w", "t1gd", "T2w")``.
        labels: label values, background first, e.g. ``(0, 1, 2, 3)``.
        label_names: one name per label value.
        training: labelled cases (``imagesTr`` / ``labelsTr``).
        test: unlabelled cases (``imagesTs``).
    """

    root: Path
    modalities: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)


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


_LITS_NAME = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def find_lits_cases(root: str | os.PathLike[str]) -> list[Case]:
    """List the cases of a LiTS-style dataset.

    Args:
        root: a folder with ``volume-N.nii[.gz]`` files and their
            ``segmentation-N.nii[.gz]`` labels, at any depth (hidden files
            such as macOS ``._volume-0.nii`` are ignored).

    Returns:
        Cases ``lits-N`` sorted by N; a volume without segmentation has
        ``label_path`` None (test data).

    Raises:
        DataError: ``root`` is missing or holds no volume, a number appears
            twice, or a segmentation has no volume.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in sorted(root.rglob("*")):
        match = _LITS_NAME.match(path.name)
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if not match or hidden or not path.is_file():
            continue
        kind, number = match.group(1).lower(), int(match.group(2))
        if number in found[kind]:
            raise DataError(f"{path}: {kind} {number} also at {found[kind][number]}")
        found[kind][number] = path
    if not found["volume"]:
        raise DataError(f"{root}: no volume-N.nii or volume-N.nii.gz files below this folder")
    orphans = sorted(set(found["segmentation"]) - set(found["volume"]))
    if orphans:
        raise DataError(
            f"{found['segmentation'][orphans[0]]}: segmentation without volume-{orphans[0]}"
        )
    return [
        Case(f"lits-{n}", (path,), found["segmentation"].get(n))
        for n, path in sorted(found["volume"].items())
    ]


def _msd_root(root: Path) -> Path:
    """The task folder: ``root`` if it holds dataset.json, else its only Task* subfolder that does."""
    if (root / "dataset.json").is_file():
        return root
    tasks = sorted(p for p in root.glob("Task*") if (p / "dataset.json").is_file())
    if len(tasks) == 1:
        return tasks[0]
    if not tasks:
        raise DataError(f"{root}: no dataset.json here or in a Task* subfolder")
    raise DataError(f"{root}: several MSD tasks ({', '.join(p.name for p in tasks)}); point at one")


def _msd_case(task: Path, image: str, label: str | None, dataset_json: Path) -> Case:
    image_path = (task / image).resolve()
    if not _is_nifti(image_path):
        raise DataError(f"{dataset_json}: lists {image}, but {image_path} is not a NIfTI file")
    label_path = None
    if label is not None:
        label_path = (task / label).resolve()
        if not _is_nifti(label_path):
            raise DataError(f"{dataset_json}: lists {label}, but {label_path} is not a NIfTI file")
    name = image_path.name
    case_id = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return Case(case_id, (image_path,), label_path)


def read_msd_task(root: str | os.PathLike[str]) -> MsdTask:
    """Reads an MSD task's dataset.json and resolves its training and test cases.

    Args:
        root: ``TaskXX_Name`` (holding ``dataset.json``, ``imagesTr``,
            ``labelsTr``, ``imagesTs``) or a folder holding exactly one such task.

    Raises:
        DataError: no or unreadable dataset.json, missing keys, or a listed
            file that does not exist (every message names the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    task = _msd_root(root)
    path = task / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        modalities = tuple(meta["modality"][k] for k in sorted(meta["modality"], key=int))
        label_items = sorted(((int(k), v) for k, v in meta["labels"].items()))
        training = meta.get("training", [])
        test = meta.get("test", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"{path}: not a valid MSD dataset.json ({type(err).__name__}: {err})"
        ) from err
    cases = [_msd_case(task, e["image"], e.get("label"), path) for e in training]
    tests = [_msd_case(task, e if isinstance(e, str) else e["image"], None, path) for e in test]
    return MsdTask(
        root=task,
        modalities=modalities,
        labels=tuple(v for v, _ in label_items),
        label_names=tuple(n for _, n in label_items),
        training=sorted(cases, key=lambda c: c.id),
        test=sorted(tests, key=lambda c: c.id),
    )


def find_cases(fmt: str, root: str | os.PathLike[str], subset: str = "training") -> list[Case]:
    """Cases of a dataset of format 'brats' | 'lits' | 'msd' (subset 'training' or 'test' for MSD)."""
    if fmt == "brats":
        return find_brats_cases(root)
    if fmt == "lits":
        return find_lits_cases(root)
    if fmt == "msd":
        if subset not in ("training", "test"):
            raise ConfigError(f"data.subset must be 'training' or 'test', got {subset!r}")
        task = read_msd_task(root)
        cases = task.training if subset == "training" else task.test
        if not cases:
            raise DataError(f"{task.root / 'dataset.json'}: lists no {subset} cases")
        return cases
    raise ConfigError(f"data.format must be 'synthetic', 'brats', 'lits' or 'msd', got {fmt!r}")
