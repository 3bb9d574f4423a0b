"""The main job's default: OSS-Net C, `small` preset, on built-in synthetic BraTS-like data.

Run: python train.py --config configs/demo.py --workdir runs/demo
Writes 40 synthetic cases to data/synthetic_brats on first use, trains on 32, evaluates densely on 8.
Expected: validation mean Dice >= 0.85; README.md gives the run's time and memory.
"""

import ml_collections

from configs import oss_net_c


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    return oss_net_c.get_config(arg)
