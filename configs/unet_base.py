"""Settings shared by the U-Net baselines (configs/unet3d.py, configs/unet2d.py).

data.*, train.* and eval.* mean what they mean for OSS-Net (configs/base.py); the data, split, optimizer,
schedule, augmentation and checkpoint cadence are the same. A U-Net config replaces config.model,
drops the keys only occupancy networks read (train.num_points, border_fraction, seg_loss_weight,
point_dice_weight, eval_points; eval.strategy and the refinement keys) and adds:
  data.downscale             the network sees the grid average-pooled by this factor and its logits are
                             resized back (1: full resolution, the default here)
  train.foreground_fraction  share of crops (3D) or slices (2D) drawn through a foreground voxel
  train.dice_weight, train.ce_weight   loss = dice_weight x soft Dice + ce_weight x cross-entropy
  train.crop_shape           unet3d: random crop per volume (voxels; () = whole volume)
  train.slices_per_volume    unet2d: axial slices drawn per volume and step
  eval.window_shape, eval.overlap, eval.batch_windows   unet3d: sliding-window inference
  eval.batch_slices          unet2d: slices per forward pass
train.dtype and eval.dtype are accepted but the U-Nets compute in float32 only: build_unet rejects
'bfloat16' rather than ignore it.
"""

import ml_collections

from configs.base import get_base_config

OCCUPANCY_ONLY = {
    "train": (
        "num_points",
        "border_fraction",
        "seg_loss_weight",
        "point_dice_weight",
        "eval_points",
    ),
    "eval": (
        "strategy",
        "strides",
        "seeded",
        "octree_stride",
        "octree_margin",
        "compare_dense",
        "batch_points",
    ),
}


def get_unet_config(name: str, preset: str) -> ml_collections.ConfigDict:
    """The base config of `preset` with model.name = name ('unet3d' | 'unet2d') and U-Net keys."""
    config = get_base_config(preset)
    for section, keys in OCCUPANCY_ONLY.items():
        for key in keys:
            del config[section][key]
    config.data.downscale = 1
    config.model = model = ml_collections.ConfigDict()
    model.name = name
    model.channels = (16, 32, 64, 128, 256)  # width per resolution level, full resolution first
    model.upsample = "transpose"  # 'transpose' (2^d transposed conv) | 'resize' (linear + 1^d conv)
    model.activation = "pau"  # as OSS-Net, so the comparison changes the architecture only
    model.dropout = 0.0
    config.train.foreground_fraction = 0.5
    config.train.dice_weight = 1.0
    config.train.ce_weight = 1.0
    if preset == "small":
        model.channels = (8, 16, 32, 64)
    return config
