"""OSS-Net's predictor: encode a volume once, then refine a label map with a jitted fixed-size decoder.

Refinement strategies (eval.strategy): 'dense' evaluates every voxel; 'band' (the official 4-2-1
strides) and 'octree' (surface-adaptive) start from the encoder's low-resolution segmentation and
evaluate the decoder only where the label can change (ossnet_jax/inference).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from ossnet_jax.data import labels
from ossnet_jax.errors import ConfigError
from ossnet_jax.families.oss_net.model import (
    OSSNet,
    compute_dtype,
    downscale,
    observe,
    patch_source,
)
from ossnet_jax.inference.mise import OctreeRefinement
from ossnet_jax.inference.octree import BandRefinement, seed_from_segmentation


def _encode(variables: dict, image: jax.Array, *, model: OSSNet, config: ml_collections.ConfigDict):
    low = downscale(image[None], config.data.downscale)
    latents, seg = model.apply(variables, low, train=False, method=OSSNet.encode)
    seg_prob = None
    if seg is not None:  # any channel of the head: (sx, sy, sz)
        seg_prob = jax.nn.sigmoid(seg[0] if seg.ndim == 4 else seg[0].max(axis=-1))
    source = patch_source(image, config.model.large_patches) if config.model.patches else None
    return latents, seg_prob, source


def _decode(
    variables: dict,
    latents: jax.Array,
    source: Optional[dict],
    locations: jax.Array,
    *,
    model: OSSNet,
    config: ml_collections.ConfigDict,
) -> jax.Array:
    patches = None if source is None else observe(source, locations, config.model.patch_size)[None]
    logits = model.apply(
        variables, locations[None], patches, latents, train=False, method=OSSNet.decode
    )
    return labels.label_spec(config.data).probabilities(logits[0])


class Predictor:
    """Dense label maps of whole volumes; the decoder is compiled once for eval.batch_points locations.

    The model computes in eval.dtype (float32 parameters; bfloat16 arithmetic if asked).
    """

    def __init__(self, config: ml_collections.ConfigDict, model: OSSNet, variables: dict):
        model = model.clone(dtype=compute_dtype(config.eval.get("dtype", "float32")))
        self.model = model  # the module it applies (families/oss_net/field.py differentiates it)
        self.config = config
        self.spec = labels.label_spec(config.data)
        self.variables = variables
        self.encode = jax.jit(functools.partial(_encode, model=model, config=config))
        self.decode = jax.jit(functools.partial(_decode, model=model, config=config))

    @property
    def batch_sizes(self) -> tuple[int, int]:
        """(eval.batch_points, 1/8 of it): the two compiled decoder sizes; small queries use the small one."""
        size = self.config.eval.batch_points
        return size, max(size // 8, 1)

    def decode_all(self, latents, source, locations: np.ndarray) -> np.ndarray:
        """Probabilities (M[, O]) of (M, 3) locations, in padded batches of one of `batch_sizes`.

        Integer locations are voxel indices; real ones voxel coordinates, decoded as float32 (a
        program compiled per dtype) with trilinearly sampled patches.
        """
        large, small = self.batch_sizes
        m = len(locations)
        size = small if m <= small else large
        real = np.issubdtype(np.asarray(locations).dtype, np.floating)
        padded = np.zeros((-(-m // size) * size, 3), np.float32 if real else np.int32)
        padded[:m] = locations
        outs = [
            self.decode(self.variables, latents, source, padded[i : i + size])
            for i in range(0, len(padded), size)
        ]  # dispatched asynchronously, then gathered
        return np.concatenate([np.asarray(o) for o in outs])[:m]

    def compile(self, image: np.ndarray) -> None:
        """Compiles encoder and decoder for this image shape (one encode, one batch of each size)."""
        latents, _, source = self.encode(self.variables, jnp.asarray(image))
        for size in self.batch_sizes:
            self.decode_all(latents, source, np.zeros((size, 3), np.int32))

    def predict(
        self, image: np.ndarray, ev: Optional[ml_collections.ConfigDict] = None
    ) -> tuple[np.ndarray, int]:
        """Label map (X, Y, Z) int32 in label values on the padded grid, and the decoder evaluations.

        `ev` overrides config.eval (strategy, seeding, ...) for this call.
        """
        encoded = self.encode(self.variables, jnp.asarray(image))
        return self.predict_encoded(encoded, image.shape[:3], ev)

    def predict_encoded(
        self,
        encoded: tuple,
        grid_shape: tuple[int, int, int],
        ev: Optional[ml_collections.ConfigDict] = None,
    ) -> tuple[np.ndarray, int]:
        """`predict` of a volume of `grid_shape` already encoded (what `encode` returned for it)."""
        latents, seg_prob, source = encoded
        return extract(
            lambda query: self.decode_all(latents, source, query),
            self.spec,
            tuple(grid_shape),
            self.config.eval if ev is None else ev,
            None if seg_prob is None else np.asarray(seg_prob),
        )


STRATEGIES = ("dense", "band", "octree")


def extract(
    decode: Callable[[np.ndarray], np.ndarray],
    spec: labels.LabelSpec,
    grid_shape: tuple[int, int, int],
    ev: ml_collections.ConfigDict,
    seg_prob: Optional[np.ndarray] = None,
    seed: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, int]:
    """Dense label map (X, Y, Z) int32 in label values by eval.strategy, and the decoder evaluations.

    `decode` maps (M, 3) int32 locations to probabilities (M[, O]); `seg_prob` (sx, sy, sz) is the
    encoder's segmentation (any channel), used when eval.seeded; `seed`, a bool (X, Y, Z) mask, is
    used instead when given (the encoder's segmentation already upsampled to this grid).
      'dense'  every voxel (the reference).
      'band'   the official stride 4-2-1 refinement (inference/octree.py): follows the foreground score
               of LabelSpec.decide, evaluating every voxel next to predicted foreground; seeded, the
               first stage only visits voxels the encoder marks.
      'octree' multiresolution surface extraction (inference/mise.py) on the label values: refines where
               any output changes, fills agreeing elements without evaluating them; seeded, its coarse
               lattice only covers the encoder's segmentation dilated by one coarse step. With
               eval.octree_finest F > 1 the decoder stops at stride F and finer points where labels
               change are decided from logits interpolated trilinearly between evaluated points.
    """
    if ev.strategy not in STRATEGIES:
        raise ConfigError(f"eval.strategy must be one of {STRATEGIES}, got {ev.strategy!r}")
    if not ev.seeded:
        seed = None
    elif seed is None and seg_prob is not None:
        seed = seed_from_segmentation(np.asarray(seg_prob), grid_shape, ev.threshold)
    if ev.strategy == "dense":
        everything = np.argwhere(np.ones(grid_shape, bool)).astype(np.int32)
        return spec.decide(decode(everything), ev.threshold)[1].reshape(grid_shape), len(everything)
    if ev.strategy == "octree":
        stride = ev.get("octree_stride", 8)
        region = None
        if seed is not None:
            region = ndimage.maximum_filter(seed, size=2 * stride + 1, mode="constant")
        finest = ev.get("octree_finest", 1)
        octree = OctreeRefinement(
            grid_shape,
            stride,
            ev.get("octree_margin", 0),
            region=region,
            grow_connectivity=ev.get("octree_grow", 6),
            finest_stride=finest,
            confident=ev.get("octree_confident", 0.0) or None,
            cubic=ev.get("octree_interpolation", "linear") == "cubic",
            background=_logits(spec, _background_probabilities(spec))[0],
            decide=lambda scores: (
                spec.decide(_probabilities(spec, scores), ev.threshold)[1],
                _confidence(spec, scores),
            ),
        )
        while not octree.done:
            probs = decode(octree.query())
            octree.update(spec.decide(probs, ev.threshold)[1], _logits(spec, probs))
        return octree.to_labels(), octree.num_evaluated
    refinement = BandRefinement(grid_shape, tuple(ev.strides), ev.threshold, seed)
    values = np.zeros(grid_shape, np.int32)
    while not refinement.done:
        query = refinement.query()
        score, value = spec.decide(decode(query), ev.threshold)
        values[tuple(query.T)] = value
        refinement.update(score)
    return np.where(refinement.to_dense(), values, 0), refinement.num_evaluated


# Recovered logits are clipped to +-16.6 (probabilities to [2^-24, 1 - 2^-24]): float32 sigmoid
# outputs saturate at 1 above that, and clipping both signs alike keeps interpolation unbiased.
_LOGIT_LIMIT = 24 * np.log(2.0)


def _logits(spec: labels.LabelSpec, probs: np.ndarray) -> np.ndarray:
    """Scores (M, O) float32 that interpolate linearly: the network's logits, recovered from sigmoid
    outputs, or for softmax outputs log p_k - log p_0 (its logits less the background's)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-300, 1.0).reshape(len(probs), -1)
    if spec.mode == "multiclass":
        logits = np.log(p) - np.log(p[:, :1])
    else:
        logits = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 2.0**-53))
    return np.clip(logits, -_LOGIT_LIMIT, _LOGIT_LIMIT).astype(np.float32)


def _probabilities(spec: labels.LabelSpec, scores: np.ndarray) -> np.ndarray:
    """Inverse of `_logits` for M interpolated points: probabilities (M[, O]) as `decode` returns them."""
    scores = np.asarray(scores, np.float64)
    if spec.mode == "multiclass":
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    probs = (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)
    return probs[:, 0] if spec.mode == "binary" else probs


def _background_probabilities(spec: labels.LabelSpec) -> np.ndarray:
    """(1[, O]) probabilities of a location that is certainly background."""
    if spec.mode == "multiclass":
        return np.eye(spec.num_outputs, dtype=np.float32)[:1]
    return np.zeros((1, spec.num_outputs) if spec.mode != "binary" else (1,), np.float32)


def _confidence(spec: labels.LabelSpec, scores: np.ndarray) -> np.ndarray:
    """(M,) how far interpolated scores (M, O) are from changing the label: the smallest |logit| of
    the sigmoid outputs, or the gap between the two largest log-probabilities (multiclass)."""
    scores = np.asarray(scores, np.float32)
    if spec.mode == "multiclass":
        top = np.sort(scores, axis=-1)
        return top[:, -1] - top[:, -2]
    return np.abs(scores).min(axis=-1)
