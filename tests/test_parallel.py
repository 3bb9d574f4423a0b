"""Data parallelism: the 2-device train step equals the 1-device step on the same global batch.

Runs in a subprocess because the device count is fixed when jax starts:
XLA_FLAGS=--xla_force_host_platform_device_count=2 is set there before jax is imported.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import functools, os, pathlib, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec
    from ossnet_jax import parallel, training
    from ossnet_jax.data import dataset
    from ossnet_jax.models.oss_net import build_model
    from ossnet_jax.train_state import init_state, make_optimizer
    from tests.conftest import tiny_config

    assert jax.device_count() == 2, jax.devices()
    assert parallel.data_mesh(3) is None and parallel.data_mesh(4).size == 2
    config = tiny_config(pathlib.Path(sys.argv[1]))
    config.model.activation = "relu"  # compiles faster; sharding is what is tested
    train_cases, _ = dataset.load_split(config)
    model, tx = build_model(config), make_optimizer(config)
    state = init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(training.train_step, model=model, tx=tx, config=config))
    batch = dataset.stack_batch(train_cases[:2])
    device = jax.devices()[0]
    one, out_one = step(jax.device_put(state, device), jax.device_put(batch, device), jax.random.key(1))
    mesh = parallel.data_mesh(2)
    sharded = parallel.shard_batch(batch, mesh)
    assert sharded["image"].sharding.spec == PartitionSpec("data")
    assert [s.data.shape[0] for s in sharded["image"].addressable_shards] == [1, 1]
    two, out_two = step(parallel.replicate(state, mesh), sharded, jax.random.key(1))
    assert len(two.params.fast["decoder_net"]["out"]["kernel"].sharding.device_set) == 2
    np.testing.assert_allclose(float(out_two["loss"]), float(out_one["loss"]), rtol=1e-5)
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(one, name)), jax.tree.leaves(getattr(two, name))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    print("OK", float(out_one["loss"]), float(out_two["loss"]))
    """
)


def test_two_device_step_equals_one_device_step(synthetic_root, tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(synthetic_root)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.startswith("OK")
