"""Trains and evaluates several configs on one dataset and tabulates them like the paper's Table 1.

  python -m ossnet_jax.compare        # o_net, oss_net_c, unet3d, unet2d ('small') on synthetic data
  python -m ossnet_jax.compare --configs configs/oss_net_c.py:brats configs/unet3d.py:brats \\
      --data_root data/MICCAI_BraTS2020_TrainingData --workdir runs/compare_brats --out runs/brats

Every config takes the first config's data settings (dataset, grid, labels, split; all data.* keys but
data.downscale, which is the network's input resolution), the same train.steps and train.seed, trains
in WORKDIR/<name> with train.py's code (a rerun resumes, then evaluates again) and is evaluated as
evaluate.py does. Writes OUT.json (settings and one row per config), OUT.md (the table) and OUT.png
(bar charts). Columns:
  dice, iou, hd95, asd (mm), surface_dice   means over the validation cases (eval/metrics.json)
  train_memory_mib   XLA's compiled memory analysis of one jitted train step: arguments + outputs +
                     temporaries - aliased (donated) buffers, in MiB
  params             trained parameters
  outputs_per_s      supervised locations (OSS-Net) or voxels (U-Nets) per second of training: the
                     median of metrics.jsonl's windows after the first (which holds compilation)
  seconds_per_step   outputs per step / outputs_per_s
  inference_s        seconds per validation case (evaluate's timing, compilation excluded)
  network_outputs    per case: decoder evaluations (OSS-Net) or voxels the U-Net produced
  wall_s             train + evaluate wall time of this config, compilation included
"""

import argparse
import functools
import importlib.util
import io
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from ossnet_jax import families, files, runtime, training
from ossnet_jax.data import dataset
from ossnet_jax.train_state import make_optimizer

DEFAULT_CONFIGS = (
    "configs/o_net.py:small",
    "configs/oss_net_c.py:small",
    "configs/unet3d.py:small",
    "configs/unet2d.py:small",
)
MODEL_KEY = "downscale"  # the one data.* key that stays per config
MIB = 2**20
CHART = (  # (row key, axis title), one bar chart each
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("hd95", "HD95 (mm, lower is better)"),
    ("train_memory_mib", "training memory, one step (MiB)"),
    ("outputs_per_s", "training outputs / s"),
    ("inference_s", "inference s / case"),
)


def load_config(spec: str) -> tuple[str, ml_collections.ConfigDict]:
    """('<file stem>:<preset>', config) of 'path/to/config.py[:preset]' (get_config(preset))."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = dataset.resolve_data_config(
        module.get_config(preset) if preset else module.get_config()
    )
    return f"{pathlib.Path(path).stem}:{preset or 'default'}", config


def harmonise(
    configs: list[ml_collections.ConfigDict], steps: int, seed: int
) -> list[ml_collections.ConfigDict]:
    """Copies of the configs with the first one's data settings and the same steps and seed."""
    shared = {k: v for k, v in configs[0].data.items() if k != MODEL_KEY}
    out = []
    for config in configs:
        config = ml_collections.ConfigDict(config.to_dict())
        for key, value in shared.items():
            config.data[key] = value
        config.train.steps = steps
        config.train.seed = seed
        out.append(config)
    return out


def train_step_memory(config: ml_collections.ConfigDict) -> dict:
    """XLA's memory analysis of one compiled train step and the parameter count, from shapes only.

    Returns {'argument', 'output', 'temp', 'alias', 'total'} in bytes (total = argument + output +
    temp - alias) and 'params'.
    """
    family = families.get_family(config)
    model = family.build_model(config)
    tx = make_optimizer(config)
    state = jax.eval_shape(lambda: family.init_state(config, model, tx, jax.random.key(0)))
    b, grid = config.train.batch_size, tuple(config.data.grid_shape)
    batch = {
        "image": jax.ShapeDtypeStruct((b,) + grid + (config.data.num_channels,), jnp.float32),
        "target": jax.ShapeDtypeStruct((b,) + grid, jnp.uint8),
        "band": jax.ShapeDtypeStruct((b,) + grid, jnp.bool_),
    }
    step = jax.jit(
        functools.partial(family.train_step, model=model, tx=tx, config=config), donate_argnums=0
    )
    stats = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    sizes = training.compiled_memory(stats)
    sizes["params"] = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params.fast)))
    return sizes


def training_rate(workdir: pathlib.Path) -> float:
    """Median outputs per second of the logged windows after the first (which holds compilation)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["points_per_s"] for r in rows if "points_per_s" in r]
    return float(statistics.median(rates[1:] or rates))


def summarise(
    name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, memory: dict, wall: float
) -> dict:
    """One table row from a finished workdir (see the module docstring for the keys)."""
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    mean = result.get("mean", {})
    rate = training_rate(workdir)
    per_step = families.get_family(config).outputs_per_step(config)
    cases = result["cases"]
    return {
        "name": name,
        "model": config.model.name,
        "checkpoint_step": result["step"],
        **{k: mean.get(k) for k in ("dice", "iou", "hd95", "asd", "surface_dice")},
        "train_memory_mib": memory["total"] / MIB,
        "train_memory_bytes": {k: v for k, v in memory.items() if k != "params"},
        "params": memory["params"],
        "outputs_per_step": per_step,
        "outputs_per_s": rate,
        "seconds_per_step": per_step / rate,
        "inference_s": float(np.mean([c["seconds"] for c in cases])),
        "network_outputs": float(np.mean([c["decoder_points"] for c in cases])),
        "wall_s": wall,
    }


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[dict], settings: dict) -> str:
    """The comparison table with the settings it was measured under."""
    lines = [
        f"# Comparison on {settings['dataset']} ({settings['train_cases']} training, "
        f"{settings['val_cases']} validation cases)",
        "",
        f"Same split, {settings['steps']} steps, seed {settings['seed']}; {settings['machine']}; "
        f"total wall time {settings['wall_s'] / 60:.1f} min. Written by `python -m ossnet_jax.compare`.",
        "",
        "| model | Dice | IoU | HD95 mm | ASD mm | surface Dice | train memory MiB | params | "
        "outputs / step | outputs / s | s / step | inference s / case | network outputs / case | "
        "wall s |",
        "|---|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_cell(r['dice'], 4)} | {_cell(r['iou'], 4)} | "
            f"{_cell(r['hd95'], 2)} | {_cell(r['asd'], 2)} | {_cell(r['surface_dice'], 4)} | "
            f"{r['train_memory_mib']:,.0f} | {r['params']:,} | {r['outputs_per_step']:,} | "
            f"{r['outputs_per_s']:,.0f} | {r['seconds_per_step']:.2f} | {r['inference_s']:.2f} | "
            f"{r['network_outputs']:,.0f} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "Dice, IoU, HD95, ASD and surface Dice (1 mm tolerance): means over the validation cases of "
        "the best checkpoint (by validation Dice). Training memory: XLA's compiled memory analysis "
        "of one jitted train step (arguments + outputs + temporaries - donated buffers). Outputs: "
        "supervised locations (OSS-Net, O-Net) or voxels (U-Nets). Network outputs per case: decoder "
        "evaluations (OSS-Net) or voxels the U-Net produced.",
        "",
    ]
    return "\n".join(lines)


def bar_chart(rows: list[dict]) -> bytes:
    """PNG bytes: one bar chart per CHART entry, one bar per config."""
    fig = Figure(figsize=(4 * len(CHART) // 2, 7), layout="constrained")
    axes = fig.subplots(2, len(CHART) // 2).ravel()
    names = [r["name"].split(":")[0] for r in rows]
    colours = [f"C{i}" for i in range(len(rows))]
    for ax, (key, title) in zip(axes, CHART):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.bar(names, values, color=colours)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def compare(
    specs: list[str], workdir: pathlib.Path, steps: int = 0, seed: int = 0, data_root: str = ""
) -> tuple[list[dict], dict]:
    """Trains, evaluates and measures every config; returns (rows, settings)."""
    start = time.perf_counter()
    named = [load_config(s) for s in specs]
    if data_root:
        named[0][1].data.root = data_root
    first = named[0][1]
    configs = harmonise([c for _, c in named], steps or first.train.steps, seed)
    rows = []
    for (name, _), config in zip(named, configs):
        run_dir = workdir / name.replace(":", "_")
        memory = train_step_memory(config)
        tick = time.perf_counter()
        training.train_and_evaluate(config, str(run_dir))
        rows.append(summarise(name, config, run_dir, memory, time.perf_counter() - tick))
        print(json.dumps(rows[-1]), flush=True)
    train_cases, val_cases = dataset.load_split(configs[0])
    settings = {
        "configs": list(specs),
        "dataset": f"{first.data.format} ({first.data.root})",
        "grid_shape": list(first.data.grid_shape),
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "steps": configs[0].train.steps,
        "seed": seed,
        "machine": f"{platform.machine()} {jax.default_backend()} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores, JAX {jax.__version__}",
        "wall_s": time.perf_counter() - start,
    }
    return rows, settings


def write(rows: list[dict], settings: dict, out: pathlib.Path) -> None:
    """OUT.json, OUT.md and OUT.png (each written atomically)."""
    files.write_json(out.with_suffix(".json"), {"settings": settings, "rows": rows})
    files.write_bytes(out.with_suffix(".md"), markdown(rows, settings).encode())
    files.write_bytes(out.with_suffix(".png"), bar_chart(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="path[:preset]")
    parser.add_argument("--workdir", default="runs/compare", help="one training workdir per config")
    parser.add_argument("--out", default="benchmarks/results/compare", help="OUT.{json,md,png}")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (default: the first's)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every config")
    parser.add_argument("--data_root", default="", help="data.root instead of the first config's")
    args = parser.parse_args()
    # compiled programs are kept in WORKDIR/.jax_cache: the train step compiled for the memory
    # analysis is reused by training, and a rerun skips compilation
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.workdir) / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    rows, settings = compare(
        args.configs, pathlib.Path(args.workdir), args.steps, args.seed, args.data_root
    )
    write(rows, settings, pathlib.Path(args.out))
    print(markdown(rows, settings))


if __name__ == "__main__":
    runtime.prepare()
    main()
