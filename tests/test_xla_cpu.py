"""XLA_FLAGS set by the entry points: merging with the user's flags, and their effect on compiled dots."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from ossnet_jax import xla_cpu

YNN = "--xla_cpu_experimental_ynn_fusion_type"

# A dot compiled after xla_cpu.configure() (jax imported first, as in the entry points); prints how
# many YNNPACK fusions the compiled program holds, then the product's largest error against numpy.
PROBE = (
    "import jax, jax.numpy as jnp, numpy as np; from ossnet_jax import xla_cpu; xla_cpu.configure();"
    " a = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32);"
    " f = jax.jit(lambda a: jnp.tanh(a @ a.T)); text = f.lower(a).compile().as_text();"
    " ref = np.tanh(a.astype(np.float64) @ a.T.astype(np.float64));"
    " print(text.count('__ynn_fusion'), float(np.abs(np.asarray(f(a)) - ref).max()))"
)


def test_merged_flags_appends_keeps_the_users_and_opts_out():
    assert xla_cpu.merged_flags({}) == " ".join(xla_cpu.FLAGS)
    user = "--xla_cpu_enable_fast_math=false"
    assert xla_cpu.merged_flags({"XLA_FLAGS": user}) == f"{user} {' '.join(xla_cpu.FLAGS)}"
    own = f"{YNN}=dot"
    assert xla_cpu.merged_flags({"XLA_FLAGS": own}) == own
    assert xla_cpu.merged_flags({"XLA_FLAGS": user, xla_cpu.OPT_OUT: "0"}) == user
    assert xla_cpu.merged_flags({xla_cpu.OPT_OUT: "0"}) == ""


def _probe(environ: dict[str, str]) -> tuple[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True
    )
    count, error = done.stdout.split()
    return int(count), float(error)


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
