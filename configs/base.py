"""Base configuration of every OSS-Net variant (Reich et al., BMVC 2021).

Variant files import `get_base_config` and override a handful of fields. Presets:
  'brats' (default) the official BraTS 2020 sizes: 240x240x155 padded to 256x256x160, 4 modalities.
  'lits'  the official LiTS sizes: CT clipped to [-200, 250] HU and resampled to 512^3, 1 channel,
          encoder 1->8->16->32->64->128.
  'small' a CPU-sized version of the same structure on the built-in synthetic BraTS-like data
          (--config.data.synthetic_kind=vessels: thin branching vessels instead): a planned grid
          ('auto': 96x96x64 for the synthetic data), channels from the data, 3 encoder blocks, a
          128-wide decoder, 2 x 2048 locations, 400 steps, lr 1e-3 decayed x0.1 at 80% and 90%.
  'brats_release', 'lits_release'  'brats' and 'lits' with the official release's preprocessing and
          voxel-index locations (`release_preprocessing`): what its published checkpoints expect
          (python -m ossnet_jax.official convert selects them).
Only strings, numbers, booleans and tuples of them live here.
"""

import ml_collections

from ossnet_jax.errors import ConfigError

PRESETS = ("brats", "lits", "small", "brats_release", "lits_release")


def get_base_config(preset: str = "brats") -> ml_collections.ConfigDict:
    """Returns the OSS-Net C ('full') configuration for a preset; variants edit it."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if preset.endswith("_release"):
        return release_preprocessing(get_base_config(preset[: -len("_release")]))
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.format = "brats"  # 'synthetic' | 'brats' | 'lits' | 'msd'
    data.root = "data/MICCAI_BraTS2020_TrainingData"
    # padded full-resolution grid (voxels), or 'auto': the smallest grid holding every case that the
    # model's halvings and data.downscale divide (data/planning.py; config.json stores the result)
    data.grid_shape = ml_collections.FieldReference(
        "auto" if preset == "small" else (256, 256, 160), field_type=object
    )
    data.downscale = 2  # the encoder sees the grid average-pooled by this factor
    data.label_mode = "binary"  # 'binary' (label > 0) | 'multiclass' (softmax) | 'brats_regions'
    data.labels = (0, 1, 2, 4)  # label values on disk, background first (MSD: from dataset.json)
    data.label_names = ("background", "necrotic tumour core", "oedema", "enhancing tumour")
    data.region_names = ("whole_tumour", "tumour_core", "enhancing_tumour")  # for 'brats_regions'
    data.region_labels = ((1, 2, 4), (1, 4), (4,))  # label values inside each region, nested
    data.clip_range = ()  # (low, high) intensity clip before normalisation, e.g. a CT window in HU
    # z-score over 'nonzero' voxels (MRI) | 'all' voxels (CT) | 'all_unbiased' (n - 1 std, the release)
    data.normalize = "nonzero"
    data.resample = False  # False: pad into grid_shape (BraTS); True: resample to it (LiTS)
    data.reorient = True  # True: to RAS voxel order; False: the arrays as stored (the release)
    data.pad_remainder = "after"  # where an odd padding voxel goes: 'after' | 'before' (release)
    # trilinear resampling (data.resample) reads 'zero' outside the volume | the 'edge' voxel (PyTorch's
    # align_corners=False, the release)
    data.resample_border = "zero"
    data.subset = "training"  # MSD: 'training' (imagesTr/labelsTr) | 'test' (imagesTs)
    data.split_file = ""  # optional JSON {"train": [ids], "val": [ids]} instead of the seeded split
    data.val_fraction = 0.2
    data.seed = 0  # the train/validation split's seed
    # image channels; 0: from the data (BraTS 4: flair, t1, t1ce, t2; LiTS 1; MSD dataset.json; else
    # the first case)
    data.num_channels = 0 if preset == "small" else 4
    data.band_size = (
        13  # border band: Sobel magnitude of the label dilated by a band_size^3 max-pool
    )
    data.synthetic_cases = 40  # only for format 'synthetic'
    data.synthetic_shape = (88, 88, 58)  # only for format 'synthetic'; voxels before padding
    # only for format 'synthetic': the generator's seed; each setting has its own folder in data.root
    data.synthetic_seed = 0
    # only for format 'synthetic': 'tumour' BraTS-like 4-channel tumours (data/synthetic.py) |
    # 'vessels' 1-channel thin branching vessels in the Decathlon layout (data/synthetic_vessels.py)
    data.synthetic_kind = "tumour"

    config.model = model = ml_collections.ConfigDict()
    model.name = "oss_net"
    model.encoder = (
        "skip"  # 'plain' (one global latent) | 'skip' (one latent per decoder block + 1)
    )
    model.encoder_channels = (16, 32, 64, 128)  # output channels of the residual blocks
    model.decoder_width = 512
    model.decoder_blocks = 5
    model.patches = True  # 7^3 local patch of every channel around each location
    model.large_patches = False  # a 14^3 patch average-pooled to 7^3, as extra channels
    model.patch_size = 7
    model.seg_head = True  # low-resolution segmentation head + auxiliary loss
    model.activation = "pau"  # 'pau' | 'relu'
    model.dropout = 0.0
    model.fourier_features = 0  # random Fourier features of the location (config D: 16)
    model.fourier_scale = 4.0
    model.location_encoding = "normalized"  # 'normalized' to [-1, 1] | 'voxel' (raw indices)
    # formulation of the layers (ossnet_jax/kernels): 'xla' the plain one (GPU/TPU), 'cpu' the CPU fast
    # paths, 'auto' the CPU's on the CPU backend and 'xla' elsewhere; parameters are the same for both
    model.kernels = "auto"

    config.train = train = ml_collections.ConfigDict()
    train.steps = 1850  # 50 epochs of the 295 training volumes of an 80/20 split at batch 8
    train.batch_size = 8
    train.num_points = 2**14
    train.border_fraction = 0.0  # the published runs sampled uniformly
    # draw each location uniformly inside its sampled voxel (real coordinates, trilinear patches),
    # the target being that voxel's label; off: integer voxel indices, as the published runs
    train.continuous_locations = False
    train.learning_rate = 3e-4
    # PAU coefficients at 1e-2 while the rest is at 3e-4, decayed alike (the official recipe)
    train.pau_lr_multiplier = 1e-2 / 3e-4
    train.lr_decay_fractions = (0.4, 0.6)  # lr x0.1 at 40% and 60% of the steps
    train.lookahead_steps = 5
    train.lookahead_alpha = 0.8
    train.seg_loss_weight = 0.1
    # > 0: the point loss adds this x the soft Dice of the sampled locations (as the U-Nets' Dice +
    # cross-entropy); 0: BCE only, the published recipe
    train.point_dice_weight = 0.0
    train.flip_probability = 0.5
    train.brightness_shift = 0.15
    train.noise_std = 0.15
    train.augment_probability = 0.5
    train.eval_every = 185  # every 5 epochs
    train.eval_points = 2**14  # locations per validation case for the metrics logged while training
    train.checkpoint_every = 185
    train.log_every = 50
    train.seed = 0
    train.max_nonfinite_steps = 10  # stop after this many consecutive skipped (NaN/Inf) updates
    train.allow_config_change = False  # resume even if model/data keys differ from config.json
    # K contiguous shards of the training cases, each feeding B / K slots of every batch; 0: one per
    # process. A run's batches depend on K only (data/schedule.py), so K = P on one process replays P.
    train.case_shards = 0
    # devices that split each volume's train.num_points locations (parallel.py's 'points' mesh axis):
    # 0 auto: those the batch leaves idle (batch per process < its devices); 1 none; k: exactly k
    train.points_devices = 0
    # where prepare_inputs (augmentation, sampling, patches of the whole volumes) runs: 'device' or
    # 'host' (the host's CPU: accelerator memory then holds only what the update reads; one process)
    train.prepare = "device"
    train.dtype = (
        "float32"  # 'bfloat16': compute in bfloat16; parameters, loss, BN statistics float32
    )
    # 'all': the patch encoder, the decoder blocks and the encoder's first convolution keep only their
    # inputs for the backward pass and are recomputed there; 'decoder': the decoder blocks only;
    # 'none' (docs/performance.md compares their memory and speed). Needs model.dropout = 0
    train.remat = "all"

    config.eval = ev = ml_collections.ConfigDict()
    ev.threshold = 0.5
    ev.strategy = "band"  # 'dense' (every voxel) | 'band' (official 4-2-1) | 'octree' (surface)
    ev.strides = (4, 2, 1)  # 'band' strides
    ev.seeded = True  # start from the encoder's segmentation ('band', 'octree')
    ev.octree_stride = 8  # 'octree': coarse lattice stride, a power of two
    ev.octree_margin = 0  # 'octree': also evaluate this many lattice steps around disagreements
    ev.octree_grow = 6  # 'octree': check filled points next to an evaluated other label (0, 6, 26)
    ev.octree_finest = (
        2  # 'octree': finest stride evaluated; finer points interpolate logits (1: exact)
    )
    ev.octree_interpolation = "cubic"  # 'octree': of the logits, 'linear' | 'cubic' (Catmull-Rom)
    ev.octree_confident = 2.0  # 'octree': on the finest stride, keep interpolated labels with |logit| >= this (0: off)
    ev.compare_dense = False  # also run 'dense' and report each case's voxel disagreement
    ev.min_component_voxels = 0  # > 0: drop foreground components smaller (official mesh: 12**3)
    ev.component_connectivity = 6  # 6 (scipy's default, as the official release), 18 or 26
    ev.surface_tolerance_mm = 1.0  # tolerance of the surface Dice
    # OSS-Net: write predictions at this spacing (mm, one value or one per file axis; () the input's):
    # the field sampled on that grid (families/oss_net/resolution.py); metrics resample it back to
    # the label's voxels (nearest) and compare there
    ev.output_spacing = ()
    # OSS-Net: prediction meshes from the field ('field': marching cubes of its probabilities near
    # the surface, the mask's kept as <id>_prediction_mask) or from the binary mask ('mask')
    ev.mesh_source = "field"
    # 'standard': HD95 = larger directed 95th percentile (MONAI, BraTS), surface Dice (NSD) and ASD
    # from area-weighted surfels (Nikolov et al. 2018, DeepMind surface-distance); 'voxel': medpy's
    # pooled HD95, surface voxels weigh 1 (the earlier definitions). Both: ossnet_jax/surface.py
    ev.surface_metrics = "standard"
    ev.meshes = True  # eval/meshes/<id>_{prediction,label}.{ply,obj} in world mm
    ev.pictures = True  # eval/pictures/<id>_{slices,mesh}.png and eval/dice.png
    ev.batch_points = 2**15
    ev.dtype = "float32"  # 'bfloat16': the predictor computes in bfloat16 (parameters stay float32)

    if preset == "lits":
        data.format = "lits"
        data.root = "data/LiTS"
        data.grid_shape = (512, 512, 512)
        data.num_channels = 1
        data.labels = (0, 1, 2)
        data.label_names = ("background", "liver", "tumour")
        data.clip_range = (-200.0, 250.0)  # abdominal window in HU
        data.normalize = "all"
        data.resample = True
        model.encoder_channels = (8, 16, 32, 64, 128)
    elif preset == "small":
        data.format = "synthetic"
        data.root = "data/synthetic_brats"
        data.synthetic_cases = 40
        model.encoder_channels = (16, 32, 64)
        model.decoder_width = 128
        train.steps = 400
        train.batch_size = 2
        train.num_points = 2048
        train.border_fraction = 0.5
        train.learning_rate = 1e-3
        train.pau_lr_multiplier = 10.0  # PAU at 1e-2, as the recipe
        # the recipe's shares (0.4, 0.6) would leave the last 40% of 400 steps at 1e-5; every model
        # segments better decaying late (docs/accuracy.md); the U-Nets' small presets share it
        train.lr_decay_fractions = (0.8, 0.9)
        train.eval_every = 100
        train.eval_points = 8192
        train.checkpoint_every = 100
        ev.batch_points = 8192
    return config


def release_preprocessing(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the input the official release's models were trained on, returned edited.

    Each channel z-scored over the whole volume, background included, with the n - 1 standard
    deviation; no reorientation (the arrays as stored); an odd padding voxel before the volume (BraTS
    Z: 3 before, 2 after); LiTS without the HU clip, resampled as PyTorch's trilinear interpolate
    with align_corners=False; locations fed to the decoder as raw voxel indices. Predictions are
    still written in each input file's own geometry.
    """
    config.data.normalize = "all_unbiased"
    config.data.reorient = False
    config.data.pad_remainder = "before"
    config.data.clip_range = ()
    config.data.resample_border = "edge"
    config.model.location_encoding = "voxel"
    return config
