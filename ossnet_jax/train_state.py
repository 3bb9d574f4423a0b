"""Train state and optimizer: what a checkpoint holds and how it is updated.

TrainState.params is an optax.LookaheadParams: gradients use the fast weights, evaluation the slow ones.
Shared by every model family; each family builds its initial state from state_from_variables.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


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
