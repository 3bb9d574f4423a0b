"""The parity entry point: occupancy probabilities of a workdir's model at given voxels.

What a parity check against the official release calls with the release's own input, so its
signature stays as it is: `occupancy(workdir, image, locations) -> probabilities`.
"""

import pathlib

import jax.numpy as jnp
import numpy as np

from ossnet_jax import evaluation
from ossnet_jax.errors import ConfigError


def occupancy(workdir: str | pathlib.Path, image: np.ndarray, locations: np.ndarray) -> np.ndarray:
    """Occupancy probabilities of the workdir's best checkpoint (slow parameters), evaluation mode.

    Args:
      workdir: a converted (python -m ossnet_jax.official convert) or trained OSS-Net workdir of the
        binary task.
      image: (X, Y, Z, C) float32, the padded, preprocessed grid (data.grid_shape, data.num_channels)
        in the release's array order: for a converted workdir, z-scored and zero-padded as the
        release did (configs/base.py `release_preprocessing`), no reorientation.
      locations: (N, 3) integer voxel indices of that grid.
    Returns:
      (N,) float32 probabilities that each location is inside the structure (sigmoid of the logit).
    Raises ConfigError naming the workdir for a model that is not OSS-Net's binary one, and
    ValueError for an image or locations of the wrong shape, type or range.
    """
    config = evaluation.load_config(workdir)
    config.eval.dtype = "float32"
    if config.model.name != "oss_net" or config.data.label_mode != "binary":
        raise ConfigError(
            f"{workdir}: occupancy needs an OSS-Net model of the binary task, this one is "
            f"model.name {config.model.name!r} with data.label_mode {config.data.label_mode!r}"
        )
    expected = (*config.data.grid_shape, config.data.num_channels)
    image = np.asarray(image)
    if image.shape != tuple(expected) or image.dtype != np.float32:
        raise ValueError(
            f"image must be float32 of shape {tuple(expected)} (data.grid_shape and channels of "
            f"{workdir}), got {image.dtype} {image.shape}"
        )
    locations = np.asarray(locations)
    if (
        locations.ndim != 2
        or locations.shape[1] != 3
        or not np.issubdtype(locations.dtype, np.integer)
    ):
        raise ValueError(
            f"locations must be (N, 3) integers, got {locations.dtype} {locations.shape}"
        )
    outside = (locations < 0) | (locations >= np.asarray(config.data.grid_shape))
    if outside.any():
        first = locations[np.argmax(outside.any(axis=1))]
        raise ValueError(
            f"location {tuple(int(v) for v in first)} lies outside the grid {tuple(config.data.grid_shape)}"
        )
    predictor, _ = evaluation.restore_predictor(config, workdir)
    latents, _, source = predictor.encode(predictor.variables, jnp.asarray(image))
    probabilities = predictor.decode_all(latents, source, locations.astype(np.int32))
    return np.asarray(probabilities, np.float32)
