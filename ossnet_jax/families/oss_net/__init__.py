"""Occupancy networks: OSS-Net A-D and O-Net (its patch-free special case).

The training step is split in two (prepare_inputs: the grid-sized stage; update_step: the network),
so that the update's memory does not grow with the full-resolution grid.
"""

from ossnet_jax import evaluation, training
from ossnet_jax.families import Family
from ossnet_jax.models import oss_net
from ossnet_jax.train_state import init_state

FAMILY = Family(
    build_model=oss_net.build_model,
    init_state=init_state,
    train_step=training.train_step,
    validator=training.PointValidator,
    predictor=evaluation.Predictor,
    outputs_per_step=lambda c: c.train.batch_size * c.train.num_points,
    prepare_inputs=training.prepare_inputs,
    update_step=training.update_step,
)
