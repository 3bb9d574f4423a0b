"""The comparison's pieces: shared settings, the memory analysis of a train step, the table writer."""

import json

import jax
import numpy as np
import pytest

from ossnet_jax import compare, families, train_state
from tests.conftest import tiny_config, tiny_unet_config


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
    }
    compare.write(rows, settings, tmp_path / "out" / "compare")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["steps"] == 4
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| o_net") or line.startswith("| unet2d")]
    assert len(body) == 2 and "| n/a |" in body[1] and "0.8000" in body[0]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_training_rate_leaves_out_the_first_window(tmp_path):
    rows = [{"step": 2, "points_per_s": 1.0}, {"step": 2, "val_dice": 0.5}]
    rows += [{"step": 4, "points_per_s": 10.0}, {"step": 6, "points_per_s": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare.training_rate(tmp_path) == pytest.approx(20.0)
