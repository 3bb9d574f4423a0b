"""One knob at a time around a base config: Dice, HD95, train and inference seconds per variant.

  python -m benchmarks.ablation --dataset_name tumour                  # every variant, seed 0
  python -m benchmarks.ablation --dataset_name vessels --set data.synthetic_kind=vessels
  python -m benchmarks.ablation --dataset_name tumour --variants baseline border_0 --seeds 1 2
  python -m benchmarks.ablation --steps 100 --workdir runs/ablation_quick --out runs/ablation_quick

Every variant of VARIANTS is the base config (--base, default configs/oss_net_c.py:small) with the
--set overrides (the dataset: ossnet_jax.compare's parser), then --steps (train.steps, default the
base's), then the variant's own overrides (so steps_800 always trains 800 steps), then train.seed =
the seed; the data split (data.seed) stays. Each (dataset name, variant, seed) trains and evaluates
with train.py's code in WORKDIR/<dataset name>/<variant>-s<seed> (a rerun resumes it) and gives a row
  dataset, variant, overrides (the variant's), seed, base, steps, grid_shape (the planned grid)
  dice, hd95 (mm)   means over the validation cases of the best checkpoint (eval/metrics.json)
  train_s           seconds of the training loop, compilation excluded (compare.train_seconds)
  inference_s       seconds per validation case (evaluate's timing, compilation excluded)
  params            trained parameters
  wall_s            train + evaluate wall time, compilation included
  machine           where it ran
OUT.json accumulates the rows of every invocation: a row replaces the one of the same (dataset,
variant, seed), a (dataset, variant, seed) that has a row is skipped unless --rerun (which deletes
its run folder and trains it again), and each invocation's arguments are kept under "commands". So
the datasets, and more seeds where a difference is small, run as separate (or concurrent) commands.
OUT.md is rewritten from all rows after every run: one table per dataset, one line per variant.

The latent grid (latent_fine, latent_coarse) is the skip encoder's last block's spatial shape, the
grid / (data.downscale x 2^blocks): 2 or 4 encoder blocks instead of the preset's 3 make it twice as
fine or coarse per axis; 'auto' grid planning then pads the volume to a multiple of the new halvings,
so the grid can change slightly too (grid_shape records it).
"""

import argparse
import json
import pathlib
import shlex
import shutil
import statistics
import sys
import time
from typing import Any, Optional

import ml_collections

from ossnet_jax import cli, compare, families, files, runtime, training

DEFAULT_BASE = "configs/oss_net_c.py:small"
# name -> overrides of the base config; one knob each (the comments give the 'small' preset's value)
VARIANTS = {
    "baseline": {},
    "points_1024": {"train.num_points": 1024},  # locations per volume and step: 2048
    "points_4096": {"train.num_points": 4096},
    "border_0": {"train.border_fraction": 0.0},  # share drawn from the border band: 0.5
    "border_0.8": {"train.border_fraction": 0.8},
    "band_3": {"data.band_size": 3},  # max-pool edge of the border band around the label: 13
    "band_7": {"data.band_size": 7},
    "patch_5": {"model.patch_size": 5},  # patch edge in voxels, odd: 7
    "patch_9": {"model.patch_size": 9},
    "large_patches": {"model.large_patches": True},  # a 14^3 patch pooled to 7^3 as extra channels
    "width_64": {"model.decoder_width": 64},  # decoder width: 128
    "width_256": {"model.decoder_width": 256},
    "latent_fine": {"model.encoder_channels": (16, 32)},  # encoder blocks: 3 (16, 32, 64)
    "latent_coarse": {"model.encoder_channels": (16, 32, 64, 128)},
    "steps_800": {"train.steps": 800},  # steps: 400
    "continuous": {"train.continuous_locations": True},  # real-valued locations: off
    "decay_early": {"train.lr_decay_fractions": (0.4, 0.6)},  # lr x0.1 at: (0.8, 0.9)
    "point_dice": {"train.point_dice_weight": 1.0},  # soft Dice of the locations: 0 (BCE only)
    "seg_weight_1": {"train.seg_loss_weight": 1.0},  # the encoder's dense low-res loss: 0.1
    # not one knob: the two that helped on both datasets, together
    "combined": {"model.large_patches": True, "train.border_fraction": 0.8},
    # not one knob: the four that gained in single-seed runs (vessels, or the former preset), together
    "stacked": {
        "model.decoder_width": 256,
        "model.large_patches": True,
        "train.border_fraction": 0.8,
        "train.point_dice_weight": 1.0,
    },
}
BASELINE = "baseline"


def variant_config(
    base: str, sets: dict[str, Any], steps: int, variant: str, seed: int
) -> ml_collections.ConfigDict:
    """The resolved config of one run: `base` ('path.py[:preset]') with `sets`, train.steps =
    `steps` (0: the base's), the variant's overrides and train.seed = `seed`, in that order."""
    overrides = {**sets, **({"train.steps": steps} if steps else {})}
    overrides.update(VARIANTS[variant])
    overrides["train.seed"] = seed
    return compare.load_config(base, overrides)[1]


def run_variant(
    config: ml_collections.ConfigDict,
    run_dir: pathlib.Path,
    dataset_name: str,
    variant: str,
    seed: int,
    base: str,
) -> dict:
    """Trains and evaluates `config` (variant_config) in `run_dir`; its row (module docstring)."""
    tick = time.perf_counter()
    training.train_and_evaluate(config, str(run_dir))
    wall = time.perf_counter() - tick
    evaluated = compare.read_evaluation(run_dir)
    return {
        "dataset": dataset_name,
        "variant": variant,
        "overrides": json.loads(json.dumps(VARIANTS[variant])),  # as OUT.json holds it
        "seed": seed,
        "base": base,
        "steps": config.train.steps,
        "grid_shape": list(config.data.grid_shape),
        "dice": evaluated["dice"],
        "hd95": evaluated["hd95"],
        "train_s": compare.train_seconds(
            run_dir, families.get_family(config).outputs_per_step(config)
        ),
        "inference_s": evaluated["inference_s"],
        "params": compare.parameter_count(config),
        "wall_s": wall,
        "machine": compare.machine(),
    }


def row_key(row: dict) -> tuple[str, str, int]:
    """(dataset, variant, seed): what identifies a row."""
    return row["dataset"], row["variant"], row["seed"]


def _order(key: tuple[str, str, int], datasets: list[str]) -> tuple:
    """Sort key of rows: datasets in first-seen order, variants in VARIANTS order (others after,
    by name), seeds ascending."""
    dataset_name, variant, seed = key
    names = list(VARIANTS)
    rank = names.index(variant) if variant in names else len(names)
    return datasets.index(dataset_name), rank, variant, seed


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """`rows` with `new` added, a new row replacing the row of the same row_key; sorted (_order)."""
    by_key = {row_key(r): r for r in rows}
    by_key.update({row_key(r): r for r in new})
    datasets = list(dict.fromkeys(k[0] for k in by_key))
    return [by_key[k] for k in sorted(by_key, key=lambda k: _order(k, datasets))]


def pending(
    rows: list[dict], dataset_name: str, variants: list[str], seeds: list[int], rerun: bool
) -> list[tuple[str, int]]:
    """(variant, seed) pairs still to run: all of them with `rerun`, else those without a row."""
    done = {row_key(r) for r in rows}
    return [
        (variant, seed)
        for variant in variants
        for seed in seeds
        if rerun or (dataset_name, variant, seed) not in done
    ]


def read(path: pathlib.Path) -> dict:
    """The results file {'rows': [...], 'commands': [[arg, ...], ...]}; empty lists if absent."""
    if not path.exists():
        return {"rows": [], "commands": []}
    return json.loads(path.read_text())


def record(out: pathlib.Path, new: list[dict], command: list[str]) -> dict:
    """Merges `new` rows and `command` (this invocation's arguments, kept once) into OUT.json, read
    again first so that concurrent invocations keep each other's rows; writes OUT.json and OUT.md
    (atomically) and returns the payload."""
    payload = read(out.with_suffix(".json"))
    payload["rows"] = merge(payload["rows"], new)
    if command not in payload["commands"]:
        payload["commands"].append(command)
    files.write_json(out.with_suffix(".json"), payload)
    files.write_text(out.with_suffix(".md"), markdown(payload))
    return payload


def _mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation (n - 1); None for one value) of the values that are not
    None; (None, None) if there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (dataset, variant) of merged rows, in row order: 'dataset', 'variant',
    'overrides', 'seeds', 'steps' and 'params' (sets of the rows' values), 'dice' and 'dice_sd'
    (mean and sd over seeds), 'delta' and 'delta_sd' (the mean and sd over the seeds both have of
    its Dice minus the baseline's; None without such seeds), 'hd95', 'train_s', 'inference_s'
    (means over seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["variant"]), []).append(row)
    lines = []
    for (dataset_name, variant), group in groups.items():
        baseline = {r["seed"]: r["dice"] for r in groups.get((dataset_name, BASELINE), [])}
        paired = [
            r["dice"] - baseline[r["seed"]]
            for r in group
            if r["seed"] in baseline and None not in (r["dice"], baseline[r["seed"]])
        ]
        dice, dice_sd = _mean_sd([r["dice"] for r in group])
        delta, delta_sd = _mean_sd(paired)
        lines.append(
            {
                "dataset": dataset_name,
                "variant": variant,
                "overrides": group[0]["overrides"],
                "seeds": sorted(r["seed"] for r in group),
                "steps": sorted({r["steps"] for r in group}),
                "params": sorted({r["params"] for r in group}),
                "dice": dice,
                "dice_sd": dice_sd,
                "delta": delta,
                "delta_sd": delta_sd,
                **{
                    k: _mean_sd([r[k] for r in group])[0]
                    for k in ("hd95", "train_s", "inference_s")
                },
            }
        )
    return lines


def _number(value: Optional[float], sd: Optional[float], digits: int, sign: str = "") -> str:
    """'0.8123 ± 0.0040', '0.8123' (one seed) or 'n/a'."""
    if value is None:
        return "n/a"
    text = f"{value:{sign},.{digits}f}"
    return text if sd is None else f"{text} ± {sd:,.{digits}f}"


def _value(value: Any) -> str:
    """An override as the config holds it: JSON lists as tuples."""
    return str(tuple(value)) if isinstance(value, list) else str(value)


def markdown(payload: dict) -> str:
    """OUT.md of a results payload: one table per dataset, then the commands that produced it."""
    lines = [
        "# Ablation: one knob at a time around the base config",
        "",
        "Written by `python -m benchmarks.ablation` (variants: benchmarks/ablation.py, VARIANTS). "
        "Dice and HD95: means over the validation cases of the best checkpoint, then over the seeds "
        "(± the sample standard deviation over seeds, where there are several). ΔDice: the "
        "variant's Dice minus the baseline's, seed by seed, averaged over the seeds both ran. "
        "Train s: the training loop's seconds, compilation, validation and evaluation excluded "
        "(ossnet_jax/compare.py, train_seconds); inference s: per validation case, compilation "
        "excluded. Means over seeds.",
    ]
    lines_by_dataset: dict[str, list[dict]] = {}
    for line in summarise(payload["rows"]):
        lines_by_dataset.setdefault(line["dataset"], []).append(line)
    for dataset_name, summary in lines_by_dataset.items():
        rows = [r for r in payload["rows"] if r["dataset"] == dataset_name]
        lines += [
            "",
            f"## {dataset_name}",
            "",
            f"Base {', '.join(sorted({r['base'] for r in rows}))}; "
            f"{'; '.join(sorted({r['machine'] for r in rows}))}.",
            "",
            "| variant | overrides | seeds | steps | params | Dice | ΔDice | HD95 mm | train s | "
            "inference s / case |",
            "|---|" + "---|" * 9,
        ]
        for s in summary:
            overrides = ", ".join(f"{k}={_value(v)}" for k, v in s["overrides"].items()) or "—"
            delta = "—" if s["variant"] == BASELINE else _number(s["delta"], s["delta_sd"], 4, "+")
            lines.append(
                f"| {s['variant']} | {overrides} | {', '.join(map(str, s['seeds']))} | "
                f"{', '.join(map(str, s['steps']))} | {', '.join(f'{p:,}' for p in s['params'])} | "
                f"{_number(s['dice'], s['dice_sd'], 4)} | {delta} | {_number(s['hd95'], None, 2)} | "
                f"{_number(s['train_s'], None, 1)} | {_number(s['inference_s'], None, 2)} |"
            )
    lines += ["", "## Commands", "", "```"]
    lines += [shlex.join(["python", "-m", "benchmarks.ablation", *c]) for c in payload["commands"]]
    lines += ["```", ""]
    return "\n".join(lines)


def default_dataset_name(config: ml_collections.ConfigDict) -> str:
    """The table's dataset label when none is given: the synthetic data's kind ('tumour' where the
    config has no data.synthetic_kind), else data.format."""
    if config.data.format == "synthetic":
        return str(config.data.get("synthetic_kind", "tumour"))
    return config.data.format


def ablate(
    base: str,
    sets: dict[str, Any],
    dataset_name: str,
    variants: list[str],
    seeds: list[int],
    steps: int,
    workdir: pathlib.Path,
    out: pathlib.Path,
    rerun: bool = False,
    command: Optional[list[str]] = None,
) -> list[dict]:
    """Runs the (variant, seed) pairs that have no row in OUT.json yet (all with `rerun`), recording
    each row as it finishes (record; `command` is kept with them); returns the rows it ran.

    Every pair's config is built first, so a bad --set key or variant fails before any training.
    dataset_name '' takes default_dataset_name of the base config with `sets`.
    """
    dataset_name = dataset_name or default_dataset_name(compare.load_config(base, sets)[1])
    todo = pending(read(out.with_suffix(".json"))["rows"], dataset_name, variants, seeds, rerun)
    configs = {pair: variant_config(base, sets, steps, *pair) for pair in todo}
    ran = []
    for (variant, seed), config in configs.items():
        run_dir = workdir / dataset_name / f"{variant}-s{seed}"
        if rerun:
            shutil.rmtree(run_dir, ignore_errors=True)
        ran.append(run_variant(config, run_dir, dataset_name, variant, seed, base))
        record(out, [ran[-1]], command or [])
        print(json.dumps(ran[-1]), flush=True)
    if (
        not ran and out.with_suffix(".json").exists()
    ):  # the table of the rows as this code writes it
        files.write_text(out.with_suffix(".md"), markdown(read(out.with_suffix(".json"))))
    return ran


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="path[:preset] of the base config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override of every run, e.g. data.synthetic_cases=20 (repeatable)",
    )
    parser.add_argument("--dataset_name", default="", help="the table's dataset label")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="VARIANT",
        help=f"default: all of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed of each run")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (default: the base's)")
    parser.add_argument("--workdir", default="runs/ablation", help="WORKDIR/<dataset>/<run>")
    parser.add_argument("--out", default="benchmarks/results/ablation", help="OUT.{json,md}")
    parser.add_argument("--rerun", action="store_true", help="train runs that have a row again")
    args = parser.parse_args(argv[1:])
    workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    compare.use_compilation_cache(workdir)
    ablate(
        args.base,
        compare.parse_overrides(args.overrides),
        args.dataset_name,
        args.variants,
        args.seeds,
        args.steps,
        workdir,
        out,
        args.rerun,
        argv[1:],
    )
    print(markdown(read(out.with_suffix(".json"))))


if __name__ == "__main__":
    runtime.prepare()
    cli.guarded(main)(sys.argv)
