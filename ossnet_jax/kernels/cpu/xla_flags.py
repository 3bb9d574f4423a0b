"""XLA:CPU flags of the entry points: YNNPACK's fusions off, and reassociation for vectorised loops.

1. YNNPACK off (`--xla_cpu_experimental_ynn_fusion_type=`), so dots run in XLA's Eigen GEMM. jaxlib 0.10
   hands XLA:CPU's dot products (and some elementwise and reduction fusions) to YNNPACK, whose GEMM
   was the slower one in `python -m benchmarks.xla_flags` (update step, prepare_inputs and inference
   decoder alike); XNNPACK or oneDNN dots were no better than Eigen's.
2. Reassociation (REASSOCIATION). Without it LLVM keeps the sequential order of every floating-point
   sum, so the loop of a reduction fusion is scalar code. That is the PAU backward's ten coefficient
   sums, the BatchNorm sums, and the weight gradients fused into reductions, whose loops vectorise
   with it; the update step, prepare_inputs and the decoder's forward + backward all ran faster.
   kernels/cpu/recompute.after_gradient keeps these flags from folding away train.remat's
   recomputation. NaN, Inf, exact division and exact library functions stay honoured, so isfinite,
   the NaN/Inf guard of the update and exp/log/tanh mean what they did; sums change by float32
   rounding only (as on GPUs, whose reductions are trees).

The measurements of both are in docs/performance.md, "XLA:CPU flags".

The flags only name XLA:CPU options, so accelerator programs are untouched.

XLA reads XLA_FLAGS when it creates its first backend, so `configure` must run before any JAX
computation (importing jax is fine). A flag the user already put in XLA_FLAGS wins over ours (each is
judged by its name); OSSNET_XLA_CPU_FLAGS=0 adds nothing. This module imports nothing heavy.
"""

import os

# LLVM may reassociate floating-point operations (and contract them into FMAs, ignore the sign of zero),
# which lets it vectorise the loops of reduction fusions; NaN, Inf, exact division and exact library
# functions stay honoured, so isfinite checks, the NaN/Inf guard and exp/log/tanh keep their meaning.
REASSOCIATION = (
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_fast_math_honor_nans=true",
    "--xla_cpu_fast_math_honor_infs=true",
    "--xla_cpu_fast_math_honor_division=true",
    "--xla_cpu_fast_math_honor_functions=true",
)
FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",) + REASSOCIATION
OPT_OUT = "OSSNET_XLA_CPU_FLAGS"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merged_flags(environ: dict[str, str]) -> str:
    """The XLA_FLAGS value this environment should run with: the user's flags, then each of FLAGS
    whose name the user did not set (nothing is added with OSSNET_XLA_CPU_FLAGS=0)."""
    current = environ.get("XLA_FLAGS", "").strip()
    if environ.get(OPT_OUT, "1") == "0":
        return current
    named = {_flag_name(f) for f in current.split()}
    extra = [f for f in FLAGS if _flag_name(f) not in named]
    return " ".join(([current] if current else []) + extra)


def configure() -> None:
    """Puts `merged_flags` into os.environ['XLA_FLAGS']; call it before the first JAX computation."""
    flags = merged_flags(dict(os.environ))
    if flags:
        os.environ["XLA_FLAGS"] = flags
