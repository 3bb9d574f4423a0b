"""Several devices: the 2-device train step equals the 1-device step on the same global batch, and
evaluation dealt over 2 devices equals evaluation on one.

Runs in a subprocess because the device count is fixed when jax starts:
XLA_FLAGS=--xla_force_host_platform_device_count=2 is set there before jax is imported.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np

from ossnet_jax import checkpointing, evaluation, files
from ossnet_jax.data import dataset, nifti
from ossnet_jax.models.oss_net import build_model
from ossnet_jax.train_state import init_state, make_optimizer
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict:
    """The test's environment for a subprocess that sets its own device count."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    return env


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
    config.model.encoder_channels = (4,)
    config.model.decoder_blocks = 1
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


def _on_two_devices(script: str, *args: str) -> str:
    """Runs `script` in a fresh python with two CPU devices; asserts it succeeds, returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_two_device_step_equals_one_device_step(synthetic_root, tmp_path):
    assert _on_two_devices(SCRIPT, str(synthetic_root)).startswith("OK")


EVALUATE = textwrap.dedent(
    """
    import os, pathlib, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    from ossnet_jax import evaluation
    from ossnet_jax.data import dataset

    assert jax.local_device_count() == 2, jax.devices()
    workdir, out_dir = sys.argv[1:3]
    config = evaluation.load_config(workdir)
    predictors, _ = evaluation.restore_predictors(config, workdir, jax.local_devices())
    placed = [jax.tree.leaves(p.variables)[0].devices() for p in predictors]
    assert placed == [{d} for d in jax.local_devices()], placed
    train, val = dataset.load_split(config)
    evaluation.evaluate(config, workdir, train + val, out_dir)
    print("OK")
    """
)


def test_two_device_evaluation_equals_one_device(synthetic_root, tmp_path):
    """6 cases dealt over 2 devices (3 each, in threads) give the 1-device predictions and rows."""
    config = tiny_config(synthetic_root)
    config.model.activation = "relu"
    config.eval.meshes = False
    config.eval.pictures = False
    workdir = tmp_path / "run"
    model, tx = build_model(config), make_optimizer(config)
    ckpt = checkpointing.Checkpoints(workdir, writer=True)
    ckpt.save(1, init_state(config, model, tx, jax.random.key(0)))  # untrained: noisy labels
    ckpt.close()
    files.write_json(workdir / "config.json", json.loads(config.to_json()))
    train, val = dataset.load_split(config)
    one = evaluation.evaluate(config, workdir, train + val, tmp_path / "one")
    _on_two_devices(EVALUATE, str(workdir), str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(two["cases"]) == drop(one["cases"]) and two["mean"] == one["mean"]
    assert 0 < one["mean"]["dice"] < 1  # labels of an untrained model: a sensitive comparison
    for case in train + val:
        a, _ = nifti.load_nifti(tmp_path / "one" / "predictions" / f"{case.id}.nii.gz")
        b, _ = nifti.load_nifti(tmp_path / "two" / "predictions" / f"{case.id}.nii.gz")
        np.testing.assert_array_equal(a, b)
