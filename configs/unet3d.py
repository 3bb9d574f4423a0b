"""3D residual U-Net: the paper's performance baseline, trained on random crops, sliding-window inference.

The paper reports a Dice similar to OSS-Net C's and far more training memory.
Run: python train.py --config configs/unet3d.py:small --workdir runs/unet3d
'small': 32^3 crops at full resolution, widths (8, 16, 32, 64), 400 steps, whole-volume inference.
"""

import ml_collections

from configs.unet_base import get_unet_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_unet_config("unet3d", arg)
    config.train.crop_shape = (128, 128, 128)
    config.eval.window_shape = (128, 128, 128)
    config.eval.overlap = 0.5
    config.eval.batch_windows = 2
    if arg == "small":
        config.train.crop_shape = (32, 32, 32)
        config.eval.window_shape = ()  # the whole 96x96x64 grid in one pass
        config.eval.batch_windows = 1
    return config
