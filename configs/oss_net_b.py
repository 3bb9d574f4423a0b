"""OSS-Net B: OSS-Net A plus large patches (14^3 average-pooled to 7^3, as extra channels).

Published (official release): BraTS 2020 Dice 0.8541 / IoU 0.7572, LiTS Dice 0.7585 / IoU 0.6154.
Run: python train.py --config configs/oss_net_b.py:small --workdir runs/oss_net_b
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_base_config(arg)
    config.model.encoder = "plain"
    config.model.seg_head = False
    config.model.large_patches = True
    return config
