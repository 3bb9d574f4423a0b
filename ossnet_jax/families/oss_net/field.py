"""The occupancy field of one encoded volume as a pure function of one location.

`value(variables, latents, source, location)` maps a (3,) voxel coordinate of the padded grid (real
valued, inside the grid) to the decoder's probabilities: () for one output, (O,) for several. It is
the batched decoder (predictor._decode) applied to one location, so it can be `jax.vmap`-ped over
locations and differentiated with `jax.grad` with respect to the location: patches are sampled
trilinearly (models/patches.py), the location encodings are smooth, and the decoder runs in
evaluation mode (running batch-norm statistics), so every location is decoded on its own. The
batched decoder (Predictor.decode_all) stays the fast path; both agree (tests/test_field.py).

`latents` and `source` are what Predictor.encode returns for one volume: (1, K, L) latents and the
patch source ({'volume'[, 'parity']} or None without patches).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ossnet_jax.data import labels
from ossnet_jax.families.oss_net.model import OSSNet
from ossnet_jax.families.oss_net.predictor import _decode


def value(
    variables: dict,
    latents: jax.Array,
    source: Optional[dict],
    location: jax.Array,
    *,
    model: OSSNet,
    config: ml_collections.ConfigDict,
) -> jax.Array:
    """Probabilities at one location: () (binary) or (O,) (several outputs), float32.

    Args:
      variables: {'params', 'batch_stats'} of the model.
      latents: (1, K, L) of the encoded volume.
      source: its patch source, or None.
      location: (3,) float voxel coordinate of the padded grid, each in [0, n - 1].
    """
    location = jnp.asarray(location, jnp.float32)
    return _decode(variables, latents, source, location[None], model=model, config=config)[0]


def foreground(spec: labels.LabelSpec, probabilities: jax.Array) -> jax.Array:
    """The probability that a location is foreground (label > 0), from (..., ) or (..., O) outputs:
    the one output (binary), 1 - P(background) (multiclass), the first region, which holds every
    foreground label (BraTS regions' whole tumour)."""
    if spec.mode == "binary":
        return probabilities
    if spec.mode == "multiclass":
        return 1.0 - probabilities[..., 0]
    return probabilities[..., 0]


def foreground_value(
    variables: dict,
    latents: jax.Array,
    source: Optional[dict],
    location: jax.Array,
    *,
    model: OSSNet,
    config: ml_collections.ConfigDict,
) -> jax.Array:
    """() float32: `foreground` of `value` at one (3,) location, for gradients and level sets."""
    probs = value(variables, latents, source, location, model=model, config=config)
    return foreground(labels.label_spec(config.data), probs)


def foreground_gradient_fn(
    model: OSSNet, config: ml_collections.ConfigDict
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted (variables, latents, source, locations (M, 3) float32) -> (foreground probability
    (M,), its gradient with respect to the location (M, 3), per voxel) over a batch of locations."""
    one = functools.partial(foreground_value, model=model, config=config)
    both = jax.value_and_grad(one, argnums=3)
    return jax.jit(jax.vmap(both, in_axes=(None, None, None, 0)))


def in_batches(
    fn: Callable[[np.ndarray], tuple], locations: np.ndarray, size: int
) -> tuple[np.ndarray, ...]:
    """fn over (M, 3) float32 locations in zero-padded batches of `size` (one compiled shape); the
    outputs of every batch concatenated and cut to M rows."""
    m = len(locations)
    padded = np.zeros((max(-(-m // size), 1) * size, 3), np.float32)
    padded[:m] = locations
    parts = [fn(padded[i : i + size]) for i in range(0, len(padded), size)]
    return tuple(
        np.concatenate([np.asarray(p[k]) for p in parts])[:m] for k in range(len(parts[0]))
    )
