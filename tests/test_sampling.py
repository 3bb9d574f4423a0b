"""Border band, location sampling and augmentation."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ossnet_jax.data import augment, preprocess, sampling


def _band_reference(target, size):
    """Independent slow band: voxels whose 3^3 neighbourhood mixes labels, dilated by a size^3 cube."""
    x, y, z = target.shape
    padded = np.pad(target, 1)
    edge = np.zeros(target.shape, bool)
    for i, j, k in itertools.product(range(x), range(y), range(z)):
        block = padded[i : i + 3, j : j + 3, k : k + 3]
        edge[i, j, k] = block.min() != block.max()
    r = size // 2
    band = np.zeros(target.shape, bool)
    for i, j, k in zip(*np.nonzero(edge)):
        band[max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1, max(k - r, 0) : k + r + 1] = True
    return band


def test_border_band_of_a_cube():
    target = np.zeros((20, 18, 16), np.uint8)
    target[6:12, 5:11, 4:9] = 1
    band = preprocess.border_band(target, 5)
    np.testing.assert_array_equal(band, _band_reference(target, 5))
    assert (
        band[8, 7, 6] and not band[0, 0, 0]
    )  # the cube's small interior is in the band, far away not


def test_border_band_empty_label():
    assert not preprocess.border_band(np.zeros((8, 8, 8), np.uint8), 13).any()


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_sampling_takes_the_border_share_from_the_band(kernels):
    band = np.zeros((16, 12, 10), bool)
    band[3:5, 2:4, 7:9] = True
    sample = lambda k: sampling.sample_locations(jax.random.key(0), jnp.asarray(band), 400, 0.25, k)
    locs = np.asarray(sample(kernels))
    # the kernel sets search the band with different loops, for the same locations
    np.testing.assert_array_equal(locs, np.asarray(sample("xla")))
    assert locs.shape == (400, 3) and locs.dtype == np.int32
    assert band[tuple(locs[:100].T)].all()
    assert len({tuple(p) for p in locs[:100]}) == 8  # every band voxel is drawn
    assert (locs >= 0).all() and (locs < np.array(band.shape)).all()
    assert band[tuple(locs[100:].T)].mean() < 0.2  # the uniform part mostly lies outside


def test_sampling_with_an_empty_band_is_uniform():
    locs = np.asarray(
        sampling.sample_locations(jax.random.key(1), jnp.zeros((8, 8, 8), bool), 4000, 0.5)
    )
    counts = np.bincount(locs[:, 0], minlength=8)
    assert counts.min() > 350  # ~500 per slab


def test_take_at_reads_volume_values():
    volume = jnp.arange(4 * 5 * 6).reshape(4, 5, 6)
    locs = jnp.asarray([[0, 0, 0], [3, 4, 5], [1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(sampling.take_at(volume, locs)), [0, 119, 45])


def test_augment_flips_image_and_label_together():
    cfg = ml_collections.ConfigDict(
        dict(flip_probability=1.0, brightness_shift=0.0, noise_std=0.0, augment_probability=0.5)
    )
    image = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5, 4, 2)), jnp.float32)
    target = (image[..., 0] > 0).astype(jnp.uint8)
    band = image[..., 1] > 0
    a_img, a_tgt, a_band = augment.augment(jax.random.key(0), image, target, band, cfg)
    np.testing.assert_array_equal(np.asarray(a_img), np.asarray(image)[::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(a_tgt), np.asarray(target)[::-1, ::-1])
    np.testing.assert_array_equal(np.asarray(a_band), np.asarray(band)[::-1, ::-1])


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_augment_intensity_changes_have_the_configured_size(kernels):
    """Brightness shift and noise (the kernel set's gaussian_noise; its own tests are in
    tests/test_kernels.py)."""
    cfg = ml_collections.ConfigDict(
        dict(flip_probability=0.0, brightness_shift=0.15, noise_std=0.15, augment_probability=1.0)
    )
    image = jnp.zeros((20, 20, 20, 1))
    target, band = jnp.zeros((20, 20, 20)), jnp.zeros((20, 20, 20), bool)
    out, _, _ = augment.augment(jax.random.key(3), image, target, band, cfg, kernels)
    out = np.asarray(out)
    assert abs(out.mean()) <= 0.15 + 0.01
    assert abs(out.std() - 0.15) < 0.01


def _shifts(probability: float, seeds: range) -> np.ndarray:
    """The brightness shift (brightness_shift 0.15, no noise, no flips) of a zero volume with the
    key of each seed: its value at every voxel, checked to be one value per volume. Called op by op
    on the test above's shapes, so its operations are compiled once."""
    cfg = ml_collections.ConfigDict(
        dict(
            flip_probability=0, brightness_shift=0.15, noise_std=0, augment_probability=probability
        )
    )
    image = jnp.zeros((20, 20, 20, 1))
    target, band = jnp.zeros((20, 20, 20)), jnp.zeros((20, 20, 20), bool)
    out = np.stack(
        [
            np.asarray(augment.augment(jax.random.key(seed), image, target, band, cfg)[0]).ravel()
            for seed in seeds
        ]
    )
    np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1], out.shape))
    return out[:, 0]


def test_augment_brightness_shift_is_one_uniform_value_per_volume():
    """Uniform in +-0.15 (std 0.15 / sqrt 3 = 0.087), applied with augment_probability."""
    shifts = _shifts(1.0, range(48))
    assert np.abs(shifts).max() <= 0.15 and np.abs(shifts).max() > 0.12
    assert 0.06 < shifts.std() < 0.11 and (shifts < 0).sum() > 12 and (shifts > 0).sum() > 12
    assert not _shifts(0.0, range(48, 56)).any()
    assert 8 < np.count_nonzero(_shifts(0.5, range(56, 88))) < 24


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_augment_batch_loop_equals_the_vmapped_augmentation(kernels):
    cfg = ml_collections.ConfigDict(
        dict(flip_probability=0.5, brightness_shift=0.15, noise_std=0.15, augment_probability=0.5)
    )
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(6, 6, 5, 4, 2)), jnp.float32)
    targets = (images[..., 0] > 0).astype(jnp.uint8)
    bands = images[..., 1] > 0
    key = jax.random.key(7)
    batch = jax.jit(lambda *a: augment.augment_batch(key, *a, cfg, kernels))
    looped = batch(images, targets, bands)
    vmapped = jax.vmap(lambda k, i, g, d: augment.augment(k, i, g, d, cfg, kernels))(
        jax.random.split(key, 6), images, targets, bands
    )
    np.testing.assert_allclose(np.asarray(looped[0]), np.asarray(vmapped[0]), rtol=0, atol=1e-6)
    for a, b in zip(looped[1:], vmapped[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(looped[0]), np.asarray(images))  # something was applied
