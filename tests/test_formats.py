"""BraTS, LiTS and MSD layouts: discovery, reorientation round trips, resampling, split files, and a
few training steps plus dense evaluation on each layout with predictions in the input geometry."""

import json
import re
import shutil
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from ossnet_jax import evaluation, training
from ossnet_jax.data import check, dataset, labels, layouts, nifti
from tests.conftest import tiny_config
from tests.dataset_writers import oriented, write_lits, write_msd


def lits_config(root):
    config = tiny_config(root)
    config.data.format = "lits"
    config.data.num_channels = 0  # from the data: LiTS is one CT channel
    config.data.labels = (0, 1, 2)
    config.data.label_names = ("background", "liver", "tumour")
    config.data.clip_range = (-200.0, 250.0)
    config.data.normalize = "all"
    config.data.resample = True
    config.data.val_fraction = 0.25
    return config


def msd_config(task):
    config = tiny_config(task)
    config.data.format = "msd"
    config.data.grid_shape = "auto"  # planned from the cases
    config.data.val_fraction = 0.25
    return config


@pytest.fixture(scope="module")
def lits_root(tmp_path_factory):
    return write_lits(tmp_path_factory.mktemp("lits"))


@pytest.fixture(scope="module")
def msd4d_root(tmp_path_factory):
    return write_msd(tmp_path_factory.mktemp("msd4d"), four_d=True)


@pytest.fixture(scope="module")
def msd3d_root(tmp_path_factory):
    return write_msd(tmp_path_factory.mktemp("msd3d"), four_d=False, codes="LAS")


def test_lits_discovery_pairs_volumes_across_batches_and_ignores_hidden_files(lits_root, tmp_path):
    (lits_root / "Training Batch 1" / "._volume-9.nii").write_bytes(b"resource fork")
    cases = layouts.find_lits_cases(lits_root)
    assert [c.id for c in cases] == ["lits-0", "lits-1", "lits-2", "lits-3"]
    for c in cases:
        number = c.id.split("-")[1]
        assert c.image_paths[0].name == f"volume-{number}.nii"
        assert c.label_path.name == f"segmentation-{number}.nii"
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "segmentation-3.nii").write_bytes(b"")
    (orphan / "volume-1.nii").write_bytes(b"")
    with pytest.raises(nifti.DataError, match="segmentation-3.nii: segmentation without volume-3"):
        layouts.find_lits_cases(orphan)


def test_msd_task_is_read_from_dataset_json(msd4d_root):
    task = layouts.read_msd_task(msd4d_root.parent)  # the parent of one Task folder works too
    assert task.modalities == ("FLAIR", "T1w", "t1gd", "T2w") and task.labels == (0, 1, 2, 3)
    assert [c.id for c in task.training] == [f"BRATS_{i:03d}" for i in range(4)]
    assert [c.id for c in task.test] == ["BRATS_004"] and task.test[0].label_path is None
    config = dataset.resolve_data_config(msd_config(msd4d_root))
    assert config.data.num_channels == 4 and tuple(config.data.labels) == (0, 1, 2, 3)
    config.data.subset = "test"
    assert [c.id for c in dataset.find_cases(config)] == ["BRATS_004"]


def test_non_canonical_label_round_trips_to_the_file_exactly(msd4d_root):
    config = dataset.resolve_data_config(msd_config(msd4d_root))
    train, val = dataset.load_split(config)
    for case in train + val:
        path = msd4d_root / "labelsTr" / f"{case.id}.nii.gz"
        label, affine = nifti.load_nifti(path)
        assert nib.aff2axcodes(affine) == ("P", "I", "R") and case.file_shape == label.shape
        np.testing.assert_array_equal(case.affine, affine)
        np.testing.assert_array_equal(case.to_file_geometry(case.target), label)  # indices = values
        np.testing.assert_allclose(case.spacing, (1.0, 1.2, 1.5))
        # the cached grid is RAS: voxel (i, j, k) of the grid is world point A (i - offsets) + t
        ras_affine = nib.as_closest_canonical(nib.load(path)).affine
        ijk = np.argwhere(label == 3)[0]
        world = affine @ np.r_[ijk, 1.0]
        grid_index = np.round(np.linalg.inv(ras_affine) @ world)[:3].astype(int) + case.offsets
        assert case.target[tuple(grid_index)] == 3


def test_lits_is_clipped_resampled_and_mapped_back(lits_root):
    config = dataset.resolve_data_config(lits_config(lits_root))
    train, val = dataset.load_split(config)
    case = train[0]
    assert case.resampled and case.image.shape == (32, 32, 16, 1) and case.offsets == (0, 0, 0)
    image = np.asarray(case.image)  # z-scored over all voxels before resampling
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1) < 0.1
    assert np.mean(image == image.min()) > 0.3  # air at -300 HU clipped to the -200 plateau
    label, _ = nifti.load_nifti(lits_root / "Training Batch 1" / "segmentation-0.nii")
    np.testing.assert_array_equal(case.target_in_file_geometry(), label)
    back = case.to_file_geometry(case.target)
    assert back.shape == label.shape and np.mean(back == label) > 0.97


def test_split_file_reproduces_a_given_split(msd3d_root, tmp_path):
    config = msd_config(msd3d_root)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["liver_000", "liver_002"], "val": ["liver_003"]}))
    config.data.split_file = str(split)
    train, val = dataset.load_split(dataset.resolve_data_config(config))
    assert [c.id for c in train] == ["liver_000", "liver_002"] and [c.id for c in val] == [
        "liver_003"
    ]
    split.write_text(json.dumps({"train": ["liver_000", "nobody"], "val": ["liver_000"]}))
    with pytest.raises(nifti.DataError, match="split.json: case ids not in the dataset: nobody"):
        dataset.load_split(dataset.resolve_data_config(config))


def test_check_reports_cases_and_every_problem(msd3d_root, tmp_path):
    reports, problems = check.check_dataset(msd_config(msd3d_root))
    assert problems == [] and len(reports) == 4
    assert reports[0].orientation == "LAS" and reports[0].label_values == (0, 1, 2)
    assert reports[0].spacing == pytest.approx((1.0, 1.2, 1.5)) and 0 < reports[0].foreground < 0.2
    bad = tmp_path / "Task03_Liver"
    shutil.copytree(msd3d_root, bad)
    (bad / "imagesTr" / "liver_001.nii.gz").write_bytes(b"\x1f\x8b truncated")
    label, affine = nifti.load_nifti(bad / "labelsTr" / "liver_002.nii.gz")
    label[0, 0, 0] = 7
    nifti.save_nifti(bad / "labelsTr" / "liver_002.nii.gz", label, affine)
    reports, problems = check.check_dataset(msd_config(bad))
    assert len(problems) == 2
    assert "liver_001.nii.gz" in problems[0] and "liver_002.nii.gz: label values [7]" in problems[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ossnet_jax.data.check",
            "--config",
            "configs/demo.py",
            f"--config.data.root={bad}",
            "--config.data.format=msd",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "4 cases, 2 with labels, 2 problems" in result.stdout
    assert "PROBLEM: " in result.stdout and "liver_001.nii.gz" in result.stdout


def _label_file(root, case_id):
    if case_id.startswith("lits-"):
        return next(root.rglob(f"segmentation-{case_id[5:]}.nii"))
    return root / "labelsTr" / f"{case_id}.nii.gz"


LAYOUTS = {
    "lits-multiclass": ("lits_root", lits_config, "multiclass", None, "classes"),
    "msd4d-regions": (
        "msd4d_root",
        msd_config,
        "brats_regions",
        ((1, 2, 3), (2, 3), (3,)),
        "regions",
    ),
    "msd3d-binary": ("msd3d_root", msd_config, "binary", None, None),
}


def _assert_disagreement_with_dense(workdir, row):
    """The octree prediction of a case and its reported disagreement, redone here against evaluating
    every voxel: the octree evaluates fewer locations, and the fraction is theirs."""
    config = evaluation.load_config(workdir)
    predictor, _ = evaluation.restore_predictor(config, workdir)
    _, val = dataset.load_split(config)
    image = np.asarray(next(c for c in val if c.id == row["id"]).image)
    dense_ev = ml_collections.ConfigDict(config.eval.to_dict())
    dense_ev.strategy = "dense"
    dense, every = predictor.predict(image, dense_ev)
    octree, evaluated = predictor.predict(image)
    assert evaluated == row["decoder_points"] < every == dense.size
    assert row["disagreement"] == pytest.approx(float(np.mean(dense != octree)), abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_and_evaluate_on_each_layout(name, request, tmp_path, capsys):
    root_fixture, make_config, mode, regions, key = LAYOUTS[name]
    root = request.getfixturevalue(root_fixture)
    config = make_config(root)
    config.data.label_mode = mode
    if regions:
        config.data.region_labels = regions
    config.train.steps = 2
    config.model.activation = "relu"  # compiles faster; the layouts are what is tested
    config.model.encoder_channels = (4,)
    config.model.decoder_blocks = 1
    if mode == "binary":  # also: the octree strategy, checked against dense evaluation
        config.eval.strategy = "octree"
        config.eval.compare_dense = True
    result = training.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    # what was planned is stored for evaluation: the cases' 28x28x16 on multiples of 2 x 2^1
    assert (saved["grid_shape"], saved["num_channels"]) == (
        [32, 32, 16] if config.data.format == "lits" else [28, 28, 16],
        1 if name != "msd4d-regions" else 4,
    )
    printed = capsys.readouterr().out
    if config.data.format == "lits":
        assert "planned from the data: data.num_channels -> 1" in printed
    else:
        assert "data.grid_shape 'auto' -> (28, 28, 16)" in printed
    memory = re.search(r"training step: ([\d,]+) MiB of device memory per device", printed)
    assert memory and 0 < int(memory.group(1).replace(",", "")) < 1024, printed
    spec = labels.label_spec(dataset.resolve_data_config(config).data)
    assert result["cases"] and "mean" in result
    for row in result["cases"]:
        assert 0.0 <= row["dice"] <= 1.0 and row["decoder_points"] > 0
        if key:
            assert set(row[key]) == set(spec.names)
        image_file = next(
            p
            for p in root.rglob("*.nii*")
            if p.name.startswith(row["id"].replace("lits-", "volume-"))
            and "label" not in str(p.parent)
        )
        source = nib.load(image_file)
        pred = nib.load(tmp_path / "run" / "eval" / "predictions" / f"{row['id']}.nii.gz")
        assert pred.shape == source.shape[:3]
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(
            (0, 1) if mode == "binary" else spec.values
        )
        if mode == "binary" and row is result["cases"][0]:
            _assert_disagreement_with_dense(tmp_path / "run", row)
        eval_dir = tmp_path / "run" / "eval"
        assert (eval_dir / "pictures" / f"{row['id']}_slices.png").stat().st_size > 1000
        vertices = np.loadtxt(
            eval_dir / "meshes" / f"{row['id']}_label.obj", usecols=(1, 2, 3), comments=("f", "#")
        )
        label_voxels = np.argwhere(np.asarray(nib.load(_label_file(root, row["id"])).dataobj) > 0)
        world = nib.affines.apply_affine(source.affine, label_voxels)
        np.testing.assert_allclose(vertices.mean(0), world.mean(0), atol=2.0)  # mm, same place
        if row["dice"] > 0:  # both masks hold voxels: every surface distance is defined
            assert row["hd95"] is not None and row["asd"] is not None and row["hd95"] >= 0.0
    if key:
        assert set(result["mean"][key]) == set(spec.names)
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["mean"] == result["mean"]
    csv_rows = (tmp_path / "run" / "eval" / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(result["cases"]) and "hd95" in csv_rows[0]
    if config.data.format == "msd":  # unlabelled imagesTs: predictions only, no metrics
        trained = evaluation.load_config(tmp_path / "run")
        other, cases = evaluation.dataset_cases(trained, str(root), subset="test")
        out = tmp_path / "run" / "eval" / "test"
        unlabelled = evaluation.evaluate(other, tmp_path / "run", cases, out)
        assert "mean" not in unlabelled and [r["id"] for r in unlabelled["cases"]] == [cases[0].id]
        assert "dice" not in unlabelled["cases"][0]
        source = nib.load(root / "imagesTs" / f"{cases[0].id}.nii.gz")
        pred = nib.load(out / "predictions" / f"{cases[0].id}.nii.gz")
        assert pred.shape == source.shape[:3]
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)


def test_label_written_non_canonically_overlays_in_world_space(tmp_path):
    ras = np.zeros((6, 7, 5), np.uint8)
    ras[1:3, 2:5, 1:4] = 1
    data, affine = oriented(ras, "SLA", (0.5, 1.0, 2.0))
    nifti.save_nifti(tmp_path / "x.nii.gz", data, affine)
    canonical = nib.as_closest_canonical(nib.load(tmp_path / "x.nii.gz"))
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), ras)
