"""Throughput, memory and FLOP utilisation of OSS-Net's programs on the backend this process finds.

  python -m benchmarks.accelerator      # an accelerator: configs/oss_net_c.py:brats, 8 x 2^14
  python -m benchmarks.accelerator --config configs/oss_net_c.py:brats --batch 2 --points 4096 \
      --kernels cpu                          # a CPU: the CPU forms alone at the BraTS grid
  python -m benchmarks.accelerator --config configs/oss_net_c.py:small --batch 2 --points 64 \
      --grid 32 32 16 --repeats 1 --gemm 256 --out /tmp/accelerator.json      # a smoke run

Runs unattended on jax.default_backend()'s first device. The programs are benchmarks/lowering.py's,
built for config.model.kernels = 'xla' and, on a CPU backend, 'cpu' too (--kernels names others):
  'prepare'  oss_net_step.prepare_inputs on train.batch_size synthetic volumes (noise, a foreground box)
  'update'   oss_net_step.update_step on prepare's outputs (state donated and carried from call to call)
  'encode'   the Predictor's encoder pass on one volume
  'decode'   the Predictor's decoder forward on eval.batch_points locations of that volume
Sizes: the config's (train.batch_size x train.num_points locations, eval.batch_points decoder
locations, data.grid_shape; --batch, --points for both location counts and --grid override them),
by default the official BraTS sizes. A CPU backend defaults to the small preset at 2 x 256
locations (CPU_DEFAULTS) instead, so that the run finishes unattended on the 2-core development
machine: XLA:CPU runs the 'xla' kernels' 3D convolutions slowly, most of all their gradients and the
patch encoder's convolutions on 7^3 patches, whose cost grows with the locations; at the BraTS
grid, or with thousands of locations, the 'xla' update step alone overruns the time budget. The
JSON records the config and sizes used.

Each program is compiled from shapes (jax.jit(f).trace(shapes).lower().compile(); "compile_s"), run
once to warm up, then timed `repeats` times with jax.block_until_ready ("seconds": the median).
Memory: XLA's compiled memory analysis ("argument_bytes", "output_bytes", "temp_bytes",
"alias_bytes"; total = argument + output + temp - alias) and the device's "peak_bytes_in_use" after
the program's runs (device.memory_stats(); a high-water mark since the process started, so it covers
every program run before; null where the backend keeps no statistics, as XLA:CPU).
FLOPs are counted by XLA in the compiled program: "flops" = compiled.cost_analysis()['flops'].
XLA counts the body of a while loop once, not once per iteration, so for a program whose compiled
text holds while loops ("while_loops": the 'cpu' kernels' slab-GEMM scan, XLA:CPU's rolled threefry
loops) the utilisation uses the count of the same program with kernels 'xla' where that one has
none, and otherwise its own count, marked a lower bound: "mfu_flops" is the count used and
"flops_source" says which. GEMM: the median FLOP/s of an (n x n) @ (n x n) product in float32
and in bfloat16 at JAX's default matmul precision, timed after the programs so that their memory
peak does not include its matrices. "mfu" = flops / seconds / the GEMM rate of the program's compute
dtype (train.dtype for prepare and update, eval.dtype for encode and decode).

Per kernel set: "train_step_s" = prepare + update seconds (the host loop runs prepare in its
prefetch thread, so this is the step without overlap), "train_locations_per_s" = batch x points /
train_step_s, "update_locations_per_s" the same over the update alone, "decode_locations_per_s" =
eval.batch_points / decode seconds, "train_mfu" = (prepare + update FLOPs) / train_step_s / the GEMM
rate.

Writes benchmarks/results/accelerator-<device>.json (device: device_kind as a slug, e.g.
'nvidia-h100-80gb-hbm3' or 'cpu'; --out names another path) and a markdown table beside it (.md).
"""

import argparse
import json
import pathlib
import re
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import lowering
from benchmarks.memory import compiled_sizes
from ossnet_jax import families, runtime
from ossnet_jax.train_state import make_optimizer

RESULTS = pathlib.Path(__file__).parent / "results"
MIB = 2**20
OFFICIAL = "configs/oss_net_c.py:brats"
# --config / --batch / --points defaults on a CPU backend
CPU_DEFAULTS = {"config": "configs/oss_net_c.py:small", "batch": 2, "points": 256}
GEMM_N = {"cpu": 2048}  # n of the GEMM; 8192 on other backends
MEMORY_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes")


def device_slug(kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of call() over `repeats` runs after one warm-up run, each to completion."""
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(n: int, dtype: Any, repeats: int) -> float:
    """FLOP/s of one (n x n) @ (n x n) product in `dtype`: 2 n^3 / median seconds."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    product = jax.jit(jnp.matmul).lower(a, b).compile()
    return 2 * n**3 / median_seconds(lambda: product(a, b), repeats)


def synthetic_batch(config: ml_collections.ConfigDict) -> dict:
    """{'image' (B, X, Y, Z, C) float32 noise, 'target' (B, X, Y, Z) uint8 one box filling the
    middle fifth of each axis, 'band' (B, X, Y, Z) bool the box}, B = train.batch_size."""
    grid = tuple(config.data.grid_shape)
    b, channels = config.train.batch_size, config.data.num_channels
    image = jax.random.normal(jax.random.key(3), (b,) + grid + (channels,), jnp.float32)
    box = (slice(None),) + tuple(slice(2 * n // 5, 3 * n // 5) for n in grid)
    target = jnp.zeros((b,) + grid, jnp.uint8).at[box].set(1)
    return {"image": image, "target": target, "band": target > 0}


def memory(compiled: Any) -> dict:
    """XLA's memory analysis of a compiled program in bytes (None each where it gives none)."""
    stats = compiled.memory_analysis()
    return dict.fromkeys(MEMORY_KEYS) if stats is None else compiled_sizes(stats)


def cost_flops(compiled: Any) -> Optional[float]:
    """compiled.cost_analysis()['flops'], None where the backend reports none."""
    flops = (compiled.cost_analysis() or {}).get("flops")
    return None if flops is None or flops <= 0 else float(flops)


def peak_bytes(device: Any) -> Optional[int]:
    """The device's peak_bytes_in_use since the process started; None without statistics."""
    stats = device.memory_stats()
    return (
        None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])
    )


def compile_all(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """lowering.programs(config) compiled from their shapes: {name: {'compiled', 'compile_s',
    'while_loops', 'flops', memory sizes}}."""
    found = {}
    for name, program in lowering.programs(config).items():
        start = time.perf_counter()
        compiled = program.fn.trace(*program.args).lower().compile()
        found[name] = {
            "compiled": compiled,
            "compile_s": round(time.perf_counter() - start, 2),
            "while_loops": lowering.census(compiled.as_text(), "compiled")["while"],
            "flops": cost_flops(compiled),
            **memory(compiled),
        }
        print(f"{name}: compiled in {found[name]['compile_s']} s", flush=True)
    return found


def time_programs(
    config: ml_collections.ConfigDict, found: dict[str, dict], repeats: int, device: Any
) -> None:
    """Adds 'seconds' (median of `repeats`) and 'peak_bytes_in_use' to each of compile_all's
    entries, running them on a synthetic batch, fresh parameters and random decoder locations."""
    family = families.get_family(config)
    state = family.init_state(
        config, family.build_model(config), make_optimizer(config), jax.random.key(0)
    )
    rng, step = jax.random.key(1), jnp.asarray(0, jnp.int32)
    batch = synthetic_batch(config)
    variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
    variables = jax.tree.map(jnp.copy, variables)  # the update donates the state's buffers
    prepare, update = found["prepare"]["compiled"], found["update"]["compiled"]
    encode, decode = found["encode"]["compiled"], found["decode"]["compiled"]
    inputs = prepare(batch, rng, step)
    latents, _, source = encode(variables, batch["image"][0])
    grid = jnp.asarray(config.data.grid_shape)
    locations = jax.random.randint(jax.random.key(2), (config.eval.batch_points, 3), 0, grid)

    def next_update():
        nonlocal state
        state, metrics = update(state, inputs, rng)
        return state, metrics

    calls = {
        "prepare": lambda: prepare(batch, rng, step),
        "update": next_update,
        "encode": lambda: encode(variables, batch["image"][0]),
        "decode": lambda: decode(variables, latents, source, locations),
    }
    for name, call in calls.items():
        found[name]["seconds"] = median_seconds(call, repeats)
        found[name]["peak_bytes_in_use"] = peak_bytes(device)
        print(f"{name}: {found[name]['seconds']:.4f} s", flush=True)


def flops_for_utilisation(name: str, entry: dict, runs: list[dict]) -> tuple[Optional[float], str]:
    """(FLOPs, their source) of one program for the utilisation (see the module docstring)."""
    if entry["flops"] is None:
        return None, "none: the backend's cost analysis has no 'flops'"
    if not entry["while_loops"]:
        return entry["flops"], "cost_analysis"
    for run in runs:
        plain = run["programs"][name]
        if run["kernels"] == "xla" and not plain["while_loops"] and plain["flops"] is not None:
            return plain["flops"], (
                f"cost_analysis of the 'xla' program (this one's {entry['while_loops']} while"
                " loop bodies count once)"
            )
    return entry["flops"], (
        f"cost_analysis, a lower bound ({entry['while_loops']} while loop bodies count once)"
    )


def benchmark(
    config: ml_collections.ConfigDict, kernel_sets: list[str], repeats: int, gemm_n: int
) -> dict:
    """The result object written as JSON (keys: see the module docstring and `markdown`)."""
    device = jax.devices()[0]
    runs = []
    for kernels in kernel_sets:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.model.kernels = kernels
        print(f"kernels {kernels!r}", flush=True)
        found = compile_all(run_config)
        time_programs(run_config, found, repeats, device)
        for entry in found.values():
            del entry["compiled"]
        runs.append({"kernels": kernels, "programs": found})
    gemm = {
        dtype: gemm_rate(gemm_n, getattr(jnp, dtype), repeats) for dtype in ("float32", "bfloat16")
    }
    dtypes = {"prepare": config.train.dtype, "update": config.train.dtype}
    dtypes.update(encode=config.eval.dtype, decode=config.eval.dtype)
    locations = config.train.batch_size * config.train.num_points
    for run in runs:
        programs = run["programs"]
        for name, entry in programs.items():
            flops, source = flops_for_utilisation(name, entry, runs)
            entry.update(mfu_flops=flops, flops_source=source, mfu_dtype=dtypes[name])
            entry["mfu"] = None if flops is None else flops / entry["seconds"] / gemm[dtypes[name]]
        step_s = sum(programs[name]["seconds"] for name in lowering.TRAIN_PROGRAMS)
        train_flops = [programs[name]["mfu_flops"] for name in lowering.TRAIN_PROGRAMS]
        run.update(
            train_step_s=step_s,
            train_locations_per_s=locations / step_s,
            update_locations_per_s=locations / programs["update"]["seconds"],
            decode_locations_per_s=config.eval.batch_points / programs["decode"]["seconds"],
            train_mfu=None
            if None in train_flops
            else sum(train_flops) / step_s / gemm[config.train.dtype],
        )
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
        "sizes": {
            "batch": config.train.batch_size,
            "points": config.train.num_points,
            "decode_points": config.eval.batch_points,
            "grid": list(config.data.grid_shape),
            "downscale": config.data.downscale,
            "train_dtype": config.train.dtype,
            "eval_dtype": config.eval.dtype,
        },
        "repeats": repeats,
        "gemm": {"n": gemm_n, **{f"{d}_flops_per_s": rate for d, rate in gemm.items()}},
        "runs": runs,
    }


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def markdown(result: dict) -> str:
    """A table per program and kernel set, headed by the device, sizes and GEMM rates."""
    s, g = result["sizes"], result["gemm"]
    lines = [
        f"{result['device_kind']} ({result['backend']}, jax {result['jax_version']}),"
        f" {result['config']}:"
        f" {s['batch']} x {s['points']} training locations, {s['decode_points']} decoder locations,"
        f" grid {'x'.join(map(str, s['grid']))}, {s['train_dtype']}; medians of {result['repeats']}"
        f" runs. GEMM {g['n']}^3: float32 {g['float32_flops_per_s'] / 1e12:.3f} TFLOP/s, bfloat16"
        f" {g['bfloat16_flops_per_s'] / 1e12:.3f} TFLOP/s. Memory in MiB (compiled analysis; peak:"
        " the device's high-water mark so far).",
        "",
        "| kernels | program | seconds | compile s | arguments | outputs | temporaries | aliased"
        " | total | peak | GFLOP | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for name, p in run["programs"].items():
            flops = "-" if p["mfu_flops"] is None else f"{p['mfu_flops'] / 1e9:.1f}"
            if p["flops_source"] != "cost_analysis":
                flops += "*"
            mfu = "-" if p["mfu"] is None else f"{p['mfu']:.1%}"
            sizes = " | ".join(_mib(p[k]) for k in MEMORY_KEYS + ("peak_bytes_in_use",))
            lines.append(
                f"| {run['kernels']} | {name} | {p['seconds']:.4f} | {p['compile_s']:.1f} |"
                f" {sizes} | {flops} | {mfu} |"
            )
    lines += [
        "",
        "| kernels | train step s | train loc/s | update loc/s | decoder loc/s | train MFU |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for run in result["runs"]:
        mfu = "-" if run["train_mfu"] is None else f"{run['train_mfu']:.1%}"
        lines.append(
            f"| {run['kernels']} | {run['train_step_s']:.3f} | {run['train_locations_per_s']:.0f} |"
            f" {run['update_locations_per_s']:.0f} | {run['decode_locations_per_s']:.0f} | {mfu} |"
        )
    lines += [
        "",
        "GFLOP marked * are not the program's own cost analysis: see flops_source in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"path.py[:arg] (default {OFFICIAL}, CPU: small preset)")
    parser.add_argument("--batch", type=int, help="train.batch_size (CPU default 2)")
    parser.add_argument(
        "--points", type=int, help="train.num_points and eval.batch_points (CPU default 256)"
    )
    parser.add_argument("--grid", type=int, nargs=3, help="data.grid_shape X Y Z")
    parser.add_argument("--kernels", nargs="+", choices=("xla", "cpu"), help="default: xla[, cpu]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm", type=int, help="n of the GEMM (CPU default 2048, else 8192)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/accelerator-<device>)")
    args = parser.parse_args()
    runtime.prepare()
    backend = jax.default_backend()
    defaults = CPU_DEFAULTS if backend == "cpu" else {"config": OFFICIAL}
    config_name = args.config or defaults["config"]
    batch = args.batch if args.batch is not None else defaults.get("batch")
    points = args.points if args.points is not None else defaults.get("points")
    config = lowering.sized(lowering.load_config(config_name), batch, points, args.grid)
    kernel_sets = args.kernels or (["xla", "cpu"] if backend == "cpu" else ["xla"])
    gemm_n = args.gemm or GEMM_N.get(backend, 8192)
    result = benchmark(config, kernel_sets, args.repeats, gemm_n)
    result["config"] = config_name
    slug = device_slug(result["device_kind"])
    out = pathlib.Path(args.out or RESULTS / f"accelerator-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
