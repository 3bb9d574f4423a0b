"""benchmarks/lowering.py: the op census of programs lowered for cpu, cuda and tpu; its --check."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import lowering
from ossnet_jax.kernels.cpu.conv import SLAB_MIN_VOXELS
from tests.conftest import tiny_preset

SMALL = "configs/oss_net_c.py:small"
TINY = dict(batch=2, points=64, grid=(32, 32, 16))  # 3 encoder blocks below downscale 2: 2x2x1


def _convs_and_loop(x2: jax.Array, x3: jax.Array, k2: jax.Array, k3: jax.Array) -> jax.Array:
    """One 2D and one 3D 'same' convolution, and a scan (a while loop) over 3 steps."""
    y2 = jax.lax.conv_general_dilated(x2, k2, (1, 1), "SAME")
    y3 = jax.lax.conv_general_dilated(x3, k3, (1, 1, 1), "SAME")
    total, _ = jax.lax.scan(lambda c, _: (c + 1.0, None), jnp.sum(y2) + jnp.sum(y3), None, 3)
    return total


def test_census_counts_convolutions_by_spatial_dims_and_loops():
    args = (
        jnp.ones((1, 2, 8, 8)),
        jnp.ones((1, 2, 4, 4, 4)),
        jnp.ones((3, 2, 3, 3)),
        jnp.ones((3, 2, 3, 3, 3)),
    )
    traced = jax.jit(_convs_and_loop).trace(*args)
    for text, stage in (
        (traced.lower(lowering_platforms=("cuda",)).as_text(), "lowered"),
        (traced.lower().compile().as_text(), "compiled"),
    ):
        counts = lowering.census(text, stage)
        assert (counts["conv2d"], counts["conv3d"], counts["while"]) == (1, 1, 1), stage
        assert counts["all_gather"] == counts["all_reduce"] == 0


def test_load_config_takes_the_preset_after_the_colon():
    config = lowering.sized(lowering.load_config(SMALL), **TINY)
    assert config.data.grid_shape == TINY["grid"] and config.model.decoder_width == 128
    assert config.train.num_points == config.eval.batch_points == TINY["points"]
    assert lowering.load_config("configs/oss_net_c.py").data.grid_shape == (256, 256, 160)


def test_host_device_flags_replaces_a_count_and_keeps_other_flags():
    flags = lowering.host_device_flags("--a=1 --xla_force_host_platform_device_count=8", 2)
    assert flags == "--a=1 --xla_force_host_platform_device_count=2"


@pytest.mark.slow
def test_cpu_kernels_have_the_cpu_forms_and_fail_the_check_on_accelerators():
    """The small preset's encoder input, 48x48x32, has the slab kernel gradient's voxel count."""
    config = lowering.sized(lowering.load_config(SMALL), batch=2, points=64)
    low = [g // config.data.downscale for g in config.data.grid_shape]
    assert low[0] * low[1] * low[2] >= SLAB_MIN_VOXELS
    rows = {r["program"]: r for r in lowering.run(config, "cpu")}
    assert {r["kernels"] for r in rows.values()} == {"cpu"}
    update = rows["update"]
    assert update["conv2d"] > 0 and update["conv3d"] == 0 and update["while"] > 0
    assert rows["encode"]["conv2d"] > 0
    assert lowering.findings(list(rows.values())) == []  # platform cpu is not checked
    forced = lowering.run(lowering.sized(config, **TINY), "cuda", "cpu")
    assert any("update" in f and "conv2d" in f for f in lowering.findings(forced))


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_xla_kernels_are_the_plain_formulation_on_accelerators(platform):
    config = lowering.sized(lowering.load_config(SMALL), **TINY)
    # uniform sampling as in the official presets: with a border share, jnp.searchsorted puts a
    # while loop into 'prepare' (which --check reports)
    config.train.border_fraction = 0.0
    rows = {r["program"]: r for r in lowering.run(config, platform)}
    assert set(rows) == {"prepare", "update", "encode", "decode"}
    assert {r["kernels"] for r in rows.values()} == {"xla"}
    assert rows["update"]["conv3d"] > 0 and rows["encode"]["conv3d"] > 0
    for row in rows.values():
        assert row["conv2d"] == 0 and row["while"] == 0, row
    assert lowering.findings(list(rows.values())) == []


@pytest.mark.slow
def test_devices_run_compiles_the_sharded_step_with_all_reduces_only(tmp_path):
    command = [sys.executable, "-m", "benchmarks.lowering", "--platform", "cuda"]
    command += ["--config", tiny_preset(tmp_path), "--batch", "2", "--points", "64"]
    command += ["--devices", "2", "--check"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["program"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"prepare", "update"}
    assert {(r["stage"], r["kernels"]) for r in rows.values()} == {("compiled", "xla")}
    assert rows["update"]["all_reduce"] > 0 and rows["update"]["conv3d"] > 0
    assert rows["update"]["all_gather"] == rows["prepare"]["all_gather"] == 0
