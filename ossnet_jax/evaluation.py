"""Dense evaluation of a trained checkpoint: encode once, refine with a jitted fixed-size decoder.

Writes WORKDIR/eval/metrics.json
  {"mean": {"dice", "iou"}, "cases": [{"id", "dice", "iou", "decoder_points", "seconds"}]}
and WORKDIR/eval/predictions/<id>.nii.gz (uint8, the input's shape and affine), each under a temporary
name and renamed. metrics.json is rewritten after every case (without "mean" until the last), so a
rerun after an interruption skips the cases already done for the same checkpoint step.
"""

import functools
import json
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ossnet_jax import checkpointing, files, metrics, train_state
from ossnet_jax.data import dataset, nifti, preprocess
from ossnet_jax.inference.octree import BandRefinement, seed_from_segmentation
from ossnet_jax.models.oss_net import OSSNet, build_model, downscale, observe, patch_source


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config train.py saved in WORKDIR/config.json."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _encode(variables: dict, image: jax.Array, *, model: OSSNet, config: ml_collections.ConfigDict):
    low = downscale(image[None], config.data.downscale)
    latents, seg = model.apply(variables, low, train=False, method=OSSNet.encode)
    seg_prob = None if seg is None else jax.nn.sigmoid(seg[0])
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
    return jax.nn.sigmoid(logits[0])


class Predictor:
    """Dense occupancy of whole volumes; the decoder is compiled once for eval.batch_points locations."""

    def __init__(self, config: ml_collections.ConfigDict, model: OSSNet, variables: dict):
        self.config = config
        self.variables = variables
        self.encode = jax.jit(functools.partial(_encode, model=model, config=config))
        self.decode = jax.jit(functools.partial(_decode, model=model, config=config))

    def decode_all(self, latents, source, locations: np.ndarray) -> np.ndarray:
        """Occupancy probabilities (M,) of (M, 3) locations, in padded batches of eval.batch_points."""
        size = self.config.eval.batch_points
        m = len(locations)
        padded = np.zeros((-(-m // size) * size, 3), np.int32)
        padded[:m] = locations
        outs = [
            self.decode(self.variables, latents, source, padded[i : i + size])
            for i in range(0, len(padded), size)
        ]  # dispatched asynchronously, then gathered
        return np.concatenate([np.asarray(o) for o in outs])[:m]

    def compile(self, image: np.ndarray) -> None:
        """Compiles encoder and decoder for this image shape (one encode, one decoder batch)."""
        latents, _, source = self.encode(self.variables, jnp.asarray(image))
        self.decode_all(latents, source, np.zeros((1, 3), np.int32))

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """Binary prediction (X, Y, Z) bool on the padded grid, and the number of decoder evaluations."""
        ev = self.config.eval
        latents, seg_prob, source = self.encode(self.variables, jnp.asarray(image))
        seed = None
        if ev.seeded and seg_prob is not None:
            seed = seed_from_segmentation(np.asarray(seg_prob), image.shape[:3], ev.threshold)
        refinement = BandRefinement(image.shape[:3], tuple(ev.strides), ev.threshold, seed)
        while not refinement.done:
            refinement.update(self.decode_all(latents, source, refinement.query()))
        return refinement.to_dense(), refinement.num_evaluated


def restore_predictor(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, step: Optional[int] = None
) -> tuple[Predictor, int]:
    """A Predictor with the slow (Lookahead) parameters of the best (or given) checkpoint, and its step.

    If the best checkpoint cannot be read, the newest readable one is used and the corrupt one named;
    a given step that cannot be read raises checkpointing.CorruptCheckpointError naming it.
    """
    model = build_model(config)
    template = jax.eval_shape(  # shapes and dtypes only: nothing to initialise or compile
        lambda: train_state.init_state(
            config, model, train_state.make_optimizer(config), jax.random.key(0)
        )
    )
    ckpt = checkpointing.Checkpoints(workdir)
    try:
        if step is None:
            step, state = ckpt.restore_best(template)
        else:
            state = ckpt.restore(step, template)
    finally:
        ckpt.close()
    variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
    return Predictor(config, model, variables), step


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


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    cases: Optional[list[dataset.PreparedCase]] = None,
    overwrite: bool = False,
) -> dict:
    """Predicts every case (default: the validation split), writes metrics.json and NIfTI predictions.

    Cases already predicted for the same checkpoint step (see finished_rows) keep their prediction and
    row unless `overwrite`.
    """
    workdir = pathlib.Path(workdir)
    if cases is None:
        _, cases = dataset.load_split(config)
    predictor, step = restore_predictor(config, workdir)
    out_dir = workdir / "eval"
    done = {} if overwrite else finished_rows(out_dir, step)
    todo = [case for case in cases if case.id not in done]
    if len(todo) < len(cases):
        print(
            f"reusing {len(cases) - len(todo)} predictions of checkpoint step {step} in {out_dir}"
            " (--overwrite predicts them again)"
        )
    rows = []
    if todo:
        predictor.compile(np.asarray(todo[0].image))  # keep compilation out of the timings
    for case in cases:
        if case.id in done:
            rows.append(done[case.id])
            continue
        start = time.perf_counter()
        grid_pred, evaluations = predictor.predict(np.asarray(case.image))
        seconds = time.perf_counter() - start
        pred = preprocess.crop_from_grid(grid_pred, case.shape, case.offsets).astype(np.uint8)
        nifti.save_nifti(out_dir / "predictions" / f"{case.id}.nii.gz", pred, case.affine)
        row = {"id": case.id, "decoder_points": int(evaluations), "seconds": round(seconds, 3)}
        if case.target is not None:
            target = preprocess.crop_from_grid(np.asarray(case.target), case.shape, case.offsets)
            counts = metrics.overlap_counts(pred, target)
            row.update(dice=metrics.dice_from_counts(counts), iou=metrics.iou_from_counts(counts))
        rows.append(row)
        files.write_json(out_dir / "metrics.json", {"step": step, "cases": rows})
    scored = [r for r in rows if "dice" in r]
    result = {"step": step, "cases": rows}
    if scored:
        result["mean"] = {
            "dice": float(np.mean([r["dice"] for r in scored])),
            "iou": float(np.mean([r["iou"] for r in scored])),
        }
    files.write_json(out_dir / "metrics.json", result)
    return result
