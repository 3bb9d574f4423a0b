"""OSS-Net's training step: two pure jitted stages, and the validator at sampled locations.

prepare_inputs takes a batch of whole volumes (B, X, Y, Z, C) and does on the device what grows with the
grid: augmentation, location sampling, patch gathering, downscaling, the targets. update_step runs
forward, loss and update on what the network needs only (downscaled volume, N locations and patches), so
its memory does not depend on the full-resolution grid. train_step is their composition; the generic
loop (training.py) runs prepare_inputs in its prefetch thread, ahead of the update. A step's
randomness is fold_in(seed, step), so a resumed run draws exactly what an uninterrupted one would.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ossnet_jax import kernels as kernel_sets
from ossnet_jax import losses, metrics
from ossnet_jax.data import augment, labels, sampling
from ossnet_jax.families.oss_net.model import OSSNet, model_inputs, patch_channels
from ossnet_jax.train_state import TrainState, guarded_update, lr_schedule, state_from_variables


def init_state(
    config: ml_collections.ConfigDict,
    model: OSSNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> TrainState:
    """Fresh parameters and optimizer state for one-volume input shapes of the config.

    One compiled program: run op by op, every primitive of the initialisation is compiled on its own,
    which is slow even for a tiny model (docs/performance.md).
    """
    grid = tuple(config.data.grid_shape)
    d = config.data.downscale
    low_shape = (1,) + tuple(g // d for g in grid) + (config.data.num_channels,)
    size = config.model.patch_size
    patch_shape = (1, 2, size, size, size, patch_channels(config))

    def init(rng: jax.Array) -> TrainState:
        patches = jnp.zeros(patch_shape) if config.model.patches else None
        locs = jnp.zeros((1, 2, 3), jnp.int32)
        variables = model.init({"params": rng}, jnp.zeros(low_shape), locs, patches, train=False)
        return state_from_variables(variables, tx)

    return jax.jit(init)(rng)


def seg_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(sx, sy, sz): the segmentation head's grid, the encoder input halved by every encoder block."""
    shape = tuple(g // config.data.downscale for g in config.data.grid_shape)
    for _ in config.model.encoder_channels:
        shape = tuple(s // 2 for s in shape)
    return shape


def prepare_inputs(
    batch: dict, rng: jax.Array, step: jax.Array | int, config: ml_collections.ConfigDict
) -> dict:
    """What one update needs of a batch of whole volumes, drawn with the randomness of `step`.

    Augments the volumes, samples locations, gathers the patches, downscales, and reads the targets;
    everything that grows with the full-resolution grid happens here, so update_step's memory does not.

    Args:
      batch: {'image' (B, X, Y, Z, C) float32, 'target' (B, X, Y, Z) uint8, 'band' (B, X, Y, Z) bool}.
      rng: the run's PRNG key; the step's randomness is fold_in(rng, step), as in update_step.
      step: () int, the step these inputs are for (state.step of the update that consumes them).
    Returns:
      {'low' (B, X/d, Y/d, Z/d, C) encoder input, 'locations' (B, N, 3) int32 (float32 voxel
      coordinates with train.continuous_locations), 'index' (B, N) class
      indices at the locations, 'patches' (B, N, S, S, S, Cp) with model.patches, 'coarse'
      (B, sx, sy, sz, R) bool max-pooled channel masks with model.seg_head}.
    """
    t = config.train
    k_aug, k_loc, _ = jax.random.split(jax.random.fold_in(rng, step), 3)
    b = batch["image"].shape[0]
    kernels = kernel_sets.of_config(config)
    image, target, band = augment.augment_batch(
        k_aug, batch["image"], batch["target"], batch["band"], t, kernels
    )
    locs = jax.vmap(
        lambda k, d: sampling.sample_locations(k, d, t.num_points, t.border_fraction, kernels)
    )(jax.random.split(k_loc, b), band)
    index = jax.vmap(sampling.take_at)(target, locs)
    if t.get("continuous_locations", False):  # the target stays that of the containing voxel
        keys = jax.random.split(jax.random.fold_in(k_loc, 1), b)
        grid = tuple(image.shape[1:4])
        locs = jax.vmap(lambda k, v: sampling.jitter_within_voxels(k, v, grid))(keys, locs)
    low, patches = model_inputs(config, image, locs)
    inputs = {"low": low, "locations": locs, "index": index}
    if patches is not None:
        inputs["patches"] = patches
    if config.model.seg_head:
        spec = labels.label_spec(config.data)
        inputs["coarse"] = losses.max_pool_target(spec.channel_masks(target), seg_shape(config))
    return inputs


def update_step(
    state: TrainState,
    inputs: dict,
    rng: jax.Array,
    *,
    model: OSSNet,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
    """One update from prepare_inputs' `inputs` for state.step; sizes depend on N and the encoder input only.

    If the loss or any gradient is NaN/Inf the update is skipped: the returned state is the input state
    (parameters, batch_stats and opt_state bitwise unchanged) with only `step` incremented, so the next
    step draws the next cases and randomness. metrics['skipped'] is () int32, 1 for a skipped update.
    """
    t = config.train
    _, _, k_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    spec = labels.label_spec(config.data)
    index = inputs["index"]

    def loss_fn(fast):
        (logits, seg), mutated = model.apply(
            {"params": fast, "batch_stats": state.batch_stats},
            inputs["low"],
            inputs["locations"],
            inputs.get("patches"),
            train=True,
            rngs={"dropout": k_drop},
            mutable=["batch_stats"],
        )
        point_loss = spec.point_loss(logits, index)
        if t.get("point_dice_weight", 0.0):
            point_loss += t.point_dice_weight * losses.label_dice_loss(spec, logits, index)
        seg_loss = jnp.zeros(())
        if seg is not None:
            coarse = inputs["coarse"]
            seg_loss = losses.bce(seg, coarse if seg.ndim == 5 else coarse[..., 0])
        return point_loss + t.seg_loss_weight * seg_loss, (
            mutated["batch_stats"],
            logits,
            point_loss,
            seg_loss,
        )

    grads, (batch_stats, logits, point_loss, seg_loss) = jax.grad(loss_fn, has_aux=True)(
        state.params.fast
    )
    loss = point_loss + t.seg_loss_weight * seg_loss
    new_state, skipped = guarded_update(state, grads, loss, batch_stats, tx)
    out = {
        "loss": loss,
        "skipped": skipped,
        "point_loss": point_loss,
        "seg_loss": seg_loss,
        "learning_rate": lr_schedule(t)(state.step),
        **metrics.mask_counts(
            spec.predicted_masks(logits, config.eval.threshold), spec.channel_masks(index)
        ),
    }
    return new_state, out


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: OSSNet,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
    """One update from a batch {'image' (B,X,Y,Z,C), 'target' (B,X,Y,Z), 'band' (B,X,Y,Z)}.

    prepare_inputs then update_step in one program; the host loop runs the two as separate calls.
    """
    inputs = prepare_inputs(batch, rng, state.step, config)
    return update_step(state, inputs, rng, model=model, tx=tx, config=config)


def point_eval_step(
    state: TrainState,
    image: jax.Array,
    target: jax.Array,
    locs: jax.Array,
    *,
    model: OSSNet,
    config: ml_collections.ConfigDict,
) -> dict:
    """Per-channel tp/fp/fn (R,) of the slow parameters at fixed locations (B, N, 3) of validation volumes."""
    low, patches = model_inputs(config, image, locs)
    logits, _ = model.apply(
        {"params": state.params.slow, "batch_stats": state.batch_stats},
        low,
        locs,
        patches,
        train=False,
    )
    spec = labels.label_spec(config.data)
    index = jax.vmap(sampling.take_at)(target, locs)
    return metrics.mask_counts(
        spec.predicted_masks(logits, config.eval.threshold), spec.channel_masks(index)
    )


class PointValidator:
    """Validation Dice/IoU at fixed sampled locations of each validation case (logged while training)."""

    scope = "sampled locations"  # where val_dice is measured, for the log line

    def __init__(self, cases: list, config: ml_collections.ConfigDict, model: OSSNet):
        self.cases = cases
        key = jax.random.key(config.train.seed + 1)
        t = config.train
        self.locations = [
            sampling.sample_locations(
                jax.random.fold_in(key, i), jnp.asarray(c.band), t.eval_points, t.border_fraction
            )[None]
            for i, c in enumerate(cases)
        ]
        self.step = jax.jit(functools.partial(point_eval_step, model=model, config=config))

    def __call__(self, state: TrainState) -> dict:
        """{'val_dice', 'val_iou'}: over all cases' locations, averaged over the label channels."""
        totals = {"tp": 0, "fp": 0, "fn": 0}
        for case, locs in zip(self.cases, self.locations):
            counts = self.step(
                state, jnp.asarray(case.image)[None], jnp.asarray(case.target)[None], locs
            )
            for k in totals:
                totals[k] = totals[k] + np.asarray(counts[k], np.int64)
        return {
            "val_dice": metrics.channel_mean(totals, metrics.dice_from_counts),
            "val_iou": metrics.channel_mean(totals, metrics.iou_from_counts),
        }
