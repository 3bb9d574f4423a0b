"""2D residual U-Net on axial slices: the paper's efficiency baseline; volumes are stacked slices.

The paper reports a lower Dice than OSS-Net's and a little less memory.
Run: python train.py --config configs/unet2d.py:small --workdir runs/unet2d
'small': 2 volumes x 4 slices of 96x96 per step, widths (16, 32, 64, 128), 400 steps.
"""

import ml_collections

from configs.unet_base import get_unet_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_unet_config("unet2d", arg)
    config.model.channels = (32, 64, 128, 256, 512)
    config.train.slices_per_volume = 16
    config.eval.batch_slices = 32
    if arg == "small":
        config.model.channels = (16, 32, 64, 128)
        config.train.slices_per_volume = 4
        config.eval.batch_slices = 16
    return config
