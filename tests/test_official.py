"""Converting the official release's state dicts (ossnet_jax/official): every release key and shape of
the ten configurations against our models, the published ones converted, bad files refused naming the
keys, the converted models against a numpy forward of the release, the release's preprocessing, a
converted workdir through evaluate.py, and the command on a file of the published size."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import oss_net_c as configs_oss_net_c
from ossnet_jax import official, training
from ossnet_jax.data import dataset, nifti, preprocess
from ossnet_jax.errors import ConfigError
from ossnet_jax.official import conversion
from tests import dataset_writers
from tests import official_writers as w
from tests import release_reference as reference

ROOT = pathlib.Path(__file__).parents[1]
CONFIGURATIONS = [(v, d) for v in conversion.VARIANT_CONFIGS for d in conversion.DATASETS]
PUBLISHED = [(v, d) for v, d in CONFIGURATIONS if v != "o_net"]
C_BRATS_TRAINABLE = 8_695_733  # shared/reference/OFFICIAL-RELEASE.md "Totals"


def _release_name(variant: str, dataset: str) -> str:
    return f"{conversion.RELEASE_NAMES[variant]}_{conversion.DATASETS[dataset]}"


@pytest.mark.parametrize("variant,dataset", CONFIGURATIONS)
def test_our_models_have_every_key_and_shape_of_the_release(variant, dataset):
    layout = conversion.published_layout(variant, dataset)
    assert layout == w.release_layout(_release_name(variant, dataset))


@pytest.mark.parametrize("variant,dataset", PUBLISHED)
def test_published_state_dicts_convert(variant, dataset):
    state = w.release_state_dict(w.release_layout(_release_name(variant, dataset)))
    config = conversion.release_config(variant, dataset)
    templates = conversion.published_templates(variant, dataset)
    variables = conversion.to_variables(state, templates, "synthetic.pt")
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, templates)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["encoder_net"]["block1"]["conv1"]["kernel"],
        state["encoder.blocks.1.main_mapping.0.weight"].transpose(2, 3, 4, 1, 0),
    )
    np.testing.assert_array_equal(
        params["decoder_net"]["block0"]["dense1"]["kernel"],
        state["decoder.blocks.0.linear_layer_1.weight"].T,
    )
    np.testing.assert_array_equal(
        params["decoder_net"]["block3"]["cbn2"]["gamma"]["kernel"],
        state["decoder.blocks.3.cnb_2.linear_gamma.weight"].T,
    )
    cbn_var = stats["decoder_net"]["block3"]["cbn2"]["var"]
    assert (
        cbn_var.shape == ()
        and cbn_var == state["decoder.blocks.3.cnb_2.normalization.running_var"][0]
    )
    np.testing.assert_allclose(
        stats["encoder_net"]["to_latent"]["bn"]["mean"],
        state["encoder.final_mapping.1.running_mean"] - state["encoder.final_mapping.0.bias"],
        rtol=1e-6,
    )
    blocks = len(config.model.encoder_channels)
    assert not any(
        params["encoder_net"][f"block{i}"]["shortcut"]["bias"].any() for i in range(blocks)
    )
    seg = config.model.seg_head
    assert seg == (variant in "cd") and (
        not seg or not params["encoder_net"]["seg_head"]["bias"].any()
    )
    ours = sum(leaf.size for leaf in jax.tree.leaves(params))
    folded, zeros = state[conversion.FOLDED_BIAS].size, sum(config.model.encoder_channels) + seg
    assert ours == conversion.trainable_count(state) - folded + zeros
    if (variant, dataset) == ("c", "brats"):
        assert conversion.trainable_count(state) == C_BRATS_TRAINABLE
    assert conversion.identify(state) == (variant, dataset)  # and no other configuration's


def test_release_configs_are_the_published_ones():
    d = conversion.release_config("d", "brats")
    assert d.model.large_patches and d.model.encoder == "skip" and d.model.fourier_features == 0
    lits = conversion.release_config("a", "lits")
    assert (lits.data.normalize, lits.data.clip_range, lits.data.resample_border) == (
        "all_unbiased",
        (),
        "edge",
    )
    assert lits.model.location_encoding == "voxel" and not lits.data.reorient
    assert lits.train.learning_rate * lits.train.pau_lr_multiplier == pytest.approx(1e-2)
    with pytest.raises(ConfigError, match="--variant must be one of"):
        conversion.release_config("e", "brats")


def _tiny_config(variant: str):
    """A variant's release config at test sizes and the state-dict layout of its model."""
    config = w.tiny_release_config(conversion.release_config(variant, "brats"))
    return config, conversion.expected_layout(conversion.model_templates(config))


def _tiny(variant: str, image: np.ndarray) -> tuple:
    """(tiny release config, a state dict for it whose logits on `image` spread over about +-4)."""
    config, layout = _tiny_config(variant)
    state = w.release_state_dict(layout, scale=0.3)
    probe = np.argwhere(np.ones(image.shape[:3], bool))[:: image[..., 0].size // 48]
    spread = reference.logits(state, image, probe).std()
    state["decoder.final_mapping.0.weight"] *= np.float32(2.0 / spread)
    return config, state


def _padded_image(seed: int = 0) -> np.ndarray:
    """A (32, 32, 16, 4) grid as the release pads it: values inside, zeros in the padding."""
    image = np.zeros((32, 32, 16, 4), np.float32)
    image[3:30, 2:30, 2:15] = np.random.default_rng(seed).normal(size=(27, 28, 13, 4))
    return image


def test_a_state_dict_that_does_not_fit_is_refused_naming_the_keys(tmp_path):
    config, layout = _tiny_config("c")
    state = w.release_state_dict(layout)
    bad = dict(state)
    del bad["decoder.blocks.1.cnb_2.linear_beta.bias"]
    bad["decoder.blocks.0.dropout.weight"] = np.zeros(3, np.float32)
    bad["decoder.blocks.0.linear_layer_1.weight"] = state[
        "decoder.blocks.0.linear_layer_1.weight"
    ].T
    path = w.write_pt(tmp_path / "bad.pt", bad)
    with pytest.raises(conversion.ConversionError) as refused:
        conversion.convert(path, tmp_path / "run", config)
    message = str(refused.value)
    assert message.startswith(f"{path} does not hold this variant's state dict")
    assert (
        "1 missing:\n    decoder.blocks.1.cnb_2.linear_beta.bias: expected shape (16,)" in message
    )
    assert "1 unexpected:\n    decoder.blocks.0.dropout.weight: shape (3,)" in message
    assert (
        "1 with another shape:\n    decoder.blocks.0.linear_layer_1.weight: shape (378, 16), "
        "expected (16, 378)"
    ) in message
    integer = dict(state, **{"decoder.final_mapping.0.weight": np.ones((1, 16), np.int32)})
    with pytest.raises(conversion.ConversionError, match="final_mapping.0.weight are not floating"):
        conversion.convert(w.write_pt(tmp_path / "int.pt", integer), tmp_path / "run", config)
    assert not (tmp_path / "run").exists()


def test_occupancy_checks_its_inputs(tmp_path):
    config = w.tiny_release_config(conversion.release_config("c", "brats"))
    (tmp_path / "config.json").write_text(config.to_json())
    image = np.zeros((32, 32, 16, 4), np.float32)
    with pytest.raises(ValueError, match=r"float32 of shape \(32, 32, 16, 4\).*float64"):
        official.occupancy(tmp_path, image.astype(np.float64), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match=r"\(N, 3\) integers, got float"):
        official.occupancy(tmp_path, image, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"location \(0, 32, 0\) lies outside"):
        official.occupancy(tmp_path, image, np.array([[0, 0, 0], [0, 32, 0]]))
    config.data.label_mode = "multiclass"
    (tmp_path / "config.json").write_text(config.to_json())
    with pytest.raises(ConfigError, match="binary task.*'multiclass'"):
        official.occupancy(tmp_path, image, np.zeros((1, 3), int))


@pytest.mark.slow
def test_a_converted_model_computes_the_release_forward(tmp_path):
    """D: skip encoder (6 latents), segmentation head, 7^3 and large patches, in the plain XLA kernel
    set (GPU/TPU's). The plain encoder (one latent) runs through evaluate.py below in this machine's
    default set; B, C and O-Net combine the same parts."""
    image = _padded_image(1)
    config, state = _tiny("d", image)
    config.model.kernels = "xla"
    path = w.write_pt(tmp_path / "oss_net_d.pt", state)
    conversion.convert(path, tmp_path / "run", config)
    corners = [[0, 0, 0], [31, 31, 15], [0, 31, 7], [3, 2, 2], [29, 29, 14]]
    rng = np.random.default_rng(2)
    random = np.stack([rng.integers(0, n, 60) for n in (32, 32, 16)], 1)
    locations = np.concatenate([corners, random])
    got = official.occupancy(tmp_path / "run", image, locations)
    want = reference.occupancy(state, image, locations)
    assert got.dtype == np.float32 and got.shape == (len(locations),)
    np.testing.assert_allclose(got, want, atol=2e-5)
    unsaturated = (want > 0.05) & (want < 0.95)
    assert unsaturated.mean() > 0.3  # so that the comparison is sensitive
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        conversion.convert(path, tmp_path / "run", config)


def _release_input(image: np.ndarray, grid: tuple, before: tuple) -> np.ndarray:
    """The release's BraTS input, written out: each channel z-scored over the whole volume with the
    n - 1 std, zero-padded into `grid` starting at `before`, the stored array order."""
    x = image.astype(np.float64)
    z = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2), ddof=1)
    out = np.zeros((*grid, image.shape[-1]), np.float32)
    out[tuple(slice(b, b + n) for b, n in zip(before, image.shape[:3]))] = z
    return out


def test_release_preprocessing_of_a_brats_case(tmp_path):
    raw = w.write_brats_case(tmp_path / "data", 1, (27, 28, 13), seed=3)
    config = w.tiny_release_config(conversion.release_config("c", "brats"))
    config.data.root = str(tmp_path / "data")
    [case] = dataset.prepare_cases(dataset.find_cases(config), config, tmp_path / "cache")
    assert case.offsets == (3, 2, 2)  # the odd padding voxel before, as the release's Z 3 / 2
    assert [list(row) for row in case.ornt] == [list(r) for r in preprocess.STORED_ORDER]
    np.testing.assert_allclose(
        case.image, _release_input(raw["image"], (32, 32, 16), (3, 2, 2)), atol=2e-6
    )
    index = np.searchsorted((0, 1, 2, 4), raw["label"])
    np.testing.assert_array_equal(case.target_in_file_geometry(), index)
    config.data.reorient, config.data.pad_remainder = True, "after"  # the default: RAS, extra after
    [ras] = dataset.prepare_cases(dataset.find_cases(config), config, tmp_path / "cache")
    np.testing.assert_allclose(
        ras.image[28:1:-1, 29:1:-1, 1:14], case.image[3:30, 2:30, 2:15], atol=1e-4
    )


def _trilinear(volume: np.ndarray, shape: tuple) -> np.ndarray:
    """PyTorch's trilinear interpolate with align_corners=False, written out one axis at a time:
    output voxel d reads input position max(0, (d + 0.5) n / m - 0.5), neighbours clamped."""
    for axis, m in enumerate(shape):
        n = volume.shape[axis]
        src = np.maximum((np.arange(m) + 0.5) * n / m - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        weight = (src - lo).reshape([-1 if a == axis else 1 for a in range(volume.ndim)])
        volume = (1 - weight) * np.take(volume, lo, axis) + weight * np.take(volume, hi, axis)
    return volume


def test_release_preprocessing_of_a_lits_case(tmp_path):
    root = dataset_writers.write_lits(tmp_path / "lits", cases=1)
    config = conversion.release_config("c", "lits")
    config.data.root, config.data.grid_shape = str(root), (32, 40, 24)
    [case] = dataset.prepare_cases(dataset.find_cases(config), config, tmp_path / "cache")
    hu, _ = nifti.load_nifti(next(root.rglob("volume-0.nii")))
    assert hu.min() < -200 and hu.max() > 250  # the release's input keeps what a CT window clips
    z = (hu - hu.mean()) / hu.std(ddof=1)
    np.testing.assert_allclose(case.image[..., 0], _trilinear(z, (32, 40, 24)), atol=1e-5)
    assert case.resampled and case.image.shape == (32, 40, 24, 1)


@pytest.mark.slow
def test_a_converted_workdir_evaluates_with_evaluate_py(tmp_path):
    """evaluate.py predicts every validation case into its file's geometry as the release's forward
    on the release's input decides it (A: plain encoder, one latent conditioning every block)."""
    data = tmp_path / "data"
    raws = {
        f"BraTS20_Training_{n:03d}": w.write_brats_case(data, n, (27, 28, 13), n) for n in (1, 2, 3)
    }
    inputs = {i: _release_input(r["image"], (32, 32, 16), (3, 2, 2)) for i, r in raws.items()}
    config, state = _tiny("a", inputs["BraTS20_Training_001"])
    config.data.root, config.data.val_fraction = str(data), 0.34
    config.eval.strategy, config.eval.meshes, config.eval.pictures = "dense", False, False
    workdir = tmp_path / "official_a"
    conversion.convert(w.write_pt(tmp_path / "oss_net_a.pt", state), workdir, config)
    done = subprocess.run(
        [sys.executable, "evaluate.py", f"--workdir={workdir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((workdir / "eval" / "metrics.json").read_text())["cases"]
    prediction, affine = nifti.load_nifti(workdir / "eval" / "predictions" / f"{row['id']}.nii.gz")
    np.testing.assert_array_equal(affine, w.LPS)
    assert prediction.shape == (27, 28, 13) and 0 < prediction.mean() < 1
    voxels = np.stack([np.random.default_rng(4).integers(0, n, 300) for n in (27, 28, 13)], 1)
    want = reference.occupancy(state, inputs[row["id"]], voxels + (3, 2, 2))
    decided = np.abs(want - 0.5) > 1e-3
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(prediction[tuple(voxels.T)][decided], (want > 0.5)[decided])


@pytest.mark.slow
def test_the_command_converts_a_published_file(tmp_path):
    """python -m ossnet_jax.official convert on a file of oss_net_c_bra_ts.pt's keys and shapes: the
    workdir holds the release's configuration, which train.py's resume check accepts (fine-tuning
    with --config configs/oss_net_c.py:brats_release)."""
    name = _release_name("c", "brats")
    state = w.release_state_dict(w.release_layout(name))
    path = w.write_pt(tmp_path / "oss_net_c_bra_ts.pt", state, name="oss_net_c_bra_ts")
    workdir = tmp_path / "official_c"
    command = [sys.executable, "-m", "ossnet_jax.official", "convert", f"--checkpoint={path}"]
    command += ["--variant=c", "--dataset=brats", f"--workdir={workdir}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "231 entries, 8,695,733 trainable parameters" in done.stdout
    summary = json.loads((workdir / "official.json").read_text())
    assert (summary["variant"], summary["dataset"], summary["entries"]) == ("c", "brats", 231)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["location_encoding"] == "voxel" and not saved["data"]["reorient"]
    assert (
        saved["data"]["normalize"] == "all_unbiased" and saved["data"]["pad_remainder"] == "before"
    )
    training.check_resume_config(configs_oss_net_c.get_config("brats_release"), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]
