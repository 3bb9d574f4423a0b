"""Reliability: non-finite updates are skipped and stop a run; resuming refuses a changed configuration."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest

from ossnet_jax import checkpointing, train_state, training
from ossnet_jax.data import dataset
from ossnet_jax.models.oss_net import build_model
from tests.conftest import tiny_config


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _snapshot(workdir: pathlib.Path) -> dict:
    """Bytes and mtime of config.json and of every file under checkpoints/."""
    files = [workdir / "config.json", *sorted((workdir / "checkpoints").rglob("*"))]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.is_file()}


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_nonfinite_batch_skips_the_update_and_a_finite_one_applies_it(synthetic_root):
    config = tiny_config(synthetic_root)
    train_cases, _ = dataset.load_split(config)
    model = build_model(config)
    tx = train_state.make_optimizer(config)
    state = train_state.init_state(config, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(training.train_step, model=model, tx=tx, config=config))
    batch = dataset.stack_batch(train_cases[:2])
    bad = {**batch, "image": batch["image"].copy()}
    bad["image"][0, 3, 4, 5, 0] = np.nan

    skipped, out = step(state, bad, jax.random.key(1))
    assert int(out["skipped"]) == 1 and out["skipped"].dtype == np.int32
    assert int(skipped.step) == int(state.step) + 1
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(_leaves(getattr(skipped, name)), _leaves(getattr(state, name))):
            np.testing.assert_array_equal(a, b)

    applied, out = step(skipped, batch, jax.random.key(1))
    assert int(out["skipped"]) == 0 and int(applied.step) == int(state.step) + 2
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(applied.params.fast), _leaves(state.params.fast))
    )


@pytest.fixture(scope="module")
def two_steps(synthetic_root, tmp_path_factory):
    """A 2-step run with a checkpoint at step 2; tests below only change it where they say so."""
    workdir = tmp_path_factory.mktemp("reliability")
    config = tiny_config(synthetic_root)
    config.train.steps = 2
    training.train_and_evaluate(config, str(workdir))
    assert _checkpoint_steps(workdir) == [2]
    return config, workdir


def test_resuming_with_another_model_is_refused_and_writes_nothing(two_steps):
    config, workdir = two_steps
    before = _snapshot(workdir)
    changed = tiny_config(pathlib.Path(config.data.root), decoder_width=8)
    changed.train.steps = 4
    with pytest.raises(ValueError) as error:
        training.train_and_evaluate(changed, str(workdir))
    message = str(error.value)
    assert "model.decoder_width: 16 (saved) -> 8 (new)" in message
    assert "--workdir" in message and "allow_config_change" in message
    assert "train.steps" not in message
    assert _snapshot(workdir) == before


def test_config_differences_ignore_tuples_versus_lists_and_train_keys(two_steps):
    config, workdir = two_steps
    saved = json.loads((workdir / "config.json").read_text())
    new = config.to_dict()
    new["train"]["steps"] = 100
    assert training.config_differences(saved, new) == []
    new["data"]["grid_shape"] = (64, 32, 16)
    assert training.config_differences(saved, new) == [
        ("data.grid_shape", [32, 32, 16], [64, 32, 16])
    ]


def test_allowed_config_change_reaches_restore_which_names_the_mismatch(two_steps):
    config, workdir = two_steps
    before = _snapshot(workdir)
    changed = tiny_config(pathlib.Path(config.data.root), decoder_width=8)
    changed.train.allow_config_change = True
    with pytest.raises(ValueError, match=r"decoder_net\..*: saved \(.*16.*\), expected \(.*8.*\)"):
        training.train_and_evaluate(changed, str(workdir))
    assert _snapshot(workdir) == before


def test_restore_into_another_model_names_checkpoint_and_paths(two_steps):
    config, workdir = two_steps
    changed = tiny_config(pathlib.Path(config.data.root), decoder_width=8)
    model = build_model(changed)
    template = train_state.init_state(
        changed, model, train_state.make_optimizer(changed), jax.random.key(0)
    )
    ckpt = checkpointing.Checkpoints(workdir)
    with pytest.raises(ValueError) as error:
        ckpt.restore(2, template)
    ckpt.close()
    message = str(error.value)
    assert str(workdir / "checkpoints" / "2") in message
    assert "params.fast.decoder_net." in message and "saved (16" in message


def test_a_longer_run_resumes_and_nan_batches_stop_it_keeping_the_checkpoint(
    two_steps, monkeypatch, capsys
):
    """train.steps 2 -> 6 resumes from step 2; every batch NaN stops it after 2 skipped steps."""
    config, workdir = two_steps
    before = _snapshot(workdir)
    stack_batch = training.dataset.stack_batch

    def nan_batch(cases):
        batch = stack_batch(cases)
        return {**batch, "image": np.full_like(batch["image"], np.nan)}

    monkeypatch.setattr(training.dataset, "stack_batch", nan_batch)
    longer = tiny_config(pathlib.Path(config.data.root))
    longer.train.steps = 6
    longer.train.max_nonfinite_steps = 2
    with pytest.raises(
        FloatingPointError, match="2 consecutive non-finite steps .* at step 4"
    ) as e:
        training.train_and_evaluate(longer, str(workdir))
    assert f"resuming from step 2 of {workdir / 'checkpoints'}" in capsys.readouterr().out
    assert "checkpoint (step 2)" in str(e.value) and "is intact" in str(e.value)
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert _checkpoint_steps(workdir) == [2]
    after = _snapshot(workdir)
    del after[str(workdir / "config.json")], before[str(workdir / "config.json")]
    assert after == before
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite") == 1] == [3, 4]
