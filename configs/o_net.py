"""O-Net baseline (Mescheder et al., CVPR 2019): plain encoder, one global latent, no patches.

Published (official release): BraTS 2020 Dice 0.7016 / IoU 0.5615, LiTS Dice 0.6506 / IoU 0.4842.
Run: python train.py --config configs/o_net.py:small --workdir runs/o_net
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str = "brats") -> ml_collections.ConfigDict:
    config = get_base_config(arg)
    config.model.encoder = "plain"
    config.model.patches = False
    config.model.seg_head = False
    return config
