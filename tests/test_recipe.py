"""The training recipe against formulas written here in float64, not taken from the code: RAdam in
Lookahead (k=5, alpha=0.8) with its learning-rate steps and the PAU's 10x rate, the segmentation
head's auxiliary loss and its weight, and the random Fourier features of the location."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ossnet_jax import losses, train_state
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import FOURIER_KEY, build_model
from ossnet_jax.models.decoder import Decoder
from ossnet_jax.models.patches import PatchEncoder
from tests.conftest import TINY_GRID, tiny_config


def _radam_in_lookahead(params, grads, lr, pau_multiplier, k=5, alpha=0.8):
    """(fast, slow) after each update, in float64: RAdam (Liu et al. 2020; b1 0.9, b2 0.999, eps
    1e-8, rectified from rho_t >= 5 as optax, else the bias-corrected momentum) at lr(t) for step
    t = 0, 1, ..., x pau_multiplier for 'numerator' / 'denominator'; every k updates Lookahead
    (Zhang et al. 2019) moves the slow weights alpha of the way to the fast ones and restarts the
    fast ones there."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    rho_inf = 2 / (1 - b2) - 1
    fast = {name: np.array(p, np.float64) for name, p in params.items()}
    slow = {name: p.copy() for name, p in fast.items()}
    m = {name: np.zeros_like(p) for name, p in fast.items()}
    v = {name: np.zeros_like(p) for name, p in fast.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        for name in fast:
            m[name] = b1 * m[name] + (1 - b1) * g[name]
            v[name] = b2 * v[name] + (1 - b2) * g[name] ** 2
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            if rho >= 5:
                r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                direction = r * m_hat / (np.sqrt(v_hat) + eps)
            else:
                direction = m_hat
            rate = lr(t - 1) * (pau_multiplier if name in ("numerator", "denominator") else 1)
            fast[name] = fast[name] - rate * direction
        if t % k == 0:
            for name in fast:
                slow[name] = slow[name] + alpha * (fast[name] - slow[name])
                fast[name] = slow[name].copy()
        out.append(({n: p.copy() for n, p in fast.items()}, {n: p.copy() for n, p in slow.items()}))
    return out


def test_updates_are_radam_in_lookahead_with_the_learning_rate_steps(tmp_path):
    """15 updates of 20 steps (train.lr_decay_fractions (0.4, 0.6): rate x0.1 from step 8 and again
    from 12; PAU coefficients at 10x; RAdam rectified from its 6th update; Lookahead syncs after
    updates 5, 10, 15) through guarded_update, the loop's update."""
    config = tiny_config(tmp_path)
    t = config.train
    assert (t.lookahead_steps, t.lookahead_alpha) == (5, 0.8)
    t.steps, t.learning_rate, t.lr_decay_fractions, t.pau_lr_multiplier = 20, 0.05, (0.4, 0.6), 10
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 2)),
        "numerator": rng.normal(size=6),
        "denominator": rng.normal(size=4),
    }
    grads = [
        {n: rng.normal(size=p.shape) * (1 + i % 3) for n, p in params.items()} for i in range(15)
    ]
    lr = lambda step: 0.05 * 0.1 ** ((step >= 8) + (step >= 12))
    expected = _radam_in_lookahead(params, grads, lr, 10.0)

    tx = train_state.make_optimizer(config)
    as32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    state = train_state.state_from_variables({"params": as32(params)}, tx)
    update = jax.jit(lambda s, g: train_state.guarded_update(s, g, jnp.float32(0), {}, tx)[0])
    for step, (g, (fast, slow)) in enumerate(zip(grads, expected), start=1):
        state = update(state, as32(g))
        for name in params:
            for got, want in ((state.params.fast, fast), (state.params.slow, slow)):
                # float32 against float64: RAdam's rectification term is computed in float32
                np.testing.assert_allclose(
                    np.asarray(got[name]),
                    want[name],
                    rtol=1e-4,
                    atol=1e-4,
                    err_msg=f"{step} {name}",
                )
    moved = np.abs(expected[-1][1]["kernel"] - params["kernel"]).max()
    assert moved > 0.05  # the updates are far larger than the tolerance


class _Fixed(nn.Module):
    """A stand-in model: logits a * POINT at the locations and s * SEG from the segmentation head,
    a and s parameters (1 at first), so update_step's loss and gradients have closed forms."""

    point: tuple
    seg: tuple

    @nn.compact
    def __call__(self, low, locations, patches, train):
        a = self.param("a", nn.initializers.ones, ())
        s = self.param("s", nn.initializers.ones, ())
        self.variable("batch_stats", "unused", lambda: jnp.zeros(()))
        return a * jnp.asarray(self.point), s * jnp.asarray(self.seg)


def _bce64(z, y):
    """Mean binary cross-entropy of logits z against 0/1 targets y, and its derivative in z."""
    return np.mean(np.logaddexp(0, z) - y * z), (1 / (1 + np.exp(-z)) - y) / z.size


def test_segmentation_head_adds_its_weighted_loss_to_the_point_loss(tmp_path):
    """loss = BCE(point logits, foreground at the locations) + seg_loss_weight x BCE(segmentation
    logits, coarse target); the first update (RAdam's first step is the gradient times the rate)
    moves each parameter by the rate times its part of the gradient."""
    config = tiny_config(tmp_path)
    config.train.seg_loss_weight = weight = 0.3
    rng = np.random.default_rng(1)
    point, seg = rng.normal(size=(2, 16)) * 2, rng.normal(size=(2, 4, 4, 2)) * 2
    index = rng.integers(0, 4, size=(2, 16))  # class indices into labels (0, 1, 2, 4): binary > 0
    coarse = rng.random(size=(2, 4, 4, 2, 1)) < 0.4
    model = _Fixed(point.tolist(), seg.tolist())
    tx = train_state.make_optimizer(config)
    variables = model.init(jax.random.key(0), None, None, None, False)
    state = train_state.state_from_variables(variables, tx)
    inputs = {"low": jnp.zeros(()), "locations": jnp.zeros(()), "index": jnp.asarray(index)}
    inputs["coarse"] = jnp.asarray(coarse)
    update = functools.partial(oss_net_step.update_step, model=model, tx=tx, config=config)
    new, out = jax.jit(update)(state, inputs, jax.random.key(0))
    point_loss, point_grad = _bce64(point, (index > 0).astype(float))
    seg_loss, seg_grad = _bce64(seg, coarse[..., 0].astype(float))
    np.testing.assert_allclose(float(out["point_loss"]), point_loss, rtol=1e-5)
    np.testing.assert_allclose(float(out["seg_loss"]), seg_loss, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), point_loss + weight * seg_loss, rtol=1e-5)
    rate = config.train.learning_rate
    np.testing.assert_allclose(
        float(new.params.fast["a"]), 1 - rate * np.sum(point_grad * point), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(new.params.fast["s"]), 1 - rate * weight * np.sum(seg_grad * seg), rtol=1e-5
    )


def _soft_dice64(z, y):
    """1 - (2 sum p y + 1) / (sum p + sum y + 1) of logits z (p = sigmoid z) against 0/1 targets y,
    the sums over every entry, and its derivative in z."""
    p = 1 / (1 + np.exp(-z))
    overlap, total = 2 * np.sum(p * y) + 1, np.sum(p) + np.sum(y) + 1
    d_p = -(2 * y * total - overlap) / total**2
    return 1 - overlap / total, d_p * p * (1 - p)


def test_point_dice_weight_adds_the_soft_dice_of_the_locations_to_the_point_loss(tmp_path):
    """train.point_dice_weight w: point loss = BCE + w x soft Dice over the batch's locations; the
    first update moves the point logits' scale by the rate times the gradient of both."""
    config = tiny_config(tmp_path)
    config.train.point_dice_weight = weight = 0.7
    config.train.seg_loss_weight = 0.0
    rng = np.random.default_rng(3)
    point, seg = rng.normal(size=(2, 16)) * 2, rng.normal(size=(2, 4, 4, 2))
    index = rng.integers(0, 4, size=(2, 16))
    model = _Fixed(point.tolist(), seg.tolist())
    tx = train_state.make_optimizer(config)
    state = train_state.state_from_variables(
        model.init(jax.random.key(0), None, None, None, False), tx
    )
    inputs = {"low": jnp.zeros(()), "locations": jnp.zeros(()), "index": jnp.asarray(index)}
    inputs["coarse"] = jnp.zeros((2, 4, 4, 2, 1), bool)
    update = functools.partial(oss_net_step.update_step, model=model, tx=tx, config=config)
    new, out = jax.jit(update)(state, inputs, jax.random.key(0))
    y = (index > 0).astype(float)
    (bce, bce_grad), (dice, dice_grad) = _bce64(point, y), _soft_dice64(point, y)
    np.testing.assert_allclose(float(out["point_loss"]), bce + weight * dice, rtol=1e-5)
    gradient = np.sum((bce_grad + weight * dice_grad) * point)
    rate = config.train.learning_rate
    np.testing.assert_allclose(float(new.params.fast["a"]), 1 - rate * gradient, rtol=1e-5)


def test_coarse_target_is_the_max_over_each_cell():
    target = np.random.default_rng(2).random(size=(2, 8, 6, 4, 3)) < 0.05
    got = np.asarray(losses.max_pool_target(jnp.asarray(target), (4, 2, 2)))
    want = np.zeros((2, 4, 2, 2, 3), bool)
    for i, j, k in np.ndindex(4, 2, 2):
        want[:, i, j, k] = target[:, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3, 2 * k : 2 * k + 2].any(
            axis=(1, 2, 3)
        )
    np.testing.assert_array_equal(got, want)


def test_fourier_features_are_sin_and_cos_of_the_projected_location(tmp_path):
    """OSS-Net D with --config.model.fourier_features=16: the decoder's input per location is
    [u | sin(2 pi u B) | cos(2 pi u B) | patch features] with u the location mapped to [-1, 1]
    and B (3, 16) fixed normal frequencies of std model.fourier_scale."""
    from configs import oss_net_d

    config = tiny_config(tmp_path)
    config.model = oss_net_d.get_config("small").model
    config.model.update(encoder_channels=(4, 8), decoder_width=16, decoder_blocks=2)
    config.model.fourier_features = 16
    model = build_model(config)
    locations = np.random.default_rng(3).integers(0, TINY_GRID, size=(1, 10, 3))
    seen = []

    def capture(next_fun, args, kwargs, context):
        """Records the decoder's input; the patch encoder's output is zeros of its width (7^3)."""
        if isinstance(context.module, PatchEncoder):
            return jnp.zeros((1, 10, 7**3))
        if isinstance(context.module, Decoder):
            seen.append(args[0])
            return jnp.zeros(args[0].shape[:2])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply({}, jnp.asarray(locations), None, jnp.zeros((1, 3, 2)), False, method="decode")
    features = np.asarray(seen[-1], np.float64)[0]
    scale = config.model.fourier_scale
    frequencies = scale * np.asarray(jax.random.normal(jax.random.key(FOURIER_KEY), (3, 16)))
    assert 0.5 * scale < frequencies.std() < 1.5 * scale
    u = 2 * locations[0] / (np.array(TINY_GRID) - 1) - 1
    angle = 2 * np.pi * u @ frequencies
    assert config.model.large_patches and features.shape == (10, 3 + 2 * 16 + 7**3)
    np.testing.assert_allclose(features[:, :3], u, atol=1e-6)
    np.testing.assert_allclose(features[:, 3:19], np.sin(angle), atol=2e-4)
    np.testing.assert_allclose(features[:, 19:35], np.cos(angle), atol=2e-4)
