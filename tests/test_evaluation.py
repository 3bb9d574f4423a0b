"""Evaluation plumbing that needs no trained model: configs of older runs, the scoring of rows, and
evaluate() with a stand-in predictor: post-processing and surface tolerance from the config, the
metrics.json rewritten after every case, meshes and pictures."""

import json

import numpy as np
import pytest

from configs import base
from ossnet_jax import evaluation, files, reporting
from ossnet_jax.data import dataset, labels, nifti
from tests.conftest import tiny_config


def test_config_of_an_older_run_gets_defaults_for_new_keys(tmp_path):
    saved = base.get_base_config("small").to_dict()
    del saved["eval"]["strategy"], saved["data"]["labels"]
    saved["eval"]["threshold"] = 0.3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = evaluation.load_config(tmp_path)
    assert config.eval.strategy == "band" and tuple(config.data.labels) == (0, 1, 2, 4)
    assert config.eval.threshold == 0.3 and config.data.format == "synthetic"  # saved values win
    with pytest.raises(FileNotFoundError, match="training workdir"):
        evaluation.load_config(tmp_path / "nothing")


def test_means_over_cases_skip_undefined_metrics():
    rows = [
        {"dice": 0.5, "hd95": None, "regions": {"a": {"dice": 1.0}}},
        {"dice": 0.7, "hd95": 4.0, "regions": {"a": {"dice": 0.0}}},
    ]
    mean = reporting.mean_over_cases(rows)
    assert mean == {"dice": pytest.approx(0.6), "hd95": 4.0, "regions": {"a": {"dice": 0.5}}}


GRID = (16, 12, 10)
AFFINE = np.array([[2.0, 0, 0, -5.0], [0, 1.0, 0, 3.0], [0, 0, 1.0, 1.0], [0, 0, 0, 1]])


class _StandIn:
    """A predictor that returns, for each case, the label map stored under its image's first voxel."""

    def __init__(self, spec, maps):
        self.spec, self.maps = spec, maps

    def compile(self, image):
        pass

    def predict(self, image, ev=None):
        return self.maps[int(image[0, 0, 0, 0])].copy(), 1000


def _box(x0):
    box = np.zeros(GRID, np.int32)
    box[x0 : x0 + 6, 3:9, 3:7] = 1
    return box


def _cases():
    """Two RAS cases of 2 x 1 x 1 mm voxels: label a 6x6x4 box; prediction the box one voxel (2 mm)
    further along x, case 0 with a 2-voxel speck far from it."""
    cases, maps = [], {}
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.normal(size=GRID + (1,)).astype(np.float32)
        image[0, 0, 0, 0] = i
        cases.append(
            dataset.PreparedCase(
                id=f"case{i}",
                image=image,
                target=_box(3).astype(np.uint8),
                band=None,
                affine=AFFINE,
                file_shape=GRID,
                ornt=((0, 1), (1, 1), (2, 1)),
                shape=GRID,
                offsets=(0, 0, 0),
                spacing=(2.0, 1.0, 1.0),
            )
        )
        maps[i] = _box(4)
    maps[0][14, 1, 1:3] = 1
    return cases, maps


def _evaluate(tmp_path, monkeypatch, name, **ev):
    """evaluate() of the two cases with the stand-in predictor into tmp_path/name, eval keys `ev`."""
    config = tiny_config(tmp_path)
    config.data.labels, config.data.label_names = (0, 1), ("background", "lesion")
    config.eval.mesh_source = "mask"  # the label map's surface: the stand-in has no field
    config.eval.update(ev)
    cases, maps = _cases()
    predictor = _StandIn(labels.label_spec(config.data), maps)
    monkeypatch.setattr(evaluation, "restore_predictors", lambda *args, **kw: ([predictor], 7))
    return evaluation.evaluate(config, tmp_path, cases, tmp_path / name)


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_evaluate_applies_the_eval_config_and_rewrites_metrics_after_every_case(
    tmp_path, monkeypatch
):
    """eval.min_component_voxels removes the speck (0 keeps it); eval.surface_tolerance_mm decides
    the surface Dice (every surface point is within 2 mm of the other surface, some farther than
    0.5 mm); metrics.json is written after each case, with "mean" only in the last write."""
    written = []
    write_json = files.write_json

    def recording(path, data):
        if path.name == "metrics.json":
            written.append(json.loads(json.dumps(data)))
        write_json(path, data)

    monkeypatch.setattr(files, "write_json", recording)
    no_files = dict(meshes=False, pictures=False)  # the next test's
    kept = _evaluate(
        tmp_path, monkeypatch, "kept", surface_tolerance_mm=0.5, min_component_voxels=0, **no_files
    )
    removed = _evaluate(
        tmp_path,
        monkeypatch,
        "removed",
        surface_tolerance_mm=2.5,
        min_component_voxels=5,
        **no_files,
    )
    assert [len(w["cases"]) for w in written] == [1, 2, 2] * 2
    assert ["mean" in w for w in written] == [False, False, True] * 2
    assert written[2] == kept and written[5] == removed
    label = _box(3) > 0
    for result, speck in ((kept, True), (removed, False)):
        assert result["step"] == 7 and [r["id"] for r in result["cases"]] == ["case0", "case1"]
        for row, expected_speck in zip(result["cases"], (speck, False)):
            prediction = _box(4) > 0
            prediction[14, 1, 1:3] = expected_speck
            name = "kept" if result is kept else "removed"
            saved, affine = nifti.load_nifti(
                tmp_path / name / "predictions" / f"{row['id']}.nii.gz"
            )
            np.testing.assert_array_equal(saved, prediction)
            np.testing.assert_array_equal(affine, AFFINE)
            assert row["dice"] == pytest.approx(_dice(prediction, label))
        assert result["mean"]["dice"] == pytest.approx(
            np.mean([r["dice"] for r in result["cases"]])
        )
    assert [r["surface_dice"] for r in removed["cases"]] == [1.0, 1.0]
    assert all(r["surface_dice"] < 0.9 for r in kept["cases"])


def _obj_vertices(path) -> np.ndarray:
    lines = path.read_text().splitlines()
    return np.array(
        [[float(v) for v in line.split()[1:]] for line in lines if line.startswith("v ")]
    )


def test_evaluate_writes_meshes_pictures_and_the_dice_chart(tmp_path, monkeypatch):
    """Per case: prediction and label meshes (PLY, OBJ) in world mm around their mask, the slices
    and the predicted surface as PNG; dice.png and metrics.csv for all. eval.meshes and
    eval.pictures off: none of them."""
    _evaluate(tmp_path, monkeypatch, "on", min_component_voxels=5)
    out = tmp_path / "on"
    for case in ("case0", "case1"):
        for kind, x0 in (("prediction", 4), ("label", 3)):
            assert (out / "meshes" / f"{case}_{kind}.ply").read_text().startswith("ply\n")
            vertices = _obj_vertices(out / "meshes" / f"{case}_{kind}.obj")
            # the box's voxels x0..x0+5, 3..8, 3..6 in world mm, surfaces within half a voxel
            low = AFFINE[:3, :3] @ np.array([x0, 3, 3]) + AFFINE[:3, 3]
            high = AFFINE[:3, :3] @ np.array([x0 + 5, 8, 6]) + AFFINE[:3, 3]
            spacing = np.array([2.0, 1.0, 1.0])
            assert np.all(vertices.min(0) >= low - spacing / 2 - 1e-6)
            assert np.all(vertices.max(0) <= high + spacing / 2 + 1e-6)
            assert np.all(vertices.min(0) < low) and np.all(vertices.max(0) > high)
        for picture in ("slices", "mesh"):
            assert (out / "pictures" / f"{case}_{picture}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "dice.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("id,")
    _evaluate(tmp_path, monkeypatch, "off", meshes=False, pictures=False)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [
        "metrics.csv",
        "metrics.json",
        "predictions",
    ]
