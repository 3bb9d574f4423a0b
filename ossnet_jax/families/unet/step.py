"""Training the U-Nets: random crops (3D) or axial slices (2D) of augmented volumes, Dice + cross-entropy.

The step has the contract of OSS-Net's train_step (families/oss_net/step.py): one pure jitted update from a batch of whole volumes
{'image' (B, X, Y, Z, C), 'target' (B, X, Y, Z), 'band'}, randomness fold_in(seed, step), augmentation
of the whole volumes on the device (data/augment.py), NaN/Inf updates skipped (train_state.guarded_update).
Then, instead of sampling locations:
  unet3d  one crop of train.crop_shape per volume; the first round(B f) crops of a batch are centred on
          a random foreground voxel (clipped to the grid), the others start uniformly at random.
  unet2d  train.slices_per_volume axial slices (X, Y) per volume; the first round(S f) slices of each
          volume go through a random foreground voxel, the others are uniform over Z.
with f = train.foreground_fraction and foreground = any non-background label.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ossnet_jax import kernels as kernel_sets
from ossnet_jax import losses, metrics
from ossnet_jax.data import augment, labels, sampling
from ossnet_jax.families.unet.model import ResidualUNet
from ossnet_jax.families.unet.predictor import UNetPredictor, clip_window
from ossnet_jax.train_state import TrainState, guarded_update, lr_schedule, state_from_variables


def init_state(
    config: ml_collections.ConfigDict,
    model: ResidualUNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> TrainState:
    """Fresh parameters and optimizer state (convolutions: they do not depend on the input size).

    One compiled program, as train_state.init_state.
    """
    side = config.data.downscale * 2 ** (len(model.channels) - 1)
    shape = (1,) + (side,) * model.spatial_dims + (config.data.num_channels,)
    init = lambda rng: state_from_variables(
        model.init({"params": rng}, jnp.zeros(shape), train=False), tx
    )
    return jax.jit(init)(rng)


def outputs_per_step(config: ml_collections.ConfigDict) -> int:
    """Voxels supervised per step: B crops (3D) or B x slices_per_volume slices (2D)."""
    t, grid = config.train, tuple(config.data.grid_shape)
    if config.model.name == "unet2d":
        return t.batch_size * t.slices_per_volume * grid[0] * grid[1]
    return t.batch_size * int(np.prod(clip_window(tuple(t.crop_shape), grid)))


def _first(n: int, fraction: float) -> jax.Array:
    """(n,) bool: True for the first round(n fraction)."""
    return jnp.arange(n) < int(round(n * fraction))


def _foreground_voxel(rng: jax.Array, target: jax.Array) -> jax.Array:
    """(3,) int32 a uniformly drawn voxel with a non-background label of (X, Y, Z); any voxel if none."""
    return sampling.sample_locations(rng, target > 0, 1, 1.0)[0]


def random_crops(
    rng: jax.Array,
    image: jax.Array,
    target: jax.Array,
    crop_shape: tuple[int, ...],
    foreground_fraction: float,
) -> tuple[jax.Array, jax.Array]:
    """Crops (B, cx, cy, cz, C) and their targets (B, cx, cy, cz), one per volume of (B, X, Y, Z, C).

    crop_shape is clipped to the grid (empty: whole volumes).
    """
    grid = image.shape[1:4]
    crop = clip_window(crop_shape, grid)
    highest = jnp.asarray(grid) - jnp.asarray(crop)  # largest start per axis

    def one(key, img, tgt, centred):
        k_fg, k_uniform = jax.random.split(key)
        around = jnp.clip(_foreground_voxel(k_fg, tgt) - jnp.asarray(crop) // 2, 0, highest)
        start = jnp.where(centred, around, jax.random.randint(k_uniform, (3,), 0, highest + 1))
        return (
            jax.lax.dynamic_slice(img, (*start, 0), crop + img.shape[-1:]),
            jax.lax.dynamic_slice(tgt, tuple(start), crop),
        )

    b = image.shape[0]
    return jax.vmap(one)(jax.random.split(rng, b), image, target, _first(b, foreground_fraction))


def random_slices(
    rng: jax.Array,
    image: jax.Array,
    target: jax.Array,
    per_volume: int,
    foreground_fraction: float,
) -> tuple[jax.Array, jax.Array]:
    """Axial slices (B S, X, Y, C) and their targets (B S, X, Y) of volumes (B, X, Y, Z, C)."""
    depth = image.shape[3]

    def depth_of(key, tgt, through_foreground):
        k_fg, k_uniform = jax.random.split(key)
        uniform = jax.random.randint(k_uniform, (), 0, depth)
        return jnp.where(through_foreground, _foreground_voxel(k_fg, tgt)[2], uniform)

    def one(key, img, tgt):
        keys = jax.random.split(key, per_volume)
        zs = jax.vmap(depth_of, in_axes=(0, None, 0))(
            keys, tgt, _first(per_volume, foreground_fraction)
        )
        return jnp.moveaxis(img[:, :, zs], 2, 0), jnp.moveaxis(tgt[:, :, zs], 2, 0)

    b = image.shape[0]
    slices, targets = jax.vmap(one)(jax.random.split(rng, b), image, target)
    return slices.reshape((-1,) + slices.shape[2:]), targets.reshape((-1,) + targets.shape[2:])


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: ResidualUNet,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
    """One update from a batch {'image' (B,X,Y,Z,C), 'target' (B,X,Y,Z), 'band' (B,X,Y,Z)}.

    Returns the new state and metrics: 'loss', 'ce_loss', 'dice_loss', 'learning_rate', 'skipped'
    (() int32, 1 for a skipped non-finite update) and per-channel 'tp'/'fp'/'fn' (R,) of the trained
    voxels.
    """
    t = config.train
    rng = jax.random.fold_in(rng, state.step)
    k_aug, k_sample, k_drop = jax.random.split(rng, 3)
    image, target, _ = augment.augment_batch(
        k_aug, batch["image"], batch["target"], batch["band"], t, kernel_sets.of_config(config)
    )
    if model.spatial_dims == 2:
        inputs, index = random_slices(
            k_sample, image, target, t.slices_per_volume, t.foreground_fraction
        )
    else:
        inputs, index = random_crops(
            k_sample, image, target, tuple(t.crop_shape), t.foreground_fraction
        )
    spec = labels.label_spec(config.data)

    def loss_fn(fast):
        logits, mutated = model.apply(
            {"params": fast, "batch_stats": state.batch_stats},
            inputs,
            train=True,
            rngs={"dropout": k_drop},
            mutable=["batch_stats"],
        )
        loss, ce, dice = losses.dice_ce_loss(spec, logits, index, t.dice_weight, t.ce_weight)
        return loss, (mutated["batch_stats"], logits, ce, dice)

    (loss, (batch_stats, logits, ce, dice)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params.fast
    )
    new_state, skipped = guarded_update(state, grads, loss, batch_stats, tx)
    predicted = spec.predicted_masks(
        logits[..., 0] if spec.mode == "binary" else logits, config.eval.threshold
    )
    return new_state, {
        "loss": loss,
        "ce_loss": ce,
        "dice_loss": dice,
        "skipped": skipped,
        "learning_rate": lr_schedule(t)(state.step),
        **metrics.mask_counts(predicted, spec.channel_masks(index)),
    }


class DenseValidator:
    """Validation Dice/IoU over every grid voxel of each validation case (logged while training).

    Predicts like evaluation does (sliding windows or stacked slices) with the slow parameters; one
    predictor is kept, so the network compiles once.
    """

    scope = "every voxel"  # where val_dice is measured, for the log line

    def __init__(self, cases: list, config: ml_collections.ConfigDict, model: ResidualUNet):
        self.cases = cases
        self.predictor = UNetPredictor(config, model, None)

    def __call__(self, state: TrainState) -> dict:
        """{'val_dice', 'val_iou'}: over all cases' voxels, averaged over the label channels."""
        spec = self.predictor.spec
        self.predictor.variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
        totals = {"tp": 0, "fp": 0, "fn": 0}
        for case in self.cases:
            label_map, _ = self.predictor.predict(np.asarray(case.image))
            predicted = np.stack(spec.value_masks(label_map), axis=-1)
            counts = metrics.mask_counts(predicted, spec.table[np.asarray(case.target)])
            for k in totals:
                totals[k] = totals[k] + np.asarray(counts[k], np.int64)
        return {
            "val_dice": metrics.channel_mean(totals, metrics.dice_from_counts),
            "val_iou": metrics.channel_mean(totals, metrics.iou_from_counts),
        }
