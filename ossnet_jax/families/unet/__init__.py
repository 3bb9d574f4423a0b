"""The paper's U-Net baselines: 3D on random crops with sliding-window inference, 2D on axial slices.

model.py: the residual U-Nets; step.py: crops or slices of augmented volumes, Dice + cross-entropy;
predictor.py: sliding windows (3D) or stacked slices (2D).
"""

from ossnet_jax.families import Family
from ossnet_jax.families.unet import model, predictor, step

FAMILY = Family(
    build_model=model.build_unet,
    init_state=step.init_state,
    train_step=step.train_step,
    validator=step.DenseValidator,
    predictor=predictor.UNetPredictor,
    outputs_per_step=step.outputs_per_step,
    grid_multiple=model.grid_multiple,
)
