"""The train step, the optimizer recipe, checkpoints, resuming, and train -> evaluate end to end."""

import errno
import functools
import io
import json
import os
import pathlib
import pickle
import pickletools
import re
import shutil
import signal
import subprocess
import sys
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
    parallel,
    reporting,
    train_state,
    training,
)
from ossnet_jax.data import dataset, nifti
from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.families.oss_net.model import build_model
from tests.conftest import assert_holds_best_slow_weights, mechanics_config, tiny_config
from tests.dataset_writers import write_msd
from tests.events import scalars


def test_learning_rate_steps_down_at_40_and_60_percent(tmp_path):
    config = tiny_config(tmp_path)
    config.train.steps = 100
    config.train.lr_decay_fractions = (0.4, 0.6)
    schedule = train_state.lr_schedule(config.train)
    lr = config.train.learning_rate
    np.testing.assert_allclose(
        [schedule(0), schedule(39), schedule(40), schedule(59), schedule(60)],
        [lr, lr, lr * 0.1, lr * 0.1, lr * 0.01],
        rtol=1e-6,
    )


@pytest.mark.slow
def test_pau_coefficients_get_ten_times_the_step(tmp_path):
    config = tiny_config(tmp_path, encoder_channels=(4,), decoder_blocks=1)  # PAU kept
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, state.params.fast)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
    # RAdam's first steps are momentum SGD: the step is lr times the (bias-corrected) gradient.
    pau = updates.fast["decoder_net"]["block0"]["act1"]["numerator"]
    dense = updates.fast["decoder_net"]["block0"]["dense1"]["kernel"]
    np.testing.assert_allclose(np.asarray(pau), 10 * np.asarray(dense).flat[0], rtol=1e-5)


def _small_config(root):
    """mechanics_config at learning rate 3e-3: the composed train step of the two tests below is one
    program, compiled once."""
    config = mechanics_config(root)
    config.train.learning_rate = 3e-3
    return config


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(synthetic_root):
    config = _small_config(synthetic_root)
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(
        functools.partial(oss_net_step.train_step, model=model, tx=tx, config=config),
        donate_argnums=0,  # as in the test below: one program
    )
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
    config = _small_config(synthetic_root)  # test_loss_falls_...'s train step: compiled once
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    composed = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    split = jax.tree.map(jnp.copy, composed)
    kwargs = dict(model=model, tx=tx, config=config)
    step = jax.jit(functools.partial(oss_net_step.train_step, **kwargs), donate_argnums=0)
    prepare = jax.jit(
        lambda batch, key, s: oss_net_step.prepare_inputs(batch, key, s, config=config)
    )
    update = jax.jit(functools.partial(oss_net_step.update_step, **kwargs), donate_argnums=0)
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
    config = mechanics_config(tmp_path)
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


def test_fresh_and_restored_states_lower_the_update_to_one_program(synthetic_root, tmp_path):
    """Orbax restores committed arrays; the loop commits a fresh state too (parallel.replicate), so a
    resumed run lowers the update step to the fresh run's program and the compilation cache serves
    it. An uncommitted state lowers to another program (no sharding annotations)."""
    config = mechanics_config(synthetic_root)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    fresh = oss_net_step.init_state(config, model, tx, jax.random.key(0))
    placed = parallel.replicate(fresh, None)
    ckpt = checkpointing.Checkpoints(tmp_path / "work")
    ckpt.save(1, placed, {"val_dice": 0.5})
    restored = ckpt.restore(1, fresh)
    ckpt.close()
    train_cases, _ = dataset.load_split(config)
    inputs = jax.eval_shape(
        lambda b: oss_net_step.prepare_inputs(
            b, jax.random.key(1), jnp.asarray(0, jnp.int32), config=config
        ),
        dataset.stack_batch(train_cases[:2]),
    )
    update = jax.jit(
        functools.partial(oss_net_step.update_step, model=model, tx=tx, config=config),
        donate_argnums=0,
    )
    text = lambda state: update.trace(state, inputs, jax.random.key(1)).lower().as_text()
    assert text(placed) == text(restored)
    assert text(fresh) != text(restored)


@pytest.mark.slow
def test_the_loop_reads_the_device_only_at_log_steps_and_a_stop(
    synthetic_root, tmp_path, monkeypatch
):
    """6 steps logged every 3, SIGTERM while step 5's inputs are taken: the host reads device values
    twice, after step 3 (the flags of steps 1-3) and after step 5 (the stop: steps 4-5), and
    converts no other device value from its first step on; so steps 2 and 3 were dispatched before
    step 1's results were read. The stop is seen at step 5 (one process checks every step) and
    step 5 is saved."""
    config = mechanics_config(synthetic_root)
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
def trained(trained_run):
    """A 4-step run with checkpoints at steps 2 and 4 and its evaluation (conftest.trained_run)."""
    return trained_run


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
def test_training_writes_tensorboard_scalars_and_curves_png(trained):
    """The event file holds metrics.jsonl's numbers under their tags at their steps; curves.png is
    a PNG of them (what it draws is tested in test_curves.py)."""
    _, workdir, _ = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    got = scalars(workdir)
    for tag, key in (
        ("train/loss", "loss"),
        ("train/dice", "dice"),
        ("train/learning_rate", "learning_rate"),
        ("train/locations_per_s", "points_per_s"),
        ("val/dice", "val_dice"),
        ("val/iou", "val_iou"),
    ):
        want = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows if key in r]
        assert got[tag] == want and [step for step, _ in want] == [2, 4], tag
    assert (workdir / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_new_scans_are_predicted_in_their_geometry_as_evaluate_predicts_them(trained, tmp_path):
    """evaluate.py --input's path: a folder of BraTS case folders (the validation cases and a third
    whose FLAIR is truncated) and one 4D MSD image in PIR voxel order. Each prediction has its input
    file's shape and affine and the labels evaluate writes for the same case; the bad case is named
    once the good ones are written."""
    _, workdir, result = trained
    config = evaluation.load_config(workdir)
    root = dataset.dataset_root(config)
    folder = tmp_path / "scans"
    ids = [case["id"] for case in result["cases"]]
    for case_id in ids:
        shutil.copytree(root / case_id, folder / case_id)
    shutil.copytree(root / ids[0], folder / "broken")
    flair = next((folder / "broken").glob("*_flair.nii.gz"))
    flair.write_bytes(flair.read_bytes()[:200])
    out = tmp_path / "out"
    with pytest.raises(nifti.DataError, match=f"1 of 3 scans .*\\n  {re.escape(str(flair))}: "):
        evaluation.predict_scans(config, workdir, folder, out)
    assert sorted(p.name for p in out.iterdir()) == [f"{case_id}.nii.gz" for case_id in ids]
    for case_id in ids:
        pred, affine = nifti.load_nifti(out / f"{case_id}.nii.gz")
        image, image_affine = nifti.load_nifti(folder / case_id / f"{case_id}_t2.nii.gz")
        want, _ = nifti.load_nifti(workdir / "eval" / "predictions" / f"{case_id}.nii.gz")
        assert pred.shape == image.shape and np.array_equal(affine, image_affine)
        np.testing.assert_array_equal(pred, want)

    task = write_msd(tmp_path / "msd", four_d=True, cases=1, test_cases=1)
    (image_file,) = (task / "imagesTs").iterdir()
    (written,) = evaluation.predict_scans(config, workdir, image_file, out)
    msd_config, cases = evaluation.dataset_cases(config, str(task), "msd", "test")
    msd_config.eval.meshes = msd_config.eval.pictures = False
    evaluation.evaluate(msd_config, workdir, cases, tmp_path / "msd_eval")
    pred, affine = nifti.load_nifti(written)
    image, image_affine = nifti.load_nifti(image_file)
    assert pred.shape == image.shape[:3] == (28, 16, 28)  # PIR order of a 28x28x16 RAS volume
    np.testing.assert_array_equal(affine, image_affine)
    want, _ = nifti.load_nifti(tmp_path / "msd_eval" / "predictions" / written.name)
    np.testing.assert_array_equal(pred, want)


@pytest.mark.slow
def test_resume_reaches_the_same_parameters(trained, tmp_path, capsys):
    """Without checkpoint 4 the run resumes from checkpoint 2: it says so, keeps the log rows up to
    step 2 (one is marked here) and logs step 4 once, reaching step 4's parameters."""
    config, workdir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "eval")
    log = resumed / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [{**r, "marker": 1} if r["step"] == 2 and "loss" in r else r for r in rows]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = evaluation.load_config(resumed)
    config.eval.meshes = config.eval.pictures = False
    training.train_and_evaluate(config, str(resumed))
    assert f"resuming from step 2 of {resumed / 'checkpoints'}" in capsys.readouterr().out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if r.get("marker")] == [2]
    a, b = _params(workdir, config, 4), _params(resumed, config, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_evaluate_reproduces_metrics_from_the_checkpoint(trained, tmp_path):
    _, _, result = trained
    workdir = _copy(trained, tmp_path)
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
    model = build_model(config)

    @jax.jit  # one program, not one per operation
    def direct_logits(variables, image, locs):
        low, patches = oss_net_model.model_inputs(config, image[None], locs[None])
        return model.apply(variables, low, locs[None], patches, train=False)[0]

    logits = direct_logits(predictor.variables, jnp.asarray(image), jnp.asarray(locs))
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
    assert not np.array_equal(
        np.asarray(on_host(0)["locations"]), np.asarray(on_host(3)["locations"])
    )


def test_unknown_preparation_is_refused_before_anything_is_written(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root)
    config.train.prepare = "gpu"
    with pytest.raises(ValueError, match="train.prepare must be one of"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# What a finished run's workdir holds and what the programs do with it: evaluation with the slow
# (Lookahead) parameters, checkpoints without pickle, the free-space check through training with
# checkpoints present, and evaluate.py run as a program (`python -m ossnet_jax.compare` runs on a
# U-Net's run in test_unet.py). Each test works on a copy of the trained run's workdir.

REPO = pathlib.Path(__file__).resolve().parents[1]


def _copy(trained, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained[1], workdir)
    return workdir


def _state_template(config):
    family = families.get_family(config)
    model = family.build_model(config)
    tx = train_state.make_optimizer(config)
    return jax.eval_shape(lambda: family.init_state(config, model, tx, jax.random.key(0)))


def _is_pickle(data: bytes) -> bool:
    """Whether `data` starts like a pickle of protocol 2 or later, or parses whole as one (any
    protocol): its opcodes run to STOP at the last byte."""
    if len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    try:
        last = None
        for _, _, position in pickletools.genops(io.BytesIO(data)):
            last = position
    except Exception:  # not a sequence of pickle opcodes
        return False
    return last == len(data) - 1


def test_is_pickle_finds_pickles_of_every_protocol():
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert _is_pickle(pickle.dumps({"step": 4, "val_dice": [0.5]}, protocol=protocol))
    assert not _is_pickle(json.dumps({"step": 4}).encode()) and not _is_pickle(b"")


@pytest.mark.slow
def test_checkpoints_hold_no_pickle_and_restore_without_unpickling(trained, tmp_path, monkeypatch):
    """Every file in checkpoints/ is scanned; a restore with pickle's loaders disabled gives the
    evaluating predictor the slow (Lookahead) parameters and the statistics of the best checkpoint,
    as read here on their own (after 4 steps of k=5 the fast ones moved, the slow ones did not)."""
    config, _, result = trained
    workdir = _copy(trained, tmp_path)
    files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 10
    assert [str(p) for p in files if _is_pickle(p.read_bytes())] == []
    assert [p.name for p in files if p.suffix in (".pkl", ".pickle", ".npy")] == []

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    predictor, step = evaluation.restore_predictor(config, workdir)
    monkeypatch.undo()
    assert step == result["step"]
    assert_holds_best_slow_weights(predictor, step, workdir, _state_template(config))


@pytest.mark.slow
def test_free_space_check_counts_the_checkpoints_present_and_stops_before_writing(
    trained, tmp_path, monkeypatch
):
    """Resuming a workdir holding 2 checkpoints (of the last 3 and the best): 3 more must fit, each
    of the state's bytes (counted here from its shapes), + 64 MiB; one byte less stops the run
    before config.json, metrics.jsonl or a checkpoint is written."""
    workdir = _copy(trained, tmp_path)
    config = evaluation.load_config(workdir)
    config.train.steps = 6
    state_bytes = sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(_state_template(config))
    )
    needed = 3 * state_bytes + checkpointing.FREE_SPACE_MARGIN_BYTES
    usage = shutil.disk_usage(workdir)
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(OSError) as error:
        training.train_and_evaluate(config, str(workdir))
    assert error.value.errno == errno.ENOSPC
    assert f"3 x {state_bytes / 2**20:.1f} MiB" in str(error.value)
    assert f"{needed / 2**20:.1f} MiB needed" in str(error.value)
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """A python program of this repository, in its folder, with the session's environment (and so
    its compilation cache)."""
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_evaluate_py_predicts_another_dataset_again_with_overwrite(trained, tmp_path):
    """`evaluate.py --workdir W --data.root DIR --overwrite`: DIR holds the run's validation cases
    (in the BraTS layout);
    W/eval/DIR-name/ already has a row and a prediction of one of them for the same checkpoint (made
    up here), which --overwrite predicts again. Its labels and metrics are then those of the run's
    own evaluation; the run's eval/ is left alone."""
    config, _, result = trained
    workdir = _copy(trained, tmp_path)
    saved_config = json.loads((workdir / "config.json").read_text())
    saved_config["eval"].update(meshes=False, pictures=False)
    (workdir / "config.json").write_text(json.dumps(saved_config))
    other = tmp_path / "other_set"
    ids = [case["id"] for case in result["cases"]]
    for case_id in ids:
        shutil.copytree(dataset.dataset_root(config) / case_id, other / case_id)
    out = workdir / "eval" / "other_set"
    real, affine = nifti.load_nifti(workdir / "eval" / "predictions" / f"{ids[0]}.nii.gz")
    nifti.save_nifti(out / "predictions" / f"{ids[0]}.nii.gz", 1 - real, affine)
    made_up = {"id": ids[0], "dice": -1.0, "iou": -1.0, "decoder_points": 1, "seconds": 0.0}
    made_up = {
        "step": result["step"],
        "surface_metrics": result["surface_metrics"],
        "cases": [made_up],
    }
    (out / "metrics.json").write_text(json.dumps(made_up))
    own = (workdir / "eval" / "metrics.json").read_bytes()

    done = _run(
        [
            "evaluate.py",
            f"--workdir={workdir}",
            f"--data.root={other}",
            "--data.format=brats",  # a folder of BraTS cases; the run's own data is synthetic
            "--overwrite",
        ]
    )
    assert "reusing" not in done.stdout and f"written to {out}" in done.stdout
    assert f"(checkpoint step {result['step']})" in done.stdout
    written = json.loads((out / "metrics.json").read_text())
    assert [case["id"] for case in written["cases"]] == ids and "mean" in written
    for got, want in zip(written["cases"], result["cases"]):
        assert got["dice"] == pytest.approx(want["dice"]) and got["iou"] == pytest.approx(
            want["iou"]
        )
        assert f"{got['id']}: Dice {got['dice']:.4f}" in done.stdout
        pred, _ = nifti.load_nifti(out / "predictions" / f"{got['id']}.nii.gz")
        run_pred, _ = nifti.load_nifti(workdir / "eval" / "predictions" / f"{got['id']}.nii.gz")
        np.testing.assert_array_equal(pred, run_pred)
    assert (workdir / "eval" / "metrics.json").read_bytes() == own
