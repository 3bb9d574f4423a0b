"""Model families behind one interface, selected by config.model.name, for train.py and evaluate.py.

  'oss_net'  occupancy networks (OSS-Net A-D, O-Net): training.py, evaluation.py.
  'unet3d'   3D residual U-Net, crops and sliding windows: unet_training.py, unet_inference.py.
  'unet2d'   2D residual U-Net on axial slices, stacked: the same modules.

training.py and evaluation.py import this module and this module refers to their OSS-Net parts; the
parts are looked up when get_family is called, so either may be imported first.
"""

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from ossnet_jax import evaluation, training, unet_inference, unet_training
from ossnet_jax.models import oss_net, unet
from ossnet_jax.train_state import TrainState, init_state

NAMES = ("oss_net",) + tuple(unet.FAMILIES)


@dataclasses.dataclass(frozen=True)
class Family:
    """What training and evaluation need of a model family.

    Attributes:
      build_model: config -> flax module.
      init_state: (config, model, tx, rng) -> fresh TrainState.
      train_step: (state, batch, rng, *, model, tx, config) -> (state, metrics); pure, jitted by
        the caller. metrics hold 'loss', 'skipped', 'learning_rate', per-channel 'tp'/'fp'/'fn' and
        the loss terms as '<name>_loss'.
      validator: (val cases, config, model) -> callable state -> {'val_dice', 'val_iou'}.
      predictor: (config, model, variables) -> object with predict(image, ev=None) -> (label map
        (X, Y, Z) int32 in label values, network evaluations), compile(image), spec.
      outputs_per_step: config -> locations (OSS-Net) or voxels (U-Nets) supervised per step.
      prepare_inputs, update_step: train_step split in two, or None where it is not: (batch, rng,
        step, config) -> inputs, the grid-sized stage the host loop runs ahead in the prefetch thread,
        and (state, inputs, rng, *, model, tx, config) -> (state, metrics), the update; their
        composition equals train_step (to float32 rounding: the one program may fuse
        products differently).
    """

    build_model: Callable[[ml_collections.ConfigDict], Any]
    init_state: Callable[..., TrainState]
    train_step: Callable[..., tuple[TrainState, dict]]
    validator: Callable[..., Callable[[TrainState], dict]]
    predictor: Callable[..., Any]
    outputs_per_step: Callable[[ml_collections.ConfigDict], int]
    prepare_inputs: Optional[Callable[..., dict]] = None
    update_step: Optional[Callable[..., tuple[TrainState, dict]]] = None


def get_family(config: ml_collections.ConfigDict) -> Family:
    """The Family of config.model.name; ValueError for an unknown name."""
    name = config.model.name
    if name == "oss_net":
        return Family(
            build_model=oss_net.build_model,
            init_state=init_state,
            train_step=training.train_step,
            validator=training.PointValidator,
            predictor=evaluation.Predictor,
            outputs_per_step=lambda c: c.train.batch_size * c.train.num_points,
            prepare_inputs=training.prepare_inputs,
            update_step=training.update_step,
        )
    if name in unet.FAMILIES:
        return Family(
            build_model=unet.build_unet,
            init_state=unet_training.init_state,
            train_step=unet_training.train_step,
            validator=unet_training.DenseValidator,
            predictor=unet_inference.UNetPredictor,
            outputs_per_step=unet_training.outputs_per_step,
        )
    raise ValueError(f"unknown model.name {name!r}; choose one of {NAMES}")
