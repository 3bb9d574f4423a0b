"""Gaussian noise for the training augmentation with a hand-written threefry hash, as XLA:CPU runs it fast.

Equal in distribution to kernels/xla.gaussian_noise (jax.random.normal); the bits differ. The threefry
rounds are checked against an independent numpy reference in tests/test_kernels.py.
"""

import math

import jax
import jax.numpy as jnp

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)


def threefry2x32(
    key: tuple[jax.Array, jax.Array], x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), the hash of jax.random's default PRNG.

    key: two uint32 scalars; x0, x1: uint32 counters of one shape. Returns the two output words.
    Written out round by round, XLA fuses it into one vectorised loop; jax's own lowering for the CPU
    is a rolled loop that passes the arrays through memory five times, which runs slower
    (docs/performance.md, "Hand-written threefry noise"). The same bits, see tests/test_kernels.py.
    """
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[4 * (group % 2) : 4 * (group % 2) + 4]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def gaussian_noise(key: jax.Array, x: jax.Array, std: float) -> jax.Array:
    """x + std * z for standard normal z drawn with a threefry key, two values per threefry block.

    jax.random.normal of a threefry key hashes one counter per value and keeps the XOR of the block's
    two output words; here counter i gives the values at flat indices i and i + n/2 (n = x.size rounded
    up to even), so the hashing costs half. Each value is sqrt(2) erfinv(2u - 1) of a uniform u of the
    word's top 23 bits, clipped to the open interval as jax.random.normal does. The two halves of x
    are noised separately and joined, the form XLA:CPU fuses into vectorised loops (joining the noise
    first took longer than jax.random.normal). With `threefry2x32` written out, the noise of a volume
    takes less time than jax.random.normal's (docs/performance.md). Keys of another PRNG
    implementation use jax.random.normal. Returns x's shape and dtype (the noise is float32).
    """
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return x + std * jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
    n = x.size
    flat = x.reshape(-1).astype(jnp.float32)
    if n % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.float32)])
    half = flat.size // 2
    words = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, half)
    first, second = threefry2x32((words[0], words[1]), counter, counter + jnp.uint32(half))
    lowest = jnp.nextafter(jnp.float32(-1), jnp.float32(1))

    def normal(bits: jax.Array) -> jax.Array:
        mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
        u = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0  # [0, 1)
        return jnp.float32(math.sqrt(2.0)) * jax.scipy.special.erfinv(
            jnp.maximum(lowest, 2.0 * u - 1.0)
        )

    noisy = jnp.concatenate([flat[:half] + std * normal(first), flat[half:] + std * normal(second)])
    return noisy[:n].reshape(x.shape).astype(x.dtype)
