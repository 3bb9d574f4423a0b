"""Dense evaluation of a trained checkpoint: encode once, refine with a jitted fixed-size decoder.

Writes WORKDIR/eval/metrics.json
  {"step", "surface_metrics", "mean": {"dice", "iou"[, "regions"|"classes"]},
   "cases": [{"id", "dice", "iou", "decoder_points", "seconds"[, "regions"|"classes"]
              [, "disagreement"]}]}
where "regions" (label_mode 'brats_regions') or "classes" ('multiclass') maps each region or class name
to {"dice", "iou"} and the top-level dice/iou are their mean; "disagreement" (eval.compare_dense) is the
fraction of grid voxels whose label differs from evaluating every voxel; each row also holds
sensitivity, precision, hd95 and asd (mm), surface_dice and volumes in ml (reporting.py), whose
definition "surface_metrics" (eval.surface_metrics, ossnet_jax/surface.py) names. Also written:
eval/metrics.csv (one row per case), eval/meshes/<id>_{prediction,label}.{ply,obj} (world mm),
eval/pictures/<id>_{slices,mesh}.png, eval/dice.png, and eval/predictions/<id>.nii.gz:
a label map in label values (binary: 0/1; BraTS regions: 0/1/2/4) with the input file's shape, affine
and voxel order, so it opens aligned on the image in ITK-SNAP or 3D Slicer.

The same files are written for every model family (ossnet_jax/families): for the U-Nets "decoder_points" counts
the voxels the network produced (sliding windows: window voxels x windows; 2D: the grid).

With eval.output_spacing (OSS-Net) the prediction file holds the field sampled at that spacing, with
its affine (families/oss_net/resolution.py); the metrics compare its nearest-neighbour resampling to
the input file's voxels with the label there, and the row's "native_agreement" is the fraction of
those voxels on which it equals the prediction at the input's spacing.

predict_scans (evaluate.py --input) predicts new scans into OUT_DIR/<id>.nii.gz only: the same label
maps in each input file's geometry, without labels, metrics or other files.
"""

import collections
import contextlib
import dataclasses
import json
import pathlib
import time
from concurrent import futures
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from configs import base
from ossnet_jax import (
    checkpointing,
    families,
    files,
    outputs,
    postprocess,
    reporting,
    surface,
    train_state,
)
from ossnet_jax.data import dataset, nifti, scans
from ossnet_jax.errors import ConfigError
from ossnet_jax.families.oss_net import resolution


def _merged(defaults: dict, saved: dict) -> dict:
    out = dict(defaults)
    for key, value in saved.items():
        both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = _merged(defaults[key], value) if both else value
    return out


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config train.py saved in WORKDIR/config.json.

    Keys added to the code after the run was trained take their defaults (configs/base.py), so older
    workdirs keep evaluating with the behaviour they were trained with plus the new options' defaults.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    saved = json.loads(path.read_text())
    return ml_collections.ConfigDict(_merged(base.get_base_config().to_dict(), saved))




def restore_predictor(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, step: Optional[int] = None
) -> tuple[Any, int]:
    """The predictor of the config's model family (Predictor for OSS-Net, UNetPredictor for U-Nets)
    with the slow (Lookahead) parameters of the best (or given) checkpoint, and its step.

    If the best checkpoint cannot be read, the newest readable one is used and the corrupt one named;
    a given step that cannot be read raises checkpointing.CorruptCheckpointError naming it.
    """
    predictors, step = restore_predictors(config, workdir, jax.local_devices()[:1], step)
    return predictors[0], step


def restore_predictors(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    devices: list,
    step: Optional[int] = None,
) -> tuple[list, int]:
    """restore_predictor's predictor once per device of `devices`, each with its own copy of the
    parameters there (the checkpoint is read once), and the checkpoint's step."""
    family = families.get_family(config)
    model = family.build_model(config)
    on_first = jax.sharding.SingleDeviceSharding(devices[0])
    template = jax.tree.map(  # shapes and dtypes only: nothing to initialise or compile
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_first),
        jax.eval_shape(
            lambda: family.init_state(
                config, model, train_state.make_optimizer(config), jax.random.key(0)
            )
        ),
    )  # restored onto one local device, whichever devices (or processes) saved it
    ckpt = checkpointing.Checkpoints(workdir)
    try:
        if step is None:
            step, state = ckpt.restore_best(template)
        else:
            state = ckpt.restore(step, template)
    finally:
        ckpt.close()
    variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
    predictors = [
        family.predictor(config, model, jax.device_put(variables, device)) for device in devices
    ]
    return predictors, step


@dataclasses.dataclass(frozen=True)
class CasePrediction:
    """What a predictor produced for one case.

    Attributes:
      labels: (X, Y, Z) int32 label map in label values on the grid, small components removed
        (eval.min_component_voxels).
      evaluations: decoder (or network) evaluations.
      seconds: wall time of the prediction and the component removal.
      disagreement: fraction of voxels differing from the dense prediction (eval.compare_dense),
        else None.
    """

    labels: np.ndarray
    evaluations: int
    seconds: float
    disagreement: Optional[float]


def predict_case(
    predictor: Any, image: np.ndarray, ev: ml_collections.ConfigDict
) -> CasePrediction:
    """One case's prediction with eval settings `ev` (strategy, post-processing, dense comparison)."""
    start = time.perf_counter()
    grid_pred, evaluations = predictor.predict(image)
    if ev.get("min_component_voxels", 0):
        keep = postprocess.remove_small_components(
            grid_pred > 0, ev.min_component_voxels, ev.get("component_connectivity", 26)
        )
        grid_pred = np.where(keep, grid_pred, 0)
    seconds = time.perf_counter() - start
    disagreement = None
    if ev.get("compare_dense", False) and ev.strategy != "dense":
        dense_ev = ml_collections.ConfigDict(ev.to_dict())
        dense_ev.strategy = "dense"
        reference, _ = predictor.predict(image, dense_ev)
        disagreement = float(np.mean(reference != grid_pred))
    return CasePrediction(grid_pred, int(evaluations), seconds, disagreement)


def predict_in_order(
    predictors: list, cases: list[dataset.PreparedCase], ev: ml_collections.ConfigDict
) -> Iterator[CasePrediction]:
    """predict_case of every case, yielded in case order.

    Each predictor compiles on the first case, then case i goes to predictor i mod D; with D > 1
    predictors each runs in its own thread, at most 2 D cases ahead of the consumer (whose writing
    then overlaps the predictions). One predictor runs in the calling thread.
    """
    if not cases:
        return
    first = np.asarray(cases[0].image)
    if len(predictors) == 1:
        predictors[0].compile(first)  # keep compilation out of the timings
        for case in cases:
            yield predict_case(predictors[0], np.asarray(case.image), ev)
        return
    pools = [futures.ThreadPoolExecutor(1, thread_name_prefix="predict") for _ in predictors]
    try:
        for pool, predictor in zip(pools, predictors):
            pool.submit(predictor.compile, first)
        pending: collections.deque = collections.deque()
        for i, case in enumerate(cases):
            device = i % len(predictors)
            pending.append(
                pools[device].submit(predict_case, predictors[device], np.asarray(case.image), ev)
            )
            if len(pending) > 2 * len(predictors):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


def _label_dtype(values: tuple[int, ...]) -> type:
    return np.uint8 if max(values) < 256 else np.uint16


def finished_rows(
    out_dir: pathlib.Path, step: int, surface_metrics: str = "standard"
) -> dict[str, dict]:
    """Rows of OUT_DIR/metrics.json, by case id, that were written for checkpoint `step` with the
    `surface_metrics` definition (files without one predate it: 'voxel') and whose prediction file
    exists: the cases a rerun of evaluate does not need to predict again."""
    path = out_dir / "metrics.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("step") != step or saved.get("surface_metrics", "voxel") != surface_metrics:
        return {}
    return {
        row["id"]: row
        for row in saved.get("cases", [])
        if (out_dir / "predictions" / f"{row['id']}.nii.gz").exists()
    }


def dataset_cases(
    config: ml_collections.ConfigDict, root: str, fmt: str = "", subset: str = ""
) -> tuple[ml_collections.ConfigDict, list[dataset.PreparedCase]]:
    """Every case of another dataset (labels optional), preprocessed like the training data.

    Returns the config with data.root (and data.format / data.subset if given) replaced, and the cases.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.root = root
    config.data.format = fmt or config.data.format
    config.data.subset = subset or config.data.get("subset", "training")
    config.data.cache_dir = ""
    cases = dataset.find_cases(config)
    return config, dataset.prepare_cases(cases, config, dataset.cache_dir_for(config))


def predict_scans(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
) -> list[pathlib.Path]:
    """Predicts the scans at `path` (data/scans.py: an image file, a case folder or a folder of
    either; no labels, no metrics) into OUT_DIR/<id>.nii.gz.

    Each scan is read and preprocessed like the training data in memory (no cache is written), and
    predicted by predict_case with the best checkpoint on the first local device; the label map, in
    label values, gets the scan's file shape, affine and voxel order, as evaluate writes them. A
    progress bar counts the scans. A bad scan does not stop the others: DataError lists every bad
    one at the end. ConfigError, before anything is read, if a prediction would overwrite an input.

    Returns the prediction files written, in scan order.
    """
    out_dir = pathlib.Path(out_dir)
    found = scans.find_scans(path, dataset.layout_format(config))
    targets = [out_dir / f"{scan.id}.nii.gz" for scan in found]
    inputs = {file.resolve() for scan in found for file in scan.image_paths}
    clashes = [str(target) for target in targets if target.resolve() in inputs]
    if clashes:
        raise ConfigError(
            f"--output {out_dir} would overwrite the input {clashes[0]}; choose another folder"
        )
    predictor, _ = restore_predictor(config, workdir)
    values = predictor.spec.values
    written, problems = [], []
    for scan, target in zip(tqdm(found, desc="predict", unit="scan", dynamic_ncols=True), targets):
        try:
            case = dataset.read_case(scan, config)
        except nifti.DataError as error:
            problems.append(str(error))
            continue
        prediction = predict_case(predictor, np.asarray(case.image), config.eval)
        pred = case.to_file_geometry(prediction.labels).astype(_label_dtype(values))
        nifti.save_nifti(target, pred, case.affine)
        written.append(target)
    if problems:
        raise nifti.DataError(
            f"{len(problems)} of {len(found)} scans cannot be used ({len(written)} predicted into "
            f"{out_dir}):\n  " + "\n  ".join(problems)
        )
    return written


def spaced_output(config: ml_collections.ConfigDict, case: dataset.PreparedCase) -> bool:
    """Whether eval.output_spacing (mm, one value or one per file axis; empty: the input's) asks
    for another spacing than the case's. ConfigError for a model family without a field (U-Nets)."""
    spacing = config.eval.get("output_spacing", ())
    if resolution.is_native(case, spacing):
        return False
    if config.model.name != "oss_net":
        raise ConfigError(
            f"eval.output_spacing={tuple(spacing)} needs an occupancy field (model.name 'oss_net'),"
            f" not {config.model.name!r}; leave it empty"
        )
    return True


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    cases: Optional[list[dataset.PreparedCase]] = None,
    out_dir: Optional[str | pathlib.Path] = None,
    overwrite: bool = False,
) -> dict:
    """Predicts every case (default: the validation split) into `out_dir` (default WORKDIR/eval).

    Writes predictions/<id>.nii.gz for every case and metrics.json; cases without a label get a
    prediction and a row without metrics, and "mean" is only written when some case has a label.
    metrics.json is rewritten after every case (without "mean" until the last), and cases already
    predicted for the same checkpoint step (see finished_rows) keep their files and row unless
    `overwrite`, so a rerun after an interruption continues where it stopped. The cases are dealt
    over the local devices, one predictor each (predict_in_order); files and rows stay in case order.
    """
    workdir = pathlib.Path(workdir)
    if cases is None:
        _, cases = dataset.load_split(config)
    predictors, step = restore_predictors(config, workdir, jax.local_devices())
    spec = predictors[0].spec
    ev = config.eval
    out_dir = workdir / "eval" if out_dir is None else pathlib.Path(out_dir)
    surface_metrics = ev.get("surface_metrics", "standard")
    if surface_metrics not in surface.SURFACE_METRICS:
        raise ConfigError(
            f"eval.surface_metrics must be one of {surface.SURFACE_METRICS}, got {surface_metrics!r}"
        )
    done = {} if overwrite else finished_rows(out_dir, step, surface_metrics)
    todo = [case for case in cases if case.id not in done]
    if len(todo) < len(cases):
        print(
            f"reusing {len(cases) - len(todo)} predictions of checkpoint step {step} in {out_dir}"
            " (--overwrite predicts them again)"
        )
    rows = []
    with contextlib.closing(predict_in_order(predictors, todo, ev)) as predictions:
        for case in cases:
            if case.id in done:
                rows.append(done[case.id])
                continue
            prediction = next(predictions)
            grid_pred = prediction.labels
            pred = case.to_file_geometry(grid_pred).astype(_label_dtype(spec.values))
            row = {
                "id": case.id,
                "decoder_points": prediction.evaluations,
                "seconds": round(prediction.seconds, 3),
            }
            written, written_affine = pred, case.affine
            if spaced_output(config, case):  # eval.output_spacing: written there, scored on input
                spaced = resolution.predict_spaced(predictors[0], case, ev)
                written, written_affine = spaced.labels.astype(pred.dtype), spaced.affine
                row["native_agreement"] = float(np.mean(spaced.on_input == pred))
                pred = spaced.on_input.astype(pred.dtype)
                row["decoder_points"] = spaced.evaluations
                row["seconds"] = round(spaced.seconds, 3)
            nifti.save_nifti(out_dir / "predictions" / f"{case.id}.nii.gz", written, written_affine)
            if prediction.disagreement is not None:
                row["disagreement"] = prediction.disagreement
            target = case.target_in_file_geometry()
            if target is not None:
                target = np.asarray(spec.values)[target]
                row.update(
                    reporting.score(
                        spec,
                        pred,
                        target,
                        reporting.file_spacing(case),
                        ev.get("surface_tolerance_mm", 1.0),
                        surface_metrics,
                    )
                )
            field_mesh = None
            if config.model.name == "oss_net" and ev.get("mesh_source", "field") == "field":
                if ev.get("meshes", True) or ev.get("pictures", True):
                    spacing = ev.get("output_spacing", ()) if written is not pred else None
                    field_mesh = resolution.prediction_mesh(
                        predictors[0], case, written, spacing, ev.threshold
                    )
            reporting.write_case_files(
                out_dir,
                case,
                grid_pred,
                pred,
                target,
                ev.get("meshes", True),
                ev.get("pictures", True),
                field_mesh,
            )
            rows.append(row)
            partial = {"step": step, "surface_metrics": surface_metrics, "cases": rows}
            files.write_json(out_dir / "metrics.json", partial)
    scored = [
        {k: v for k, v in r.items() if k not in ("id", "decoder_points", "seconds", "disagreement")}
        for r in rows
        if "dice" in r
    ]
    result = {"step": step, "surface_metrics": surface_metrics, "cases": rows}
    if scored:
        result["mean"] = reporting.mean_over_cases(scored)
        if ev.get("pictures", True):
            outputs.dice_summary_png(out_dir / "dice.png", rows)
    outputs.write_csv(out_dir / "metrics.csv", rows)
    files.write_json(out_dir / "metrics.json", result)
    return result
