"""Dense evaluation of a trained checkpoint: encode once, refine with a jitted fixed-size decoder.

Writes WORKDIR/eval/metrics.json
  {"step", "mean": {"dice", "iou"[, "regions"|"classes"]},
   "cases": [{"id", "dice", "iou", "decoder_points", "seconds"[, "regions"|"classes"]
              [, "disagreement"]}]}
where "regions" (label_mode 'brats_regions') or "classes" ('multiclass') maps each region or class name
to {"dice", "iou"} and the top-level dice/iou are their mean; "disagreement" (eval.compare_dense) is the
fraction of grid voxels whose label differs from evaluating every voxel; each row also holds
sensitivity, precision, hd95 and asd (mm), surface_dice and volumes in ml (reporting.py). Also written:
eval/metrics.csv (one row per case), eval/meshes/<id>_{prediction,label}.{ply,obj} (world mm),
eval/pictures/<id>_{slices,mesh}.png, eval/dice.png, and eval/predictions/<id>.nii.gz:
a label map in label values (binary: 0/1; BraTS regions: 0/1/2/4) with the input file's shape, affine
and voxel order, so it opens aligned on the image in ITK-SNAP or 3D Slicer.

The same files are written for every model family (ossnet_jax/families): for the U-Nets "decoder_points" counts
the voxels the network produced (sliding windows: window voxels x windows; 2D: the grid).
"""

import collections
import contextlib
import dataclasses
import functools
import json
import pathlib
import time
from concurrent import futures
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from configs import base
from ossnet_jax import checkpointing, families, files, outputs, postprocess, reporting, train_state
from ossnet_jax.data import dataset, labels, nifti
from ossnet_jax.inference.mise import OctreeRefinement
from ossnet_jax.inference.octree import BandRefinement, seed_from_segmentation
from ossnet_jax.models.oss_net import OSSNet, compute_dtype, downscale, observe, patch_source


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


def _encode(variables: dict, image: jax.Array, *, model: OSSNet, config: ml_collections.ConfigDict):
    low = downscale(image[None], config.data.downscale)
    latents, seg = model.apply(variables, low, train=False, method=OSSNet.encode)
    seg_prob = None
    if seg is not None:  # any channel of the head: (sx, sy, sz)
        seg_prob = jax.nn.sigmoid(seg[0] if seg.ndim == 4 else seg[0].max(axis=-1))
    source = patch_source(image, config.model.large_patches) if config.model.patches else None
    return latents, seg_prob, source


def _decode(
    variables: dict,
    latents: jax.Array,
    source: Optional[dict],
    locations: jax.Array,
    *,
    model: OSSNet,
    config: ml_collections.ConfigDict,
) -> jax.Array:
    patches = None if source is None else observe(source, locations, config.model.patch_size)[None]
    logits = model.apply(
        variables, locations[None], patches, latents, train=False, method=OSSNet.decode
    )
    return labels.label_spec(config.data).probabilities(logits[0])


class Predictor:
    """Dense label maps of whole volumes; the decoder is compiled once for eval.batch_points locations.

    The model computes in eval.dtype (float32 parameters; bfloat16 arithmetic if asked).
    """

    def __init__(self, config: ml_collections.ConfigDict, model: OSSNet, variables: dict):
        model = model.clone(dtype=compute_dtype(config.eval.get("dtype", "float32")))
        self.config = config
        self.spec = labels.label_spec(config.data)
        self.variables = variables
        self.encode = jax.jit(functools.partial(_encode, model=model, config=config))
        self.decode = jax.jit(functools.partial(_decode, model=model, config=config))

    @property
    def batch_sizes(self) -> tuple[int, int]:
        """(eval.batch_points, 1/8 of it): the two compiled decoder sizes; small queries use the small one."""
        size = self.config.eval.batch_points
        return size, max(size // 8, 1)

    def decode_all(self, latents, source, locations: np.ndarray) -> np.ndarray:
        """Probabilities (M[, O]) of (M, 3) locations, in padded batches of one of `batch_sizes`."""
        large, small = self.batch_sizes
        m = len(locations)
        size = small if m <= small else large
        padded = np.zeros((-(-m // size) * size, 3), np.int32)
        padded[:m] = locations
        outs = [
            self.decode(self.variables, latents, source, padded[i : i + size])
            for i in range(0, len(padded), size)
        ]  # dispatched asynchronously, then gathered
        return np.concatenate([np.asarray(o) for o in outs])[:m]

    def compile(self, image: np.ndarray) -> None:
        """Compiles encoder and decoder for this image shape (one encode, one batch of each size)."""
        latents, _, source = self.encode(self.variables, jnp.asarray(image))
        for size in self.batch_sizes:
            self.decode_all(latents, source, np.zeros((size, 3), np.int32))

    def predict(
        self, image: np.ndarray, ev: Optional[ml_collections.ConfigDict] = None
    ) -> tuple[np.ndarray, int]:
        """Label map (X, Y, Z) int32 in label values on the padded grid, and the decoder evaluations.

        `ev` overrides config.eval (strategy, seeding, ...) for this call.
        """
        latents, seg_prob, source = self.encode(self.variables, jnp.asarray(image))
        return extract(
            lambda query: self.decode_all(latents, source, query),
            self.spec,
            image.shape[:3],
            self.config.eval if ev is None else ev,
            None if seg_prob is None else np.asarray(seg_prob),
        )


STRATEGIES = ("dense", "band", "octree")


def extract(
    decode: Callable[[np.ndarray], np.ndarray],
    spec: labels.LabelSpec,
    grid_shape: tuple[int, int, int],
    ev: ml_collections.ConfigDict,
    seg_prob: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, int]:
    """Dense label map (X, Y, Z) int32 in label values by eval.strategy, and the decoder evaluations.

    `decode` maps (M, 3) int32 locations to probabilities (M[, O]); `seg_prob` (sx, sy, sz) is the
    encoder's segmentation (any channel), used when eval.seeded.
      'dense'  every voxel (the reference).
      'band'   the official stride 4-2-1 refinement (inference/octree.py): follows the foreground score
               of LabelSpec.decide, evaluating every voxel next to predicted foreground; seeded, the
               first stage only visits voxels the encoder marks.
      'octree' multiresolution surface extraction (inference/mise.py) on the label values: refines where
               any output changes, fills agreeing elements without evaluating them; seeded, its coarse
               lattice only covers the encoder's segmentation dilated by one coarse step. With
               eval.octree_finest F > 1 the decoder stops at stride F and finer points where labels
               change are decided from logits interpolated trilinearly between evaluated points.
    """
    if ev.strategy not in STRATEGIES:
        raise ValueError(f"eval.strategy must be one of {STRATEGIES}, got {ev.strategy!r}")
    seed = None
    if ev.seeded and seg_prob is not None:
        seed = seed_from_segmentation(np.asarray(seg_prob), grid_shape, ev.threshold)
    if ev.strategy == "dense":
        everything = np.argwhere(np.ones(grid_shape, bool)).astype(np.int32)
        return spec.decide(decode(everything), ev.threshold)[1].reshape(grid_shape), len(everything)
    if ev.strategy == "octree":
        stride = ev.get("octree_stride", 8)
        region = None
        if seed is not None:
            region = ndimage.maximum_filter(seed, size=2 * stride + 1, mode="constant")
        finest = ev.get("octree_finest", 1)
        octree = OctreeRefinement(
            grid_shape,
            stride,
            ev.get("octree_margin", 0),
            region=region,
            grow_connectivity=ev.get("octree_grow", 6),
            finest_stride=finest,
            confident=ev.get("octree_confident", 0.0) or None,
            cubic=ev.get("octree_interpolation", "linear") == "cubic",
            background=_logits(spec, _background_probabilities(spec))[0],
            decide=lambda scores: (
                spec.decide(_probabilities(spec, scores), ev.threshold)[1],
                _confidence(spec, scores),
            ),
        )
        while not octree.done:
            probs = decode(octree.query())
            octree.update(spec.decide(probs, ev.threshold)[1], _logits(spec, probs))
        return octree.to_labels(), octree.num_evaluated
    refinement = BandRefinement(grid_shape, tuple(ev.strides), ev.threshold, seed)
    values = np.zeros(grid_shape, np.int32)
    while not refinement.done:
        query = refinement.query()
        score, value = spec.decide(decode(query), ev.threshold)
        values[tuple(query.T)] = value
        refinement.update(score)
    return np.where(refinement.to_dense(), values, 0), refinement.num_evaluated


# Recovered logits are clipped to +-16.6 (probabilities to [2^-24, 1 - 2^-24]): float32 sigmoid
# outputs saturate at 1 above that, and clipping both signs alike keeps interpolation unbiased.
_LOGIT_LIMIT = 24 * np.log(2.0)


def _logits(spec: labels.LabelSpec, probs: np.ndarray) -> np.ndarray:
    """Scores (M, O) float32 that interpolate linearly: the network's logits, recovered from sigmoid
    outputs, or for softmax outputs log p_k - log p_0 (its logits less the background's)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-300, 1.0).reshape(len(probs), -1)
    if spec.mode == "multiclass":
        logits = np.log(p) - np.log(p[:, :1])
    else:
        logits = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 2.0**-53))
    return np.clip(logits, -_LOGIT_LIMIT, _LOGIT_LIMIT).astype(np.float32)


def _probabilities(spec: labels.LabelSpec, scores: np.ndarray) -> np.ndarray:
    """Inverse of `_logits` for M interpolated points: probabilities (M[, O]) as `decode` returns them."""
    scores = np.asarray(scores, np.float64)
    if spec.mode == "multiclass":
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    probs = (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)
    return probs[:, 0] if spec.mode == "binary" else probs


def _background_probabilities(spec: labels.LabelSpec) -> np.ndarray:
    """(1[, O]) probabilities of a location that is certainly background."""
    if spec.mode == "multiclass":
        return np.eye(spec.num_outputs, dtype=np.float32)[:1]
    return np.zeros((1, spec.num_outputs) if spec.mode != "binary" else (1,), np.float32)


def _confidence(spec: labels.LabelSpec, scores: np.ndarray) -> np.ndarray:
    """(M,) how far interpolated scores (M, O) are from changing the label: the smallest |logit| of
    the sigmoid outputs, or the gap between the two largest log-probabilities (multiclass)."""
    scores = np.asarray(scores, np.float32)
    if spec.mode == "multiclass":
        top = np.sort(scores, axis=-1)
        return top[:, -1] - top[:, -2]
    return np.abs(scores).min(axis=-1)


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


def finished_rows(out_dir: pathlib.Path, step: int) -> dict[str, dict]:
    """Rows of OUT_DIR/metrics.json, by case id, that were written for checkpoint `step` and whose
    prediction file exists: the cases a rerun of evaluate does not need to predict again."""
    path = out_dir / "metrics.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("step") != step:
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
    done = {} if overwrite else finished_rows(out_dir, step)
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
            nifti.save_nifti(out_dir / "predictions" / f"{case.id}.nii.gz", pred, case.affine)
            row = {
                "id": case.id,
                "decoder_points": prediction.evaluations,
                "seconds": round(prediction.seconds, 3),
            }
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
                    )
                )
            reporting.write_case_files(
                out_dir,
                case,
                grid_pred,
                pred,
                target,
                ev.get("meshes", True),
                ev.get("pictures", True),
            )
            rows.append(row)
            files.write_json(out_dir / "metrics.json", {"step": step, "cases": rows})
    scored = [
        {k: v for k, v in r.items() if k not in ("id", "decoder_points", "seconds", "disagreement")}
        for r in rows
        if "dice" in r
    ]
    result = {"step": step, "cases": rows}
    if scored:
        result["mean"] = reporting.mean_over_cases(scored)
        if ev.get("pictures", True):
            outputs.dice_summary_png(out_dir / "dice.png", rows)
    outputs.write_csv(out_dir / "metrics.csv", rows)
    files.write_json(out_dir / "metrics.json", result)
    return result
