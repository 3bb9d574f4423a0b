"""ossnet_jax.api on a tiny trained run: world-mm queries, segment() against evaluate.py's files,
super-resolved label maps, meshes from the field, and the messages for bad input."""

import numpy as np
import pytest

from ossnet_jax import api, evaluation
from ossnet_jax.data import dataset, nifti, scans
from ossnet_jax.families.oss_net import resolution

pytestmark = pytest.mark.slow  # they share conftest.trained_run, a training run


@pytest.fixture(scope="module")
def loaded(trained_run):
    """The restored model, one validation case's folder, and its field."""
    config, workdir, _ = trained_run
    model = api.load(workdir)
    _, val = dataset.split_cases(config)
    folder = val[0].image_paths[0].parent
    return model, folder, model.field(folder), workdir


@pytest.fixture(scope="module")
def fine(loaded):
    """The field's label map and affine at 0.5 mm, half the synthetic cases' 1 mm voxels: segmented
    once for the two tests that read it."""
    _, _, field, _ = loaded
    np.testing.assert_allclose(nifti.voxel_spacing(field.case.affine), 1.0, rtol=1e-6)
    return field.segment(spacing=0.5)


def test_segment_at_native_spacing_is_what_evaluate_wrote(loaded):
    model, folder, field, workdir = loaded
    labels, affine = field.segment()
    written, written_affine = nifti.load_nifti(
        workdir / "eval" / "predictions" / f"{field.case.id}.nii.gz"
    )
    np.testing.assert_array_equal(labels, np.asarray(written))
    np.testing.assert_allclose(affine, written_affine, atol=1e-5)


def test_queries_at_voxel_centres_are_the_decoder_at_the_grid_voxels(loaded):
    model, _, field, _ = loaded
    rng = np.random.default_rng(0)
    case = field.case
    voxels = np.stack([rng.integers(0, n, 40) for n in case.file_shape], axis=1)  # file order
    points = voxels @ case.affine[:3, :3].T + case.affine[:3, 3]
    to_grid = np.linalg.inv(field.grid_affine)
    grid = np.rint(points @ to_grid[:3, :3].T + to_grid[:3, 3]).astype(np.int32)
    latents, _, source = field.encoded
    expected = model.predictor.decode_all(latents, source, grid)
    np.testing.assert_allclose(field(points), expected, rtol=1e-6, atol=1e-7)


def test_array_input_gives_the_field_of_the_files(loaded):
    model, folder, field, _ = loaded
    [scan] = scans.find_scans(folder, "brats")
    channels = [nifti.load_nifti(path) for path in scan.image_paths]  # flair, t1, t1ce, t2
    image = np.stack([np.asarray(c[0], np.float32) for c in channels], axis=-1)
    other = model.field((image, channels[0][1]))
    affine = field.case.affine
    centre = affine[:3, :3] @ (np.asarray(field.case.file_shape) / 2) + affine[:3, 3]
    points = centre + np.random.default_rng(1).uniform(-6, 6, (25, 3))
    np.testing.assert_allclose(other(points), field(points), rtol=1e-5, atol=1e-6)


def test_super_resolved_prediction_has_its_shape_affine_and_agrees_with_native(loaded, fine):
    model, _, field, _ = loaded
    case = field.case
    native, _ = field.segment()
    spacing = np.asarray(nifti.voxel_spacing(case.affine)) / 2  # 0.5 mm: the fixture's spacing
    fine, affine = fine
    assert fine.shape == tuple(2 * n for n in case.file_shape)
    np.testing.assert_allclose(affine[:3, :3], case.affine[:3, :3] / 2, atol=1e-9)
    np.testing.assert_allclose(affine[:3, 3], case.affine[:3, 3], atol=1e-9)  # first voxel kept
    grid = resolution.output_grid(case, np.asarray(case.image).shape[:3], spacing)
    back = resolution.to_input_grid(fine, grid, case.file_shape)
    assert back.shape == native.shape
    assert np.mean(back == native) >= 0.99


def test_mesh_from_the_field_lies_on_its_level_set(loaded):
    """Refined vertices carry the decision level (99 % of them to 0.02 on this 4-step, noisy field;
    benchmarks/results/superres_field.md has the demo field's maximum), except those of the caps
    closing the mesh at the volume's border; normals are unit vectors."""
    model, _, field, _ = loaded
    vertices, faces, normals = field.mesh(normals=True, refine_steps=3)
    assert len(faces) > 100
    affine = field.case.affine
    voxels = (vertices - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    sampled = np.all((voxels >= 0) & (voxels <= np.asarray(field.case.file_shape) - 1), axis=1)
    assert sampled.mean() > 0.5
    level = model.config.eval.threshold
    error = np.abs(field(vertices[sampled]) - level)
    assert np.percentile(error, 99) < 0.02 and error.mean() < 0.005
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, rtol=1e-5)


def test_evaluate_writes_super_resolved_predictions_scored_on_the_input_grid(
    trained_run, loaded, fine, tmp_path
):
    config, workdir, result = trained_run
    model, _, field, _ = loaded
    config = evaluation.load_config(workdir)
    config.eval.output_spacing = (0.5, 0.5, 0.5)  # the synthetic cases have 1 mm voxels
    config.eval.meshes = config.eval.pictures = False
    _, val = dataset.load_split(config)
    again = evaluation.evaluate(config, workdir, val[:1], tmp_path)
    row = again["cases"][0]
    assert row["id"] == field.case.id and row["native_agreement"] >= 0.99
    written, affine = nifti.load_nifti(tmp_path / "predictions" / f"{row['id']}.nii.gz")
    fine, fine_affine = fine
    np.testing.assert_array_equal(np.asarray(written), fine)
    np.testing.assert_allclose(affine, fine_affine, atol=1e-5)
    native = next(c for c in result["cases"] if c["id"] == row["id"])
    assert abs(row["dice"] - native["dice"]) < 0.05


def test_bad_input_is_named(loaded, tmp_path):
    model, _, field, _ = loaded
    far = field.case.affine[:3, 3] - 1000.0
    with pytest.raises(ValueError, match="1 of 1 points lie outside the scanned volume"):
        field(far[None])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        field(np.zeros(3))
    with pytest.raises(nifti.DataError, match="no such file or folder"):
        model.field(tmp_path / "missing")
    with pytest.raises(ValueError, match="data.num_channels"):
        model.field((np.zeros((4, 4, 4, 2)), np.eye(4)))
