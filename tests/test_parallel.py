"""Several devices: the 2-device train step equals the 1-device step on the same global batch, with
the batch split over 'data' and with one volume's locations split over 'points', and evaluation
dealt over 2 devices equals evaluation on one.

The 2-device side runs in a subprocess, one for both tests, because the device count is fixed when
jax starts: XLA_FLAGS=--xla_force_host_platform_device_count=2 is set there before jax is imported.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ossnet_jax import checkpointing, evaluation, files
from ossnet_jax.data import dataset, nifti
from ossnet_jax.families.oss_net.model import build_model
from ossnet_jax.families.oss_net.step import init_state
from ossnet_jax.train_state import make_optimizer
from tests.conftest import COMPILE_FAST, mechanics_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict:
    """The test's environment for a subprocess that sets its own device count."""
    return {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": COMPILE_FAST}


# One python with two CPU devices runs the checks named in its 4th argument, each in a function of
# its own, and prints as its last line {check: "OK" or the traceback of its failure}.
SCRIPT = textwrap.dedent(
    """
    import functools, json, os, pathlib, sys, traceback
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec
    from ossnet_jax import evaluation, parallel
    from ossnet_jax.data import dataset
    from ossnet_jax.families.oss_net import step as oss_net_step
    from ossnet_jax.families.oss_net.model import build_model
    from ossnet_jax.families.oss_net.step import init_state
    from ossnet_jax.train_state import make_optimizer
    from tests.conftest import mechanics_config

    assert jax.device_count() == 2, jax.devices()
    root, workdir, out_dir, checks = sys.argv[1:5]
    shape = lambda mesh: None if mesh is None else dict(mesh.shape)


    def steps():
        mesh_of = lambda b, n, p: shape(parallel.data_mesh(b, num_points=n, points_devices=p))
        assert mesh_of(3, 128, 1) is None  # the batch only: 3 volumes on one device
        assert mesh_of(4, 128, 0) == {"data": 2, "points": 1}
        assert mesh_of(3, 128, 0) == mesh_of(1, 128, 0) == {"data": 1, "points": 2}
        assert mesh_of(2, 128, 2) == {"data": 1, "points": 2}
        assert mesh_of(1, 127, 0) is None  # auto: no divisor of 127 but 1 fits in 2 devices
        for points, n, error in (
            (2, 127, "must divide by train.points_devices 2"),
            (4, 128, "exceed"),
        ):
            try:
                mesh_of(1, n, points)
                raise AssertionError(f"no ValueError for points_devices {points}")
            except ValueError as e:
                assert error in str(e), e

        config = mechanics_config(pathlib.Path(root))
        train_cases, _ = dataset.load_split(config)
        model, tx = build_model(config), make_optimizer(config)
        state = init_state(config, model, tx, jax.random.key(0))
        device = jax.devices()[0]
        rng = jax.random.key(1)

        def assert_same(one, out_one, two, out_two):  # loss, parameters, BN statistics, optimizer
            np.testing.assert_allclose(float(out_two["loss"]), float(out_one["loss"]), rtol=1e-5)
            leaf = two.params.fast["decoder_net"]["out"]["kernel"]
            assert len(leaf.sharding.device_set) == 2 and leaf.sharding.is_fully_replicated
            for name in ("params", "batch_stats", "opt_state"):
                pairs = zip(
                    jax.tree.leaves(getattr(one, name)), jax.tree.leaves(getattr(two, name))
                )
                for a, b in pairs:
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)

        # Batch 2 over 'data' = 2: the composed step, each device one volume.
        step = jax.jit(
            functools.partial(oss_net_step.train_step, model=model, tx=tx, config=config)
        )
        batch = dataset.stack_batch(train_cases[:2])
        one, out_one = step(jax.device_put(state, device), jax.device_put(batch, device), rng)
        mesh = parallel.data_mesh(2, num_points=config.train.num_points, points_devices=0)
        assert shape(mesh) == {"data": 2, "points": 1}
        sharded = parallel.shard_batch(batch, mesh)
        assert sharded["image"].sharding.spec == PartitionSpec("data")
        assert [s.data.shape[0] for s in sharded["image"].addressable_shards] == [1, 1]
        two, out_two = step(parallel.replicate(state, mesh), sharded, rng)
        assert_same(one, out_one, two, out_two)

        # Batch 1 over 'points' = 2: the host loop's two stages, each device half of the locations.
        update = jax.jit(
            functools.partial(oss_net_step.update_step, model=model, tx=tx, config=config)
        )

        def prepared(batch, mesh):
            prepare = lambda *a: parallel.shard_inputs(
                oss_net_step.prepare_inputs(*a, config), mesh
            )
            return jax.jit(prepare)(batch, rng, jnp.int32(0))

        batch = dataset.stack_batch(train_cases[:1])
        one, out_one = update(
            jax.device_put(state, device), prepared(jax.device_put(batch, device), None), rng
        )
        mesh = parallel.data_mesh(1, num_points=config.train.num_points, points_devices=0)
        assert shape(mesh) == {"data": 1, "points": 2}
        inputs = prepared(parallel.shard_batch(batch, mesh), mesh)
        assert set(inputs) == {"low", "locations", "index", "patches", "coarse"}
        n = config.train.num_points
        split = parallel.input_shardings(inputs, mesh)
        for key in ("locations", "index", "patches"):
            assert split[key].spec == PartitionSpec("data", "points"), key
            assert inputs[key].sharding.is_equivalent_to(split[key], inputs[key].ndim), key
            assert [s.data.shape[:2] for s in inputs[key].addressable_shards] == [(1, n // 2)] * 2
        for key in ("low", "coarse"):
            assert inputs[key].sharding.is_fully_replicated, key  # (1, ...) whole on both devices
        two, out_two = update(parallel.replicate(state, mesh), inputs, rng)
        assert_same(one, out_one, two, out_two)


    def evaluate():
        assert jax.local_device_count() == 2, jax.devices()
        config = evaluation.load_config(workdir)
        predictors, _ = evaluation.restore_predictors(config, workdir, jax.local_devices())
        placed = [jax.tree.leaves(p.variables)[0].devices() for p in predictors]
        assert placed == [{d} for d in jax.local_devices()], placed
        train, val = dataset.load_split(config)
        evaluation.evaluate(config, workdir, train + val, out_dir)


    results = {}
    for check in checks.split(","):
        try:
            {"steps": steps, "evaluate": evaluate}[check]()
            results[check] = "OK"
        except Exception:
            results[check] = traceback.format_exc()
    print(json.dumps(results))
    """
)
CHECKS = {  # test -> the check of SCRIPT it reads
    "test_two_device_steps_over_data_and_over_points_equal_one_device_steps": "steps",
    "test_two_device_evaluation_equals_one_device": "evaluate",
}


@pytest.fixture(scope="module")
def two_devices(request, synthetic_root, tmp_path_factory):
    """(results, workdir, out_dir): one SCRIPT process runs the checks of this module's selected
    tests; `evaluate` evaluates the untrained checkpoint written here in WORKDIR into OUT_DIR."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    checks = [check for test, check in CHECKS.items() if test in selected]
    folder = tmp_path_factory.mktemp("parallel")
    workdir, out_dir = folder / "run", folder / "two"
    config = mechanics_config(synthetic_root)
    dataset.load_split(config)  # writes the dataset and its cache before the child reads them
    if "evaluate" in checks:
        model, tx = build_model(config), make_optimizer(config)
        ckpt = checkpointing.Checkpoints(workdir, writer=True)
        ckpt.save(1, init_state(config, model, tx, jax.random.key(0)))  # untrained: noisy labels
        ckpt.close()
        files.write_json(workdir / "config.json", json.loads(config.to_json()))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(synthetic_root), str(workdir), str(out_dir)]
        + [",".join(checks)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1]), workdir, out_dir


def test_two_device_steps_over_data_and_over_points_equal_one_device_steps(two_devices):
    results, _, _ = two_devices
    assert results["steps"] == "OK", results["steps"]


@pytest.mark.slow
def test_two_device_evaluation_equals_one_device(two_devices, synthetic_root, tmp_path):
    """6 cases dealt over 2 devices (3 each, in threads) give the 1-device predictions and rows."""
    results, workdir, out_dir = two_devices
    assert results["evaluate"] == "OK", results["evaluate"]
    config = mechanics_config(synthetic_root)
    train, val = dataset.load_split(config)
    one = evaluation.evaluate(config, workdir, train + val, tmp_path / "one")
    two = json.loads((out_dir / "metrics.json").read_text())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(two["cases"]) == drop(one["cases"]) and two["mean"] == one["mean"]
    assert 0 < one["mean"]["dice"] < 1  # labels of an untrained model: a sensitive comparison
    for case in train + val:
        a, _ = nifti.load_nifti(tmp_path / "one" / "predictions" / f"{case.id}.nii.gz")
        b, _ = nifti.load_nifti(out_dir / "predictions" / f"{case.id}.nii.gz")
        np.testing.assert_array_equal(a, b)
