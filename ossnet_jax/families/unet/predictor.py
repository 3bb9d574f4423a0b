"""Dense prediction with the U-Nets: sliding windows (3D) and stacked axial slices (2D).

Both call a jitted network on fixed-size batches (windows or slices), so it compiles once per window
shape, and return probabilities on the whole grid. UNetPredictor offers the interface of
families/oss_net/predictor.Predictor: predict(image) -> (label map in label values on the grid, voxels the network
produced), compile(image), spec, variables.
"""

import functools
import itertools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ossnet_jax.data import labels
from ossnet_jax.errors import ConfigError
from ossnet_jax.families.unet.model import ResidualUNet

Forward = Callable[[np.ndarray], np.ndarray]  # (n, *window, C) inputs -> (n, *window, O) probs


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of `window` voxels covering an axis of `size` voxels.

    Consecutive windows overlap by about `overlap` (in [0, 1)) of the window; the last window ends at
    the axis's end. A window at least as long as the axis gives one start, 0.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"eval.overlap must be in [0, 1), got {overlap}")
    if window >= size:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def clip_window(window: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The window shape used on a volume of `shape`: clipped to it; an empty window is the volume."""
    if not len(window):
        return tuple(shape)
    return tuple(min(int(w), int(s)) for w, s in zip(window, shape))


def _batched(forward: Forward, inputs: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """forward on `inputs` (each (*window, C)) in batches of exactly `batch`, zero-padding the last."""
    outputs = []
    for i in range(0, len(inputs), batch):
        chunk = inputs[i : i + batch]
        padding = [np.zeros_like(chunk[0])] * (batch - len(chunk))
        outputs.append(forward(np.stack(chunk + padding)))  # dispatched asynchronously
    return [row for out in outputs for row in np.asarray(out)][: len(inputs)]


def sliding_window(
    forward: Forward,
    volume: np.ndarray,
    window: Sequence[int],
    overlap: float,
    batch: int,
) -> tuple[np.ndarray, int]:
    """Probabilities (X, Y, Z, O) float32 of a volume (X, Y, Z, C), averaged over overlapping windows.

    Windows of shape `window` (clipped to the volume; empty: the whole volume) start at
    window_starts of each axis; every voxel's output is the mean over the windows containing it.
    Returns the probabilities and the voxels the network produced (window voxels x windows).
    """
    shape = volume.shape[:3]
    window = clip_window(window, shape)
    corners = list(
        itertools.product(*(window_starts(s, w, overlap) for s, w in zip(shape, window)))
    )
    regions = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in corners]
    outputs = _batched(forward, [volume[r] for r in regions], batch)
    total = np.zeros(shape + outputs[0].shape[-1:], np.float32)
    count = np.zeros(shape + (1,), np.float32)
    for region, out in zip(regions, outputs):
        total[region] += out
        count[region] += 1.0
    return total / count, len(regions) * int(np.prod(window))


def stack_slices(forward: Forward, volume: np.ndarray, batch: int) -> tuple[np.ndarray, int]:
    """Probabilities (X, Y, Z, O) of a volume (X, Y, Z, C) from its axial slices (X, Y, C), stacked.

    Returns the probabilities and the voxels the network produced (X Y Z).
    """
    slices = list(np.moveaxis(volume, 2, 0))
    outputs = _batched(forward, slices, batch)
    return np.stack(outputs, axis=2), int(np.prod(volume.shape[:3]))


def _forward(
    variables: dict, inputs: jax.Array, *, model: ResidualUNet, spec: labels.LabelSpec
) -> jax.Array:
    return spec.probabilities(model.apply(variables, inputs, train=False))


class UNetPredictor:
    """Dense label maps of whole volumes with a U-Net (3D: sliding windows, 2D: stacked slices).

    Attributes:
      variables: {'params', 'batch_stats'} used by predict; a validator may swap in newer ones,
        the compiled network is kept.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, model: ResidualUNet, variables: Optional[dict]
    ):
        self.config = config
        self.model = model
        self.spec = labels.label_spec(config.data)
        self.variables = variables
        self.network = jax.jit(functools.partial(_forward, model=model, spec=self.spec))

    def probabilities(
        self, image: np.ndarray, ev: Optional[ml_collections.ConfigDict] = None
    ) -> tuple[np.ndarray, int]:
        """(X, Y, Z, O) float32 probabilities of an image (X, Y, Z, C), and the voxels produced."""
        ev = self.config.eval if ev is None else ev
        forward = lambda batch: self.network(self.variables, jnp.asarray(batch))
        if self.model.spatial_dims == 2:
            return stack_slices(forward, image, ev.batch_slices)
        return sliding_window(forward, image, tuple(ev.window_shape), ev.overlap, ev.batch_windows)

    def compile(self, image: np.ndarray) -> None:
        """Compiles the network for this image's windows or slices (one batch)."""
        ev = self.config.eval
        if self.model.spatial_dims == 2:
            inputs = np.zeros((ev.batch_slices,) + image.shape[:2] + image.shape[3:], np.float32)
        else:
            window = clip_window(tuple(ev.window_shape), image.shape[:3])
            inputs = np.zeros((ev.batch_windows,) + window + image.shape[3:], np.float32)
        jax.block_until_ready(self.network(self.variables, jnp.asarray(inputs)))

    def predict(
        self, image: np.ndarray, ev: Optional[ml_collections.ConfigDict] = None
    ) -> tuple[np.ndarray, int]:
        """Label map (X, Y, Z) int32 in label values on the grid, and the voxels the network produced.

        `ev` overrides config.eval (threshold, window_shape, overlap, batch sizes) for this call.
        """
        ev = self.config.eval if ev is None else ev
        probs, voxels = self.probabilities(image, ev)
        flat = probs.reshape(-1, probs.shape[-1])
        _, values = self.spec.decide(
            flat[:, 0] if self.spec.mode == "binary" else flat, ev.threshold
        )
        return values.reshape(image.shape[:3]), voxels
