"""Train state and optimizer: what a checkpoint holds and how it is updated.

TrainState.params is an optax.LookaheadParams: gradients use the fast weights, evaluation the slow ones.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ossnet_jax import kernels as kernel_sets
from ossnet_jax.models.oss_net import OSSNet, compute_dtype, downscale, observe, patch_source


@flax.struct.dataclass
class TrainState:
    """step: () int32; params: optax.LookaheadParams (fast for gradients, slow for evaluation)."""

    step: jax.Array
    params: optax.LookaheadParams
    batch_stats: Any
    opt_state: optax.OptState


def lr_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """train.learning_rate, multiplied by 0.1 at each of train.lr_decay_fractions of train.steps."""
    boundaries = {}
    for f in train_cfg.lr_decay_fractions:
        step = int(f * train_cfg.steps)
        boundaries[step] = boundaries.get(step, 1.0) * 0.1
    return optax.piecewise_constant_schedule(train_cfg.learning_rate, boundaries)


def _pau_labels(params: Any) -> Any:
    """'pau' for Pade coefficients (trained at a higher rate), 'default' for everything else."""

    def label(path, _):
        name = getattr(path[-1], "key", "")
        return "pau" if name in ("numerator", "denominator") else "default"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """RAdam inside Lookahead (k, alpha), the PAU coefficients at pau_lr_multiplier x the rate."""
    t = config.train
    schedule = lr_schedule(t)
    inner = optax.multi_transform(
        {
            "default": optax.radam(schedule),
            "pau": optax.radam(lambda step: schedule(step) * t.pau_lr_multiplier),
        },
        _pau_labels,
    )
    return optax.lookahead(inner, sync_period=t.lookahead_steps, slow_step_size=t.lookahead_alpha)


def patch_channels(config: ml_collections.ConfigDict) -> int:
    return config.data.num_channels * (2 if config.model.large_patches else 1)


def model_inputs(
    config: ml_collections.ConfigDict, image: jax.Array, locations: jax.Array
) -> tuple[jax.Array, Optional[jax.Array]]:
    """Encoder input (B, X/d, Y/d, Z/d, C) and patches (B, N, 7, 7, 7, Cp) (None without patches).

    Patches are cast to train.dtype (bfloat16 halves their memory); the model casts the rest.
    """
    low = downscale(image, config.data.downscale, True, kernel_sets.of_config(config))
    if not config.model.patches:
        return low, None
    size, large = config.model.patch_size, config.model.large_patches
    patches = jax.vmap(lambda v, loc: observe(patch_source(v, large), loc, size))(image, locations)
    return low, patches.astype(compute_dtype(config.train.get("dtype", "float32")))


def init_state(
    config: ml_collections.ConfigDict,
    model: OSSNet,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> TrainState:
    """Fresh parameters and optimizer state for one-volume input shapes of the config.

    One compiled program: run op by op, every primitive of the initialisation is compiled on its own,
    which is slow even for a tiny model (docs/performance.md).
    """
    grid = tuple(config.data.grid_shape)
    d = config.data.downscale
    low_shape = (1,) + tuple(g // d for g in grid) + (config.data.num_channels,)
    size = config.model.patch_size
    patch_shape = (1, 2, size, size, size, patch_channels(config))

    def init(rng: jax.Array) -> TrainState:
        patches = jnp.zeros(patch_shape) if config.model.patches else None
        locs = jnp.zeros((1, 2, 3), jnp.int32)
        variables = model.init({"params": rng}, jnp.zeros(low_shape), locs, patches, train=False)
        return state_from_variables(variables, tx)

    return jax.jit(init)(rng)


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 of freshly initialised {'params'[, 'batch_stats']}: slow = fast, optimizer state new."""
    params = optax.LookaheadParams.init_synced(variables["params"])
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )
    return jax.tree.map(
        jnp.copy, state
    )  # distinct buffers (fast and slow start equal), so it can be donated


def guarded_update(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    batch_stats: Any,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, jax.Array]:
    """Applies gradients of the fast parameters unless the loss or a gradient is NaN/Inf.

    A skipped update returns the input state bitwise (parameters, batch_stats, opt_state) with only
    `step` incremented. Returns (new state, skipped () int32: 1 for a skipped update).
    """
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )

    # a conditional rather than a select per array: the same values, and a third of the compile time
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    return new_state.replace(step=state.step + 1), jnp.logical_not(finite).astype(jnp.int32)
