"""The FLOP count of ossnet_jax/models/flops.py: what the compiled decoder executes, by XLA's own count,
and the official release's count of OSS-Net C (8.44 MFLOP per location) kept apart from it."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from ossnet_jax.families.oss_net.model import OSSNet, build_model, patch_channels
from ossnet_jax.models.flops import (
    compiled_flops,
    decoder_flops,
    decoder_input_width,
    flops_per_point,
    flops_per_volume,
    latent_size,
    official_flops_per_point,
    same_conv_taps,
)
from tests.conftest import tiny_config

# XLA's count and the analytic one differ by the location code and casts (a few FLOPs per location);
# with ReLU, XLA also duplicates the cheap elementwise producers of a value into each of its consumers'
# fusions (block outputs feed the next block's Linear and shortcut), work the analytic count leaves out
# (5 % for this 16-wide decoder, 2 % at 128)
TOLERANCE = {"pau": 0.01, "relu": 0.1}


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config("brats")


def _xla_decoder_flops(config, points: int, volumes: int) -> float:
    """XLA's cost analysis of the compiled OSSNet.decode (evaluation mode) on zero inputs."""
    model = build_model(config)
    s = config.model.patch_size
    locations = jnp.zeros((volumes, points, 3), jnp.int32)
    patches = None
    if config.model.patches:
        patches = jnp.zeros((volumes, points, s, s, s, patch_channels(config)), jnp.float32)
    k = config.model.decoder_blocks + 1 if config.model.encoder == "skip" else 1
    latents = jnp.zeros((volumes, k, latent_size(config)), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), locations, patches, latents, train=False, method=OSSNet.decode
        )
    )

    def forward(v, locations, patches, latents):
        return model.apply(v, locations, patches, latents, train=False, method=OSSNet.decode)

    return compiled_flops(jax.jit(forward).lower(variables, locations, patches, latents).compile())


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize(
    "variant",
    [
        {},  # OSS-Net C: 7^3 patches of 4 channels, PAU
        {"large_patches": True, "fourier_features": 4, "decoder_width": 24},  # B / D-like
        {"patches": False},  # O-Net-like: the Linear layers and the elementwise work alone
        {"patches": False, "activation": "relu"},
    ],
    ids=["c", "large_fourier", "no_patches", "no_patches_relu"],
)
def test_count_equals_xla_cost_analysis_of_the_compiled_decoder(tmp_path, kernels, variant):
    config = tiny_config(tmp_path, kernels=kernels, **variant)
    points, volumes = 96, 2
    xla = _xla_decoder_flops(config, points, volumes)
    analytic = decoder_flops(config, points, volumes)
    tolerance = TOLERANCE[config.model.activation]
    assert analytic == pytest.approx(xla, rel=tolerance), (kernels, variant, analytic, xla)
    # the parts add up; in a 16-wide decoder the elementwise work is as large as the products
    matmul = decoder_flops(config, points, volumes, part="matmul")
    elementwise = decoder_flops(config, points, volumes, part="elementwise")
    assert matmul + elementwise == analytic
    assert matmul > 0 and elementwise > 0


def test_latent_0_is_per_volume_work():
    config = _config("oss_net_c")
    w, lat, fin = 512, latent_size(config), decoder_input_width(config)
    assert (lat, fin) == (320, 3 + 343 + 320)
    per_point = flops_per_point(config, kernels="cpu")
    official = official_flops_per_point(config)
    # dense1 and the shortcut of the first block multiply latent 0's 320 rows once per volume
    assert official["cbn_blocks"] - per_point["dense"] == 2 * 2 * lat * w
    assert flops_per_volume(config)["matmul"] == 2 * 2 * lat * w + 10 * 2 * 2 * lat * w
    # spread over 8,192 locations the per-volume work is under 0.1 % of the forward
    assert flops_per_volume(config)["total"] / 8192 < 1e-3 * per_point["total"]


def test_patch_convolutions_per_kernel_set():
    config = _config("oss_net_c")
    assert same_conv_taps(7, 7) == 37**3
    assert same_conv_taps(5, 3) == 13**3  # per axis 2 + 3 + 3 + 3 + 2
    cpu = flops_per_point(config, kernels="cpu")["patch_convs"]
    xla = flops_per_point(config, kernels="xla")["patch_convs"]
    assert cpu == 2 * 343 * 343 * (4 * 2 + 2 * 1)  # the dense (343 Cin, 343 Cout) matrices
    assert xla == 2 * 37**3 * (4 * 2 + 2 * 1)  # the taps that read inside the patch
    large = flops_per_point(_config("oss_net_b"), kernels="cpu")["patch_convs"]
    assert large == 2 * 343 * 343 * (8 * 4 + 4)  # large patches: 8 -> 4 -> 1 channels


def test_oss_net_c_executed_count_at_the_brats_sizes():
    config = _config("oss_net_c")
    cpu, xla = flops_per_point(config, kernels="cpu"), flops_per_point(config, kernels="xla")
    assert round(cpu["matmul"] / 1e6, 2) == 7.78
    assert round(cpu["total"] / 1e6, 2) == 7.96
    assert round(xla["matmul"] / 1e6, 2) == 6.44
    assert cpu["dense"] == xla["dense"] == 2 * 2 * 346 * 512 + 2 * 512 * 512 + 4 * 4 * 512 * 512


def test_official_count_of_oss_net_c():
    flops = official_flops_per_point(_config("oss_net_c"))
    assert round(flops["cbn_blocks"] / 1e6, 2) == 6.08
    assert round(flops["patch_convs"] / 1e6, 2) == 2.35
    assert round(flops["total"] / 1e6, 2) == 8.44


def test_variants_differ_where_their_inputs_do():
    onet, a, b, d = (
        flops_per_point(_config(n), kernels="cpu")
        for n in ("o_net", "oss_net_a", "oss_net_b", "oss_net_d")
    )
    fourier = _config("oss_net_d")
    fourier.model.fourier_features = 16  # the paper's D; the release's has none
    d16 = flops_per_point(fourier, kernels="cpu")
    assert onet["patch_convs"] == 0
    assert onet["dense"] == 2 * (3 * 512 * 2 + 512 * 512) + 4 * 4 * 512 * 512
    assert d["dense"] == b["dense"] and d["fourier"] == 0  # D as released: B's inputs
    assert d16["dense"] - b["dense"] == 2 * 2 * 32 * 512  # 32 Fourier features, 2 layers
    assert d16["fourier"] == 2 * 3 * 16
    assert a == flops_per_point(_config("oss_net_c"), kernels="cpu")
