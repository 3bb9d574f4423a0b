"""OSS-Net D ('full2' in the official release): OSS-Net C plus large patches (14^3 pooled to 7^3).

As the release trained it (`decoder_fourier_input_features: False` in all its configurations): no
Fourier features of the location. The paper's random Fourier features remain an option:
--config.model.fourier_features=16 (model.fourier_scale 4.0); D runs trained before this file
followed the paper (fourier_features 16, kept in their config.json).
Published (official release): BraTS 2020 Dice 0.8774 / IoU 0.7876, LiTS Dice 0.7566 / IoU 0.6150.
Run: python train.py --config configs/oss_net_d.py:small --workdir runs/oss_net_d
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_base_config(arg)
    config.model.large_patches = True
    return config
