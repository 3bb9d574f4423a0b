"""Settings planned from the data: the grid ('auto'), the channels (0), the synthetic data's folders."""

import numpy as np
import pytest

from configs import demo, unet2d, unet3d
from ossnet_jax.data import dataset, nifti, planning, preprocess
from ossnet_jax.errors import ConfigError
from tests.conftest import tiny_config
from tests.dataset_writers import oriented, write_lits, write_msd


@pytest.mark.parametrize(
    "value, grid",
    [
        ("auto", None),
        (("auto",), None),
        ((96, 128, 96), (96, 128, 96)),
        ([8, 16, 24], (8, 16, 24)),
        ("(96, 128, 96)", (96, 128, 96)),
        ("96,128,96", (96, 128, 96)),
        ("96x128x96", (96, 128, 96)),
    ],
)
def test_grid_settings_parse(value, grid):
    assert planning.parse_grid(value) == grid


@pytest.mark.parametrize("value", ["big", (96, 96), (96, 0, 64), "96,96,6.5"])
def test_bad_grid_settings_name_the_key(value):
    with pytest.raises(ConfigError, match="data.grid_shape"):
        planning.parse_grid(value)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR", "SLA", "IPL"])
def test_canonical_shape_is_the_shape_preprocessing_makes(codes):
    ras = np.zeros((5, 7, 3), np.float32)
    data, affine = oriented(ras, codes, (0.8, 1.0, 2.5))
    assert planning.canonical_shape(data.shape, affine) == (5, 7, 3)
    assert preprocess.to_canonical(data, affine)[0].shape == (5, 7, 3)


def test_grid_is_the_smallest_multiple_holding_every_case():
    assert planning.grid_for([(88, 88, 58)], (16, 16, 16)) == (96, 96, 64)
    assert planning.grid_for([(96, 112, 96), (90, 128, 80)], (16, 16, 16)) == (96, 128, 96)
    assert planning.grid_for([(33, 10, 7)], (8, 8, 1)) == (40, 16, 7)


def test_each_family_names_what_divides_its_grid():
    small = dataset.resolve_data_config(demo.get_config())
    assert small.data.grid_shape == (96, 96, 64) and small.data.num_channels == 4  # 2 x 2^3
    u3 = unet3d.get_config("small")
    u2 = unet2d.get_config("small")
    levels3, levels2 = len(u3.model.channels) - 1, len(u2.model.channels) - 1
    assert dataset.resolve_data_config(u3).data.grid_shape == planning.grid_for(
        [(88, 88, 58)], (2**levels3,) * 3
    )
    # the 2D U-Net halves X and Y only: Z keeps the data's 58 slices
    assert dataset.resolve_data_config(u2).data.grid_shape == planning.grid_for(
        [(88, 88, 58)], (2**levels2, 2**levels2, 1)
    )


def test_msd_task_gets_a_grid_that_holds_it_and_a_too_small_one_names_cases(tmp_path):
    task = write_msd(tmp_path, four_d=True, cases=2, codes="PIR", test_cases=0)
    config = tiny_config(task)
    config.data.format = "msd"
    config.data.num_channels = 0
    config.data.grid_shape = "auto"
    resolved = dataset.resolve_data_config(config, check_fit=True)
    # the cases are 28x28x16 in RAS; tiny_config's encoder needs multiples of 2 x 2^2 = 8
    assert resolved.data.grid_shape == (32, 32, 16) and resolved.data.num_channels == 4
    assert "data.grid_shape 'auto' -> (32, 32, 16)" in planning.describe(config.data, resolved.data)
    config.data.grid_shape = (24, 32, 16)
    with pytest.raises(nifti.DataError) as error:
        dataset.resolve_data_config(config, check_fit=True)
    message = str(error.value)
    assert "2 of 2 cases do not fit data.grid_shape (24, 32, 16) after reorientation" in message
    assert "BRATS_000.nii.gz 28x28x16" in message and "BRATS_001.nii.gz 28x28x16" in message
    assert "A grid that holds every case: (32, 32, 16)" in message


def test_channels_come_from_the_format_and_a_disagreeing_case_is_named(tmp_path):
    lits = tiny_config(write_lits(tmp_path / "lits", cases=2))
    lits.data.format, lits.data.num_channels, lits.data.resample = "lits", 0, True
    assert dataset.resolve_data_config(lits, check_fit=True).data.num_channels == 1
    task = write_msd(tmp_path / "msd", four_d=False, cases=3, test_cases=0)
    odd = task / "imagesTr" / "liver_001.nii.gz"
    data, affine = nifti.load_nifti(odd)
    nifti.save_nifti(odd, np.stack([data, data], axis=-1), affine)
    msd = tiny_config(task)
    msd.data.format = "msd"
    with pytest.raises(nifti.DataError, match=r"liver_001.nii.gz: case liver_001 has 2") as error:
        dataset.resolve_data_config(msd, check_fit=True)
    assert "liver_000" not in str(error.value) and "the 1 channels" in str(error.value)


def test_unreadable_cases_are_left_to_the_reading_which_names_each(tmp_path):
    task = write_msd(tmp_path, four_d=False, cases=3, test_cases=0)
    for stem in ("liver_000", "liver_002"):
        (task / "imagesTr" / f"{stem}.nii.gz").write_bytes(b"not a nifti file")
    config = tiny_config(task)
    config.data.format, config.data.grid_shape = "msd", "auto"
    resolved = dataset.resolve_data_config(config, check_fit=True)  # planned from liver_001
    assert resolved.data.grid_shape == (32, 32, 16)
    with pytest.raises(nifti.DataError, match="2 of 3 cases cannot be used") as error:
        dataset.load_split(resolved)
    assert "liver_000.nii.gz" in str(error.value) and "liver_002.nii.gz" in str(error.value)


def test_split_seed_keeps_the_synthetic_data_and_generator_seeds_live_side_by_side(tmp_path):
    config = tiny_config(tmp_path)
    config.data.synthetic_cases = 2
    first = dataset.dataset_root(config)
    config.data.seed = 3  # the split's seed: the same data
    assert dataset.dataset_root(config) == first
    config.data.synthetic_seed = 5  # the generator's: another folder beside the first
    second = dataset.dataset_root(config)
    assert second != first and first.is_dir() and second.is_dir()
    name = "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz"
    a, _ = nifti.load_nifti(first / name)
    b, _ = nifti.load_nifti(second / name)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_without_reorientation_the_stored_array_order_is_planned(tmp_path):
    task = write_msd(tmp_path, four_d=False, cases=1, codes="PIR", test_cases=0)
    config = tiny_config(task)
    config.data.format, config.data.grid_shape = "msd", "auto"
    config.data.reorient = False  # PIR: the stored axes are RAS's y, z, x
    assert dataset.resolve_data_config(config).data.grid_shape == (32, 16, 32)
