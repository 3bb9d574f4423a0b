"""XLA:CPU's kernel libraries for dots (YNNPACK, XNNPACK, oneDNN, Eigen) on the training programs.

  python -m benchmarks.xla_flags [--rounds 3] [--repeats 2] [--sets default,eigen,...]

XLA:CPU hands dot products (and some elementwise and reduction fusions) to YNNPACK by default; the
flags below route them elsewhere. Each flag set runs in its own process (XLA reads XLA_FLAGS once),
and the sets alternate over `rounds` so that a slow moment of the machine does not fall on one set.
Every process measures, after one compiling run, the minimum over `repeats` runs of:

  gemm_gflops       a float32 (8192 x 512) @ (512 x 512) product, the decoder's shape;
  fwd_points_per_s  OSS-Net C's decoder forward, 8192 locations of one volume (BraTS preset);
  train_points_per_s  the same decoder's forward + backward in training mode;
  prepare_s, update_s  OSS-Net C's two train-step programs, 2 volumes x 4096 locations on the
                    256x256x160 grid (the host loop runs them one after the other on 2 cores);
  small_step_s      the demo's train step (OSS-Net C, `small` preset, 2 volumes);
  unet3d_step_s     the 3D U-Net's train step (`small` preset, 2 crops);
  infer_points_per_s  the demo's inference decoder (OSS-Net C small, 2^16 locations).

Writes benchmarks/results/xla_flags.json (every process's numbers, the CPU model) and xla_flags.md
(per set, the median over rounds of each figure, and of prepare_s + update_s).
"""

import argparse
import importlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import throughput
from ossnet_jax.data import dataset
from ossnet_jax.kernels.cpu import hostmem, xla_flags

SETS = {
    "default": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=",
    "eigen_reassoc": "--xla_cpu_experimental_ynn_fusion_type= " + " ".join(xla_flags.REASSOCIATION),
    "ynn_no_dot": "--xla_cpu_experimental_ynn_fusion_type=-dot",
    "xnn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "onednn_dot": (
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot"
    ),
}
FIGURES = (
    "gemm_gflops",
    "fwd_points_per_s",
    "train_points_per_s",
    "prepare_s",
    "update_s",
    "small_step_s",
    "unet3d_step_s",
    "infer_points_per_s",
)


def cpu_model() -> str:
    """'<model name> (family F, model M)' from /proc/cpuinfo; platform.processor() where that is missing.

    A hypervisor can hide the name ('AMD EPYC'): family 26 is AMD Zen 5, 25 Zen 3 / Zen 4.
    """
    fields = {}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    if "model name" not in fields:
        return platform.processor()
    return (
        f"{fields['model name']} (family {fields.get('cpu family')}, model {fields.get('model')})"
    )


def measure(repeats: int) -> dict:
    """Every figure of FIGURES in this process (XLA_FLAGS as it was started)."""
    out = {}
    a = jax.random.normal(jax.random.key(0), (8192, 512), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (512, 512), jnp.float32)
    gemm_s = throughput.min_seconds(jax.jit(jnp.matmul), a, b, repeats=5 * repeats)
    out["gemm_gflops"] = 2 * 8192 * 512 * 512 / gemm_s / 1e9

    config = throughput.model_config("oss_net_c", "float32")
    fwd, train = throughput.decoder_rates(config, 8192, repeats)
    out["fwd_points_per_s"], out["train_points_per_s"] = fwd, train

    family, _, kwargs, state, batch = throughput.step_setup(config, 4096)
    out["prepare_s"], out["update_s"], _ = throughput.host_loop_seconds(
        family, kwargs, state, batch, repeats
    )
    del state, batch

    for name, figure in (("demo", "small_step_s"), ("unet3d", "unet3d_step_s")):
        small = dataset.resolve_data_config(
            importlib.import_module(f"configs.{name}").get_config("small")
        )
        family, _, kwargs, state, batch = throughput.step_setup(small, None)
        step = jax.jit(lambda s, b, r, f=family, k=kwargs: f.train_step(s, b, r, **k))
        out[figure] = throughput.min_seconds(
            step, state, batch, jax.random.key(2), repeats=3 * repeats
        )

    demo = dataset.resolve_data_config(importlib.import_module("configs.demo").get_config("small"))
    fwd, _ = throughput.decoder_rates(demo, 2**16, repeats, train=False)
    out["infer_points_per_s"] = fwd
    return out


def run_child(name: str, repeats: int) -> dict:
    """`measure` in a fresh process with the flag set `name` as XLA_FLAGS (huge pages inherited
    from this process, re-executed with them as train.py is)."""
    env = dict(os.environ, XLA_FLAGS=SETS[name], OSSNET_XLA_CPU_FLAGS="0")
    cmd = [sys.executable, "-m", "benchmarks.xla_flags", "--child", "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"flag set {name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def summary(runs: list[dict]) -> dict:
    """Median over runs of every figure, and of prepare_s + update_s per run ('host_step_s')."""
    out = {f: statistics.median(run[f] for run in runs) for f in FIGURES}
    out["host_step_s"] = statistics.median(run["prepare_s"] + run["update_s"] for run in runs)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"CPU: {result['cpu']}, {result['cores']} cores; medians over {result['rounds']} alternating"
        f" rounds (one process per set and round), each figure the minimum of its runs.",
        "",
        "| flag set | XLA_FLAGS | GEMM GFLOP/s | dec fwd loc/s | dec train loc/s | prepare s |"
        " update s | prepare + update s | demo step s | 3D U-Net step s | demo infer loc/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["medians"].items():
        flags = f"`{SETS[name]}`" if SETS[name] else "(none)"
        lines.append(
            f"| {name} | {flags} | {m['gemm_gflops']:.0f} | {m['fwd_points_per_s']:.0f} |"
            f" {m['train_points_per_s']:.0f} | {m['prepare_s']:.2f} | {m['update_s']:.2f} |"
            f" {m['host_step_s']:.2f} | {m['small_step_s']:.3f} |"
            f" {m['unet3d_step_s']:.3f} | {m['infer_points_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(throughput.RESULTS / "xla_flags.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)), flush=True)
        return
    names = args.sets.split(",")
    unknown = sorted(set(names) - set(SETS))
    if unknown:
        parser.error(f"unknown flag sets {unknown}; choose from {sorted(SETS)}")
    runs = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            runs[name].append(run_child(name, args.repeats))
            print(f"round {r} {name}: {json.dumps(runs[name][-1])}", flush=True)
    medians = {name: summary(rows) for name, rows in runs.items()}
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "sets": {name: SETS[name] for name in names},
        "runs": runs,
        "medians": medians,
    }
    throughput.write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    hostmem.relaunch_with_huge_pages()
    main()
