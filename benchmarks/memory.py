"""Memory of one compiled train step and one compiled inference step per model, grid and locations.

  python -m benchmarks.memory      # DEFAULT_PLAN: about an hour on 2 busy CPU cores (see below)
  python -m benchmarks.memory --models oss_net_c unet3d --grids brats brats_2x --points 12 14
  python -m benchmarks.memory --models oss_net_c --grids half --points 12 --rss   # also run them
  python -m benchmarks.memory --models o_net --append   # add rows to the existing results

Every number is XLA's compiled memory analysis (jax.jit(f).lower(shapes).compile().memory_analysis())
of a program compiled from jax.ShapeDtypeStruct / jax.eval_shape shapes only: nothing is allocated or
run, so the official sizes work on a CPU. One volume per step (train.batch_size = 1), float32, the
official networks of each preset. Writes OUT.json, a list of rows
  {"model", "grid": [x, y, z], "points", "phase", "what", "argument_bytes", "output_bytes",
   "temp_bytes", "alias_bytes", "total_bytes", "compile_s"[, "encoder"][, "peak_rss_bytes",
   "start_rss_bytes"]}
with total = argument + output + temp - alias (alias: donated buffers reused for outputs), OUT.md (a
table and the targets) and OUT.png (total against grid voxels and against locations). Phases:
  occupancy networks (o_net, oss_net_a..d); points = locations per volume
    'prepare'  oss_net_step.prepare_inputs on the whole volume: augmentation, location sampling, patch
               gathering, downscaling, targets (the host loop runs it in the prefetch thread)
    'train'    oss_net_step.update_step on the prepared inputs: forward, loss, update (state donated)
    'infer'    what the Predictor runs for one volume: the encoder pass (its argument/output/temp/
               total under "encoder"), then the decoder on `points` locations (the row's argument/
               output/temp). The two run one after the other and the encoder's outputs are the
               decoder's arguments, so total_bytes is the larger of the two totals.
  U-Nets; points = null (they sample no locations; "voxels" is what one call outputs)
    'train'    the U-Net step's train_step on one whole volume (augmentation and the crop (3D) or
               train.slices_per_volume slices (2D) inside the step, as the host loop runs it)
    'infer'    one call of the network as the U-Net predictor does it: unet3d eval.batch_windows windows
               of eval.window_shape (sliding windows), unet2d eval.batch_slices axial slices; the
               host assembles the volume from such calls.
Grids (name: shape, preset, OSS-Net data.downscale): brats 256x256x160 (brats, 2), lits 512^3 (lits, 2),
brats_2x 512x512x320 (brats, 4: the encoder sees 128x128x80 as at brats), half 128x128x80 (brats, 1:
the same encoder input again, small enough to run on a CPU with --rss).
Models: o_net, oss_net_a..oss_net_d, unet2d, unet3d (128^3 crops and windows, as configured) and
unet3d_whole (the same network on whole volumes, crop_shape = window_shape = (): the setting in which a
3D CNN's memory grows with the cube of the resolution).
Compile time: the programs with a train step (prepare is seconds) take 1.5-3 minutes each to compile at
the official sizes on 2 CPU cores shared with other jobs, so DEFAULT_PLAN takes about an hour; pick
models, grids and points for a quick run (each row's "compile_s" says what it cost).
--rss runs each row in a fresh subprocess on zeros (compile, then one call; 'infer': encoder then
decoder) and adds peak_rss_bytes (resource.getrusage maxrss at the end: the Python process, compiler and
buffers together) and start_rss_bytes (maxrss before compiling: the interpreter, JAX and the config).
"""

import argparse
import dataclasses
import functools
import importlib
import io
import itertools
import json
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from ossnet_jax import families, files, runtime, training
from ossnet_jax.data import dataset
from ossnet_jax.families.oss_net import predictor as oss_net_predictor
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.unet import predictor as unet_inference
from ossnet_jax.kernels import NAMES, resolve
from ossnet_jax.train_state import make_optimizer

GRIDS = {  # name -> (shape, preset, data.downscale of the occupancy networks)
    "half": ((128, 128, 80), "brats", 1),
    "brats": ((256, 256, 160), "brats", 2),
    "brats_2x": ((512, 512, 320), "brats", 4),
    "lits": ((512, 512, 512), "lits", 2),
}
OCCUPANCY = ("o_net", "oss_net_a", "oss_net_b", "oss_net_c", "oss_net_d")
MODELS = OCCUPANCY + ("unet2d", "unet3d", "unet3d_whole")
POINTS = tuple(range(12, 18))  # log2 of the locations per volume
DEFAULT_PLAN = (  # (models, grids, log2 points): every model at 2^14, the sweep on two of them
    (MODELS, ("brats", "brats_2x", "lits"), (14,)),
    (("o_net", "oss_net_c"), ("brats",), POINTS),
)
MIB = 2**20


def make_config(
    model: str, grid: str, points: int, kernels: str = "auto"
) -> ml_collections.ConfigDict:
    """configs/<model>.py at the grid's preset and shape, one volume per step, `points` locations,
    the kernel set `kernels` (model.kernels)."""
    shape, preset, downscale = GRIDS[grid]
    module = "unet3d" if model == "unet3d_whole" else model
    config = importlib.import_module(f"configs.{module}").get_config(preset)
    config.data.grid_shape = shape
    config.model.kernels = kernels
    config.train.batch_size = 1
    if model in OCCUPANCY:
        config.data.downscale = downscale
        config.train.num_points = points
        config.eval.batch_points = points
    if model == "unet3d_whole":
        config.train.crop_shape = ()
        config.eval.window_shape = ()
        config.eval.batch_windows = 1
    return dataset.resolve_data_config(config)


@dataclasses.dataclass
class Program:
    """A jitted function and the shapes (pytree of jax.ShapeDtypeStruct) of its arguments."""

    what: str
    fn: Callable
    args: tuple


def programs(model: str, grid: str, points: int, kernels: str = "auto") -> dict[str, Program]:
    """The programs measured for one (model, grid, points), by name (see the module docstring)."""
    config = make_config(model, grid, points, kernels)
    family = families.get_family(config)
    net = family.build_model(config)
    tx = make_optimizer(config)
    state = jax.eval_shape(lambda: family.init_state(config, net, tx, jax.random.key(0)))
    rng = jax.eval_shape(lambda: jax.random.key(0))
    shape, channels = tuple(config.data.grid_shape), config.data.num_channels
    batch = {
        "image": jax.ShapeDtypeStruct((1,) + shape + (channels,), jnp.float32),
        "target": jax.ShapeDtypeStruct((1,) + shape, jnp.uint8),
        "band": jax.ShapeDtypeStruct((1,) + shape, jnp.bool_),
    }
    variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
    if model in OCCUPANCY:
        prepare = jax.jit(functools.partial(oss_net_step.prepare_inputs, config=config))
        inputs = jax.eval_shape(prepare, batch, rng, jax.ShapeDtypeStruct((), jnp.int32))
        update = jax.jit(
            functools.partial(oss_net_step.update_step, model=net, tx=tx, config=config),
            donate_argnums=0,
        )
        predictor = oss_net_predictor.Predictor(config, net, variables)
        image = jax.ShapeDtypeStruct(shape + (channels,), jnp.float32)
        latents, _, source = jax.eval_shape(predictor.encode, variables, image)
        locations = jax.ShapeDtypeStruct((points, 3), jnp.int32)
        encoder = "x".join(str(s // config.data.downscale) for s in shape)
        return {
            "prepare": Program(
                "prepare_inputs: augment whole volume, sample, gather patches, downscale, targets",
                prepare,
                (batch, rng, jax.ShapeDtypeStruct((), jnp.int32)),
            ),
            "train": Program(
                f"update_step: encoder on {encoder}, decoder on the locations, loss, update",
                update,
                (state, inputs, rng),
            ),
            "encode": Program(
                f"Predictor.encode: encoder on {encoder}",
                predictor.encode,
                (variables, image),
            ),
            "decode": Program(
                "Predictor.decode: patches and decoder at the locations",
                predictor.decode,
                (variables, latents, source, locations),
            ),
        }
    train = jax.jit(
        functools.partial(family.train_step, model=net, tx=tx, config=config), donate_argnums=0
    )
    predictor = unet_inference.UNetPredictor(config, net, variables)
    ev = config.eval
    if net.spatial_dims == 2:
        calls = (ev.batch_slices,) + shape[:2]
        what = f"network on {ev.batch_slices} axial slices"
    else:
        window = unet_inference.clip_window(tuple(ev.window_shape), shape)
        calls = (ev.batch_windows,) + window
        what = f"network on {ev.batch_windows} window(s) of {'x'.join(map(str, window))}"
    crop = (
        f"{config.train.slices_per_volume} axial slices"
        if net.spatial_dims == 2
        else "a crop of "
        + "x".join(map(str, unet_inference.clip_window(config.train.crop_shape, shape)))
    )
    return {
        "train": Program(
            f"train_step: augment whole volume, {crop}, update", train, (state, batch, rng)
        ),
        "infer": Program(
            what,
            predictor.network,
            (variables, jax.ShapeDtypeStruct(calls + (channels,), jnp.float32)),
        ),
    }


def compiled_sizes(stats: Any) -> dict:
    """Bytes of a compiled program's memory analysis as this file's JSON keys: argument_bytes,
    output_bytes, temp_bytes, alias_bytes and total_bytes (training.compiled_memory)."""
    return {f"{key}_bytes": value for key, value in training.compiled_memory(stats).items()}


def analyse(program: Program) -> dict:
    """XLA's memory analysis of the compiled program, in bytes, and the seconds compiling took."""
    start = time.perf_counter()
    sizes = compiled_sizes(program.fn.lower(*program.args).compile().memory_analysis())
    sizes["compile_s"] = round(time.perf_counter() - start, 2)
    return sizes


def _zeros(shapes: Any) -> Any:
    """Concrete arguments of the given shapes: zeros, and key 0 for PRNG keys."""

    def make(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(make, shapes)


def run_phase(model: str, grid: str, points: int, phase: str, kernels: str = "auto") -> dict:
    """Compiles and runs one row's programs on zeros in this process; maxrss before and after, bytes."""
    found = programs(model, grid, points, kernels)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if phase == "infer" and "decode" in found:
        encode, decode = found["encode"], found["decode"]
        variables, image = _zeros(encode.args)
        latents, _, source = encode.fn(variables, image)
        out = decode.fn(variables, latents, source, _zeros(decode.args[3]))
    else:
        out = found[phase].fn(*_zeros(found[phase].args))
    jax.block_until_ready(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss_bytes": peak, "start_rss_bytes": start}


def measure_rss(row: dict, timeout: float) -> dict:
    """run_phase of a row in a fresh Python process; {} (and a note on stderr) if it fails."""
    spec = {k: row[k] for k in ("model", "grid_name", "points", "phase", "kernels")}
    command = [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except (subprocess.SubprocessError, OSError) as err:
        print(f"  peak RSS of {spec} not measured: {err}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_of(
    model: str, grid: str, points: int, cache: dict, kernels: str = "auto"
) -> list[dict]:
    """The rows of one (model, grid, points); programs that do not depend on `points` compile once."""
    found = programs(model, grid, points, kernels)
    shape = list(GRIDS[grid][0])
    base = {"model": model, "grid": shape, "grid_name": grid, "kernels": resolve(kernels)}

    def sizes(name: str) -> dict:
        key = (model, grid, None if name == "encode" or model not in OCCUPANCY else points, name)
        if key not in cache:
            cache[key] = analyse(found[name])
        return cache[key]

    if model not in OCCUPANCY:
        config = make_config(model, grid, points, kernels)
        infer_voxels = int(np.prod(found["infer"].args[1].shape[:-1]))
        voxels = {
            "train": families.get_family(config).outputs_per_step(config),
            "infer": infer_voxels,
        }
        return [
            {
                **base,
                "points": None,
                "phase": name,
                "what": found[name].what,
                "voxels": voxels[name],
                **sizes(name),
            }
            for name in ("train", "infer")
        ]
    encoder, decoder = sizes("encode"), sizes("decode")
    infer = {
        **decoder,
        "total_bytes": max(encoder["total_bytes"], decoder["total_bytes"]),
        "compile_s": encoder["compile_s"] + decoder["compile_s"],
        "encoder": {k: v for k, v in encoder.items() if k != "compile_s"},
    }
    what = f"{found['encode'].what}, then {found['decode'].what}"
    return [
        {
            **base,
            "points": points,
            "phase": "prepare",
            "what": found["prepare"].what,
            **sizes("prepare"),
        },
        {**base, "points": points, "phase": "train", "what": found["train"].what, **sizes("train")},
        {**base, "points": points, "phase": "infer", "what": what, **infer},
    ]


def _find(
    rows: list[dict], model: str, grid: str, phase: str, points: Optional[int]
) -> Optional[dict]:
    for row in rows:
        if (row["model"], row["grid_name"], row["phase"], row["points"]) == (
            model,
            grid,
            phase,
            points,
        ):
            return row
    return None


def targets(rows: list[dict]) -> list[str]:
    """Lines on the targets: OSS-Net C train (2^14) vs the 3D U-Net, growth brats -> brats_2x, and the
    whole step's device peak with either train.prepare."""
    lines = []
    points = 2**14
    c = {g: _find(rows, "oss_net_c", g, "train", points) for g in ("brats", "brats_2x")}
    p = {g: _find(rows, "oss_net_c", g, "prepare", points) for g in ("brats", "brats_2x")}
    for unet in ("unet3d", "unet3d_whole"):
        u = {g: _find(rows, unet, g, "train", None) for g in ("brats", "brats_2x")}
        if c["brats"] and u["brats"]:
            ratio = c["brats"]["total_bytes"] / u["brats"]["total_bytes"]
            lines.append(
                f"- oss_net_c train (update step, 2^14 locations) / {unet} train at brats: "
                f"{ratio:.3f} (target <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})"
            )
        if u["brats"] and u["brats_2x"]:
            growth = u["brats_2x"]["total_bytes"] / u["brats"]["total_bytes"]
            lines.append(f"- {unet} train growth brats -> brats_2x: x{growth:.2f}")
    if c["brats"] and c["brats_2x"]:
        growth = c["brats_2x"]["total_bytes"] / c["brats"]["total_bytes"] - 1
        lines.append(
            f"- oss_net_c train growth brats -> brats_2x: {100 * growth:+.2f}% "
            f"(target < 10%: {'met' if growth < 0.10 else 'NOT met'})"
        )
    if p["brats"] and p["brats_2x"]:
        growth = p["brats_2x"]["total_bytes"] / p["brats"]["total_bytes"]
        lines.append(
            f"- oss_net_c prepare stage (whole volume) growth brats -> brats_2x: x{growth:.2f} "
            f"({p['brats']['total_bytes'] / MIB:.0f} -> {p['brats_2x']['total_bytes'] / MIB:.0f} MiB)"
        )
    for g in ("brats", "brats_2x"):
        if c[g] and p[g]:
            device = max(c[g]["total_bytes"], p[g]["total_bytes"]) / MIB
            host = c[g]["total_bytes"] / MIB  # its arguments are the prepared inputs
            lines.append(
                f"- oss_net_c whole step's device peak at {g}: {device:.0f} MiB with "
                f"train.prepare='device' (max of prepare and update), {host:.0f} MiB with 'host' "
                "(the update alone; prepare runs on the host CPU)"
            )
    return lines


def markdown(rows: list[dict]) -> str:
    """The table of every row (MiB) and the target lines."""
    rss = any("peak_rss_bytes" in r for r in rows)
    header = "| model | grid | points | phase | arguments | outputs | temporaries | aliased | total | compile s |"
    lines = [
        "One volume per step, float32, XLA's compiled memory analysis (compiled from shapes, nothing run);"
        " MiB. total = arguments + outputs + temporaries - aliased (donated). 'infer' of the occupancy"
        " networks: the larger of the encoder's and the decoder's totals (arguments etc. are the decoder's)."
        " See benchmarks/memory.py for what each phase runs.",
        "",
        header + (" peak RSS |" if rss else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rss else ""),
    ]
    for r in rows:
        points = "-" if r["points"] is None else f"2^{int(np.log2(r['points']))}"
        cells = [
            r["model"],
            "x".join(map(str, r["grid"])),
            points,
            r["phase"],
            *(
                f"{r[k] / MIB:.1f}"
                for k in (
                    "argument_bytes",
                    "output_bytes",
                    "temp_bytes",
                    "alias_bytes",
                    "total_bytes",
                )
            ),
            f"{r['compile_s']:.1f}",
        ]
        if rss:
            cells.append(f"{r['peak_rss_bytes'] / MIB:.0f}" if "peak_rss_bytes" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    found = targets(rows)
    if found:
        lines += ["", "Targets:", *found]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> bytes:
    """PNG: total memory (GiB, log) against grid voxels at 2^14 locations, and against locations."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    by_grid, by_points = fig.subplots(1, 2)
    styles = {"train": "-", "infer": ":", "prepare": "--"}
    for (model, phase), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["model"], r["phase"], np.prod(r["grid"]))),
        key=lambda r: (r["model"], r["phase"]),
    ):
        group = [r for r in group if r["points"] in (None, 2**14)]
        if len(group) > 1:
            by_grid.plot(
                [np.prod(r["grid"]) for r in group],
                [r["total_bytes"] / 2**30 for r in group],
                styles[phase],
                marker="o",
                label=f"{model} {phase}",
            )
    for (model, grid, phase), group in itertools.groupby(
        sorted(
            (r for r in rows if r["points"] is not None),
            key=lambda r: (r["model"], r["grid_name"], r["phase"], r["points"]),
        ),
        key=lambda r: (r["model"], r["grid_name"], r["phase"]),
    ):
        group = list(group)
        if len(group) > 1:
            by_points.plot(
                [r["points"] for r in group],
                [r["total_bytes"] / 2**30 for r in group],
                styles[phase],
                marker="o",
                label=f"{model} {phase} ({grid})",
            )
    for row in rows:  # the U-Nets sample no locations: one level per grid
        if row["points"] is None and row["grid_name"] == "brats" and row["phase"] == "train":
            by_points.axhline(row["total_bytes"] / 2**30, color="grey", lw=0.8)
            by_points.annotate(
                f"{row['model']} train (brats)", (2**12, row["total_bytes"] / 2**30), fontsize=7
            )
    by_grid.set(
        xscale="log",
        yscale="log",
        xlabel="grid voxels",
        ylabel="GiB",
        title="memory vs resolution (2^14 locations)",
    )
    by_points.set(
        xscale="log",
        yscale="log",
        xlabel="locations per volume",
        ylabel="GiB",
        title="memory vs locations",
    )
    by_points.set_xscale("log", base=2)
    for ax in (by_grid, by_points):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(model, grid, points) to measure: the product of the options, or DEFAULT_PLAN without any."""
    if not (args.models or args.grids or args.points):
        parts = DEFAULT_PLAN
    else:
        parts = (
            (
                args.models or MODELS,
                args.grids or ("brats", "brats_2x", "lits"),
                args.points or (14,),
            ),
        )
    chosen = []
    for models, grids, points in parts:
        for model, grid, p in itertools.product(models, grids, points):
            # the U-Nets sample no locations: one row set per grid
            item = (model, grid, 2**p if model in OCCUPANCY else 2**14)
            if item not in chosen:
                chosen.append(item)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--grids", nargs="+", choices=tuple(GRIDS))
    parser.add_argument("--points", nargs="+", type=int, choices=POINTS, help="log2 locations")
    parser.add_argument("--rss", action="store_true", help="also run each row in a fresh process")
    parser.add_argument("--rss_timeout", type=float, default=600.0, help="seconds per row")
    parser.add_argument("--out", default="benchmarks/results/memory")
    parser.add_argument("--append", action="store_true", help="keep OUT.json's other rows")
    parser.add_argument("--kernels", default="auto", choices=NAMES, help="model.kernels")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one row's run_phase, for --rss
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(
            json.dumps(
                run_phase(
                    spec["model"], spec["grid_name"], spec["points"], spec["phase"], spec["kernels"]
                )
            )
        )
        return

    out = pathlib.Path(args.out)
    rows, cache = [], {}
    if args.append and out.with_suffix(".json").exists():
        rows = json.loads(out.with_suffix(".json").read_text())
    for model, grid, points in plan(args):
        for row in rows_of(model, grid, points, cache, args.kernels):
            if args.rss:
                row.update(measure_rss(row, args.rss_timeout))
            key = lambda r: (r["model"], r["grid_name"], r["points"], r["phase"], r.get("kernels"))
            rows = [r for r in rows if key(r) != key(row)] + [row]
            files.write_json(
                out.with_suffix(".json"), rows
            )  # after every row: long runs keep what they have
            print(
                f"{model:<13} {grid:<9} {str(row['points']):>7} {row['phase']:<8} "
                f"total {row['total_bytes'] / MIB:10.1f} MiB (temp {row['temp_bytes'] / MIB:9.1f}) "
                f"compile {row['compile_s']:.1f} s"
                + (
                    f" peak RSS {row['peak_rss_bytes'] / MIB:.0f} MiB"
                    if "peak_rss_bytes" in row
                    else ""
                ),
                flush=True,
            )
    out.with_suffix(".md").write_text(markdown(rows))
    out.with_suffix(".png").write_bytes(plot(rows))
    print(markdown(rows))


if __name__ == "__main__":
    runtime.prepare()
    main()
