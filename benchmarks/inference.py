"""Dense extraction strategies on one trained checkpoint: decoder evaluations, seconds, agreement, Dice.

  python -m benchmarks.inference --workdir runs/demo [--cases 8]
Runs 'dense', 'band' (unseeded and seeded) and 'octree' (unseeded and seeded; exact with margins 0
and 1 and growth checks off, 6- and 26-connected; and evaluating down to stride 2 with cubic
interpolation of the logits below, with and without the confidence gate on stride 2) on the same
validation cases of the workdir's dataset at the checkpoint's grid (data.grid_shape), and writes
benchmarks/results/inference.json, a list of rows {"strategy", "seeded", "margin", "grow", "finest",
"confident", "case", "decoder_points", "seconds", "disagreement", "dice"} (disagreement: the fraction
of grid voxels whose label differs from 'dense'; dice: against the label, on the padded grid), and
benchmarks/results/inference.md with the mean per strategy. Seconds include the encoder pass and
exclude compilation (one warm-up case first).
"""

import argparse
import pathlib
import time

import ml_collections
import numpy as np

from ossnet_jax import evaluation, files, reporting, runtime
from ossnet_jax.data import dataset

VARIANTS = (  # strategy, seeded, octree margin, growth connectivity, finest stride, confident
    ("dense", False, None, None, None, None),
    ("band", False, None, None, None, None),
    ("band", True, None, None, None, None),
    ("octree", False, 0, 6, 1, 0.0),
    ("octree", True, 0, 6, 1, 0.0),
    ("octree", True, 0, 0, 1, 0.0),
    ("octree", True, 0, 26, 1, 0.0),
    ("octree", True, 1, 6, 1, 0.0),
    ("octree", True, 0, 6, 2, 0.0),
    ("octree", True, 0, 6, 2, 2.0),  # the defaults of configs/base.py
)
KEYS = ("strategy", "seeded", "margin", "grow", "finest", "confident")


def _table(rows: list[dict], grid_voxels: int) -> str:
    lines = [
        "| strategy | seeded | margin | grow | finest | confident | decoder evaluations | "
        "share of grid | seconds | disagreement with dense | Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        strategy, seeded, margin, grow, finest, confident = variant
        chosen = [r for r in rows if tuple(r[k] for k in KEYS) == variant]
        if not chosen:
            continue
        mean = lambda key: float(np.mean([r[key] for r in chosen]))
        lines.append(
            f"| {strategy} | {seeded} | {'' if margin is None else margin} | "
            f"{'' if grow is None else grow} | {'' if finest is None else finest} | "
            f"{'' if confident is None else confident} | "
            f"{mean('decoder_points'):.0f} | {100 * mean('decoder_points') / grid_voxels:.2f}% | "
            f"{mean('seconds'):.2f} | {100 * mean('disagreement'):.4f}% | {mean('dice'):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--cases", type=int, default=8, help="validation cases to use (at most)")
    parser.add_argument("--out", default="benchmarks/results/inference")
    args = parser.parse_args()

    config = evaluation.load_config(args.workdir)
    _, cases = dataset.load_split(config)
    cases = cases[: args.cases]
    predictor, step = evaluation.restore_predictor(config, args.workdir)
    spec = predictor.spec
    predictor.compile(np.asarray(cases[0].image))
    grid = tuple(config.data.grid_shape)
    rows = []
    for case in cases:
        image = np.asarray(case.image)
        target = np.asarray(spec.values)[np.asarray(case.target)]
        reference = None
        for strategy, seeded, margin, grow, finest, confident in VARIANTS:
            ev = ml_collections.ConfigDict(config.eval.to_dict())
            ev.strategy, ev.seeded = strategy, seeded
            if margin is not None:
                ev.octree_margin, ev.octree_grow = margin, grow
                ev.octree_finest, ev.octree_confident = finest, confident
                ev.octree_interpolation = "cubic"
            start = time.perf_counter()
            labels, evaluations = predictor.predict(image, ev)
            seconds = time.perf_counter() - start
            if reference is None:
                reference = labels
            rows.append(
                {
                    "strategy": strategy,
                    "seeded": seeded,
                    "margin": margin,
                    "grow": grow,
                    "finest": finest,
                    "confident": confident,
                    "case": case.id,
                    "decoder_points": int(evaluations),
                    "seconds": round(seconds, 3),
                    "disagreement": float(np.mean(labels != reference)),
                    "dice": reporting.score(spec, labels, target)["dice"],
                }
            )
            print(
                f"{case.id} {strategy:<6} seeded={seeded!s:<5} margin={margin!s:<4} grow={grow!s:<4} "
                f"finest={finest!s:<4} confident={confident!s:<4} "
                f"{evaluations:>7} points {seconds:6.2f} s "
                f"disagreement {100 * rows[-1]['disagreement']:.4f}% Dice {rows[-1]['dice']:.4f}"
            )
    out = pathlib.Path(args.out)
    files.write_json(out.with_suffix(".json"), rows)
    header = (
        f"Checkpoint {args.workdir} (step {step}), {len(cases)} validation cases, grid "
        f"{'x'.join(map(str, grid))} = {int(np.prod(grid))} voxels, eval.batch_points "
        f"{config.eval.batch_points}; means over cases.\n\n"
    )
    table = _table(rows, int(np.prod(grid)))
    out.with_suffix(".md").write_text(header + table)
    print(header + table)


if __name__ == "__main__":
    runtime.prepare()
    main()
