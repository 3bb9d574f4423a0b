"""Model families behind one interface, found by config.model.name, for training.py and evaluation.py.

  'oss_net'  occupancy networks (OSS-Net A-D, O-Net): families/oss_net/.
  'unet3d'   3D residual U-Net, crops and sliding windows: families/unet/.
  'unet2d'   2D residual U-Net on axial slices, stacked: families/unet/.

Each family is a package with the same modules: model (the flax network and build_model), step (the
pure jitted training step and the validator) and predictor (dense label maps of whole volumes). Its
__init__ describes it as a `Family`. The packages are imported when a family is asked for, so the
generic loops (training.py, evaluation.py) import this registry without importing any family.
"""

import dataclasses
import importlib
from typing import Any, Callable, Optional

import ml_collections

from ossnet_jax.errors import ConfigError

# model.name -> the package that describes it
PACKAGES = {
    "oss_net": "ossnet_jax.families.oss_net",
    "unet3d": "ossnet_jax.families.unet",
    "unet2d": "ossnet_jax.families.unet",
}
NAMES = tuple(PACKAGES)


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
      grid_multiple: config -> (3,) ints that must divide data.grid_shape's axes (the input downscale
        times the network's halvings); data.grid_shape = 'auto' plans the grid with it.
      prepare_inputs, update_step: train_step split in two, or None where it is not: (batch, rng,
        step, config) -> inputs, the grid-sized stage the host loop runs ahead in the prefetch thread,
        and (state, inputs, rng, *, model, tx, config) -> (state, metrics), the update; their
        composition equals train_step (to float32 rounding: the one program may fuse
        products differently).
    """

    build_model: Callable[[ml_collections.ConfigDict], Any]
    init_state: Callable[..., Any]
    train_step: Callable[..., tuple[Any, dict]]
    validator: Callable[..., Callable[[Any], dict]]
    predictor: Callable[..., Any]
    outputs_per_step: Callable[[ml_collections.ConfigDict], int]
    grid_multiple: Callable[[ml_collections.ConfigDict], tuple[int, int, int]]
    prepare_inputs: Optional[Callable[..., dict]] = None
    update_step: Optional[Callable[..., tuple[Any, dict]]] = None


def get_family(config: ml_collections.ConfigDict) -> Family:
    """The Family of config.model.name; ValueError for an unknown name."""
    name = config.model.name
    if name not in PACKAGES:
        raise ConfigError(f"unknown model.name {name!r}; choose one of {NAMES}")
    return importlib.import_module(PACKAGES[name]).FAMILY
