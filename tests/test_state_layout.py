"""Checkpoints written before the kernel switch and the family packages still restore: the train state's
tree (every path, shape and dtype) of each family equals the one recorded from that code.

tests/fixtures/state_trees.json was written by the code of commit beca386 (before both changes) for the
tiny configurations below; orbax restores a checkpoint into a target of exactly this structure.
"""

import importlib
import json
import pathlib

import jax
import pytest

from ossnet_jax import families
from ossnet_jax.train_state import make_optimizer
from tests.conftest import tiny_config, tiny_unet_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "state_trees.json"


def _config(name: str, kernels: str):
    if name.startswith("unet"):
        config = tiny_unet_config(pathlib.Path("unused"), name)
    else:
        config = tiny_config(pathlib.Path("unused"))
        config.model = importlib.import_module(f"configs.{name}").get_config("small").model
        config.model.encoder_channels = (4, 8)
        config.model.decoder_width = 16
        config.model.decoder_blocks = 2
        if name == "oss_net_d":  # recorded when D had the paper's Fourier features (now an option)
            config.model.fourier_features = 16
    config.model.kernels = kernels
    return config


def _tree(config) -> dict:
    family = families.get_family(config)
    model = family.build_model(config)
    state = jax.eval_shape(
        lambda: family.init_state(config, model, make_optimizer(config), jax.random.key(0))
    )
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in leaves}


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("name", ["oss_net_c", "oss_net_d", "o_net", "unet3d", "unet2d"])
def test_train_state_tree_equals_the_recorded_one(name, kernels):
    recorded = json.loads(FIXTURE.read_text())[name]
    now = _tree(_config(name, kernels))
    assert sorted(now) == sorted(recorded)
    assert now == recorded
