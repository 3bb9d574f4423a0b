"""Shared fixtures: tiny OSS-Net and U-Net configurations and a tiny synthetic BraTS dataset on disk.

Every test, and every python subprocess a test starts (they inherit the environment), shares one
persistent JAX compilation cache in a folder made for the session: every program, however small, that
several tests, both xdist workers or train.py runs compile is compiled once. It is set here, before
anything imports jax; a cache folder already named in JAX_COMPILATION_CACHE_DIR is used instead. XLA_FLAGS get the entry points' XLA:CPU
flags (ossnet_jax/kernels/cpu/xla_flags.py) here too, so the tests run the programs users run, and
GLIBC_TUNABLES the huge-page setting the entry points re-execute themselves to get (kernels/cpu/hostmem.py).

One flag is the tests' own, COMPILE_FAST: LLVM's backend optimisation level 0. XLA's HLO passes, its
fusion and buffer assignment (so the compiled memory, donation and the op forms the tests read) are
unchanged; only the machine code is less optimised, which halves the compile time that dominates the
tiny programs tested here. Benchmarks and the entry points never set it.
"""

import atexit
import importlib
import os
import pathlib
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="ossnet_jax_test_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import ml_collections
import pytest

from configs import demo
from ossnet_jax.kernels.cpu import hostmem, xla_flags

COMPILE_FAST = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_FAST}".strip()
xla_flags.configure()  # before any JAX computation: the tests compile what train.py and evaluate.py do
if hostmem.huge_pages_wanted(dict(os.environ)):
    # python subprocesses (train.py, evaluate.py) start with the huge-page setting their first call
    # of runtime.prepare would re-execute them to get, so each imports JAX once instead of twice
    os.environ["GLIBC_TUNABLES"] = ":".join(
        t for t in (os.environ.get("GLIBC_TUNABLES", ""), hostmem.TUNABLE) if t
    )

TINY_GRID = (32, 32, 16)  # divisible by downscale 2 x 2^2 blocks


def tiny_config(root: pathlib.Path, **model) -> ml_collections.ConfigDict:
    """The demo config shrunk for tests: 6 cases of 28x28x16 on a 32x32x16 grid, a 16-wide decoder."""
    config = demo.get_config()
    config.data.root = str(root)
    config.data.grid_shape = (
        TINY_GRID  # what 'auto' plans for these cases, set so models build directly
    )
    config.data.num_channels = 4
    config.data.synthetic_shape = (28, 28, 16)
    config.data.synthetic_cases = 6
    config.data.val_fraction = 0.34
    config.data.band_size = 5
    config.model.encoder_channels = (4, 8)
    config.model.decoder_width = 16
    config.model.decoder_blocks = 2
    for key, value in model.items():
        config.model[key] = value
    config.train.steps = 4
    # a constant rate: the schedule's steps are constants of the compiled update, so runs of any
    # length then share one program (the persistent cache compiles it once per session)
    config.train.lr_decay_fractions = ()
    config.train.batch_size = 2
    config.train.num_points = 128
    config.train.eval_points = 256
    config.train.log_every = 2
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.eval.batch_points = 1024
    return config


def mechanics_config(root: pathlib.Path, **model) -> ml_collections.ConfigDict:
    """tiny_config with ReLU, one encoder level and one decoder block, which compile fastest, and no
    meshes or pictures: for tests of the loop, checkpoints, resumption, sharding and configurations
    rather than of the model. Tests that share it share its compiled programs (the session cache)."""
    config = tiny_config(root, activation="relu", encoder_channels=(4,), decoder_blocks=1, **model)
    config.eval.meshes = False
    config.eval.pictures = False
    return config


# A config file for the benchmark programs the tests run as subprocesses (benchmarks/accelerator.py,
# benchmarks/lowering.py): the small preset with the cheapest network that keeps every kind of layer.
TINY_PRESET = """
from configs import oss_net_c


def get_config(arg="small"):
    config = oss_net_c.get_config(arg)
    config.data.grid_shape = (32, 32, 16)
    config.model.encoder_channels = (4,)
    config.model.decoder_width = 16
    config.model.decoder_blocks = 1
    return config
"""


def tiny_preset(folder: pathlib.Path) -> str:
    """'FOLDER/tiny.py:small', TINY_PRESET written there: a --config for benchmark subprocesses."""
    path = folder / "tiny.py"
    path.write_text(TINY_PRESET)
    return f"{path}:small"


def tiny_unet_config(root: pathlib.Path, name: str) -> ml_collections.ConfigDict:
    """configs/<name>.py ('unet3d' | 'unet2d') on tiny_config's data and schedule, widths (4, 8)."""
    tiny = tiny_config(root)
    config = importlib.import_module(f"configs.{name}").get_config("small")
    config.data = tiny.data
    config.data.downscale = 1
    for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        config.train[key] = tiny.train[key]
    config.model.channels = (4, 8)
    if name == "unet3d":
        config.train.crop_shape = (16, 16, 16)
    else:
        config.train.slices_per_volume = 2
    return config


def assert_holds_best_slow_weights(predictor, step: int, workdir: pathlib.Path, template) -> None:
    """The predictor evaluates with the slow (Lookahead) parameters and the statistics of the best
    checkpoint (`step`), as read here on their own into `template`; the fast parameters moved."""
    import jax
    import numpy as np

    from ossnet_jax import checkpointing

    ckpt = checkpointing.Checkpoints(workdir)
    try:
        assert step == ckpt.best_step()
        saved = ckpt.restore(step, template)
    finally:
        ckpt.close()
    expected = {"params": saved.params.slow, "batch_stats": saved.batch_stats}
    assert jax.tree.structure(predictor.variables) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(predictor.variables), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fast, slow = jax.tree.leaves(saved.params.fast), jax.tree.leaves(saved.params.slow)
    assert any(np.any(np.asarray(f) != np.asarray(s)) for f, s in zip(fast, slow))


# The files that take longest, longest first (pytest --durations=0 on 2 cores). pytest.ini hands
# whole files to the two xdist workers in collection order (--dist loadfile --no-loadscope-reorder),
# so starting with these leaves short files for the end and the workers finish together. test_api
# comes after test_training has had time to train the trained_run both read.
LONGEST_FIRST = (
    "test_training.py",
    "test_unet.py",
    "test_decoder.py",
    "test_reliability.py",
    "test_formats.py",
    "test_models.py",
    "test_lowering.py",
    "test_api.py",
    "test_mixed_precision.py",
    "test_layers.py",
    "test_kernels.py",
    "test_multihost.py",
    "test_accelerator.py",
    "test_field.py",
    "test_official.py",
    "test_compare.py",
    "test_parallel.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    """Orders the collected tests by LONGEST_FIRST (a stable sort: the rest keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> pathlib.Path:
    """A folder holding the tiny synthetic dataset (written once per test session)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(config, workdir, result): a 4-step tiny run with checkpoints at steps 2 and 4 and its
    evaluation, trained once per test session for every test file that reads one (tests read it or
    copy it; they never write into it).

    Under xdist the workers share it: the first to need it trains it in their common folder under a
    file lock, the others wait for the lock and read it (its data too: the run's config names it).
    """
    import fcntl
    import json

    from ossnet_jax import training

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if shared else base) / "trained_run"
    folder.mkdir(exist_ok=True)
    config = tiny_config(folder / "data")
    config.data.seed = 3  # a split of its own
    workdir, result_file = folder / "run", folder / "result.json"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result_file.exists():
            result = training.train_and_evaluate(config, str(workdir))
            result_file.write_text(json.dumps(result))
    return config, workdir, json.loads(result_file.read_text())
