"""OSS-Net A: O-Net's plain encoder and global latent plus 7^3 local patches.

Published (official release): BraTS 2020 Dice 0.8592 / IoU 0.7644, LiTS Dice 0.7127 / IoU 0.5579.
Run: python train.py --config configs/oss_net_a.py:small --workdir runs/oss_net_a
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_base_config(arg)
    config.model.encoder = "plain"
    config.model.seg_head = False
    return config
