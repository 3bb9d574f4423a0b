"""Tests for the synthetic vessel generator (thin, branching targets), its MSD writer and its use as
data.synthetic_kind = 'vessels'."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from ossnet_jax.data import dataset, layouts, nifti, planning, scans, synthetic_vessels
from ossnet_jax.data.synthetic_vessels import (
    GENERATOR_VERSION,
    LABEL_NAMES,
    MODALITIES,
    TASK_DIR,
    generate_case,
    main,
    write_synthetic_vessels,
)
from ossnet_jax.errors import ConfigError
from tests.conftest import tiny_config

TINY = (24, 24, 16)
SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [generate_case(0, i, SHAPE) for i in range(3)]


def _skeleton_profile(label: np.ndarray) -> tuple[np.ndarray, int]:
    """(thickness at every skeleton voxel, number of branch-point voxels) of a binary label.

    Thickness is 2 edt - 1 voxels (edt: Euclidean distance to the nearest unlabelled voxel): 1 on a
    one-voxel line, 2k + 1 at the centre of a (2k + 1)-voxel-wide bar. A branch point is a skeleton
    voxel with at least three skeleton voxels among its 26 neighbours.
    """
    mask = label > 0
    skeleton = skeletonize(mask)
    thickness = 2.0 * ndimage.distance_transform_edt(mask)[skeleton] - 1.0
    counts = ndimage.convolve(
        skeleton.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant"
    )
    return thickness, int(np.sum(skeleton & (counts >= 4)))  # the voxel itself and >= 3 others


def _thin_tapering_tree(labels: list[np.ndarray]) -> bool:
    """Whether the labels' skeletons are mostly <= 3 voxels thick, partly thicker, and branch."""
    profiles = [_skeleton_profile(label) for label in labels]
    thickness = np.concatenate([t for t, _ in profiles])
    junctions = sum(j for _, j in profiles)
    return bool(
        thickness.size > 0
        and np.mean(thickness <= 3.0) >= 0.7
        and np.sum(thickness >= 3.4) >= 10
        and junctions >= 30
    )


def _regions(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of one case: head interior (> 4 voxels from its edge, clear of the bright fat rim),
    skeleton voxels at thick vessel centres and on 1-2 voxel wide vessels, the label's outer shell,
    and unlabelled voxels 3-5 voxels from the label (local background) or >= 3 away."""
    mask = label > 0
    inner = ndimage.distance_transform_edt(image > 0) > 4
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    skeleton = skeletonize(mask)
    return {
        "centre": skeleton & (inside >= 2),
        "thin": skeleton & (inside == 1) & inner,
        "shell": inner & (outside == 1),
        "ring": inner & (outside >= 3) & (outside <= 5),
        "far": inner & (outside >= 3),
    }


def _best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of ``values >= t`` against ``target`` over all thresholds ``t``."""
    hits = np.cumsum(target[np.argsort(-values, kind="stable")])
    return float(np.max(2.0 * hits / (np.arange(1, hits.size + 1) + target.sum())))


@pytest.mark.parametrize("index", range(4))
def test_shapes_dtypes_ranges_and_head(index: int) -> None:
    image, label = generate_case(1, index, TINY)
    assert image.shape == TINY and image.dtype == np.float32
    assert label.shape == TINY and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert np.all(np.isfinite(image)) and image.min() >= 0.0 and image.max() < 3000.0
    head = image > 0
    # the head is an ellipsoid with semi-axes 0.88 x (0.95..1.02) x the half sides: 0 beyond
    centre = (np.array(TINY) - 1.0) / 2.0
    grid = np.ogrid[tuple(slice(0, s) for s in TINY)]
    q = np.sqrt(sum(((g - c) / (0.88 * 1.02 * c)) ** 2 for g, c in zip(grid, centre)))
    assert not head[q >= 1.0].any()
    assert np.all(image[q >= 1.0] == 0.0)
    assert head[q < 0.9 * 0.95 / 1.02].all()
    assert np.all(head[label > 0])


def test_rejects_tiny_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, 0, (12, 24, 24))


def test_deterministic_by_seed_and_index() -> None:
    image_a, label_a = generate_case(3, 5, TINY)
    image_b, label_b = generate_case(3, 5, TINY)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    for other in (generate_case(3, 6, TINY), generate_case(4, 5, TINY)):
        assert not np.array_equal(image_a, other[0])
        assert not np.array_equal(label_a, other[1])


def test_label_is_thin_tapering_and_branching(cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for _, label in cases:
        thickness, junctions = _skeleton_profile(label)
        assert np.mean(thickness <= 3.0) >= 0.7, np.mean(thickness <= 3.0)  # mostly 1-3 voxels
        assert np.sum(thickness >= 3.4) >= 5  # thicker roots: the tree tapers
        assert junctions >= 10
        assert 0.003 < np.mean(label) < 0.1
    assert _thin_tapering_tree([label for _, label in cases])


def test_thickness_criteria_reject_blobs_and_uniform_tubes() -> None:
    grid = np.ogrid[:40, :40, :30]
    ball = sum((g - c) ** 2 for g, c in zip(grid, (20, 20, 15))) <= 8.0**2
    assert not _thin_tapering_tree([ball.astype(np.uint8)])
    tubes = np.zeros((40, 40, 30), np.uint8)
    tubes[5:35, 20, 15] = 1  # a 1-voxel cross of tubes: thin and branching, but never thicker
    tubes[20, 5:35, 15] = 1
    tubes[20, 20, 5:25] = 1
    assert not _thin_tapering_tree([tubes] * 3)


def test_partial_volume_gives_intermediate_intensities(
    cases: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    shell_ratios = []
    for image, label in cases:
        masks = _regions(image, label)
        background = np.median(image[masks["ring"]])
        contrast = np.median(image[masks["centre"]]) - background
        assert contrast > 0.0
        shell_ratios.append((image[masks["shell"]].mean() - background) / contrast)
        thin = (np.median(image[masks["thin"]]) - background) / contrast
        assert 0.3 < thin < 0.9, thin  # vessels thinner than a voxel look dimmer
    assert 0.08 < np.mean(shell_ratios) < 0.5, shell_ratios  # voxels next to vessels: in between


def test_unlabelled_confounders_defeat_a_threshold(
    cases: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    for image, label in cases:
        masks = _regions(image, label)
        bright = image[masks["far"]] >= np.median(image[masks["centre"]])
        assert np.sum(bright) >= 5  # unlabelled voxels as bright as thick vessel centres
        assert _best_threshold_dice(image.ravel(), label.ravel() > 0) < 0.95


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_msd_round_trip_and_idempotence(tmp_path: Path) -> None:
    folder = write_synthetic_vessels(tmp_path / "data", 2, 7, TINY)
    assert folder == tmp_path / "data" / TASK_DIR
    assert [p.name for p in (tmp_path / "data").iterdir()] == [TASK_DIR]  # no temporary folder
    meta = json.loads((folder / "synthetic.json").read_text())
    assert meta == {
        "generator": "vessels",
        "num_cases": 2,
        "seed": 7,
        "shape": list(TINY),
        "generator_version": GENERATOR_VERSION,
    }
    task = layouts.read_msd_task(folder)
    assert task.modalities == MODALITIES and task.labels == (0, 1)
    assert task.label_names == LABEL_NAMES and task.test == []
    found = layouts.find_cases("msd", tmp_path / "data")  # the one Task* folder below the root
    assert [c.id for c in found] == ["vessels_001", "vessels_002"] == [c.id for c in task.training]
    for i, case in enumerate(found, start=1):
        image, label = generate_case(7, i, TINY)
        (image_path,) = case.image_paths
        stored, affine = nifti.load_nifti(image_path)
        assert stored.dtype == np.int16
        np.testing.assert_array_equal(stored, np.rint(image).astype(np.int16))
        np.testing.assert_array_equal(affine, np.eye(4))
        seg, seg_affine = nifti.load_nifti(case.label_path)
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, label)
        np.testing.assert_array_equal(seg_affine, affine)
    before = _files(tmp_path)
    assert write_synthetic_vessels(tmp_path / "data", 2, 7, TINY) == folder
    assert _files(tmp_path) == before


def test_mismatch_raises_naming_the_difference(tmp_path: Path) -> None:
    folder = write_synthetic_vessels(tmp_path, 1, 0, TINY)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="num_cases") as info:
        write_synthetic_vessels(tmp_path, 2, 0, TINY)
    assert str(folder) in str(info.value)
    with pytest.raises(ValueError, match="seed.*shape"):
        write_synthetic_vessels(tmp_path, 1, 1, (24, 24, 20))
    assert _files(tmp_path) == before


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(seed: int, index: int, shape: tuple[int, int, int]):
        if index == 2:
            raise OSError("disk full")
        return generate_case(seed, index, shape)

    monkeypatch.setattr(synthetic_vessels, "generate_case", fail)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_vessels(tmp_path, 2, 0, TINY)
    assert list(tmp_path.iterdir()) == []


def test_main_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--root", str(tmp_path), "--cases", "1", "--seed", "2", "--shape", *map(str, TINY)])
    assert str(tmp_path / TASK_DIR) in capsys.readouterr().out
    assert (tmp_path / TASK_DIR / "imagesTr" / "vessels_001.nii.gz").is_file()
    with pytest.raises(SystemExit) as info:
        main(["--root", str(tmp_path), "--cases", "2", "--shape", *map(str, TINY)])
    assert info.value.code == 2 and "num_cases" in capsys.readouterr().err


def _vessel_config(root: Path):
    config = tiny_config(root)
    config.data.synthetic_kind = "vessels"
    config.data.synthetic_cases = 3
    config.data.grid_shape, config.data.num_channels = "auto", 0
    return config


def test_resolve_reads_the_generated_task_and_plans_the_grid(tmp_path: Path) -> None:
    resolved = dataset.resolve_data_config(_vessel_config(tmp_path), check_fit=True)
    d = resolved.data
    assert d.num_channels == 1 and tuple(d.labels) == (0, 1)
    assert tuple(d.label_names) == LABEL_NAMES
    assert tuple(d.grid_shape) == (32, 32, 16)  # the tiny model's planned grid for 28x28x16
    root = dataset.dataset_root(resolved)
    assert root == tmp_path / "vessels-cases3-seed0-28x28x16" / TASK_DIR
    assert dataset.layout_format(resolved) == "msd"
    tumours = tiny_config(tmp_path)
    tumours.data.synthetic_cases = 3
    assert dataset.layout_format(tumours) == "brats"
    assert dataset.dataset_root(tumours).parent.name == "cases3-seed0-28x28x16"  # side by side
    found = scans.find_scans(root / "imagesTr", dataset.layout_format(resolved))
    assert [len(scan.image_paths) for scan in found] == [1, 1, 1]
    train, val = dataset.load_split(resolved)
    assert len(train) + len(val) == 3
    for case in train + val:
        assert case.image.shape == (32, 32, 16, 1) and set(np.unique(case.target)) == {0, 1}


def test_unknown_kind_and_tumour_regions_are_config_errors(tmp_path: Path) -> None:
    config = _vessel_config(tmp_path)
    config.data.synthetic_kind = "blobs"
    with pytest.raises(ConfigError, match="data.synthetic_kind.*'tumour', 'vessels'.*'blobs'"):
        dataset.resolve_data_config(config)
    with pytest.raises(ConfigError, match="data.synthetic_kind"):
        dataset.dataset_root(config)
    assert list(tmp_path.iterdir()) == []
    config = _vessel_config(tmp_path)
    config.data.label_mode = "brats_regions"  # regions of labels 1, 2, 4: the vessels have 1 only
    with pytest.raises(ConfigError, match="data.region_labels"):
        dataset.resolve_data_config(config)


def test_configs_without_the_kind_are_tumours(tmp_path: Path) -> None:
    values = tiny_config(tmp_path).to_dict()
    del values["data"]["synthetic_kind"]  # a config.json written before the key existed
    old = ml_collections.ConfigDict(values)
    assert planning.synthetic_kind(old.data) == "tumour" and planning.format_channels(old.data) == 4
    assert dataset.layout_format(old) == "brats"
    assert planning.format_channels(_vessel_config(tmp_path).data) == 1
