"""XLA:CPU flags of the entry points: YNNPACK's fusions off, and reassociation for vectorised loops.

1. YNNPACK off (`--xla_cpu_experimental_ynn_fusion_type=`), so dots run in XLA's Eigen GEMM. jaxlib 0.10
   hands XLA:CPU's dot products (and some elementwise and reduction fusions) to YNNPACK by default. On
   the 2-core AMD EPYC Zen 5 (family 26), medians of 3 alternating rounds of `python -m
   benchmarks.xla_flags`, one process each, OSS-Net C at the official sizes (2 x 4096 locations): update
   step 2.97 -> 2.50 s, prepare_inputs 0.52 -> 0.42 s, the demo's inference decoder 78,800 -> 109,000
   locations/s. On a Zen 4 (family 25), one round: update 4.93 -> 4.67 s, decoder forward 18,475 ->
   20,212 locations/s. XNNPACK or oneDNN dots were no better.
2. Reassociation (REASSOCIATION). Without it LLVM keeps the sequential order of every floating-point
   sum, so the loop of a reduction fusion is scalar code. That is the PAU backward's ten coefficient
   sums, the BatchNorm sums, and the weight gradients fused into reductions: encoder block 0's PAU
   backward reduction took 364 ms of the update step, 38 ms with reassociation, and its BatchNorm
   backward reduction 327 -> 107 ms (profile, Zen 4). Medians of 2 alternating rounds on the Zen 5,
   with YNNPACK off in both: update step 2.26 -> 2.01 s, prepare 0.41 -> 0.38 s, decoder forward +
   backward 8,227 -> 8,809 locations/s, the demo's train step 0.292 -> 0.260 s (benchmarks/NOTES.md,
   tenth run; the Zen 4 comparison of the ninth run, update 4.79 -> 3.78 s, was measured while these
   flags let XLA fold away train.remat's recomputation, see models/recompute.after_gradient, and is
   an upper bound). NaN, Inf, exact division and exact library functions stay honoured, so isfinite,
   the NaN/Inf guard of the update and exp/log/tanh mean what they did; sums change by float32
   rounding only (as on GPUs, whose reductions are trees).

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
