"""The comparison's pieces: shared settings, --set overrides, the memory analysis of a train step,
the training seconds and the wall-clock budget, the table writer."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from ossnet_jax import compare, families, train_state
from ossnet_jax.errors import ConfigError
from tests.conftest import tiny_config, tiny_unet_config

TINY_SPEC = """# tests/conftest.py's mechanics config (its programs are compiled once),
# as --configs / --base name it
import pathlib

from tests.conftest import mechanics_config


def get_config(preset):
    return mechanics_config(pathlib.Path({root!r}))
"""


def tiny_spec(folder: pathlib.Path, data_root: pathlib.Path) -> str:
    """'FOLDER/tiny.py:tiny', a config file of mechanics_config on the data in `data_root`."""
    (folder / "tiny.py").write_text(TINY_SPEC.format(root=str(data_root)))
    return f"{folder / 'tiny.py'}:tiny"


def test_harmonise_shares_data_steps_and_seed_but_not_the_input_resolution(tmp_path):
    first = tiny_config(tmp_path)
    other = tiny_unet_config(tmp_path / "elsewhere", "unet3d")
    other.data.val_fraction = 0.5
    other.train.seed = 7
    a, b = compare.harmonise([first, other], steps=9, seed=3)
    assert b.data.root == a.data.root and b.data.val_fraction == a.data.val_fraction
    assert (a.data.downscale, b.data.downscale) == (2, 1)
    assert a.train.steps == b.train.steps == 9 and a.train.seed == b.train.seed == 3
    assert other.train.seed == 7  # the inputs are not changed


def test_train_step_memory_counts_arguments_temporaries_and_donation(tmp_path):
    """The train state is donated: every byte of it (sized here from its shapes) is an output
    aliasing its argument, so it counts once; the arguments hold the state and the batch's image
    and target (the U-Nets do not read the band, which jit leaves out)."""
    config = tiny_unet_config(tmp_path, "unet2d")
    memory = compare.train_step_memory(config)
    family = families.get_family(config)
    model = family.build_model(config)
    tx = train_state.make_optimizer(config)
    state = jax.eval_shape(lambda: family.init_state(config, model, tx, jax.random.key(0)))
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    voxels = config.train.batch_size * int(np.prod(config.data.grid_shape))
    batch_bytes = voxels * (4 * config.data.num_channels + 1)  # float32 image, uint8 target
    assert memory["alias"] == state_bytes > 0
    assert memory["argument"] >= state_bytes + batch_bytes and memory["output"] >= state_bytes
    assert memory["temp"] > 0
    assert memory["params"] == sum(leaf.size for leaf in jax.tree.leaves(state.params.fast))
    assert memory["total"] == (
        memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    )


def _row(name, dice):
    return {
        "name": name,
        "model": name.split(":")[0],
        "checkpoint_step": 4,
        "dice": dice,
        "iou": None if dice is None else dice / 2,
        "hd95": 3.0,
        "asd": 1.0,
        "surface_dice": None,
        "train_memory_mib": 12.5,
        "train_memory_bytes": {},
        "params": 1234,
        "outputs_per_step": 100,
        "outputs_per_s": 50.0,
        "seconds_per_step": 2.0,
        "inference_s": 0.5,
        "network_outputs": 1000.0,
        "wall_s": 60.0,
        "steps": 4,
        "train_s": 8.0,
        "probe_seconds_per_step": None,
    }


def test_write_gives_json_markdown_and_png(tmp_path):
    rows = [_row("o_net:small", 0.8), _row("unet2d:small", None)]
    settings = {
        "configs": [],
        "dataset": "synthetic (x)",
        "grid_shape": [32, 32, 16],
        "train_cases": 4,
        "val_cases": 2,
        "steps": 4,
        "seed": 0,
        "machine": "cpu",
        "wall_s": 120.0,
        "command": ["--steps", "4", "--set", "train.lr_decay_fractions=(0.4, 0.6)"],
    }
    compare.write(rows, settings, tmp_path / "out" / "compare")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["steps"] == 4
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| o_net") or line.startswith("| unet2d")]
    assert (
        len(body) == 2
        and "| n/a |" in body[1]
        and "0.8000" in body[0]
        and "| 4 | 8.0 | 60 |" in body[0]
    )
    assert "equal steps (4 steps)" in table[2]
    command = "python -m ossnet_jax.compare --steps 4 --set 'train.lr_decay_fractions=(0.4, 0.6)'"
    assert f"Written by `{command}`." in table[2]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_training_rate_leaves_out_the_first_window(tmp_path):
    rows = [{"step": 2, "points_per_s": 1.0}, {"step": 2, "val_dice": 0.5}]
    rows += [{"step": 4, "points_per_s": 10.0}, {"step": 6, "points_per_s": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare.training_rate(tmp_path) == pytest.approx(20.0)


def test_markdown_names_the_wall_clock_budget():
    settings = {
        "dataset": "synthetic (x)",
        "train_cases": 4,
        "val_cases": 2,
        "steps": None,
        "budget_s": 600.0,
        "probe_steps": 20,
        "seed": 0,
        "machine": "cpu",
        "wall_s": 120.0,
    }
    text = compare.markdown([_row("o_net:small", 0.8)], settings)
    assert "equal wall-clock budget of 600 s of training" in text and "20-step probe" in text


def test_the_dataset_label_names_the_folder_of_each_synthetic_kind(tmp_path):
    config = tiny_config(tmp_path)
    tumours = compare.dataset_label(config.data)
    config.data.synthetic_kind = "vessels"
    vessels = compare.dataset_label(config.data)
    assert tumours.startswith("synthetic tumour (") and vessels.startswith("synthetic vessels (")
    assert tumours != vessels and str(tmp_path) in vessels and "vessels-cases" in vessels
    assert not any(tmp_path.iterdir())  # the label writes no data
    config.data.format, config.data.root = "brats", "data/BraTS"
    assert compare.dataset_label(config.data) == "brats (data/BraTS)"


def test_parse_overrides_reads_literals_else_strings():
    pairs = ["train.steps=30", "train.learning_rate=1e-3", "model.large_patches=True"]
    pairs += ["model.encoder_channels=(16, 32)", "data.root=runs/data x", "eval.strategy=dense"]
    pairs += ["data.split_file=", "train.steps=40"]  # the later pair of a key wins
    assert compare.parse_overrides(pairs) == {
        "train.steps": 40,
        "train.learning_rate": 1e-3,
        "model.large_patches": True,
        "model.encoder_channels": (16, 32),
        "data.root": "runs/data x",
        "eval.strategy": "dense",
        "data.split_file": "",
    }
    for bad in ("train.steps", "=3"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            compare.parse_overrides([bad])


def test_overrides_are_set_before_the_grid_is_planned():
    """2 encoder blocks instead of 3: the planned grid is a multiple of 2 x 2^2, not of 2 x 2^3."""
    overrides = {"model.encoder_channels": (16, 32), "train.num_points": 64, "eval.meshes": False}
    name, config = compare.load_config("configs/oss_net_c.py:small", overrides)
    assert name == "oss_net_c:small"
    assert config.model.encoder_channels == (16, 32) and config.train.num_points == 64
    assert not config.eval.meshes
    assert tuple(config.data.grid_shape) == (88, 88, 64)  # 'small' plans (96, 96, 64)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("configs/oss_net_c.py:small", {"train.nope": 1}, "has no config key 'train.nope'"),
        ("configs/oss_net_c.py:small", {"nope.steps": 1}, "has no config key 'nope.steps'"),
        ("configs/oss_net_c.py:small", {"steps": 1}, "has no config key 'steps'"),
        ("configs/oss_net_c.py:small", {"train.steps": "many"}, "train.steps='many'"),
        ("configs/oss_net_c.py:small", {"model.large_patches": 1}, "model.large_patches=1"),
        ("configs/unet2d.py:small", {"train.num_points": 64}, "unet2d:small has no config key"),
    ],
)
def test_a_missing_key_or_a_wrong_value_is_a_config_error_naming_it(spec, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compare.load_config(spec, overrides)


def _log(folder, rows):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_seconds_counts_the_first_window_at_the_median_rate_of_the_others(tmp_path):
    """100 outputs per step. Windows: steps 1-2 at 10/s (20 s, compilation), 3-4 at 100/s (1 s a
    step), 5-6 at 50/s (2 s a step), 7 at 100/s: 2 x median(1, 2, 1) + 2 + 4 + 1 = 9 s."""
    rows = [{"step": 2, "points_per_s": 10.0}, {"step": 2, "val_dice": 0.5}]
    rows += [{"step": 4, "points_per_s": 100.0}, {"step": 5, "skipped_nonfinite": 1}]
    rows += [{"step": 6, "points_per_s": 50.0}, {"step": 7, "points_per_s": 100.0}]
    _log(tmp_path, rows)
    assert compare.train_seconds(tmp_path, 100) == pytest.approx(9.0)
    _log(tmp_path, rows[:1])  # one window: measured, compilation and all
    assert compare.train_seconds(tmp_path, 100) == pytest.approx(20.0)


@pytest.mark.parametrize(
    "budget_s, seconds_per_step, steps",
    [(600.0, 1.5, 400), (10.0, 0.3, 33), (10.0, 0.29, 34), (1.0, 30.0, 1), (1e-9, 1.0, 1)],
)
def test_budget_steps_fill_the_budget_at_the_measured_rate(budget_s, seconds_per_step, steps):
    assert compare.budget_steps(budget_s, seconds_per_step) == steps


def test_planned_steps_reuse_the_plan_of_the_same_budget(tmp_path, monkeypatch):
    probes = []

    def probe(config, probe_dir, probe_steps):
        probes.append((probe_dir, probe_steps))
        return 0.25

    monkeypatch.setattr(compare, "probe_seconds_per_step", probe)
    run_dir, probe_dir = tmp_path / "run", tmp_path / ".probe_run"
    plan = compare.planned_steps(None, run_dir, probe_dir, 10.0, 20)
    assert plan == {"budget_s": 10.0, "probe_steps": 20, "seconds_per_step": 0.25, "steps": 40}
    assert json.loads((run_dir / "budget.json").read_text()) == plan
    assert compare.planned_steps(None, run_dir, probe_dir, 10.0, 20) == plan  # a rerun: no probe
    assert compare.planned_steps(None, run_dir, probe_dir, 5.0, 20)["steps"] == 20
    assert probes == [(probe_dir, 20), (probe_dir, 20)]


@pytest.mark.slow
def test_compare_at_a_wall_clock_budget_probes_then_trains_the_planned_steps(
    synthetic_root, tmp_path
):
    """A budget far below one step's time: the 2-step probe sets train.steps = 1; --set reaches the
    trained config; the probe's folder is gone and its plan is kept next to the run."""
    spec = tiny_spec(tmp_path, synthetic_root)
    overrides = {"eval.meshes": False, "eval.pictures": False, "train.eval_points": 128}
    rows, settings = compare.compare(
        [spec], tmp_path / "cw", overrides=overrides, budget_s=1e-3, probe_steps=2
    )
    (row,) = rows
    run_dir = tmp_path / "cw" / "tiny_tiny"
    plan = json.loads((run_dir / "budget.json").read_text())
    assert plan["steps"] == row["steps"] == row["checkpoint_step"] == 1
    assert row["probe_seconds_per_step"] == plan["seconds_per_step"] > 0
    assert row["train_s"] > 0 and row["dice"] is not None
    assert not (tmp_path / "cw" / ".probe_tiny_tiny").exists()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 1 and saved["train"]["eval_points"] == 128
    assert not saved["eval"]["meshes"]
    assert settings["budget_s"] == 1e-3 and settings["steps"] is None
    assert settings["overrides"] == overrides
