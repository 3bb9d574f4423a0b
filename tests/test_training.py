"""The train step, the optimizer recipe, checkpoints, resuming, and train -> evaluate end to end."""

import functools
import json
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array

from ossnet_jax import (
    checkpointing,
    evaluation,
    families,
    kernels,
    reporting,
    train_state,
    training,
)
from ossnet_jax.data import dataset
from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import build_model
from tests.conftest import tiny_config


def test_learning_rate_steps_down_at_40_and_60_percent(tmp_path):
    config = tiny_config(tmp_path)
    config.train.steps = 100
    schedule = train_state.lr_schedule(config.train)
    lr = config.train.learning_rate
    np.testing.assert_allclose(
        [schedule(0), schedule(39), schedule(40), schedule(59), schedule(60)],
        [lr, lr, lr * 0.1, lr * 0.1, lr * 0.01],
        rtol=1e-6,
    )


@pytest.mark.slow
def test_pau_coefficients_get_ten_times_the_step(tmp_path):
    config = tiny_config(tmp_path)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, state.params.fast)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
    # RAdam's first steps are momentum SGD: the step is lr times the (bias-corrected) gradient.
    pau = updates.fast["decoder_net"]["block0"]["act1"]["numerator"]
    dense = updates.fast["decoder_net"]["block0"]["dense1"]["kernel"]
    np.testing.assert_allclose(np.asarray(pau), 10 * np.asarray(dense).flat[0], rtol=1e-5)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(synthetic_root):
    config = tiny_config(synthetic_root)
    config.train.learning_rate = 3e-3
    config.train.steps = 1000  # keep the rate constant over the 25 steps below
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(oss_net_step.train_step, model=model, tx=tx, config=config))
    batch = jax.device_put(dataset.stack_batch(train_cases[:2]))
    losses = []
    for _ in range(25):
        state, out = step(state, batch, jax.random.key(1))
        losses.append(float(out["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert int(state.step) == 25


@pytest.mark.slow
def test_separate_prepare_and_update_calls_equal_the_composed_step(synthetic_root):
    """The host loop runs prepare_inputs and update_step as two programs; train_step is one.

    Integers (step, counts) agree exactly and floats to float32 rounding: with XLA:CPU's Eigen dots
    (ossnet_jax/xla_cpu.py) the one program fuses some products differently (4e-6 relative seen).
    """
    config = tiny_config(synthetic_root, activation="relu", encoder_channels=(4,), decoder_blocks=1)
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    composed = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    split = jax.tree.map(jnp.copy, composed)
    kwargs = dict(model=model, tx=tx, config=config)
    step = jax.jit(functools.partial(oss_net_step.train_step, **kwargs))
    prepare = jax.jit(functools.partial(oss_net_step.prepare_inputs, config=config))
    update = jax.jit(functools.partial(oss_net_step.update_step, **kwargs))
    batch = jax.device_put(dataset.stack_batch(train_cases[:2]))
    rng = jax.random.key(1)
    for s in range(2):
        composed, want = step(composed, batch, rng)
        inputs = prepare(batch, rng, jnp.asarray(s, jnp.int32))
        split, got = update(split, inputs, rng)
        assert set(inputs) == {"low", "locations", "index", "patches", "coarse"}
        assert inputs["low"].shape == (2, 16, 16, 8, 4) and inputs["coarse"].shape[1:4] == (8, 8, 4)
        for a, b in zip(jax.tree.leaves((composed, want)), jax.tree.leaves((split, got))):
            a, b = np.asarray(a), np.asarray(b)
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
            else:
                np.testing.assert_array_equal(a, b)
    assert float(want["loss"]) > 0 and int(split.step) == 2


def test_update_inputs_do_not_grow_with_the_grid_when_the_encoder_input_does_not(tmp_path):
    """A grid twice as fine per axis with twice the downscale gives the update step the same shapes
    (so the same memory); only the prepare stage's batch grows 8x."""
    shapes = []
    for grid, downscale in (((16, 16, 16), 1), ((32, 32, 32), 2)):
        config = tiny_config(tmp_path)
        config.data.grid_shape, config.data.downscale = grid, downscale
        batch = {
            "image": jax.ShapeDtypeStruct((2,) + grid + (4,), jnp.float32),
            "target": jax.ShapeDtypeStruct((2,) + grid, jnp.uint8),
            "band": jax.ShapeDtypeStruct((2,) + grid, jnp.bool_),
        }
        prepare = functools.partial(oss_net_step.prepare_inputs, config=config)
        inputs = jax.eval_shape(prepare, batch, jax.random.key(0), jnp.int32(0))
        shapes.append({k: (v.shape, v.dtype) for k, v in inputs.items()})
    assert shapes[0] == shapes[1]
    assert shapes[0]["low"][0] == (2, 16, 16, 16, 4) and shapes[0]["coarse"][0] == (2, 4, 4, 4, 1)
    assert shapes[0]["patches"][0] == (2, 128, 7, 7, 7, 4)


@pytest.mark.slow
def test_checkpoint_round_trip_and_best_by_dice(tmp_path):
    config = tiny_config(tmp_path)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    ckpt = checkpointing.Checkpoints(tmp_path / "work")
    for step, dice in [(1, 0.4), (2, 0.9), (3, None), (4, 0.5), (5, None), (6, None)]:
        state = state.replace(
            step=jnp.asarray(step, jnp.int32), params=jax.tree.map(lambda p: p + 1.0, state.params)
        )
        ckpt.save(step, state, None if dice is None else {"val_dice": dice})
    assert ckpt.manager.all_steps() == [2, 4, 5, 6]  # last 3 plus the best
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
    template = oss_net_step.init_state(config, model, tx, jax.random.key(1))
    restored = ckpt.restore(6, template)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


@pytest.mark.slow
def test_the_loop_reads_the_device_only_at_log_steps_and_a_stop(
    synthetic_root, tmp_path, monkeypatch
):
    """6 steps logged every 3, SIGTERM while step 5's inputs are taken: the host reads device values
    twice, after step 3 (the flags of steps 1-3) and after step 5 (the stop: steps 4-5), and
    converts no other device value from its first step on; so steps 2 and 3 were dispatched before
    step 1's results were read. The stop is seen at step 5 (one process checks every step) and
    step 5 is saved."""
    config = tiny_config(synthetic_root, activation="relu", encoder_channels=(4,), decoder_blocks=1)
    config.data.val_fraction = 0.0
    config.train.steps = 6
    config.train.log_every = 3
    config.train.checkpoint_every = 100
    batches, val_cases, validating = training._process_cases(config)
    assert not validating
    main = threading.get_ident()
    taken, reads, conversions = [], [], []
    busy = threading.local()  # set inside the loop's read and inside checkpoint saves

    class CountingPrefetcher(training.Prefetcher):
        def __next__(self):
            batch = super().__next__()
            taken.append(len(taken) + 1)  # the step whose update is dispatched next
            if len(taken) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return batch

    def read(tree):
        reads.append((len(taken), len(tree["skipped"])))
        busy.on = True
        try:
            return jax.device_get(tree)
        finally:
            busy.on = False

    value = jax_array.ArrayImpl._value  # int(), float(), bool() and jax.device_get of a jax.Array

    def counted(array):
        if taken and threading.get_ident() == main and not getattr(busy, "on", False):
            conversions.append(array.shape)
        return value.fget(array)

    monkeypatch.setattr(training, "Prefetcher", CountingPrefetcher)
    monkeypatch.setattr(training, "_read", read)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counted))
    ckpt = checkpointing.Checkpoints(tmp_path, writer=True)
    save = ckpt.save

    def saving(*args):
        busy.on = True
        try:
            save(*args)
        finally:
            busy.on = False

    monkeypatch.setattr(ckpt, "save", saving)
    try:
        with pytest.raises(training.TrainingInterrupted, match="stopped after step 5") as stopped:
            training._train(config, tmp_path, ckpt, 0, batches, val_cases, validating)
        assert ckpt.manager.all_steps() == [5]
    finally:
        ckpt.close()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert reads == [(3, 3), (5, 2)] and conversions == []
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and its dense evaluation."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(synthetic_root)
    result = training.train_and_evaluate(config, str(workdir))
    return config, workdir, result


def _params(workdir, config, step):
    model = build_model(config)
    template = oss_net_step.init_state(
        config, model, train_state.make_optimizer(config), jax.random.key(0)
    )
    ckpt = checkpointing.Checkpoints(workdir)
    state = ckpt.restore(step, template)
    ckpt.close()
    return state


@pytest.mark.slow
def test_training_writes_metrics_config_checkpoints_and_predictions(trained):
    config, workdir, result = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "val_dice" in r] == [2, 4]
    assert json.loads((workdir / "config.json").read_text())["model"]["decoder_width"] == 16
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        2,
        4,
    ]
    saved = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["mean"]) == set(reporting.SUMMARY_KEYS)
    for case in saved["cases"]:
        assert set(case) >= {"id", "dice", "iou", "decoder_points", "seconds"}
        assert 0 <= case["dice"] <= 1 and case["decoder_points"] > 0
        assert (workdir / "eval" / "predictions" / f"{case['id']}.nii.gz").exists()


@pytest.mark.slow
def test_resume_reaches_the_same_parameters(trained, tmp_path):
    config, workdir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "eval")
    training.train_and_evaluate(config, str(resumed))
    a, b = _params(workdir, config, 4), _params(resumed, config, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_evaluate_reproduces_metrics_from_the_checkpoint(trained):
    _, workdir, result = trained
    again = evaluation.evaluate(evaluation.load_config(workdir), workdir, overwrite=True)
    for a, b in zip(again["cases"], result["cases"]):
        assert a["id"] == b["id"] and a["decoder_points"] == b["decoder_points"]
        assert a["dice"] == pytest.approx(b["dice"]) and a["iou"] == pytest.approx(b["iou"])


@pytest.mark.slow
def test_predictor_batches_equal_direct_application_on_every_voxel(trained):
    """Refinement with stride 1 only evaluates every voxel: padded fixed-size batches must not change
    the answer compared with one direct model call over the whole grid."""
    config, workdir, _ = trained
    config = evaluation.load_config(workdir)
    config.eval.strides = (1,)
    config.eval.seeded = False
    config.eval.batch_points = 1000  # does not divide the 16384 voxels: the last batch is padded
    predictor, _ = evaluation.restore_predictor(config, workdir)
    _, val_cases = dataset.load_split(config)
    image = np.asarray(val_cases[0].image)
    grid, evaluations = predictor.predict(image)
    assert evaluations == grid.size
    locs = np.argwhere(np.ones(grid.shape, bool)).astype(np.int32)
    low, patches = oss_net_model.model_inputs(
        config, jnp.asarray(image)[None], jnp.asarray(locs)[None]
    )
    model = build_model(config)
    logits, _ = model.apply(predictor.variables, low, jnp.asarray(locs)[None], patches, train=False)
    direct = (jax.nn.sigmoid(logits[0]) > config.eval.threshold).reshape(grid.shape)
    np.testing.assert_array_equal(grid, np.asarray(direct))
    latents, _, source = predictor.encode(predictor.variables, jnp.asarray(image))
    some = locs[::131][:100]  # fewer than 1000 // 8: the small compiled batch size, padded
    np.testing.assert_allclose(
        predictor.decode_all(latents, source, some),
        np.asarray(jax.nn.sigmoid(logits[0]))[::131][:100],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_checkpoint_trained_with_cpu_kernels_evaluates_with_xla_kernels(trained):
    """The run trained with the CPU kernels ('auto' on this backend); its checkpoint, restored into a
    model built with the plain kernels, gives the same latents and probabilities."""
    _, workdir, _ = trained
    config = evaluation.load_config(workdir)
    assert kernels.of_config(config) == "cpu"
    _, val_cases = dataset.load_split(config)
    image = jnp.asarray(val_cases[0].image)
    locs = np.argwhere(np.ones(config.data.grid_shape, bool)).astype(np.int32)[::7]
    out = {}
    for name in ("cpu", "xla"):
        config.model.kernels = name
        predictor, _ = evaluation.restore_predictor(config, workdir)
        latents, seg_prob, source = predictor.encode(predictor.variables, image)
        out[name] = (latents, seg_prob, predictor.decode_all(latents, source, locs))
    for cpu, xla in zip(out["cpu"], out["xla"]):
        np.testing.assert_allclose(np.asarray(xla), np.asarray(cpu), rtol=1e-5, atol=1e-5)
    probabilities = out["xla"][2]
    assert probabilities.std() > 1e-3  # a field that varies: the comparison is not of constants


def test_host_preparation_gives_the_device_path_inputs(synthetic_root):
    """train.prepare = 'host' runs the same program on the host's CPU device: the same draws."""
    config = tiny_config(synthetic_root)
    config.train.prepare = "host"
    family = families.get_family(config)
    batches, _, _ = training._process_cases(config)
    rng = jax.random.key(config.train.seed)
    on_host = training._host_preparation(family, config, batches, rng, None)
    on_device = jax.jit(functools.partial(family.prepare_inputs, config=config))
    for step in (0, 3):
        host = on_host(step)
        device = on_device(batches(step), rng, jnp.asarray(step, jnp.int32))
        assert sorted(host) == sorted(device) and {"low", "locations", "patches"} <= set(host)
        for key in host:
            assert host[key].devices() == {jax.local_devices()[0]}
            np.testing.assert_array_equal(np.asarray(host[key]), np.asarray(device[key]))
    assert not np.array_equal(np.asarray(on_host(0)["locations"]), np.asarray(on_host(3)["locations"]))


def test_unknown_preparation_is_refused_before_anything_is_written(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root)
    config.train.prepare = "gpu"
    with pytest.raises(ValueError, match="train.prepare must be one of"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
