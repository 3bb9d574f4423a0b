"""Occupancy networks: OSS-Net A-D and O-Net (its patch-free special case).

model.py: the network (encode once, decode many locations) and its inputs; step.py: the training step,
split into prepare_inputs (the grid-sized stage) and update_step (the network), so that the update's
memory does not grow with the full-resolution grid; predictor.py: dense label maps by seeded
refinement.
"""

from ossnet_jax.families import Family
from ossnet_jax.families.oss_net import model, predictor, step

FAMILY = Family(
    build_model=model.build_model,
    init_state=step.init_state,
    train_step=step.train_step,
    validator=step.PointValidator,
    predictor=predictor.Predictor,
    outputs_per_step=lambda c: c.train.batch_size * c.train.num_points,
    grid_multiple=model.grid_multiple,
    prepare_inputs=step.prepare_inputs,
    update_step=step.update_step,
)
