"""Border band, location sampling and augmentation."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import special, stats

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


def test_sampling_takes_the_border_share_from_the_band():
    band = np.zeros((16, 12, 10), bool)
    band[3:5, 2:4, 7:9] = True
    locs = np.asarray(sampling.sample_locations(jax.random.key(0), jnp.asarray(band), 400, 0.25))
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


def test_augment_intensity_changes_have_the_configured_size():
    cfg = ml_collections.ConfigDict(
        dict(flip_probability=0.0, brightness_shift=0.15, noise_std=0.15, augment_probability=1.0)
    )
    image = jnp.zeros((20, 20, 20, 1))
    out, _, _ = augment.augment(
        jax.random.key(3), image, jnp.zeros((20, 20, 20)), jnp.zeros((20, 20, 20), bool), cfg
    )
    out = np.asarray(out)
    assert abs(out.mean()) <= 0.15 + 0.01
    assert abs(out.std() - 0.15) < 0.01


def test_augment_batch_loop_equals_the_vmapped_augmentation():
    cfg = ml_collections.ConfigDict(
        dict(flip_probability=0.5, brightness_shift=0.15, noise_std=0.15, augment_probability=0.5)
    )
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(6, 6, 5, 4, 2)), jnp.float32)
    targets = (images[..., 0] > 0).astype(jnp.uint8)
    bands = images[..., 1] > 0
    key = jax.random.key(7)
    looped = jax.jit(lambda *a: augment.augment_batch(key, *a, cfg))(images, targets, bands)
    vmapped = jax.vmap(lambda k, i, g, d: augment.augment(k, i, g, d, cfg))(
        jax.random.split(key, 6), images, targets, bands
    )
    np.testing.assert_allclose(np.asarray(looped[0]), np.asarray(vmapped[0]), rtol=0, atol=1e-6)
    for a, b in zip(looped[1:], vmapped[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(looped[0]), np.asarray(images))  # something was applied


def _threefry2x32_numpy(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray) -> tuple:
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), round by round as the paper states it:
    a key injection s before round 0 and after every fourth round, rotation R[round mod 8]."""
    rotation = (13, 15, 26, 6, 17, 29, 16, 24)
    schedule = [int(key[0]), int(key[1]), int(key[0]) ^ int(key[1]) ^ 0x1BD11BDA]
    words = [x0.astype(np.uint64), x1.astype(np.uint64)]
    mask = np.uint64(0xFFFFFFFF)

    def inject(s: int) -> None:
        words[0] = (words[0] + np.uint64(schedule[s % 3])) & mask
        words[1] = (words[1] + np.uint64(schedule[(s + 1) % 3]) + np.uint64(s)) & mask

    inject(0)
    for rnd in range(20):
        r = np.uint64(rotation[rnd % 8])
        words[0] = (words[0] + words[1]) & mask
        words[1] = ((words[1] << r) | (words[1] >> (np.uint64(32) - r))) & mask
        words[1] = words[1] ^ words[0]
        if rnd % 4 == 3:
            inject(rnd // 4 + 1)
    return words[0].astype(np.uint32), words[1].astype(np.uint32)


def test_threefry_reference_matches_the_published_answers():
    zero = np.zeros(1, np.uint32)
    assert [int(v[0]) for v in _threefry2x32_numpy((0, 0), zero, zero)] == [0x6B200159, 0x99BA4EFE]
    ones = np.full(1, 0xFFFFFFFF, np.uint32)
    got = _threefry2x32_numpy((0xFFFFFFFF, 0xFFFFFFFF), ones, ones)
    assert [int(v[0]) for v in got] == [0x1CB996FC, 0xBB002BE7]


def test_threefry_matches_the_numpy_reference_for_any_key_and_counter():
    rng = np.random.default_rng(3)
    key = tuple(int(k) for k in rng.integers(0, 2**32, size=2, dtype=np.uint64))
    x0, x1 = (rng.integers(0, 2**32, size=257, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    got = jax.jit(augment.threefry2x32)(
        (jnp.uint32(key[0]), jnp.uint32(key[1])), jnp.asarray(x0), jnp.asarray(x1)
    )
    for g, e in zip(got, _threefry2x32_numpy(key, x0, x1)):
        np.testing.assert_array_equal(np.asarray(g), e)


def test_added_noise_equals_a_float64_reference_of_its_definition():
    key = jax.random.key(11)
    shape = (7, 5, 3)  # 105 values: odd, so the last counter's second word is dropped
    image = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    got = np.asarray(jax.jit(lambda k, x: augment.add_gaussian_noise(k, x, 0.25))(key, image))
    n, half = 105, 53
    words = np.asarray(jax.random.key_data(key))
    counter = np.arange(half, dtype=np.uint32)
    first, second = _threefry2x32_numpy(tuple(int(w) for w in words), counter, counter + half)
    bits = np.concatenate([first, second])[:n]
    u = (bits >> np.uint32(9)).astype(np.float64) * 2.0**-23
    lowest = float(np.nextafter(np.float32(-1), np.float32(1)))
    z = np.sqrt(2.0) * special.erfinv(np.maximum(lowest, 2.0 * u - 1.0))
    expected = np.asarray(image, np.float64).reshape(-1) + 0.25 * z
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=2e-5, atol=2e-6)


def test_added_noise_is_standard_normal_and_its_halves_independent():
    def noise(key: int, n: int) -> jax.Array:
        return augment.add_gaussian_noise(jax.random.key(key), jnp.zeros((n,)), 1.0)

    z = np.asarray(noise(4, 2**17), np.float64)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[: 2**16], z[2**16 :])[0, 1]) < 0.02  # counter i gives both halves
    other = np.asarray(noise(5, 2**17))
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.02
    keys = jnp.stack([jax.random.key(4), jax.random.key(5)])
    batched = jax.vmap(lambda k: augment.add_gaussian_noise(k, jnp.zeros((9,)), 1.0))(keys)
    for row, key in zip(np.asarray(batched), (4, 5)):
        np.testing.assert_array_equal(row, np.asarray(noise(key, 9)))
