"""Multi-process training: two local CPU processes joined by jax.distributed train like one process.

The processes find each other through a coordinator on 127.0.0.1 (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, as a cluster launcher would set them) and exchange data with gloo.
'auto' start-up is tested on the SLURM variables of a two-task job step on this machine.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from ossnet_jax import checkpointing, distributed, train_state, training
from ossnet_jax.data import dataset, schedule
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import build_model
from tests.conftest import COMPILE_FAST, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# What train.py does, with the tiny configuration of these tests instead of a config file.
PROCESS = textwrap.dedent(
    """
    import pathlib, sys
    from ossnet_jax import distributed, training
    from tests.test_multihost import run_config

    distributed.initialize(distributed.settings())
    training.train_and_evaluate(run_config(pathlib.Path(sys.argv[1])), sys.argv[2])
    """
)


def run_config(root: pathlib.Path) -> ml_collections.ConfigDict:
    """tiny_config as an O-Net, 2 steps at batch 2 from 2 case shards, validated and saved at step 2."""
    config = tiny_config(root)
    config.model.activation = "relu"  # O-Net with ReLU compiles fastest; what is tested does not
    config.model.encoder = "plain"  # depend on the variant
    config.model.patches = False
    config.model.seg_head = False
    config.model.encoder_channels = (4,)
    config.model.decoder_blocks = 1
    config.train.steps = 2
    config.train.log_every = 1
    config.train.case_shards = 2  # the single-process run replays the 2-process batches
    config.eval.meshes = False
    config.eval.pictures = False
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_state(workdir: pathlib.Path, config: ml_collections.ConfigDict):
    model = build_model(config)
    template = oss_net_step.init_state(
        config, model, train_state.make_optimizer(config), jax.random.key(0)
    )
    ckpt = checkpointing.Checkpoints(workdir)
    try:
        return ckpt.restore(config.train.steps, template)
    finally:
        ckpt.close()


def test_schedule_splits_each_batch_between_the_processes_shards():
    for step in range(5):
        np.testing.assert_array_equal(  # one shard: the single-process schedule
            schedule.batch_indices(step, 4, 9, seed=3, shards=1),
            dataset.case_indices(step, 4, 9, 3),
        )
    for process in range(2):
        mine = schedule.process_cases(9, 4, process, 2)
        assert mine == (range(0, 4) if process == 0 else range(4, 9))
        rows = schedule.process_slots(8, process, 2)
        for step in range(6):
            assert set(schedule.batch_indices(step, 8, 9, 0, 4)[rows]) <= set(mine)
    epoch = np.concatenate([schedule.batch_indices(s, 4, 8, 0, 2) for s in range(2)])
    assert sorted(epoch) == list(range(8))  # 2 steps of 2 x 2 slots: each case once
    assert schedule.resolve_shards(0, 8, 9, processes=2) == 2
    with pytest.raises(ValueError, match="case_shards"):
        schedule.resolve_shards(3, 8, 9, processes=1)  # does not divide the batch


def test_settings_come_from_arguments_or_environment():
    assert distributed.settings(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=env) == distributed.Settings("h:1", 4, 3)
    assert distributed.settings("g:2", 2, 0, environ=env) == distributed.Settings("g:2", 2, 0)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.settings("g:2", environ={})
    with pytest.raises(ValueError, match="not in"):
        distributed.settings("g:2", 2, 2, environ={})


def test_auto_mode_takes_no_arguments_and_manual_is_unchanged():
    assert distributed.settings(mode="auto", environ={}) == distributed.Settings(None, None, None)
    for given in ({"coordinator_address": "h:1"}, {"num_processes": 2}, {"process_id": 0}):
        with pytest.raises(ValueError, match="detects the cluster itself: leave out --"):
            distributed.settings(mode="auto", **given)
    with pytest.raises(ValueError, match="unknown distributed mode"):
        distributed.settings(mode="slurm")


# What train.py --distributed=auto does, then one exchange between the processes.
AUTO = textwrap.dedent(
    """
    import jax
    from ossnet_jax import distributed

    distributed.initialize(distributed.settings(mode="auto"))
    print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
    print("process 1 says yes:", distributed.any_process(jax.process_index() == 1))
    """
)


def test_auto_mode_finds_a_slurm_job_and_fails_clearly_outside_a_cluster():
    """Two processes with a SLURM job step's variables (2 tasks on node 127.0.0.1) join without
    coordinator, count or id; a third without them is told that no cluster was found."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COORDINATOR_PORT": str(_free_port())}
    env["XLA_FLAGS"] = COMPILE_FAST  # one CPU device per process
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_"))}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2"}
    tasks = [{**env, **slurm, "SLURM_PROCID": str(p), "SLURM_LOCALID": str(p)} for p in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", AUTO],
            cwd=REPO,
            env=task_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task_env in [*tasks, env]
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, index, (out, err) in zip(processes, range(2), outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        mine = [line for line in out.splitlines() if line.startswith("process")]  # not gloo's
        assert mine == [f"process {index} of 2 devices 2", "process 1 says yes: True"]
    out, err = outputs[2]
    assert processes[2].returncode == 1 and "--distributed=auto: JAX found no cluster" in err


@pytest.mark.slow
def test_two_processes_reach_the_parameters_of_one(synthetic_root, tmp_path):
    config = run_config(synthetic_root)
    dataset.load_split(config)  # writes the dataset and its cache before the processes read them
    shared = tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COORDINATOR_ADDRESS": address}
    env["XLA_FLAGS"] = COMPILE_FAST  # one CPU device per process
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(synthetic_root), str(shared)],
            cwd=REPO,
            env={**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(p)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    try:
        single = training.train_and_evaluate(config, str(tmp_path / "one"))  # meanwhile
        outputs = [p.communicate(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert "validation Dice" in outputs[0][0] + outputs[0][1]
    assert "validation Dice" not in outputs[1][0] + outputs[1][1]  # notes and bars: process 0
    assert "train:" not in outputs[1][1]

    one = [json.loads(r) for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(r) for r in (shared / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 2]  # written once
    for a, b in zip(one, two):
        for key in ("loss", "val_dice"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    saved = json.loads((shared / "config.json").read_text())
    assert saved["train"]["case_shards"] == 2 and saved["model"]["activation"] == "relu"
    evaluated = json.loads((shared / "eval" / "metrics.json").read_text())
    assert [c["id"] for c in evaluated["cases"]] == [c["id"] for c in single["cases"]]

    a, b = _final_state(tmp_path / "one", config), _final_state(shared, config)
    for name in ("params", "batch_stats", "opt_state"):
        for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
