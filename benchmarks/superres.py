"""Super-resolution from thick slices: the occupancy field queried between the slices it was trained on.

  python -m benchmarks.superres [--cases 20] [--steps 300] [--unet-steps 200] [--workdir runs/superres]

Synthetic BraTS-like cases at 1 mm (88x88x56) are made 4x thicker along z: each group of 4 slices is
averaged (images) or takes its most frequent label (labels, ties to the smaller value), giving
88x88x14 volumes of 1x1x4 mm whose affine places each thick slice at the centre of its group. OSS-Net
C (`small` preset, grid 96x96x16) and the 3D U-Net (`small`, 48x48x16 crops) are trained on them with
the same split, then every validation case is scored against its original 1 mm label (whole tumour,
label > 0) by Dice and HD95 (mm) for:

  field     OSS-Net's field queried at the original voxel centres (api.Field.__call__, every voxel)
  nearest   its native 4 mm prediction (the field at the thick voxel centres, every voxel)
            upsampled along z by nearest neighbour, thresholded at 0.5
  linear    the same probabilities interpolated linearly along z (the thick grid is the original's
            in x and y, so this is the trilinear upsampling), thresholded at 0.5
  unet nearest / unet linear   the same two for the 3D U-Net's native probabilities

Also measured: the field's query throughput on CPU (points/s, 2^16 points per call), the cost of
`segment()` at twice finer spacing (0.5 x 0.5 x 2 mm) against the native one (decoder evaluations
and seconds, octree strategy), and meshes: the field's foreground probability at its own mesh
vertices inside the volume (decision level 0.5) at the native (1 x 1 x 4 mm) and at 1 mm spacing,
without and with 2 Newton refinement steps, and PNG renderings of the native prediction's mask mesh
and the field's mesh at 1 mm for the first case. Writes benchmarks/results/superres.{json,md} and
superres_{mask,field}_mesh.png. A model whose WORKDIR/<name>/eval/metrics.json exists is reused, not
trained again (its training seconds are then missing).
"""

import argparse
import pathlib
import time

import ml_collections
import numpy as np
from scipy import ndimage

from configs import demo, unet3d
from ossnet_jax import api, evaluation, files, outputs, runtime, surface, training
from ossnet_jax.data import dataset, layouts, nifti, synthetic
from ossnet_jax.families.oss_net import resolution

FACTOR = 4  # slices per thick slice
SHAPE = (88, 88, 56)  # the 1 mm synthetic volumes (z divisible by FACTOR)
GRID = (96, 96, 16)  # the thick volumes' padded grid
RESULTS = pathlib.Path(__file__).parent / "results"


def majority(label: np.ndarray) -> np.ndarray:
    """(x, y, FACTOR z) label values -> (x, y, z): the most frequent value of each group of slices,
    ties to the smaller value."""
    groups = label.reshape(label.shape[0], label.shape[1], -1, FACTOR)
    values = np.unique(label)
    counts = np.stack([(groups == v).sum(-1) for v in values], -1)
    return values[np.argmax(counts, axis=-1)].astype(label.dtype)


def thicken(cases: list, out_root: pathlib.Path) -> dict:
    """Writes every case 4x thicker along z in the BraTS layout under out_root; returns, by case id,
    the original label values (x, y, z) and affine."""
    originals = {}
    for case in cases:
        folder = out_root / synthetic.DATASET_DIR / case.id
        label, affine = nifti.load_nifti(case.label_path)
        thick = affine.copy()
        thick[:3, 2] = affine[:3, 2] * FACTOR
        thick[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, (FACTOR - 1) / 2]) + affine[:3, 3]
        for modality, path in zip(synthetic.MODALITIES, case.image_paths):
            image = np.asarray(nifti.load_nifti(path)[0], np.float32)
            mean = image.reshape(image.shape[0], image.shape[1], -1, FACTOR).mean(-1)
            nifti.save_nifti(folder / f"{case.id}_{modality}.nii.gz", mean, thick)
        label = np.asarray(label)
        nifti.save_nifti(folder / f"{case.id}_seg.nii.gz", majority(label), thick)
        originals[case.id] = (label, affine)
    return originals


def upsample_z(probs: np.ndarray, depth: int, order: int) -> np.ndarray:
    """Thick (x, y, z) foreground probabilities at the original slices, thresholded at 0.5: slice i
    lies at thick coordinate (i - (FACTOR - 1) / 2) / FACTOR; order 0 nearest, 1 linear (clamped at
    the ends). Returns (x, y, depth) bool."""
    t = (np.arange(depth) - (FACTOR - 1) / 2) / FACTOR
    x, y, z = np.meshgrid(np.arange(probs.shape[0]), np.arange(probs.shape[1]), t, indexing="ij")
    values = ndimage.map_coordinates(
        probs.astype(np.float32), [x, y, z], order=order, mode="nearest"
    )
    return values > 0.5


def oss_net_native(field: api.Field) -> np.ndarray:
    """OSS-Net's probabilities at every thick voxel centre (file order)."""
    index = np.argwhere(np.ones(field.case.file_shape, bool)).astype(np.float64)
    points = index @ field.case.affine[:3, :3].T + field.case.affine[:3, 3]
    return field(points).reshape(field.case.file_shape)


def unet_native(predictor, case) -> np.ndarray:
    """The U-Net's foreground probabilities on the case's thick voxels (file order)."""
    probs, _ = predictor.probabilities(np.asarray(case.image))
    return case.to_file_geometry(probs[..., 0])


def _scores(pred: np.ndarray, target: np.ndarray) -> dict:
    metrics = surface.case_metrics(pred, target, (1.0, 1.0, 1.0))
    return {"dice": metrics["dice"], "hd95": metrics["hd95"]}


def _configs(root: pathlib.Path, cases: int, steps: int, unet_steps: int):
    config = demo.get_config()
    config.data.format = "brats"
    config.data.root = str(root)
    config.data.grid_shape = GRID
    config.data.num_channels = 4
    config.train.steps = steps
    config.train.eval_every = config.train.checkpoint_every = steps
    config.eval.meshes = config.eval.pictures = False
    unet = unet3d.get_config("small")
    unet.data = ml_collections.ConfigDict(config.data.to_dict())  # a copy: the U-Net sees full res
    unet.data.downscale = 1
    unet.eval.meshes = unet.eval.pictures = False
    unet.train.crop_shape = (48, 48, 16)
    unet.train.steps = unet_steps
    unet.train.eval_every = unet.train.checkpoint_every = unet_steps
    return config, unet


def _field_scores(field: api.Field, label: np.ndarray, affine: np.ndarray, threshold: float):
    """Dice/HD95 of the field queried at every original voxel centre, and the seconds it took."""
    index = np.argwhere(np.ones(label.shape, bool)).astype(np.float64)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    start = time.perf_counter()
    probs = field(points)
    seconds = time.perf_counter() - start
    return _scores(probs.reshape(label.shape) > threshold, label > 0), seconds, len(points)


MESH_SPACINGS = (("native", None), ("1 mm", (1.0, 1.0, 1.0)))


def _mesh_numbers(field: api.Field, threshold: float, spacings=MESH_SPACINGS) -> dict:
    """The field at its own mesh vertices (those inside the volume), without and with refinement."""
    out = {}
    shape = np.asarray(field.case.file_shape)
    inverse = np.linalg.inv(field.case.affine)
    for name, spacing in spacings:
        for steps in (0, 2):
            start = time.perf_counter()
            vertices, faces = field.mesh(spacing=spacing, refine_steps=steps)
            seconds = time.perf_counter() - start
            voxels = vertices @ inverse[:3, :3].T + inverse[:3, 3]
            inside = np.all((voxels >= 0) & (voxels <= shape - 1), axis=1)
            if not inside.any():
                continue  # no surface inside the volume
            error = np.abs(field(vertices[inside]) - threshold)
            out[f"{name}, {steps} steps"] = {
                "vertices": int(len(vertices)),
                "faces": int(len(faces)),
                "level_error_max": float(error.max()),
                "level_error_p99": float(np.percentile(error, 99)),
                "level_error_mean": float(error.mean()),
                "seconds": round(seconds, 3),
            }
    return out


def _segment_cost(model: api.Model, case) -> dict:
    """Decoder evaluations and seconds of segment() at native and at twice finer spacing (octree)."""
    ev = model.config.eval
    ev.strategy = "octree"
    field = model.field(case)
    native = np.asarray(nifti.voxel_spacing(case.affine))
    out = {}
    for name, spacing in (("native", native), ("2x finer", native / 2)):
        predictor = model.predictor
        resolution.predict_at(predictor, field.encoded, case, spacing, ev)  # compile, warm
        start = time.perf_counter()
        _, grid, evaluations = resolution.predict_at(predictor, field.encoded, case, spacing, ev)
        out[name] = {
            "spacing_mm": [round(float(s), 3) for s in spacing],
            "shape": list(grid.shape),
            "decoder_points": int(evaluations),
            "seconds": round(time.perf_counter() - start, 3),
        }
    return out


def _throughput(field: api.Field, repeats: int = 3) -> float:
    shape = np.asarray(field.case.file_shape)
    rng = np.random.default_rng(0)
    index = rng.uniform(0, 1, (2**16, 3)) * (shape - 1)
    points = index @ field.case.affine[:3, :3].T + field.case.affine[:3, 3]
    field(points)  # compile
    best = min(_timed(lambda: field(points)) for _ in range(repeats))
    return len(points) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(result: dict) -> str:
    lines = [
        f"# Super-resolution from {FACTOR}x thicker slices (synthetic, {result['cases']} val cases)",
        "",
        f"Command: `{result['command']}`; OSS-Net C {result['steps']} steps, 3D U-Net "
        f"{result['unet_steps']} steps, 2-core CPU. Scored against the original 1 mm labels "
        "(whole tumour), means over the validation cases.",
        "",
        "| method | Dice | HD95 (mm) |",
        "|---|---|---|",
    ]
    for method, row in result["mean"].items():
        hd = "n/a" if row["hd95"] is None else f"{row['hd95']:.2f}"
        lines.append(f"| {method} | {row['dice']:.4f} | {hd} |")
    q = result["throughput_points_per_s"]
    lines += ["", f"Field query throughput on CPU: {q:,.0f} points/s (2^16 points per call).", ""]
    lines += ["segment() cost (octree, first validation case):", ""]
    lines += ["| spacing (mm) | shape | decoder evaluations | seconds |", "|---|---|---|---|"]
    for row in result["segment_cost"].values():
        lines.append(
            f"| {row['spacing_mm']} | {row['shape']} | {row['decoder_points']:,} | {row['seconds']} |"
        )
    lines += [
        "",
        "Mesh from the field, its foreground probability at its own vertices inside the "
        "volume (level 0.5), mean over cases:",
        "",
    ]
    lines += _mesh_table(result["mesh_mean"])
    lines += ["", f"Seconds: {result['seconds']}", ""]
    return "\n".join(lines)


def _mean_meshes(meshes: list[dict]) -> dict:
    meshes = [m for m in meshes if m]
    return {
        key: {k: float(np.mean([m[key][k] for m in meshes])) for k in meshes[0][key]}
        for key in (meshes[0] if meshes else {})
    }


def _mesh_table(mesh_mean: dict) -> list[str]:
    lines = [
        "| spacing, refinement | vertices | max abs(p - 0.5) | 99th percentile | mean | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in mesh_mean.items():
        lines.append(
            f"| {key} | {row['vertices']:.0f} | {row['level_error_max']:.4f} | "
            f"{row['level_error_p99']:.4f} | {row['level_error_mean']:.4f} | {row['seconds']:.2f} |"
        )
    return lines


def field_study(workdir: pathlib.Path, results: pathlib.Path) -> None:
    """`--field-of WORKDIR`: a trained run's field on its validation cases (mesh levels at native
    spacing, query throughput, segment() at native and twice finer spacing), written to
    results/superres_field.{json,md}."""
    model = api.load(workdir)
    _, val = dataset.load_split(model.config)
    threshold = model.config.eval.threshold
    meshes = [_mesh_numbers(model.field(c), threshold, MESH_SPACINGS[:1]) for c in val]
    throughput = _throughput(model.field(val[0]))
    cost = _segment_cost(model, val[0])
    result = {
        "command": f"python -m benchmarks.superres --field-of {workdir}",
        "cases": len(val),
        "throughput_points_per_s": throughput,
        "segment_cost": cost,
        "mesh_mean": _mean_meshes(meshes),
        "mesh_per_case": meshes,
    }
    files.write_json(results / "superres_field.json", result)
    lines = [
        f"# The field of {workdir} ({len(val)} validation cases)",
        "",
        f"Command: `{result['command']}`, 2-core CPU shared with other jobs.",
        "",
        f"Field query throughput: {throughput:,.0f} points/s (2^16 points per call).",
        "",
        "| segment() (octree) spacing (mm) | shape | decoder evaluations | seconds |",
        "|---|---|---|---|",
    ]
    for row in cost.values():
        lines.append(
            f"| {row['spacing_mm']} | {row['shape']} | {row['decoder_points']:,} | {row['seconds']} |"
        )
    lines += ["", "Foreground probability at the field mesh's vertices inside the volume:", ""]
    lines += _mesh_table(result["mesh_mean"]) + [""]
    (results / "superres_field.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=150)
    parser.add_argument("--workdir", default="runs/superres")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument(
        "--field-of", default="", help="only measure the field of this trained run (runs/demo)"
    )
    args = parser.parse_args()
    if args.field_of:
        field_study(pathlib.Path(args.field_of), pathlib.Path(args.results))
        return
    workdir = pathlib.Path(args.workdir)
    results = pathlib.Path(args.results)
    seconds = {}
    start = time.perf_counter()
    source = synthetic.write_synthetic_brats(workdir / "data_1mm", args.cases, 0, SHAPE)
    originals = thicken(layouts.find_brats_cases(source), workdir / "data_thick")
    config, unet = _configs(workdir / "data_thick", args.cases, args.steps, args.unet_steps)
    seconds["data"] = round(time.perf_counter() - start, 1)
    for name, cfg in (("oss_net", config), ("unet3d", unet)):
        if (workdir / name / "eval" / "metrics.json").exists():
            continue  # a finished run: reused
        start = time.perf_counter()
        training.train_and_evaluate(cfg, str(workdir / name))
        seconds[f"train_and_evaluate_{name}"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    model = api.load(workdir / "oss_net")
    unet_config = evaluation.load_config(workdir / "unet3d")
    unet_predictor, _ = evaluation.restore_predictor(unet_config, workdir / "unet3d")
    threshold = model.config.eval.threshold
    _, val = dataset.load_split(model.config)
    rows, meshes, query_seconds = [], [], 0.0
    for i, case in enumerate(val):
        label, affine = originals[case.id]
        target = label > 0
        field = model.field(case)
        scores, took, _ = _field_scores(field, label, affine, threshold)
        query_seconds += took
        row = {"id": case.id, "field": scores}
        natives = {"": oss_net_native(field), "unet ": unet_native(unet_predictor, case)}
        for prefix, native in natives.items():
            for order, method in ((0, "nearest"), (1, "linear")):
                row[prefix + method] = _scores(upsample_z(native, label.shape[2], order), target)
        rows.append(row)
        meshes.append(_mesh_numbers(field, threshold))
        if i == 0:
            path = workdir / "oss_net" / "eval" / "predictions" / f"{case.id}.nii.gz"
            native = np.asarray(nifti.load_nifti(path)[0]) > 0
            outputs.mesh_png(
                results / "superres_mask_mesh.png",
                *outputs.mask_mesh(native, case.affine),
                f"{case.id}: mask of the 4 mm prediction",
            )
            outputs.mesh_png(
                results / "superres_field_mesh.png",
                *field.mesh(spacing=(1.0, 1.0, 1.0), refine_steps=2),
                f"{case.id}: field at 1 mm",
            )
            throughput = _throughput(field)
            cost = _segment_cost(model, case)
    seconds["scoring"] = round(time.perf_counter() - start, 1)
    methods = [k for k in rows[0] if k != "id"]
    mean = {}
    for method in methods:
        hd = [r[method]["hd95"] for r in rows if r[method]["hd95"] is not None]
        mean[method] = {
            "dice": float(np.mean([r[method]["dice"] for r in rows])),
            "hd95": float(np.mean(hd)) if hd else None,
        }
    mesh_mean = _mean_meshes(meshes)
    result = {
        "command": f"python -m benchmarks.superres --cases {args.cases} --steps {args.steps} "
        f"--unet-steps {args.unet_steps}",
        "cases": len(val),
        "steps": args.steps,
        "unet_steps": args.unet_steps,
        "mean": mean,
        "per_case": rows,
        "throughput_points_per_s": throughput,
        "dense_query_seconds_per_case": query_seconds / len(val),
        "segment_cost": cost,
        "mesh_mean": mesh_mean,
        "mesh_per_case": meshes,
        "seconds": seconds,
    }
    files.write_json(results / "superres.json", result)
    (results / "superres.md").write_text(_table(result))
    print(_table(result))


if __name__ == "__main__":
    runtime.prepare()
    main()
