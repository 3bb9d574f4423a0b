"""OSS-Net D: OSS-Net C plus large patches and random Fourier features of the location.

Published (official release): BraTS 2020 Dice 0.8774 / IoU 0.7876, LiTS Dice 0.7566 / IoU 0.6150.
Run: python train.py --config configs/oss_net_d.py:small --workdir runs/oss_net_d
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_base_config(arg)
    config.model.large_patches = True
    config.model.fourier_features = 16
    return config
