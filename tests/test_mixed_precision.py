"""train.dtype / eval.dtype 'bfloat16': bfloat16 arithmetic, float32 parameters, loss and statistics."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ossnet_jax import kernels, train_state
from ossnet_jax.data import dataset
from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import build_model
from ossnet_jax.families.oss_net.predictor import Predictor
from ossnet_jax.families.unet.model import build_unet
from ossnet_jax.models import layers
from tests.conftest import TINY_GRID, tiny_config, tiny_unet_config


@pytest.mark.slow  # compiles a whole model; the quick tier checks every layer's dtype
def test_bfloat16_forward_is_close_to_float32(tmp_path):
    """Same float32 parameters: probabilities agree within 0.05 (bfloat16 keeps 8 mantissa bits)."""
    # the smallest model (one encoder block, one decoder block): the dtypes are what is tested
    config = tiny_config(tmp_path, activation="relu", encoder_channels=(4,), decoder_blocks=1)
    model32 = build_model(config)
    model16 = build_model(config, "bfloat16")
    image = jax.random.normal(jax.random.key(0), (2,) + TINY_GRID + (4,))
    locs = jax.random.randint(jax.random.key(1), (2, 64, 3), 0, jnp.asarray(TINY_GRID))
    low, patches = oss_net_model.model_inputs(config, image, locs)
    init = jax.jit(functools.partial(model32.init, train=False))
    variables = init(jax.random.key(2), low, locs, patches)
    (p32, s32), (p16, s16) = [
        jax.jit(functools.partial(m.apply, train=False))(variables, low, locs, patches)
        for m in (model32, model16)
    ]
    assert p16.dtype == jnp.float32 and s16.dtype == jnp.float32
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.sigmoid(p16), jax.nn.sigmoid(p32), atol=0.05)
    np.testing.assert_allclose(jax.nn.sigmoid(s16), jax.nn.sigmoid(s32), atol=0.05)
    assert not np.allclose(np.asarray(p16), np.asarray(p32), atol=1e-6)  # really computed in bf16


# What a bfloat16 model returns or keeps in float32: its logits, latents and segmentation logits,
# and the conditional batch norms' gamma and beta (Dense maps of the float32 latent)
_FLOAT32_OUTPUTS = re.compile(
    r"^(__call__|decoder_net/__call__|encoder_net/__call__)/|/(gamma|beta)/"
)


def _output_dtypes(model, config, train: bool) -> dict[str, np.dtype]:
    """{module path: dtype} of every module output of one forward pass, traced from shapes only."""
    low = jnp.zeros((2,) + tuple(g // 2 for g in TINY_GRID) + (4,))
    locs = jnp.zeros((2, 8, 3), jnp.int32)
    patches = jnp.zeros((2, 8, 7, 7, 7, 4), model.dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), low, locs, patches, False))
    apply = functools.partial(model.apply, capture_intermediates=True, mutable=True)
    _, state = jax.eval_shape(lambda v: apply(v, low, locs, patches, train), variables)
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf.dtype for path, leaf in flat}


def test_every_layer_of_encoder_patch_encoder_and_decoder_computes_in_bfloat16(tmp_path):
    """bfloat16: each layer's output (convolutions, batch norms, activations, dense layers) in the
    encoder, the patch encoder and the decoder, in training and in the predictor; float32: none."""
    config = tiny_config(tmp_path)
    config.eval.dtype = "bfloat16"
    model = Predictor(config, build_model(config), {}).model
    for dtypes in (
        _output_dtypes(build_model(config, "bfloat16"), config, True),
        _output_dtypes(model, config, False),
    ):
        wide = sorted(
            p for p, d in dtypes.items() if d != jnp.bfloat16 and not _FLOAT32_OUTPUTS.search(p)
        )
        assert wide == []
        for part in ("encoder_net/", "patch_net/", "decoder_net/"):
            assert sum(p.startswith(part) and d == jnp.bfloat16 for p, d in dtypes.items()) >= 6
    dtypes = _output_dtypes(build_model(config), config, True)
    assert {str(d) for d in dtypes.values()} == {"float32"}


@pytest.mark.slow  # compiles a whole model; the quick tier checks every layer's dtype
def test_bfloat16_train_step_keeps_float32_parameters(synthetic_root):
    # PAU in bfloat16: the test below; one encoder and one decoder block: the dtypes are tested
    config = tiny_config(synthetic_root, activation="relu", encoder_channels=(4,), decoder_blocks=1)
    config.train.dtype = "bfloat16"
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(oss_net_step.train_step, model=model, tx=tx, config=config))
    batch = jax.device_put(dataset.stack_batch(train_cases[:2]))
    new, out = step(state, batch, jax.random.key(1))
    assert out["loss"].dtype == jnp.float32 and np.isfinite(float(out["loss"]))
    assert int(out["skipped"]) == 0
    for tree in (new.params.fast, new.params.slow, new.batch_stats):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params.fast, state.params.fast)
    assert all(jax.tree.leaves(moved))


@pytest.mark.slow  # compiles a whole model; the quick tier checks every layer's dtype
def test_predictor_computes_in_eval_dtype(tmp_path):
    config = tiny_config(tmp_path, activation="relu", encoder_channels=(4,), decoder_blocks=1)
    model = build_model(config)
    image = jax.random.normal(jax.random.key(0), TINY_GRID + (4,))
    locs = np.asarray(jax.random.randint(jax.random.key(1), (100, 3), 0, jnp.asarray(TINY_GRID)))
    low, patches = oss_net_model.model_inputs(config, image[None], jnp.asarray(locs)[None])
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(2), low, jnp.asarray(locs)[None], patches)
    probs = {}
    for dtype in ("float32", "bfloat16"):
        config.eval.dtype = dtype
        predictor = Predictor(config, model, variables)
        latents, _, source = predictor.encode(variables, image)
        probs[dtype] = predictor.decode_all(latents, source, locs)
    np.testing.assert_allclose(probs["bfloat16"], probs["float32"], atol=0.05)
    assert not np.allclose(probs["bfloat16"], probs["float32"], atol=1e-6)


def test_unknown_dtype_is_rejected(tmp_path):
    config = tiny_config(tmp_path)
    config.train.dtype = "float16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_model(config)


def test_unets_reject_bfloat16_instead_of_ignoring_it(tmp_path):
    config = tiny_unet_config(tmp_path, "unet3d")
    config.eval.dtype = "bfloat16"
    with pytest.raises(ValueError, match="float32 only"):
        build_unet(config)


@pytest.mark.parametrize("kernel_set", ["xla", "cpu"])
def test_pau_gradients_in_bfloat16_are_close_to_float32(kernel_set):
    """bfloat16 input, float32 coefficients (cast to bfloat16 inside the loss): coefficient
    gradients within 2 %, accumulated in float32 by both kernel sets."""
    pau = kernels.get(kernel_set).pau
    x = (jax.random.normal(jax.random.key(0), (64, 32)) * 2).astype(jnp.bfloat16)
    a = jnp.asarray(layers.PAU_INIT_NUMERATOR)
    b = jnp.asarray(layers.PAU_INIT_DENOMINATOR)

    def loss(x, a, b):
        y = pau(x, a.astype(x.dtype), b.astype(x.dtype))
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(x.astype(jnp.float32)))

    g32 = jax.grad(loss, argnums=(0, 1, 2))(x.astype(jnp.float32), a, b)  # same input values
    g16 = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    assert g16[1].dtype == jnp.float32 and g16[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16[0], np.float32), g32[0], rtol=0.05, atol=0.05)
    for got, expected in zip(g16[1:], g32[1:]):
        np.testing.assert_allclose(got, expected, rtol=0.02, atol=0.02 * np.abs(expected).max())
