"""The analytic FLOP count per location reproduces the official count of OSS-Net C (8.44 MFLOP)."""

import importlib

from ossnet_jax.models.flops import decoder_input_width, flops_per_point


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config("brats")


def test_oss_net_c_matches_the_official_count():
    flops = flops_per_point(_config("oss_net_c"))
    assert decoder_input_width(_config("oss_net_c")) == 3 + 343 + 320
    assert round(flops["cbn_blocks"] / 1e6, 2) == 6.08
    assert round(flops["patch_convs"] / 1e6, 2) == 2.35
    assert round(flops["total"] / 1e6, 2) == 8.44


def test_variants_differ_where_their_inputs_do():
    onet, a, b, d = (
        flops_per_point(_config(n)) for n in ("o_net", "oss_net_a", "oss_net_b", "oss_net_d")
    )
    assert onet["patch_convs"] == 0
    assert onet["cbn_blocks"] == 2 * (323 * 512 * 2 + 512 * 512) + 4 * 4 * 512 * 512
    assert b["patch_convs"] == 2 * 343 * 343 * (8 * 4 + 4)  # large patches: 8 -> 4 -> 1 channels
    assert d["cbn_blocks"] - a["cbn_blocks"] == 2 * 2 * 32 * 512  # 32 Fourier features, 2 layers
