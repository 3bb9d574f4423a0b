"""OSS-Net C ('full'): 7^3 patches, skip-encoder latents, segmentation head with auxiliary loss.

Published (official release): BraTS 2020 Dice 0.8842 / IoU 0.7991, LiTS Dice 0.7616 / IoU 0.6201.
Run: python train.py --config configs/oss_net_c.py:small --workdir runs/oss_net_c
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    return get_base_config(arg)
