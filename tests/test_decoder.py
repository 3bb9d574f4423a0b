"""The decoder's first layer applies latent 0 once per volume: equal to the concatenated input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax.families.oss_net.model import OSSNet, remat_mode
from ossnet_jax.kernels.cpu.recompute import after_gradient
from ossnet_jax.models.decoder import Decoder, DecoderBlock, SplitDense
from ossnet_jax.models.layers import PAU_INIT_DENOMINATOR, PAU_INIT_NUMERATOR

KERNELS = ["xla", "cpu"]


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.2, jnp.float32), tree
    )


def assert_close_to_scale(got, expected):
    """Equal to 1e-4 of the largest magnitude of `expected` (of at least 0.1). The recomputed backward
    is another program whose sums XLA:CPU reassociates (xla_cpu.REASSOCIATION) in an order of its own
    and the vector width of the machine, so gradients after the blocks' batch-norm backward (sums with
    cancellation) differ by up to ~1.3e-5 of that magnitude here; a recomputation with other
    statistics or inputs differs by orders more."""
    expected = np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 0.1)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4 * scale)


def test_split_dense_equals_dense_of_the_concatenation_with_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 5)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    split = SplitDense(6)
    params = split.init(jax.random.key(0), x, context)["params"]
    assert params["kernel"].shape == (9, 6)

    def concat(params, x, context):
        full = jnp.concatenate([x, jnp.broadcast_to(context[:, None], (2, 9, 4))], -1)
        return jnp.sum(jnp.tanh(full @ params["kernel"] + params["bias"]))

    def split_fn(params, x, context):
        return jnp.sum(jnp.tanh(split.apply({"params": params}, x, context)))

    params = _random_like(params, 1)
    got = jax.value_and_grad(split_fn, argnums=(0, 1, 2))(params, x, context)
    expected = jax.value_and_grad(concat, argnums=(0, 1, 2))(params, x, context)
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("num_latents", [1, 3])
def test_decoder_equals_blocks_on_the_concatenated_input(num_latents, kernels):
    """Same parameters through plain DecoderBlocks fed [features | latent 0] at every location."""
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.normal(size=(2, 11, 5)), jnp.float32)
    latents = jnp.asarray(rng.normal(size=(2, num_latents, 4)), jnp.float32)
    decoder = Decoder(width=8, blocks=2, kernels=kernels)
    variables = decoder.init(jax.random.key(0), features, latents, train=False)
    assert variables["params"]["block0"]["dense1"]["kernel"].shape == (9, 8)
    params = _random_like(variables["params"], 3)
    stats = variables["batch_stats"]

    def decoder_fn(params, features, latents):
        out, _ = decoder.apply(
            {"params": params, "batch_stats": stats},
            features,
            latents,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(out))

    def plain(params, features, latents):
        x = jnp.concatenate([features, jnp.broadcast_to(latents[:, :1], (2, 11, 4))], -1)
        for b in range(2):
            latent = latents[:, b + 1] if num_latents > 1 else latents[:, 0]
            x, _ = DecoderBlock(8, kernels=kernels).apply(
                {"params": params[f"block{b}"], "batch_stats": stats[f"block{b}"]},
                x,
                latent,
                True,
                mutable=["batch_stats"],
            )
        return jnp.sum(jnp.sin(x @ params["out"]["kernel"]))

    got = jax.jit(jax.value_and_grad(decoder_fn, argnums=(0, 1, 2)))(params, features, latents)
    expected = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(params, features, latents)
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5, atol=1e-5)
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def _pau64(x, numerator, denominator):
    """Safe PAU (Molina et al. 2020): sum_i a_i x^i / (1 + sum_j |b_j x^j|), i = 0..5, j = 1..4."""
    p = sum(a * x**i for i, a in enumerate(numerator))
    return p / (1 + sum(np.abs(b * x ** (j + 1)) for j, b in enumerate(denominator)))


def _cbn64(h, latent, params, stats, train):
    """Conditional batch norm: one mean and (biased) variance over all of h (B, N, F), then per volume
    gamma(latent) x_hat + beta(latent); running averages keep 0.9 of the old value."""
    gamma = latent @ params["gamma"]["kernel"] + params["gamma"]["bias"]
    beta = latent @ params["beta"]["kernel"] + params["beta"]["bias"]
    mean, var = (h.mean(), h.var()) if train else (stats["mean"], stats["var"])
    out = (h - mean) / np.sqrt(var + 1e-5) * gamma[:, None] + beta[:, None]
    updated = {"mean": 0.9 * stats["mean"] + 0.1 * mean, "var": 0.9 * stats["var"] + 0.1 * var}
    return out, updated if train else stats


def _block64(params, stats, x, latent, context, train):
    """A residual CBN block: act(CBN(W2 act(CBN(W1 x + b1)) + b2) + shortcut), x = [x | context]."""
    if context is not None:
        x = np.concatenate(
            [x, np.broadcast_to(context[:, None], x.shape[:2] + context.shape[1:])], -1
        )
    dense = lambda name, h: h @ params[name]["kernel"] + params[name]["bias"]
    act = lambda name, h: _pau64(h, params[name]["numerator"], params[name]["denominator"])
    h, stats1 = _cbn64(dense("dense1", x), latent, params["cbn1"], stats["cbn1"], train)
    h, stats2 = _cbn64(
        dense("dense2", act("act1", h)), latent, params["cbn2"], stats["cbn2"], train
    )
    shortcut = dense("shortcut", x) if "shortcut" in params else x
    return act("act2", h + shortcut), {"cbn1": stats1, "cbn2": stats2}


def _decoder64(params, stats, features, latents, train):
    """The decoder: block b conditioned on latent b + 1 (latent 0 without skip latents), latent 0
    part of the first block's input, then a linear map without bias."""
    x, new_stats = features, {}
    for b in range(len(stats)):
        latent = latents[:, b + 1] if latents.shape[1] > 1 else latents[:, 0]
        context = latents[:, 0] if b == 0 else None
        name = f"block{b}"
        x, new_stats[name] = _block64(params[name], stats[name], x, latent, context, train)
    return x @ params["out"]["kernel"], new_stats


@pytest.mark.parametrize("num_latents, kernels", [(1, "xla"), (3, "cpu")])
def test_decoder_equals_a_float64_formula_of_its_blocks(num_latents, kernels):
    """Logits and running statistics of a 2-block decoder (random parameters, PAU coefficients and
    statistics), in training and in evaluation, against the float64 formulas above."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(2, 11, 5))
    latents = rng.normal(size=(2, num_latents, 4))
    decoder = Decoder(width=8, blocks=2, kernels=kernels)
    shapes = jax.eval_shape(
        lambda: decoder.init(
            jax.random.key(0), jnp.zeros(features.shape), jnp.zeros(latents.shape), False
        )
    )
    init = {
        "numerator": np.asarray(PAU_INIT_NUMERATOR),
        "denominator": np.asarray(PAU_INIT_DENOMINATOR),
    }

    def draw(path, leaf):
        name = path[-1].key
        if name in init:
            return init[name] + rng.normal(size=leaf.shape) * 0.05
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape)
        return rng.normal(size=leaf.shape) * (0.3 if name == "kernel" else 0.1)

    params64 = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    stats64 = jax.tree_util.tree_map_with_path(draw, shapes["batch_stats"])
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32), {"params": params64, "batch_stats": stats64}
    )
    variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    assert params64["block0"]["dense1"]["kernel"].shape == (9, 8)  # [features | latent 0]
    assert "shortcut" in params64["block0"] and "shortcut" not in params64["block1"]
    x, z = jnp.asarray(features, jnp.float32), jnp.asarray(latents, jnp.float32)
    for train in (True, False):
        got, mutated = jax.jit(
            lambda v, x, z: decoder.apply(v, x, z, train, mutable=["batch_stats"])
        )(variables, x, z)
        want, want_stats = _decoder64(
            variables64["params"], variables64["batch_stats"], features, latents, train
        )
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * scale)
        for a, b in zip(jax.tree.leaves(mutated["batch_stats"]), jax.tree.leaves(want_stats)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
        assert scale > 0.1


def _training_grad(model, batch_stats):
    """Gradient of sum(sin(3 logits)) of a Decoder in training mode with respect to (params, features,
    latents); aux: (logits, updated batch statistics)."""

    def loss(params, features, latents):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            features,
            latents,
            True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(3 * logits)), (logits, mutated)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("num_latents", [1, 4])
def test_recomputed_blocks_give_the_same_values_gradients_and_statistics(num_latents, kernels):
    """remat=True stores only block inputs and runs the blocks again in the backward pass (the
    kernel set's `recomputed`)."""
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.normal(size=(2, 40, 12)), jnp.float32)
    latents = jnp.asarray(rng.normal(size=(2, num_latents, 6)), jnp.float32)
    plain = Decoder(16, 3, kernels=kernels)
    recomputed = Decoder(16, 3, remat=True, kernels=kernels)
    variables = plain.init(jax.random.key(0), features, latents, False)
    params = _random_like(variables["params"], 2)

    def grads(model):
        grad = _training_grad(model, variables["batch_stats"])
        return jax.jit(grad)(params, features, latents)

    expected, (logits, stats) = grads(plain)
    got, (logits_r, stats_r) = grads(recomputed)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves((got, stats_r)), jax.tree.leaves((expected, stats))):
        assert_close_to_scale(a, b)
    assert float(jnp.max(jnp.abs(got[0]["block1"]["dense1"]["kernel"]))) > 0  # not vacuous


def _decode_loss(model, batch_stats, locations, patches, latents):
    """params -> (sum of sin(3 logits) of OSSNet.decode in training, the logits)."""

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            locations,
            patches,
            latents,
            True,
            method=OSSNet.decode,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(3 * logits)), logits

    return loss


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("mode", ["decoder", "all"])
def test_recomputed_patch_encoder_and_blocks_give_the_same_decoder_gradients(mode, kernels):
    """OSSNet(remat='decoder') recomputes the decoder blocks, 'all' the patch encoder too: logits and
    parameter gradients unchanged."""
    rng = np.random.default_rng(5)
    kwargs = dict(
        grid_shape=(8, 8, 8),
        encoder_channels=(4,),
        decoder_width=16,
        decoder_blocks=2,
        kernels=kernels,
    )
    plain, recomputed = OSSNet(patch_size=3, **kwargs), OSSNet(patch_size=3, remat=mode, **kwargs)
    locations = jnp.asarray(rng.integers(0, 8, size=(2, 30, 3)), jnp.int32)
    patches = jnp.asarray(rng.normal(size=(2, 30, 3, 3, 3, 2)), jnp.float32)
    latents = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    variables = plain.init(
        jax.random.key(0), locations, patches, latents, False, method=OSSNet.decode
    )
    params = _random_like(variables["params"], 6)

    def grads(model):
        loss = _decode_loss(model, variables["batch_stats"], locations, patches, latents)
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (expected, logits), (got, logits_r) = grads(plain), grads(recomputed)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert_close_to_scale(a, b)
    assert float(jnp.max(jnp.abs(got["patch_net"]["conv1"]["kernel"]))) > 0  # not vacuous


@pytest.mark.slow
def test_recomputed_blocks_keep_their_memory_saving_under_the_entry_points_flags():
    """CPU set only (its `recomputed` ties the recomputation to the gradient). XLA's memory
    analysis of the compiled gradient: with remat the blocks' activations are not stored. The
    session compiles with xla_cpu.FLAGS (conftest), whose reassociation once let XLA fold
    the recomputation's dependency on the gradient (0 * g) and run it in the forward pass: the saving
    was gone (temporaries 54.0 against 55.0 MiB here; 14.1 MiB with a dependency it cannot fold)."""
    features, latents = jnp.zeros((1, 4096, 16)), jnp.zeros((1, 6, 8))

    def temporaries(model):
        variables = model.init(jax.random.key(0), features, latents, False)
        grad = jax.jit(_training_grad(model, variables["batch_stats"]))
        compiled = grad.lower(variables["params"], features, latents).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temporaries(Decoder(64, 5, kernels="cpu"))
    recomputed = temporaries(Decoder(64, 5, remat=True, kernels="cpu"))
    assert recomputed < 0.5 * plain, (recomputed, plain)


def test_after_gradient_is_the_input_for_finite_and_infinite_gradients():
    """CPU set internals."""
    x = jnp.asarray([[1.5, -2.0], [0.0, 3.25]], jnp.float32)
    for first in (0.7, -0.0, -4.0, jnp.inf, -jnp.inf):
        g = jnp.full((2, 3), 1.0).at[0, 0].set(first)
        np.testing.assert_array_equal(np.asarray(after_gradient(x, g)), np.asarray(x))
    g = jnp.ones((2, 3)).at[0, 0].set(jnp.nan)
    assert bool(jnp.all(jnp.isnan(after_gradient(x, g))))


def test_recomputed_blocks_refuse_dropout():
    features, latents = jnp.zeros((1, 4, 3)), jnp.zeros((1, 1, 2))
    with pytest.raises(ValueError, match="train.remat"):
        Decoder(8, 1, dropout=0.1, remat=True).init(jax.random.key(0), features, latents, False)


@pytest.mark.slow
def test_weight_gradients_need_no_transposed_copy_of_the_output_gradients():
    """The dense layers run over (rows, F): XLA then takes each weight gradient without first
    writing the layer's output gradient as a (width, rows) array (layers.over_rows). Checked in the
    CPU set, whose conditional batch norm and PAU backward rules are in the compiled program."""
    features = jax.random.normal(jax.random.key(0), (2, 64, 32))
    latents = jax.random.normal(jax.random.key(1), (2, 3, 8))
    model = Decoder(width=32, blocks=2, kernels="cpu")
    variables = model.init(jax.random.key(2), features, latents, train=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            features,
            latents,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits**2)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    assert "f32[2,64,32]" in hlo  # the location features are in the program
    assert "f32[32,128]" not in hlo  # (width, 2 x 64 rows): a transposed gradient


def test_remat_mode_reads_modes_and_the_old_booleans():
    assert [remat_mode(v) for v in ("none", "decoder", "all", True, False)] == [
        "none",
        "decoder",
        "all",
        "all",
        "none",
    ]
    with pytest.raises(ValueError, match="train.remat must be one of"):
        remat_mode("patches")


@pytest.mark.slow
def test_remat_modes_order_the_compiled_memory_of_a_decode_gradient():
    """CPU set only (remat's memory on XLA:CPU). XLA's memory analysis of OSSNet.decode's gradient:
    'decoder' stores less than 'none' (the blocks' activations), 'all' less again (the patch
    encoder's activations)."""
    kwargs = dict(
        grid_shape=(16, 16, 16), encoder_channels=(4,), decoder_width=64, decoder_blocks=3
    )
    locations = jnp.zeros((1, 2048, 3), jnp.int32)
    patches, latents = jnp.zeros((1, 2048, 5, 5, 5, 1)), jnp.zeros((1, 4, 8))

    def temporaries(mode):
        model = OSSNet(patch_size=5, remat=mode, kernels="cpu", **kwargs)
        variables = model.init(
            jax.random.key(0), locations, patches, latents, False, method=OSSNet.decode
        )

        loss = _decode_loss(model, variables["batch_stats"], locations, patches, latents)
        compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, decoder, everything = (temporaries(m) for m in ("none", "decoder", "all"))
    assert everything < decoder < none, (everything, decoder, none)
