"""XLA:CPU flags of the entry points: YNNPACK's fusions off, so dots run in XLA's Eigen GEMM.

jaxlib 0.10 hands XLA:CPU's dot products (and some elementwise and reduction fusions) to YNNPACK by
default. On the 2-core AMD EPYC (Zen 5) this project is measured on, OSS-Net C's programs ran faster
with YNNPACK's fusions off (`python -m benchmarks.xla_flags`, medians of 3 alternating rounds, one
process each): at the official sizes the update step 2.97 -> 2.50 s and prepare_inputs 0.52 -> 0.42 s
(2 x 4096 locations), the demo's inference decoder 78,800 -> 109,000 locations/s; the demo's train step
and the 3D U-Net's did not move (0.367 / 0.362 s, 0.78 / 0.72 s). XNNPACK or oneDNN dots were no
better. The flag only names an XLA:CPU option, so accelerator programs are untouched; results agree to
float32 rounding (products summed in another order).

XLA reads XLA_FLAGS when it creates its first backend, so `configure` must run before any JAX
computation (importing jax is fine). A flag the user already put in XLA_FLAGS wins over ours;
OSSNET_XLA_CPU_FLAGS=0 adds nothing. This module imports nothing heavy.
"""

import os

FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
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
