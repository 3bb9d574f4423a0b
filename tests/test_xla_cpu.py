"""XLA_FLAGS set by the entry points: merging with the user's flags, and their effect on compiled dots."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.kernels.cpu import xla_flags as xla_cpu

YNN = "--xla_cpu_experimental_ynn_fusion_type"

# A dot compiled after xla_cpu.configure() (jax imported first, as in the entry points); prints how
# many YNNPACK fusions the compiled program holds, then the product's largest error against numpy.
PROBE = (
    "import jax, jax.numpy as jnp, numpy as np; from ossnet_jax.kernels.cpu import xla_flags as xla_cpu; xla_cpu.configure();"
    " a = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32);"
    " f = jax.jit(lambda a: jnp.tanh(a @ a.T)); text = f.lower(a).compile().as_text();"
    " ref = np.tanh(a.astype(np.float64) @ a.T.astype(np.float64));"
    " print(text.count('__ynn_fusion'), float(np.abs(np.asarray(f(a)) - ref).max()))"
)


def test_merged_flags_appends_keeps_the_users_and_opts_out():
    assert xla_cpu.merged_flags({}) == " ".join(xla_cpu.FLAGS)
    user = "--xla_cpu_use_thunk_runtime=true"
    assert xla_cpu.merged_flags({"XLA_FLAGS": user}) == f"{user} {' '.join(xla_cpu.FLAGS)}"
    own = f"{YNN}=dot"
    rest = " ".join(f for f in xla_cpu.FLAGS if not f.startswith(YNN))
    assert xla_cpu.merged_flags({"XLA_FLAGS": own}) == f"{own} {rest}"
    no_fast = "--xla_cpu_enable_fast_math=false"
    merged = xla_cpu.merged_flags({"XLA_FLAGS": no_fast}).split()
    assert merged[0] == no_fast and "--xla_cpu_enable_fast_math=true" not in merged
    assert xla_cpu.merged_flags({"XLA_FLAGS": user, xla_cpu.OPT_OUT: "0"}) == user
    assert xla_cpu.merged_flags({xla_cpu.OPT_OUT: "0"}) == ""


def _probe(environ: dict[str, str]) -> tuple[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True
    )
    count, error = done.stdout.split()
    return int(count), float(error)


@pytest.mark.slow
def test_configure_after_importing_jax_takes_dots_away_from_ynnpack():
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    fused, error_default = _probe({**base, xla_cpu.OPT_OUT: "0"})
    assert fused >= 1  # jaxlib's default: the dot runs in a YNNPACK fusion
    fused, error = _probe(base)
    assert fused == 0
    assert error < 1e-4 and error_default < 1e-4


def test_this_test_process_compiles_without_ynnpack():
    """conftest.py configures the flags before any JAX computation of the test session."""
    a = jnp.ones((32, 16), jnp.float32)
    text = jax.jit(lambda a: a @ a.T).lower(a).compile().as_text()
    assert "__ynn_fusion" not in text


def test_reassociation_keeps_nan_inf_and_division_exact():
    """The session compiles with xla_cpu.REASSOCIATION (conftest): fused reductions and elementwise
    code must still see NaN and Inf (the NaN/Inf guard of the update) and divide exactly."""
    assert set(xla_cpu.REASSOCIATION) <= set(os.environ["XLA_FLAGS"].split())
    x = jnp.asarray([1.0, 2.0, jnp.nan, 4.0] * 64, jnp.float32)
    y = jnp.asarray([1.0, jnp.inf, 3.0, 4.0] * 64, jnp.float32)
    checks = jax.jit(
        lambda x, y, s: (
            jnp.isnan(jnp.sum(x * s)),
            jnp.isinf(jnp.sum(y * s)),
            jnp.all(jnp.isfinite(x * s)),
            jnp.max(x * s),
            (y * s) / 3.0,
        )
    )
    has_nan, has_inf, all_finite, largest, quotient = checks(x, y, jnp.float32(1.0))
    assert bool(has_nan) and bool(has_inf) and not bool(all_finite)
    assert bool(jnp.isnan(largest))
    np.testing.assert_array_equal(
        np.asarray(quotient), np.asarray(y, np.float64).astype(np.float32) / np.float32(3.0)
    )


def test_reassociated_reduction_matches_float64():
    """A 10-output variadic reduction like the PAU backward's, summed in the reassociated order,
    against numpy in float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 64, 96)).astype(np.float32)
    g = rng.normal(size=(16, 64, 96)).astype(np.float32)

    def sums(x, g):
        terms = [g]
        for _ in range(9):
            terms.append(terms[-1] * x)
        return jax.lax.reduce(
            tuple(terms),
            tuple(jnp.zeros((), jnp.float32) for _ in terms),
            lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)),
            (1, 2),
        )

    got = np.stack([np.asarray(r) for r in jax.jit(sums)(x, g)])
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    want = np.stack([(g64 * x64**i).sum(axis=(1, 2)) for i in range(10)])
    scale = np.stack([(np.abs(g64) * np.abs(x64) ** i).sum(axis=(1, 2)) for i in range(10)])
    assert np.all(np.abs(got - want) <= 1e-5 * scale)
