"""3D 'same' convolution of volumes in the forms XLA's CPU backend runs fast.

XLA:CPU runs 3D convolutions of the encoder's sizes far below its GEMM rate. Stacking the k shifted
copies of the volume along X as channels turns a k^3 convolution into a k^2 convolution over (Y, Z)
with X folded into the batch, which XLA:CPU runs several times faster; the input gradient is that
form's transpose. The kernel gradient is not taken from XLA: it lowers it to one convolution whose
window spans the whole volume, which runs slowly. Here it is a sum over slabs of a few X-planes of one
GEMM each, (k^3 Cin, slab voxels) @ (slab voxels, Cout), the channel-major columns of each slab built
in cache. Measurements: docs/performance.md, "Folded 3D convolution and slab kernel gradients".
"""

import jax
import jax.numpy as jnp

from ossnet_jax.kernels.cpu.recompute import after_gradient

# Bytes of one slab's im2col columns: 2 X-planes per slab at the encoder's slab layers, which ran faster
# than 1 (docs/performance.md).
SLAB_BYTES = 16 * 2**20
# Volumes with fewer voxels (X Y Z) keep XLA's kernel gradient: there it is as fast, and the slab loop
# only adds compile time (docs/performance.md).
SLAB_MIN_VOXELS = 2**16


def _conv3d_folded(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation as a 2D convolution over (Y, Z) of the X-shifted copies."""
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    b, nx, ny, nz = x.shape[:4]
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate(
        [padded[:, i : i + nx] for i in range(k)], axis=-1
    )  # channel i Cin + c
    kernel2d = kernel.transpose(1, 2, 0, 3, 4).reshape(k, k, k * cin, cout)
    y = jax.lax.conv_general_dilated(
        stacked.reshape(b * nx, ny, nz, k * cin),
        kernel2d,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(b, nx, ny, nz, cout)


def slab_planes(shape: tuple[int, ...], k: int, itemsize: int) -> int:
    """X-planes per slab for the kernel gradient of a (B, X, Y, Z, Cin) input: the largest divisor of X
    whose im2col columns (planes (Y + k - 1) (Z + k - 1) k^3 Cin values, the padded lattice) fit
    SLAB_BYTES, at least 1."""
    nx, ny, nz, cin = shape[1:]
    per_plane = (ny + k - 1) * (nz + k - 1) * k**3 * cin * itemsize
    fitting = [d for d in range(1, nx + 1) if nx % d == 0 and d * per_plane <= SLAB_BYTES]
    return max(fitting, default=1)


def conv3d_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """Gradient of sum(g * conv3d(x, kernel)) with respect to the (k, k, k, Cin, Cout) kernel.

    Channel-major im2col on the padded lattice: x is zero-padded, transposed to (Cin, padded voxels)
    and flattened, so the input of tap (i, j, m) for every output voxel of a slab is one contiguous row
    shifted by (i Yp + j) Zp + m. A slab's columns (k^3 Cin, lattice voxels) are k^3 Cin row copies;
    g is padded at the high Y and Z ends to the same lattice, with zeros where a lattice voxel is no
    output voxel, and each slab adds columns @ g_slab (a GEMM contracting the slab's voxels). Row copies
    replace the channels-last im2col's Cin-value pieces, which ran slower (docs/performance.md).

    Args:
      x: (B, X, Y, Z, Cin) input of the convolution.
      g: (B, X, Y, Z, Cout) gradient of its output.
      k: odd kernel edge.
    Returns:
      (k, k, k, Cin, Cout), accumulated in float32 and returned in x's dtype.
    """
    b, nx, ny, nz, cin = x.shape
    cout = g.shape[-1]
    p = k // 2
    yp, zp = ny + 2 * p, nz + 2 * p
    planes = slab_planes(x.shape, k, x.dtype.itemsize)
    per_volume = nx // planes
    length = planes * yp * zp
    shifts = [(i * yp + j) * zp + m for i in range(k) for j in range(k) for m in range(k)]
    # one extra high X-plane keeps the last slab's widest shift inside the array
    lattice = jnp.pad(x, ((0, 0), (p, p + 1), (p, p), (p, p), (0, 0)))
    lattice = lattice.transpose(0, 4, 1, 2, 3).reshape(b, cin, -1)
    g_lattice = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * p), (0, 2 * p), (0, 0)))
    g_lattice = g_lattice.reshape(b, nx * yp * zp, cout)

    def add_slab(total, index):
        volume, start = index // per_volume, (index % per_volume) * length
        rows = jax.lax.dynamic_index_in_dim(lattice, volume, 0, keepdims=False)
        window = jax.lax.dynamic_slice_in_dim(rows, start, length + shifts[-1], axis=1)
        columns = jnp.concatenate(
            [window[:, shift : shift + length] for shift in shifts], axis=0
        )  # row tap Cin + c, taps row-major over (i, j, m)
        g_slab = jax.lax.dynamic_slice(g_lattice, (volume, start, 0), (1, length, cout))[0]
        product = jax.lax.dot_general(
            columns, g_slab, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return total + product, None

    total, _ = jax.lax.scan(
        add_slab, jnp.zeros((k**3 * cin, cout), jnp.float32), jnp.arange(b * per_volume)
    )
    return total.reshape(k, k, k, cin, cout).astype(x.dtype)


def conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' cross-correlation of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel, k odd.

    Equal to kernels/xla.conv3d (one lax.conv_general_dilated), gradients included; the kernel gradient is `conv3d_kernel_grad` from SLAB_MIN_VOXELS voxels on.
    Returns (B, X, Y, Z, Cout).
    """
    if kernel.shape[0] == 1:  # over (voxels, Cin) rows: see layers.over_rows
        y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[3], kernel.shape[4])
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if x.shape[1] * x.shape[2] * x.shape[3] < SLAB_MIN_VOXELS:
        return _conv3d_folded(x, kernel)
    return _conv3d(x, kernel)


@jax.custom_vjp
def _conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _conv3d_folded(x, kernel)


def _conv3d_fwd(x, kernel):
    return _conv3d_folded(x, kernel), (x, kernel)


def _conv3d_bwd(residuals, g):
    # tied to g, the kernel gradient's padded and transposed copy of x is made in the backward pass;
    # untied, XLA:CPU made it in the forward pass and kept it until the backward (docs/performance.md)
    x, kernel = (after_gradient(a, g) for a in residuals)
    _, transpose = jax.vjp(lambda v: _conv3d_folded(v, kernel), x)
    (dx,) = transpose(g)
    return dx, conv3d_kernel_grad(x, g, kernel.shape[0]).astype(kernel.dtype)


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)
