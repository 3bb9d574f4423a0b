"""What `evaluate.py --input PATH` finds at PATH (ossnet_jax/data/scans.py); paths only, no voxels."""

import pytest

from ossnet_jax.data import nifti, scans
from ossnet_jax.data.synthetic import MODALITIES


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def brats_case(folder, case_id, modalities=MODALITIES, label=True):
    """A BraTS case folder with empty files named like the release's (t1 before t1ce by name)."""
    for modality in modalities:
        touch(folder / case_id / f"{case_id}_{modality}.nii.gz")
    if label:
        touch(folder / case_id / f"{case_id}_seg.nii.gz")
    return folder / case_id


def test_a_case_folder_gives_one_scan_with_the_modalities_in_training_order(tmp_path):
    folder = brats_case(tmp_path, "Patient_7")
    touch(folder / "notes.txt")
    (scan,) = scans.find_scans(folder, "brats")
    assert scan.id == "Patient_7" and scan.label_path is None
    assert [p.name for p in scan.image_paths] == [f"Patient_7_{m}.nii.gz" for m in MODALITIES]


def test_a_folder_of_case_folders_gives_every_case_sorted(tmp_path):
    for case_id in ("b", "a"):
        brats_case(tmp_path, case_id, label=False)
    (tmp_path / "empty").mkdir()
    found = scans.find_scans(tmp_path, "brats")
    assert [s.id for s in found] == ["a", "b"]
    assert all(len(s.image_paths) == len(MODALITIES) for s in found)


def test_a_case_folder_missing_a_modality_is_named(tmp_path):
    folder = brats_case(tmp_path, "case", modalities=("flair", "t1", "t2"))
    with pytest.raises(nifti.DataError, match=f"{folder}: needs one image file named \\*_t1ce"):
        scans.find_scans(tmp_path, "brats")


def test_one_file_formats_take_files_and_folders_of_files(tmp_path):
    single = touch(tmp_path / "one" / "liver_003.nii.gz")
    assert [(s.id, s.image_paths) for s in scans.find_scans(single, "msd")] == [
        ("liver_003", (single,))
    ]
    for name in ("volume-2.nii", "volume-1.nii.gz", "segmentation-1.nii", ".hidden.nii"):
        touch(tmp_path / "lits" / name)
    assert [s.id for s in scans.find_scans(tmp_path / "lits", "lits")] == ["volume-1", "volume-2"]
    touch(tmp_path / "cases" / "p1" / "ct.nii.gz")
    touch(tmp_path / "cases" / "p2" / "ct.nii")
    found = scans.find_scans(tmp_path / "cases", "lits")
    assert [(s.id, s.image_paths[0].name) for s in found] == [("p1", "ct.nii.gz"), ("p2", "ct.nii")]


def test_a_4d_file_is_one_scan_for_a_brats_model_too(tmp_path):
    image = touch(tmp_path / "BRATS_001.nii.gz")
    (scan,) = scans.find_scans(image, "brats")
    assert scan.image_paths == (image,)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no such file or folder"),
        ({"x.txt": ""}, "not a NIfTI image"),
        ({"d/readme.txt": ""}, "no NIfTI images"),
        ({"d/a.nii": "", "d/a.nii.gz": ""}, "several scans would be named a"),
        ({"d/p/ct.nii": "", "d/p/pet.nii": ""}, "holds one image file here, found 2"),
    ],
)
def test_bad_inputs_name_the_path(tmp_path, layout, message):
    for name in layout:
        touch(tmp_path / name)
    target = tmp_path / ("x.txt" if "x.txt" in layout else "d")
    with pytest.raises(nifti.DataError, match=message) as info:
        scans.find_scans(target, "lits")
    assert str(tmp_path) in str(info.value)
