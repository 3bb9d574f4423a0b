"""Every operation of both kernel sets (ossnet_jax/kernels) against float64 reference formulas.

The references below are written out from the definitions, independently of kernels/xla.py: batch
norm as (x - mean) / sqrt(var + eps) * scale + bias with the biased variance, the PAU as P / Q, the 3D
convolution as a sum over the k^3 taps of each output voxel's neighbourhood, pooling as a reshape and
a mean. They run in float64 (jax's x64 mode), and their gradients are jax's autodiff of those
formulas. Each operation of each set runs in float32 under jit; its outputs and its vector-Jacobian
products with random cotangents (of every output, the returned batch statistics included) must agree
with the reference. Another test checks that the two sets agree with each other on float32 inputs.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from ossnet_jax import kernels
from ossnet_jax.kernels.cpu import conv as cpu_conv
from ossnet_jax.kernels.cpu import noise as cpu_noise

SETS = ("xla", "cpu")
EPS = 1e-5  # batch norm's epsilon, as PyTorch and nn.BatchNorm
# the PAU's initial coefficients (a fit to leaky ReLU), the range the models start from
NUMERATOR = np.array([0.029803, 0.618385, 2.322323, 3.04922, 1.483393, 0.250562])
DENOMINATOR = np.array([1.141535, 4.389166, -0.870326, 0.346548])


# --------------------------------------------------------------------------------------------------
# float64 references, written from the definitions


def ref_conv3d(x, kernel):
    """'same' cross-correlation: output voxel (x, y, z) is the sum over taps (i, j, m) of the
    zero-padded input at (x + i, y + j, z + m) times the tap's (Cin, Cout) matrix. The k^3
    neighbourhoods are read with one gather (a loop over k^3 slices compiles slowly in x64)."""
    k = kernel.shape[0]
    p = k // 2
    nx, ny, nz = x.shape[1:4]
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    taps = np.arange(k)
    ix = (np.arange(nx)[:, None] + taps)[:, None, None, :, None, None]
    iy = (np.arange(ny)[:, None] + taps)[None, :, None, None, :, None]
    iz = (np.arange(nz)[:, None] + taps)[None, None, :, None, None, :]
    neighbourhoods = padded[:, ix, iy, iz]  # (B, X, Y, Z, k, k, k, Cin)
    return jnp.einsum("bxyzijmc,ijmco->bxyzo", neighbourhoods, kernel)


def ref_pau(x, a, b):
    """P(x) / Q(x): P = sum_i a_i x^i (i = 0..5), Q = 1 + sum_j |b_j x^j| (j = 1..4)."""
    p = sum(a[i] * x**i for i in range(6))
    q = 1.0 + sum(jnp.abs(b[j - 1] * x**j) for j in range(1, 5))
    return p / q


def ref_batch_norm_train(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = ((x - mean) ** 2).mean(axes)  # biased
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias, mean, var


def ref_batch_norm_pau(x, scale, bias, a, b, shortcut):
    y, mean, var = ref_batch_norm_train(x, scale, bias)
    if shortcut is not None:
        y = y + shortcut
    return ref_pau(y, a, b), mean, var


def ref_conv_batch_norm_pau(x, kernel, scale, bias, a, b):
    return ref_batch_norm_pau(ref_conv3d(x, kernel), scale, bias, a, b, None)


def ref_conditional_batch_norm_train(x, gamma, beta):
    """One mean and one biased variance over all of x, then per volume gamma x_hat + beta."""
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    y = (x - mean) / jnp.sqrt(var + EPS) * gamma[:, None, :] + beta[:, None, :]
    return y, mean, var


def ref_scale_shift(x, a, c):
    return x * a[:, None, :] + c[:, None, :]


def ref_mean_pool(x, factor):
    b, nx, ny, nz, c = x.shape
    f = factor
    return x.reshape(b, nx // f, f, ny // f, f, nz // f, f, c).mean((2, 4, 6))


def ref_avg_pool2(x):
    return ref_mean_pool(x, 2)


def ref_patch_conv(x, kernel, size):
    """Each flattened (S, S, S, Cin) patch convolved on its own, zero outside it."""
    cin, cout = kernel.shape[3], kernel.shape[4]
    patches = x.reshape(-1, size, size, size, cin)
    return ref_conv3d(patches, kernel).reshape(*x.shape[:-1], size**3 * cout)


# --------------------------------------------------------------------------------------------------
# cases: arguments of one operation, which of them are differentiated, the reference


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # a name in kernels.OPERATIONS
    label: str
    args: tuple  # float64 numpy arrays (cast to the run's dtype), None or static Python values
    diff: tuple[int, ...]  # positions of the differentiated arguments
    reference: Callable[..., Any]
    rtol: float = 1e-4
    slow: bool = False  # variants of a path the quick tier covers with another case

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}"


def _pau_inputs(rng, shape, case):
    x = rng.normal(size=shape) * 2
    x.flat[::5] = 0.0  # zero-padded patches: the sign convention of |.| at x = 0
    a = rng.normal(size=6)
    b = rng.normal(size=4) * [1, -1, 1, -1]
    # the sign of b_1 decides dQ/dx at x = 0; b_j = 0 takes the sign +1 (jax's derivative of |.|)
    b[0] = {"b1>0": abs(b[0]), "b1<0": -abs(b[0]), "b1=0": 0.0, "b2=0": b[0]}[case]
    if case == "b2=0":
        b[1] = 0.0
    return x, a, b


def _cases() -> list[Case]:
    rng = np.random.default_rng(0)
    cases = []
    for k in (1, 3, 5):  # k = 1 is a product over (voxels, Cin) rows in the CPU set
        x = rng.normal(size=(2, 5, 4, 3, 3))
        kernel = 0.3 * rng.normal(size=(k, k, k, 3, 2))
        cases.append(Case("conv3d", f"k{k}", (x, kernel), (0, 1), ref_conv3d))
    # the CPU set's coefficient sums keep the leading axes (41,) and (2, 5, 3); (6, 7) and (287,)
    # have too few leading values and are summed over gcd(size, 16) = 2 and 1 rows
    pau_shapes = [((41, 7), c) for c in ("b1>0", "b1<0", "b1=0", "b2=0")]
    pau_shapes += [((2, 5, 3, 7), "b1<0"), ((6, 7), "b1>0"), ((287,), "b1<0")]
    for shape, case in pau_shapes:
        label = f"{'x'.join(map(str, shape))}-{case}"
        slow = shape in ((2, 5, 3, 7), (287,))
        args = _pau_inputs(rng, shape, case)
        cases.append(Case("pau", label, args, (0, 1, 2), ref_pau, slow=slow))
    for shape in ((2, 5, 4, 3, 4), (6, 5, 3)):
        x = 1.5 + 2.0 * rng.normal(size=shape)
        scale, bias = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
        label = "x".join(map(str, shape))
        args = (x, scale, bias)
        slow = len(shape) != 5  # the models normalise volumes
        cases.append(
            Case("batch_norm_train", label, args, (0, 1, 2), ref_batch_norm_train, slow=slow)
        )
    for with_shortcut in (False, True):
        shape = (2, 5, 4, 3, 4)
        x = 0.7 + 1.5 * rng.normal(size=shape)
        scale, bias = 1.0 + 0.5 * rng.normal(size=4), 0.3 * rng.normal(size=4)
        a = NUMERATOR + 0.1 * rng.normal(size=6)
        b = DENOMINATOR * [1, -1, 1, 1]
        shortcut = rng.normal(size=shape) if with_shortcut else None
        args = (x, scale, bias, a, b, shortcut)
        diff = (0, 1, 2, 3, 4, 5) if with_shortcut else (0, 1, 2, 3, 4)
        label = "shortcut" if with_shortcut else "plain"
        cases.append(Case("batch_norm_pau", label, args, diff, ref_batch_norm_pau))
    for k in (1, 3):
        x = rng.normal(size=(2, 6, 4, 4, 3))
        kernel = 0.3 * rng.normal(size=(k, k, k, 3, 4))
        scale, bias = 1.0 + 0.3 * rng.normal(size=4), 0.3 * rng.normal(size=4)
        a = NUMERATOR + 0.1 * rng.normal(size=6)
        b = DENOMINATOR * [1, -1, 1, 1]
        args = (x, kernel, scale, bias, a, b)
        cases.append(
            Case(
                "conv_batch_norm_pau",
                f"k{k}",
                args,
                tuple(range(6)),
                ref_conv_batch_norm_pau,
                slow=k == 1,  # the models fuse their first 3^3 convolution only
            )
        )
    x = 0.4 + 1.3 * rng.normal(size=(2, 6, 5))
    gamma, beta = 1.0 + 0.5 * rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    cases.append(
        Case(
            "conditional_batch_norm_train",
            "2x6x5",
            (x, gamma, beta),
            (0, 1, 2),
            ref_conditional_batch_norm_train,
        )
    )
    x, a, c = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    cases.append(Case("scale_shift", "2x7x3", (x, a, c), (0, 1, 2), ref_scale_shift))
    for factor in (1, 2, 4):
        x = rng.normal(size=(2, 8, 4, 12, 3))
        cases.append(Case("mean_pool", f"f{factor}", (x, factor), (0,), ref_mean_pool))
    x = rng.normal(size=(2, 4, 6, 2, 3))
    cases.append(Case("avg_pool2", "2x4x6x2x3", (x,), (0,), ref_avg_pool2))
    # (leading shape, S, k, Cin, Cout); k > S: taps reaching past the whole patch
    patch_shapes = [((2, 3), 5, 3, 2, 3), ((4,), 3, 5, 1, 2), ((2, 2), 7, 7, 2, 1)]
    for lead, size, k, cin, cout in patch_shapes:
        x = rng.normal(size=lead + (size**3 * cin,))
        kernel = 0.2 * rng.normal(size=(k, k, k, cin, cout))
        label = f"S{size}k{k}"
        cases.append(Case("patch_conv", label, (x, kernel, size), (0, 1), ref_patch_conv))
    return cases


CASES = _cases()
CASE_PARAMS = [
    pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else []) for case in CASES
]
# tested below on their own: noise is equal in distribution only, recomputation needs a module, the
# search returns integers
OWN_TESTS = {"gaussian_noise", "recomputed", "searchsorted"}


# --------------------------------------------------------------------------------------------------
# running an operation and its vector-Jacobian product


def _cotangents(fn: Callable, case: Case) -> Any:
    """Random float64 cotangents shaped like fn's outputs on the case's arguments."""
    shapes = jax.eval_shape(_differentiable(fn, case, jnp.float32), *_primals(case, jnp.float32))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: rng.normal(size=s.shape), shapes)


def _cast(value, dtype):
    return jnp.asarray(value, dtype) if isinstance(value, np.ndarray) else value


def _primals(case: Case, dtype) -> list:
    return [_cast(case.args[i], dtype) for i in case.diff]


def _fill(args: list, positions: tuple[int, ...], values) -> list:
    """args with values at positions."""
    full = list(args)
    for i, value in zip(positions, values):
        full[i] = value
    return full


def _differentiable(fn: Callable, case: Case, dtype) -> Callable:
    """fn as a function of the differentiated arguments, the others fixed."""
    fixed = [_cast(a, dtype) for a in case.args]
    return lambda *primals: fn(*_fill(fixed, case.diff, primals))


def vjp_of(fn: Callable, case: Case, cotangents: Any, dtype=jnp.float32):
    """(outputs, gradients of the differentiated arguments) of fn at the case's arguments cast to
    dtype, for the given cotangents of its outputs, as numpy arrays; under jit."""
    partial = _differentiable(fn, case, dtype)

    def run(primals, cts):
        outputs, vjp = jax.vjp(partial, *primals)
        return outputs, vjp(cts)

    cts = jax.tree.map(lambda c: jnp.asarray(c, dtype), cotangents)
    outputs, grads = jax.jit(run)(_primals(case, dtype), cts)
    return jax.tree.map(np.asarray, (outputs, grads))


def reference_vjp(case: Case, cotangents: Any):
    """vjp_of the case's float64 reference formula, in jax's x64 mode."""
    with jax.enable_x64(True):
        return vjp_of(case.reference, case, cotangents, jnp.float64)


CASE_BY_ID = {case.id: case for case in CASES}
assert len(CASE_BY_ID) == len(CASES)


@functools.lru_cache(maxsize=None)
def case_cotangents(case_id: str) -> Any:
    """The random cotangents of a case (the XLA set's output shapes, which both sets share)."""
    case = CASE_BY_ID[case_id]
    return _cotangents(getattr(kernels.get("xla"), case.op), case)


@functools.lru_cache(maxsize=None)
def case_result(name: str, case_id: str):
    """vjp_of a case's operation in a kernel set ('xla', 'cpu') or of its reference ('float64'),
    with case_cotangents, computed once for the tests that compare them."""
    case = CASE_BY_ID[case_id]
    if name == "float64":
        return reference_vjp(case, case_cotangents(case_id))
    return vjp_of(getattr(kernels.get(name), case.op), case, case_cotangents(case_id))


def assert_close(got, want, rtol: float, what: str):
    """Equal to rtol relative, with an absolute floor of rtol times want's largest magnitude (sums
    with cancellation lose relative precision in float32, not absolute)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    floor = rtol * max(float(np.abs(want).max(initial=0.0)), 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=floor, err_msg=what)


def assert_vjp_close(got, want, case: Case, rtol: float):
    (outputs, grads), (want_outputs, want_grads) = got, want
    assert jax.tree.structure(outputs) == jax.tree.structure(want_outputs)
    for n, (o, w) in enumerate(zip(jax.tree.leaves(outputs), jax.tree.leaves(want_outputs))):
        assert_close(o, w, rtol, f"{case.id}: output {n}")
    for i, g, w in zip(case.diff, grads, want_grads):
        assert g.dtype == np.float32, (case.id, i, g.dtype)
        assert_close(g, w, rtol, f"{case.id}: gradient of argument {i}")


# --------------------------------------------------------------------------------------------------
# the interface


def test_every_operation_of_both_sets_is_tested_here():
    covered = {case.op for case in CASES} | OWN_TESTS
    assert covered == set(kernels.OPERATIONS)
    for name in SETS:
        module = kernels.get(name)
        missing = [op for op in kernels.OPERATIONS if not callable(getattr(module, op, None))]
        assert not missing, (name, missing)
    assert sorted(kernels.get("cpu").__all__) == sorted(kernels.OPERATIONS)


def test_resolve_and_get():
    assert kernels.resolve("auto", "cpu") == "cpu"
    assert kernels.resolve("auto", "gpu") == "xla" and kernels.resolve("auto", "tpu") == "xla"
    assert kernels.resolve("xla", "cpu") == "xla" and kernels.resolve("cpu", "gpu") == "cpu"
    with pytest.raises(ValueError, match="model.kernels must be one of"):
        kernels.resolve("fast")
    assert kernels.get("xla").__name__ == "ossnet_jax.kernels.xla"
    assert kernels.get("cpu").__name__ == "ossnet_jax.kernels.cpu.ops"
    assert kernels.get("auto") is kernels.get(kernels.resolve("auto"))


# --------------------------------------------------------------------------------------------------
# each set against the float64 references


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("name", SETS)
def test_operation_equals_the_float64_reference_with_gradients(name, case):
    got, want = case_result(name, case.id), case_result("float64", case.id)
    assert_vjp_close(got, want, case, case.rtol)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_cpu_and_xla_sets_agree_on_float32_inputs(case):
    """Both sets on the same float32 inputs and cotangents: the same outputs and gradients."""
    assert_vjp_close(case_result("cpu", case.id), case_result("xla", case.id), case, 1e-4)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_both_sets_return_the_same_shapes_and_dtypes_in_bfloat16(case):
    """x (and a convolution kernel, PAU coefficients and scale_shift's a, c, which the models cast
    to the computation dtype) in bfloat16, the other parameters float32: the same output and
    gradient shapes and dtypes from both sets (traced only)."""
    in_compute_dtype = {
        "conv3d": (0, 1),
        "conv_batch_norm_pau": (0, 1),
        "patch_conv": (0, 1),
        "pau": (0, 1, 2),
        "scale_shift": (0, 1, 2),
    }.get(case.op, (0,))

    def cast(i, a):
        if not isinstance(a, np.ndarray):
            return a
        return jnp.asarray(a, jnp.bfloat16 if i in in_compute_dtype else jnp.float32)

    args = [cast(i, a) for i, a in enumerate(case.args)]

    def signature(name):
        """[(shape, dtype)] of the outputs, then of the gradients."""
        fn = getattr(kernels.get(name), case.op)

        def run(*primals):
            outputs, vjp = jax.vjp(lambda *p: fn(*_fill(args, case.diff, p)), *primals)
            return outputs, vjp(jax.tree.map(jnp.ones_like, outputs))

        outputs, grads = jax.eval_shape(run, *[args[i] for i in case.diff])
        describe = lambda tree: [(s.shape, s.dtype) for s in jax.tree.leaves(tree)]
        return describe(outputs), describe(grads)

    (outputs, grads), cpu = signature("xla"), signature("cpu")
    assert cpu == (outputs, grads)
    assert outputs[0][1] == jnp.bfloat16  # the result in x's dtype
    for n, stat in enumerate(outputs[1:]):
        assert stat[1] == jnp.float32, (case.id, "statistic", n)
    for i, (shape, dtype) in zip(case.diff, grads):
        assert (shape, dtype) == (args[i].shape, args[i].dtype), (case.id, i)


@pytest.mark.parametrize("name", SETS)
def test_pooling_rejects_indivisible_shapes(name):
    ops = kernels.get(name)
    with pytest.raises(ValueError, match="even spatial sizes"):
        ops.avg_pool2(jnp.zeros((1, 4, 3, 2, 1)))
    with pytest.raises(ValueError, match="cannot mean-pool"):
        ops.mean_pool(jnp.zeros((1, 8, 4, 6, 1)), 4)


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted_equals_numpy(name, side):
    """Insertion indices in a sorted array with runs of equal values (the cumulative counts of a
    sparse band, as location sampling searches them), for values below, between, at and above its
    entries, of any shape; also in a float array."""
    search = jax.jit(kernels.get(name).searchsorted, static_argnums=2)
    rng = np.random.default_rng(12)
    counts = np.cumsum(rng.random(size=300) < 0.2).astype(np.int32)
    values = rng.integers(-2, counts[-1] + 3, size=(4, 25)).astype(np.int32)
    values[0, :4] = [0, counts[-1], counts[0], -1]
    got = search(jnp.asarray(counts), jnp.asarray(values), side)
    assert got.shape == values.shape and jnp.issubdtype(got.dtype, jnp.integer)
    np.testing.assert_array_equal(np.asarray(got), np.searchsorted(counts, values, side))
    sorted_floats = np.sort(rng.normal(size=257)).astype(np.float32)
    queries = np.concatenate([rng.normal(size=40), sorted_floats[::16], [-9.0, 9.0]])
    queries = queries.astype(np.float32)
    got = search(jnp.asarray(sorted_floats), jnp.asarray(queries), side)
    np.testing.assert_array_equal(np.asarray(got), np.searchsorted(sorted_floats, queries, side))


# --------------------------------------------------------------------------------------------------
# the CPU convolution's slab kernel gradient (CPU set only: the XLA set has one convolution form)


@pytest.mark.parametrize(
    "op,k,slab_bytes",
    [
        ("conv3d", 3, 1),
        ("conv3d", 3, 2**30),
        pytest.param("conv3d", 5, 1, marks=pytest.mark.slow),
        pytest.param("conv_batch_norm_pau", 3, 1, marks=pytest.mark.slow),
    ],
)
def test_cpu_slab_kernel_gradient_equals_the_float64_reference(monkeypatch, op, k, slab_bytes):
    """From kernels/cpu/conv.SLAB_MIN_VOXELS voxels on, the CPU set's convolution takes its kernel
    gradient as a sum over slabs of X-planes (one plane per slab with SLAB_BYTES = 1, all at once
    with 1 GiB); lowered here so that these tiny volumes take that path, which is checked to run."""
    monkeypatch.setattr(cpu_conv, "SLAB_MIN_VOXELS", 0)
    monkeypatch.setattr(cpu_conv, "SLAB_BYTES", slab_bytes)
    calls = []
    slab_gradient = cpu_conv.conv3d_kernel_grad

    def counted(*args):
        calls.append(args[2])
        return slab_gradient(*args)

    monkeypatch.setattr(cpu_conv, "conv3d_kernel_grad", counted)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 5, 4, 3))
    kernel = 0.3 * rng.normal(size=(k, k, k, 3, 4))
    if op == "conv3d":
        case = Case(op, f"slab-k{k}", (x, kernel), (0, 1), ref_conv3d)
    else:
        scale, bias = 1.0 + 0.3 * rng.normal(size=4), 0.3 * rng.normal(size=4)
        args = (x, kernel, scale, bias, NUMERATOR, DENOMINATOR * [1, -1, 1, 1])
        case = Case(op, f"slab-k{k}", args, tuple(range(6)), ref_conv_batch_norm_pau)
    fn = getattr(kernels.get("cpu"), op)
    cotangents = _cotangents(fn, case)
    got = vjp_of(fn, case, cotangents)
    assert calls and set(calls) == {k}  # the slab kernel gradient ran
    assert_vjp_close(got, reference_vjp(case, cotangents), case, 1e-4)


# --------------------------------------------------------------------------------------------------
# gaussian_noise: equal in distribution (the two sets draw different bits)


@pytest.mark.parametrize("name", SETS)
def test_gaussian_noise_is_x_plus_std_times_standard_normal(name):
    noise = jax.jit(kernels.get(name).gaussian_noise, static_argnums=2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 16, 4)), jnp.float32)
    std = 0.3
    y = noise(jax.random.key(4), x, std)
    assert y.shape == x.shape and y.dtype == x.dtype
    z = (np.asarray(y, np.float64) - np.asarray(x, np.float64)) / std
    assert stats.kstest(z.reshape(-1), "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    # the halves of x (the CPU set draws both from one counter) and neighbouring values independent
    flat = z.reshape(-1)
    assert abs(np.corrcoef(flat[: flat.size // 2], flat[flat.size // 2 :])[0, 1]) < 0.02
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.02
    np.testing.assert_array_equal(np.asarray(noise(jax.random.key(4), x, std)), np.asarray(y))
    other = np.asarray(noise(jax.random.key(5), x, std), np.float64) - np.asarray(x, np.float64)
    assert abs(np.corrcoef(z.reshape(-1), other.reshape(-1))[0, 1]) < 0.02
    # the input passes through: the gradient of x is the identity
    g = jnp.asarray(np.random.default_rng(6).normal(size=(3, 5)), jnp.float32)
    _, vjp = jax.vjp(lambda v: noise(jax.random.key(4), v, std), jnp.zeros((3, 5)))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("shape,dtype", [((7, 5, 3), jnp.float32), ((4, 6), jnp.bfloat16)])
def test_gaussian_noise_keeps_shape_and_dtype_of_odd_and_bfloat16_inputs(name, shape, dtype):
    x = jnp.zeros(shape, dtype)
    y = jax.jit(kernels.get(name).gaussian_noise, static_argnums=2)(jax.random.key(0), x, 1.0)
    assert y.shape == shape and y.dtype == dtype
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert len(np.unique(np.asarray(y, np.float32))) > y.size // 2  # not one repeated value


def test_gaussian_noise_of_another_prng_implementation_is_the_same_in_both_sets():
    """Keys of another PRNG than threefry take jax.random.normal in the CPU set too: the same bits."""
    key = jax.random.key(7, impl="rbg")
    x = jnp.ones((5, 4, 3))
    xla, cpu = (kernels.get(n).gaussian_noise(key, x, 0.5) for n in SETS)
    np.testing.assert_array_equal(np.asarray(cpu), np.asarray(xla))


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


def test_cpu_threefry_matches_the_numpy_reference_for_any_key_and_counter():
    """CPU set internals: the hand-written threefry hash gives the reference's bits."""
    rng = np.random.default_rng(3)
    key = tuple(int(k) for k in rng.integers(0, 2**32, size=2, dtype=np.uint64))
    x0, x1 = (rng.integers(0, 2**32, size=257, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    got = jax.jit(cpu_noise.threefry2x32)(
        (jnp.uint32(key[0]), jnp.uint32(key[1])), jnp.asarray(x0), jnp.asarray(x1)
    )
    for g, e in zip(got, _threefry2x32_numpy(key, x0, x1)):
        np.testing.assert_array_equal(np.asarray(g), e)


def test_cpu_noise_equals_a_float64_reference_of_its_definition():
    """CPU set internals: counter i gives the values at flat indices i and i + n/2 (n rounded up to
    even), each sqrt(2) erfinv(2u - 1) of the word's top 23 bits."""
    key = jax.random.key(11)
    shape = (7, 5, 3)  # 105 values: odd, so the last counter's second word is dropped
    image = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    got = np.asarray(jax.jit(lambda k, x: cpu_noise.gaussian_noise(k, x, 0.25))(key, image))
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


def test_cpu_noise_under_vmap_equals_each_key_alone():
    keys = jnp.stack([jax.random.key(4), jax.random.key(5)])
    noise = lambda k: cpu_noise.gaussian_noise(k, jnp.zeros((9,)), 1.0)
    batched = jax.jit(jax.vmap(noise))(keys)
    for row, key in zip(np.asarray(batched), (4, 5)):
        np.testing.assert_array_equal(row, np.asarray(jax.jit(noise)(jax.random.key(key))))


# --------------------------------------------------------------------------------------------------
# recomputed: the module's own values, gradients and statistics


class _Inner(nn.Module):
    """Dense -> tanh, scaled by a per-volume factor of `rest`; a running mean of its output in
    'batch_stats', which the forward pass reads before it updates it."""

    @nn.compact
    def __call__(self, x, latent):
        count = self.variable("batch_stats", "mean", lambda: jnp.zeros((), jnp.float32))
        h = jnp.tanh(nn.Dense(5, name="dense")(x) * (1.0 + count.value))
        y = h * (1.0 + latent[:, None, :1])
        if not self.is_initializing():
            count.value = 0.9 * count.value + 0.1 * jnp.mean(y)
        return y


def _inner_call(module, x, latent):
    return module(x, latent)


class _Outer(nn.Module):
    kernels: str
    recompute: bool

    @nn.compact
    def __call__(self, x, latent):
        inner = _Inner(name="inner")
        if self.recompute and not self.is_initializing():
            return kernels.get(self.kernels).recomputed(inner, _inner_call, x, latent)
        return inner(x, latent)


@pytest.mark.parametrize("name", SETS)
def test_recomputed_equals_calling_the_module(name):
    """Values, the gradients of the parameters, of x and of the further argument, and the updated
    batch statistics are those of calling the module directly."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
    variables = _Outer(name, False).init(jax.random.key(0), x, latent)
    stats = {"inner": {"mean": jnp.asarray(0.4, jnp.float32)}}  # read by the forward pass

    def run(module):
        def f(params, x, latent):
            return module.apply(
                {"params": params, "batch_stats": stats}, x, latent, mutable=["batch_stats"]
            )

        def outputs_and_grads(params, x, latent):
            y, vjp, updated = jax.vjp(f, params, x, latent, has_aux=True)
            return y, updated, vjp(g)

        return jax.jit(outputs_and_grads)(variables["params"], x, latent)

    y, updated, grads = run(_Outer(name, False))
    y_r, updated_r, grads_r = run(_Outer(name, True))
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y), rtol=1e-6, atol=1e-6)
    expected_stat = 0.9 * 0.4 + 0.1 * float(jnp.mean(y))
    for tree in (updated, updated_r):
        np.testing.assert_allclose(float(tree["batch_stats"]["inner"]["mean"]), expected_stat, 1e-5)
    assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(grads[2]))) > 0  # the further argument's gradient, not vacuous
