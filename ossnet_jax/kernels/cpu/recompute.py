"""Recomputation in the backward pass that XLA:CPU cannot move earlier (train.remat)."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def after_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """x plus min(|g[0, ..., 0]|, 0): equal to x for a finite or infinite g (NaN where g's first value
    is NaN, which skips the update anyway), but computable only once g exists.

    The term must be one XLA's algebraic simplifier cannot prove zero: with the entry points' XLA:CPU
    reassociation flags (kernels/cpu/xla_flags.py) it folds 0 * g to 0, the recomputation then ran
    during the forward pass and the update step held its results until the backward
    (docs/performance.md, "Gradient ties").
    """
    return x + jnp.minimum(jnp.abs(g[(0,) * g.ndim]), 0).astype(x.dtype)


def recomputed(
    module: nn.Module, call: Callable[..., jax.Array], x: jax.Array, *rest: Any
) -> jax.Array:
    """call(module, x, *rest) in training, storing only its inputs and variables for the backward pass.

    The backward rule runs call again and differentiates that. Its parameters are first made to depend
    on the incoming gradient (`after_gradient`), so XLA cannot schedule the recomputation before the
    gradient exists: XLA:CPU drops optimization barriers, and with jax.checkpoint / nn.remat it
    recomputed every block right after the forward pass (docs/performance.md, "Remat modes").
    Collections other than 'params' (batch-norm statistics) are updated by the forward pass only.
    Returns call's (B, N, F) output.
    """

    def forward(mdl, x, *rest):
        # the variables the call reads, taken before it updates the batch statistics
        variables = jax.tree.map(lambda v: v, dict(mdl.variables))
        y = call(mdl, x, *rest)
        return y, (variables, x, rest)

    def backward(residuals, g):
        variables, x, rest = residuals
        # the parameters, not x, carry the dependency: every layer starts from a parameter, and the
        # sum with a large x was a full copy of it (the patches; docs/performance.md)
        params = jax.tree.map(lambda p: after_gradient(p, g), variables["params"])
        others = {k: v for k, v in variables.items() if k != "params"}
        clone = module.clone(parent=None)

        def pure(params, x, *rest):
            y, _ = clone.apply(
                {"params": params, **others},
                x,
                *rest,
                method=call,
                mutable=list(others),
            )
            return y

        _, vjp = jax.vjp(pure, params, x, *rest)
        d_params, dx, *d_rest = vjp(g)
        return ({"params": d_params}, dx, *d_rest)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, x, *rest)
