"""Trains and evaluates several configs on one dataset and tabulates them like the paper's Table 1.

  python -m ossnet_jax.compare        # o_net, oss_net_c, unet3d, unet2d ('small') on synthetic data
  python -m ossnet_jax.compare --configs configs/oss_net_c.py:brats configs/unet3d.py:brats \\
      --data_root data/MICCAI_BraTS2020_TrainingData --workdir runs/compare_brats --out runs/brats
  python -m ossnet_jax.compare --budget_s 600 --workdir runs/compare_600s --out runs/compare_600s
  python -m ossnet_jax.compare --set data.synthetic_cases=20 --set eval.meshes=False

--set KEY=VALUE (repeatable) overrides a dotted config key in every config before anything else (the
data plan included); VALUE is read as a Python literal (3, 1e-3, True, (16, 32)), else as the plain
string. A key that some config lacks is an error (ConfigError naming it and the config), as is a value
of the wrong type: a per-model key such as train.num_points (which the U-Nets do not have) needs a
run of the configs that have it. --data_root is --set data.root=DIR.

Every config takes the first config's data settings (dataset, grid, labels, split; all data.* keys but
data.downscale, which is the network's input resolution) and the same train.seed, trains in
WORKDIR/<name> with train.py's code (a rerun resumes, then evaluates again) and is evaluated as
evaluate.py does. At equal steps (the default) every config gets the same train.steps (--steps, else
the first config's). With --budget_s S every config gets an equal wall-clock budget of S seconds of
training instead: a probe (probe_seconds_per_step) trains it for --probe_steps steps in
WORKDIR/.probe_<name> and times them as train_s below, then train.steps = max(1, round(S / seconds
per step)); the schedule (train.lr_decay_fractions) follows the steps. The steps are kept in
WORKDIR/<name>/budget.json, so a rerun with the same budget resumes the same run (another budget
probes again and, like another --steps, resumes the runs in WORKDIR: use a new --workdir). Writes
OUT.json (settings and one row per config), OUT.md (the table) and OUT.png (bar charts). Columns:
  dice, iou, hd95, asd (mm), surface_dice   means over the validation cases (eval/metrics.json)
  train_memory_mib   XLA's compiled memory analysis of one jitted train step: arguments + outputs +
                     temporaries - aliased (donated) buffers, in MiB
  params             trained parameters
  outputs_per_s      supervised locations (OSS-Net) or voxels (U-Nets) per second of training: the
                     median of metrics.jsonl's windows after the first (which holds compilation)
  seconds_per_step   outputs per step / outputs_per_s
  steps              train.steps of the run
  train_s            seconds of the training loop (train_seconds): the logged windows of metrics.jsonl,
                     the first (which holds compilation) counted at the median rate of the others;
                     outside it: compilation, the data loading before the loop, validation and
                     checkpoints at logging steps (all of them in the presets), the final evaluation
  probe_seconds_per_step   under --budget_s: the probe's seconds per step that set the steps; else None
  inference_s        seconds per validation case (evaluate's timing, compilation excluded)
  network_outputs    per case: decoder evaluations (OSS-Net) or voxels the U-Net produced
  wall_s             train + evaluate wall time of this config, compilation included (the budget's
                     probe excluded)
"""

import argparse
import ast
import functools
import importlib.util
import io
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from ossnet_jax import cli, families, files, runtime, training
from ossnet_jax.data import dataset, planning
from ossnet_jax.errors import ConfigError
from ossnet_jax.train_state import make_optimizer

DEFAULT_CONFIGS = (
    "configs/o_net.py:small",
    "configs/oss_net_c.py:small",
    "configs/unet3d.py:small",
    "configs/unet2d.py:small",
)
MODEL_KEY = "downscale"  # the one data.* key that stays per config
PROBE_STEPS = 20  # steps a --budget_s probe times
MIB = 2**20
CHART = (  # (row key, axis title), one bar chart each
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("hd95", "HD95 (mm, lower is better)"),
    ("train_memory_mib", "training memory, one step (MiB)"),
    ("outputs_per_s", "training outputs / s"),
    ("inference_s", "inference s / case"),
)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """{dotted key: value} of 'KEY=VALUE' strings (--set): VALUE as a Python literal, else the string.

    '3' -> 3, '1e-3' -> 0.001, 'True' -> True, '(16, 32)' -> (16, 32), 'vessels' -> 'vessels'. A later
    pair of the same key wins; a pair without '=' or with an empty key raises ConfigError.
    """
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE (e.g. train.steps=100), got {pair!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text
        overrides[key.strip()] = value
    return overrides


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any], name: str
) -> None:
    """Sets each dotted key of `overrides` in `config` (in place) with ml_collections' type checks.

    Raises ConfigError naming the key and `name` (the config's label) when the key does not exist in
    the config or the value cannot take the field's type (a string for an int, 1 for a bool).
    """
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or field not in node:
            raise ConfigError(
                f"--set {key}: {name} has no config key {key!r} (--set sets it in every config)"
            )
        try:
            node[field] = value
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"--set {key}={value!r}: not a value for {name}'s {key} ({error})"
            ) from None


def load_config(
    spec: str, overrides: Optional[dict[str, Any]] = None
) -> tuple[str, ml_collections.ConfigDict]:
    """('<file stem>:<preset>', config) of 'path/to/config.py[:preset]' (get_config(preset)), with
    `overrides` ({dotted key: value}, apply_overrides) set before the data settings are resolved."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    name = f"{pathlib.Path(path).stem}:{preset or 'default'}"
    config = module.get_config(preset) if preset else module.get_config()
    apply_overrides(config, overrides or {}, name)
    return name, dataset.resolve_data_config(config)


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
    sizes["params"] = _parameters(state)
    return sizes


def _parameters(state: Any) -> int:
    """Trained parameters of a train state (or of its shapes)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params.fast)))


def _windows(workdir: pathlib.Path) -> list[tuple[int, float]]:
    """(last step, outputs per second) of each logged window of WORKDIR/metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["points_per_s"]) for r in rows if "points_per_s" in r]


def training_rate(workdir: pathlib.Path) -> float:
    """Median outputs per second of the logged windows after the first (which holds compilation)."""
    rates = [rate for _, rate in _windows(workdir)]
    return float(statistics.median(rates[1:] or rates))


def train_seconds(workdir: pathlib.Path, outputs_per_step: int) -> float:
    """Seconds of the training loop of a finished run, compilation excluded, from its metrics.jsonl.

    Each logged window (train.log_every steps) lasted outputs_per_step x its steps / its
    points_per_s. The windows after the first are summed; the first, which holds the compilation
    of the step (and the first inputs' preparation), counts its steps at the median seconds per step
    of the others (alone, it counts as measured, compilation included). A window runs from the end
    of the previous logging step's work to the read of its own last step, so it includes the input
    waits and any validation or checkpoint at a step that is not a logging step (none in the
    presets: eval_every and checkpoint_every are multiples of log_every), and leaves out those at
    logging steps, the data loading before the loop and the final evaluation. After a resume the
    first window of the resumed part holds that process's compilation (from the cache if kept).
    """
    windows = _windows(workdir)
    steps = np.diff([0] + [step for step, _ in windows])
    per_step = [outputs_per_step / rate for _, rate in windows]
    first = statistics.median(per_step[1:]) if len(windows) > 1 else per_step[0]
    return float(steps[0] * first + np.dot(steps[1:], per_step[1:]))


def budget_steps(budget_s: float, seconds_per_step: float) -> int:
    """train.steps that fill `budget_s` seconds of training at `seconds_per_step`: at least 1."""
    return max(1, round(budget_s / seconds_per_step))


def probe_seconds_per_step(
    config: ml_collections.ConfigDict, probe_dir: pathlib.Path, probe_steps: int
) -> float:
    """Seconds per training step of `config`: train_seconds of a `probe_steps`-step run, per step.

    The probe trains in `probe_dir` (emptied first) with train.py's code on the same training cases
    and batches, logging every probe_steps // 5 steps (so the windows after the first one, which
    holds compilation, time it), one checkpoint at the end and no validation: data.split_file names
    the training cases and no validation case, so the evaluation that follows predicts nothing.
    """
    shutil.rmtree(probe_dir, ignore_errors=True)
    train_cases, _ = dataset.split_cases(config)
    files.write_json(
        probe_dir / "split.json", {"train": [case.id for case in train_cases], "val": []}
    )
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.data.split_file = str(probe_dir / "split.json")
    probe.train.steps = probe_steps
    probe.train.log_every = max(1, probe_steps // 5)
    probe.train.checkpoint_every = probe_steps
    training.train_and_evaluate(probe, str(probe_dir / "run"))
    per_step = families.get_family(probe).outputs_per_step(probe)
    return train_seconds(probe_dir / "run", per_step) / probe_steps


def planned_steps(
    config: ml_collections.ConfigDict,
    run_dir: pathlib.Path,
    probe_dir: pathlib.Path,
    budget_s: float,
    probe_steps: int,
) -> dict:
    """{'budget_s', 'probe_steps', 'seconds_per_step', 'steps'}: the train.steps of `config` under a
    budget of `budget_s` seconds of training (budget_steps of a probe_seconds_per_step probe in
    `probe_dir`, deleted afterwards), kept in RUN_DIR/budget.json and reused from there when it
    holds the same budget and probe steps, so that a rerun resumes the same run."""
    saved = run_dir / "budget.json"
    if saved.exists():
        plan = json.loads(saved.read_text())
        if (plan["budget_s"], plan["probe_steps"]) == (budget_s, probe_steps):
            return plan
    seconds_per_step = probe_seconds_per_step(config, probe_dir, probe_steps)
    shutil.rmtree(probe_dir, ignore_errors=True)
    plan = {
        "budget_s": budget_s,
        "probe_steps": probe_steps,
        "seconds_per_step": seconds_per_step,
        "steps": budget_steps(budget_s, seconds_per_step),
    }
    files.write_json(saved, plan)
    return plan


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Trained parameters of the config's model, from shapes only (nothing is initialised)."""
    family = families.get_family(config)
    model, tx = family.build_model(config), make_optimizer(config)
    return _parameters(
        jax.eval_shape(lambda: family.init_state(config, model, tx, jax.random.key(0)))
    )


def read_evaluation(workdir: pathlib.Path) -> dict:
    """What a row takes from WORKDIR/eval/metrics.json: 'checkpoint_step', the means over the cases
    of 'dice', 'iou', 'hd95', 'asd', 'surface_dice' (None where absent), 'inference_s' and
    'network_outputs' (per case)."""
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    mean, cases = result.get("mean", {}), result["cases"]
    return {
        "checkpoint_step": result["step"],
        **{k: mean.get(k) for k in ("dice", "iou", "hd95", "asd", "surface_dice")},
        "inference_s": float(np.mean([c["seconds"] for c in cases])),
        "network_outputs": float(np.mean([c["decoder_points"] for c in cases])),
    }


def summarise(
    name: str,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    memory: dict,
    wall: float,
    probe_seconds_per_step: Optional[float] = None,
) -> dict:
    """One table row from a finished workdir (see the module docstring for the keys)."""
    evaluated = read_evaluation(workdir)
    rate = training_rate(workdir)
    per_step = families.get_family(config).outputs_per_step(config)
    return {
        "name": name,
        "model": config.model.name,
        "checkpoint_step": evaluated["checkpoint_step"],
        **{k: evaluated[k] for k in ("dice", "iou", "hd95", "asd", "surface_dice")},
        "train_memory_mib": memory["total"] / MIB,
        "train_memory_bytes": {k: v for k, v in memory.items() if k != "params"},
        "params": memory["params"],
        "outputs_per_step": per_step,
        "outputs_per_s": rate,
        "seconds_per_step": per_step / rate,
        "inference_s": evaluated["inference_s"],
        "network_outputs": evaluated["network_outputs"],
        "wall_s": wall,
        "steps": config.train.steps,
        "train_s": train_seconds(workdir, per_step),
        "probe_seconds_per_step": probe_seconds_per_step,
    }


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[dict], settings: dict) -> str:
    """The comparison table with the settings it was measured under."""
    if settings.get("budget_s"):
        equal = (
            f"equal wall-clock budget of {settings['budget_s']:g} s of training (train.steps from "
            f"a {settings['probe_steps']}-step probe of each config)"
        )
    else:
        equal = f"equal steps ({settings['steps']} steps)"
    lines = [
        f"# Comparison on {settings['dataset']} ({settings['train_cases']} training, "
        f"{settings['val_cases']} validation cases)",
        "",
        f"Same split, {equal}, seed {settings['seed']}; {settings['machine']}; "
        f"total wall time {settings['wall_s'] / 60:.1f} min. Written by "
        f"`{shlex.join(['python', '-m', 'ossnet_jax.compare', *settings.get('command', [])])}`.",
        "",
        "| model | Dice | IoU | HD95 mm | ASD mm | surface Dice | train memory MiB | params | "
        "outputs / step | outputs / s | s / step | inference s / case | network outputs / case | "
        "steps | train s | wall s |",
        "|---|" + "---|" * 15,
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_cell(r['dice'], 4)} | {_cell(r['iou'], 4)} | "
            f"{_cell(r['hd95'], 2)} | {_cell(r['asd'], 2)} | {_cell(r['surface_dice'], 4)} | "
            f"{r['train_memory_mib']:,.0f} | {r['params']:,} | {r['outputs_per_step']:,} | "
            f"{r['outputs_per_s']:,.0f} | {r['seconds_per_step']:.2f} | {r['inference_s']:.2f} | "
            f"{r['network_outputs']:,.0f} | {_cell(r.get('steps'), 0)} | "
            f"{_cell(r.get('train_s'), 1)} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "Dice, IoU, HD95, ASD and surface Dice (1 mm tolerance): means over the validation cases of "
        "the best checkpoint (by validation Dice). Train s: the training loop's seconds, "
        "compilation, validation and evaluation excluded (ossnet_jax/compare.py, train_seconds). "
        "Training memory: XLA's compiled memory analysis "
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


def dataset_label(data: ml_collections.ConfigDict) -> str:
    """'synthetic vessels (data/synthetic_brats/vessels-cases40-seed0-88x88x58)': the format (the
    synthetic data's kind too) and the folder of its cases."""
    if data.format != "synthetic":
        return f"{data.format} ({data.root})"
    return f"{data.format} {planning.synthetic_kind(data)} ({dataset.synthetic_folder(data)})"


def compare(
    specs: list[str],
    workdir: pathlib.Path,
    steps: int = 0,
    seed: int = 0,
    data_root: str = "",
    overrides: Optional[dict[str, Any]] = None,
    budget_s: float = 0.0,
    probe_steps: int = PROBE_STEPS,
) -> tuple[list[dict], dict]:
    """Trains, evaluates and measures every config; returns (rows, settings).

    `overrides` ({dotted key: value}) are set in every config (load_config), `data_root` as
    data.root before them. `budget_s` > 0: each config trains for planned_steps (a `probe_steps`
    probe in WORKDIR/.probe_<name>) instead of the same `steps`.
    """
    start = time.perf_counter()
    overrides = {**({"data.root": data_root} if data_root else {}), **(overrides or {})}
    named = [load_config(s, overrides) for s in specs]
    first = named[0][1]
    configs = harmonise([c for _, c in named], steps or first.train.steps, seed)
    rows = []
    for (name, _), config in zip(named, configs):
        run_dir = workdir / name.replace(":", "_")
        probed = None
        if budget_s:
            plan = planned_steps(
                config, run_dir, workdir / f".probe_{run_dir.name}", budget_s, probe_steps
            )
            config.train.steps, probed = plan["steps"], plan["seconds_per_step"]
        memory = train_step_memory(config)
        tick = time.perf_counter()
        training.train_and_evaluate(config, str(run_dir))
        rows.append(summarise(name, config, run_dir, memory, time.perf_counter() - tick, probed))
        print(json.dumps(rows[-1]), flush=True)
    train_cases, val_cases = dataset.load_split(configs[0])
    settings = {
        "configs": list(specs),
        "overrides": overrides,
        "dataset": dataset_label(first.data),
        "grid_shape": list(first.data.grid_shape),
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "steps": None if budget_s else configs[0].train.steps,
        "budget_s": budget_s or None,
        "probe_steps": probe_steps if budget_s else None,
        "seed": seed,
        "machine": machine(),
        "wall_s": time.perf_counter() - start,
    }
    return rows, settings


def machine() -> str:
    """This machine in one line: architecture, backend and devices, CPU cores, JAX version."""
    return (
        f"{platform.machine()} {jax.default_backend()} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores, JAX {jax.__version__}"
    )


def write(rows: list[dict], settings: dict, out: pathlib.Path) -> None:
    """OUT.json, OUT.md and OUT.png (each written atomically)."""
    files.write_json(out.with_suffix(".json"), {"settings": settings, "rows": rows})
    files.write_bytes(out.with_suffix(".md"), markdown(rows, settings).encode())
    files.write_bytes(out.with_suffix(".png"), bar_chart(rows))


def use_compilation_cache(workdir: pathlib.Path) -> None:
    """Keeps compiled programs in WORKDIR/.jax_cache: the train step compiled for the memory analysis
    (or by a probe) is reused by training, and a rerun skips compilation."""
    jax.config.update("jax_compilation_cache_dir", str(workdir / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="path[:preset]")
    parser.add_argument("--workdir", default="runs/compare", help="one training workdir per config")
    parser.add_argument("--out", default="benchmarks/results/compare", help="OUT.{json,md,png}")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (default: the first's)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every config")
    parser.add_argument("--data_root", default="", help="data.root of every config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every config, e.g. data.synthetic_cases=20 (repeatable)",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=0.0,
        help="equal wall-clock: seconds of training per config (default 0: equal steps)",
    )
    parser.add_argument(
        "--probe_steps", type=int, default=PROBE_STEPS, help="steps timed to plan --budget_s"
    )
    args = parser.parse_args(argv[1:])
    if args.budget_s < 0 or (args.budget_s and args.steps):
        parser.error("--budget_s takes a positive number of seconds, and replaces --steps")
    if args.probe_steps < 2:
        parser.error("--probe_steps must be at least 2 (the first logged window holds compilation)")
    overrides = parse_overrides(args.overrides)
    workdir = pathlib.Path(args.workdir)
    use_compilation_cache(workdir)
    rows, settings = compare(
        args.configs,
        workdir,
        args.steps,
        args.seed,
        args.data_root,
        overrides,
        args.budget_s,
        args.probe_steps,
    )
    settings["command"] = list(argv[1:])  # the arguments, for the table's "Written by"
    write(rows, settings, pathlib.Path(args.out))
    print(markdown(rows, settings))


if __name__ == "__main__":
    runtime.prepare()
    cli.guarded(main)(sys.argv)
