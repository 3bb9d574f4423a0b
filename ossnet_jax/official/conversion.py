"""The official release's trained OSS-Net state dicts as ossnet-jax workdirs.

Every parameter and statistic of ossnet-jax's model tree has one release key (`release_key`), with a
layout change where the two frameworks differ:
  conv kernels    release (out, in, kx, ky, kz) -> ours (kx, ky, kz, in, out)
  Linear weights  release (out, in)             -> our Dense kernel (in, out)
  CBN statistics  release (1,)                  -> ours ()
The release's latent conv (`encoder.final_mapping.0`) has a bias and ours none: the bias is folded into
the BatchNorm that follows (running mean - bias: the same output in evaluation, and a bias cancels under
batch statistics in training). Our encoder shortcut convs and segmentation head have a bias the release
lacks: set to 0. `num_batches_tracked` counters are dropped. A state dict is converted only if its keys
and shapes are exactly those of the variant's model; otherwise ConversionError lists what is missing,
unexpected and mis-shaped.
"""

import functools
import hashlib
import importlib
import json
import pathlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import optax

from ossnet_jax import checkpointing, files, train_state
from ossnet_jax.errors import ConfigError, UserError
from ossnet_jax.families.oss_net import model as oss_net_model
from ossnet_jax.families.oss_net import step as oss_net_step
from ossnet_jax.official import pt

# --variant -> our config file; the release's configuration names (the code and the paper differ)
VARIANT_CONFIGS = {
    "o_net": "o_net",
    "a": "oss_net_a",
    "b": "oss_net_b",
    "c": "oss_net_c",
    "d": "oss_net_d",
}
RELEASE_NAMES = {
    "o_net": "vanilla_o_net_wide",
    "a": "oss_net_A",
    "b": "oss_net_B",
    "c": "oss_net_full",
    "d": "oss_net_full2",
}
DATASETS = {"brats": "bra_ts", "lits": "lits"}  # --dataset -> the release's suffix
FOLDED_BIAS = "encoder.final_mapping.0.bias"  # folded into our encoder_net/to_latent/bn mean
MAX_LISTED = 20  # keys listed per kind of mismatch

_LEAVES = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
    "numerator": "weight_numerator",
    "denominator": "weight_denominator",
}
_ENCODER_BLOCK = {
    "conv1": "main_mapping.0",
    "bn1": "main_mapping.1",
    "act1": "main_mapping.2",
    "conv2": "main_mapping.5",
    "bn2": "main_mapping.6",
    "shortcut": "residual_mapping",
    "act2": "final_activation",
}
_TO_LATENT = {"conv": "0", "bn": "1", "act": "2"}  # encoder.final_mapping
_SKIP = {"conv": "1", "bn": "2", "act": "3"}  # encoder.output_mappings.i (0: the max-pool)
_PATCH = {"conv1": "mapping.0", "act1": "mapping.1", "conv2": "mapping.3", "act2": "mapping.4"}
_DECODER_BLOCK = {
    "dense1": "linear_layer_1",
    "dense2": "linear_layer_2",
    "shortcut": "residual_mapping",
    "act1": "activation",
    "act2": "final_activation",
    "cbn1": "cnb_1",
    "cbn2": "cnb_2",
}
_CBN = {"gamma": "linear_gamma", "beta": "linear_beta"}


class ConversionError(UserError, ValueError):
    """A state dict that does not fit the chosen variant; the message names the file and the keys."""


def release_key(path: tuple[str, ...]) -> Optional[str]:
    """The release's state-dict key of one of our leaves, or None for a leaf the release lacks.

    path: module names then the leaf, e.g. ('encoder_net', 'block0', 'conv1', 'kernel') (params) or
    ('decoder_net', 'block2', 'cbn1', 'mean') (batch_stats).
    """
    *modules, leaf = path
    name = _LEAVES[leaf]
    match modules:
        case ["encoder_net", block, part] if block.startswith("block"):
            if part == "shortcut" and leaf == "bias":
                return None
            return f"encoder.blocks.{block[5:]}.{_ENCODER_BLOCK[part]}.{name}"
        case ["encoder_net", skip, part] if skip.startswith("skip"):
            return f"encoder.output_mappings.{skip[4:]}.{_SKIP[part]}.{name}"
        case ["encoder_net", "to_latent", part]:
            return f"encoder.final_mapping.{_TO_LATENT[part]}.{name}"
        case ["encoder_net", "seg_head"]:
            return None if leaf == "bias" else f"encoder.segmentation_mapping.0.{name}"
        case ["patch_net", part]:
            return f"decoder.patch_mapping.{_PATCH[part]}.{name}"
        case ["decoder_net", block, cbn, linear] if cbn.startswith("cbn"):
            return f"decoder.blocks.{block[5:]}.{_DECODER_BLOCK[cbn]}.{_CBN[linear]}.{name}"
        case ["decoder_net", block, cbn] if cbn.startswith("cbn"):
            return f"decoder.blocks.{block[5:]}.{_DECODER_BLOCK[cbn]}.normalization.{name}"
        case ["decoder_net", "out"]:
            return f"decoder.final_mapping.0.{name}"
        case ["decoder_net", block, part]:
            return f"decoder.blocks.{block[5:]}.{_DECODER_BLOCK[part]}.{name}"
    raise ValueError(f"no release key for {'/'.join(path)}")


def release_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The release's shape of a leaf of our `shape` (see the module docstring)."""
    if len(shape) == 5:
        return (shape[4], shape[3], *shape[:3])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape if shape else (1,)


def from_release(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A release array in our layout of `shape`, float32 (inverse of release_shape)."""
    if len(shape) == 5:
        value = value.transpose(2, 3, 4, 1, 0)
    elif len(shape) == 2:
        value = value.T
    return np.array(value.reshape(shape), np.float32, order="C")  # 0-d stays 0-d


def release_config(variant: str, dataset: str) -> ml_collections.ConfigDict:
    """Our configuration of a published model: configs/<variant>.py with the '<dataset>_release' preset
    (official sizes, the release's preprocessing, voxel-index locations)."""
    if variant not in VARIANT_CONFIGS:
        raise ConfigError(f"--variant must be one of {sorted(VARIANT_CONFIGS)}, got {variant!r}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    module = importlib.import_module(f"configs.{VARIANT_CONFIGS[variant]}")
    return module.get_config(f"{dataset}_release")


def model_templates(config: ml_collections.ConfigDict) -> dict:
    """{'params', 'batch_stats'} of the config's model as shape structs; nothing is computed."""
    model = oss_net_model.build_model(config)
    # the initial train state's shapes; no optimizer state is needed, so none is traced
    state = jax.eval_shape(
        lambda: oss_net_step.init_state(config, model, optax.identity(), jax.random.key(0))
    )
    return {"params": state.params.fast, "batch_stats": state.batch_stats}


def _paths(tree: Any) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(module names + leaf name, shape) of every leaf of a nested dict of arrays or shape structs."""
    return [
        (tuple(str(k.key) for k in path), tuple(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def expected_layout(templates: dict) -> dict[str, tuple[int, ...]]:
    """Release key -> release shape of every entry a state dict for the model of `templates` (see
    model_templates) holds, without the num_batches_tracked counters, in our tree's order."""
    layout = {}
    for collection in ("params", "batch_stats"):
        for path, shape in _paths(templates[collection]):
            key = release_key(path)
            if key is not None:
                layout[key] = release_shape(shape)
    layout[FOLDED_BIAS] = tuple(
        templates["batch_stats"]["encoder_net"]["to_latent"]["bn"]["mean"].shape
    )
    return layout


def _mismatch_message(source: str, state_dict: dict, layout: dict) -> Optional[str]:
    """What is wrong with the keys and shapes of `state_dict` against `layout`, or None."""
    missing = [k for k in layout if k not in state_dict]
    extra = [k for k in state_dict if k not in layout]
    wrong = [
        k for k in layout if k in state_dict and tuple(state_dict[k].shape) != tuple(layout[k])
    ]
    if not (missing or extra or wrong):
        return None

    def listed(title: str, keys: list[str], describe) -> str:
        if not keys:
            return ""
        lines = "".join(f"\n    {k}: {describe(k)}" for k in keys[:MAX_LISTED])
        more = f"\n    ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
        return f"\n  {len(keys)} {title}:{lines}{more}"

    return (
        f"{source} does not hold this variant's state dict ({len(layout)} entries expected, "
        f"{len(state_dict)} found)"
        + listed("missing", missing, lambda k: f"expected shape {tuple(layout[k])}")
        + listed("unexpected", extra, lambda k: f"shape {tuple(state_dict[k].shape)}")
        + listed(
            "with another shape",
            wrong,
            lambda k: f"shape {tuple(state_dict[k].shape)}, expected {tuple(layout[k])}",
        )
    )


def to_variables(state_dict: dict[str, np.ndarray], templates: dict, source: str) -> dict:
    """{'params', 'batch_stats'} of our model (the shapes of `templates`, see model_templates) from a
    release state dict, as float32 numpy arrays.

    Raises ConversionError naming `source` (the file) if a key is missing, unexpected or mis-shaped,
    or an entry is not floating point.
    """
    entries = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    problem = _mismatch_message(source, entries, expected_layout(templates))
    if problem:
        raise ConversionError(problem)
    not_float = [k for k, v in entries.items() if not np.issubdtype(v.dtype, np.floating)]
    if not_float:
        raise ConversionError(
            f"{source}: entries {', '.join(not_float[:MAX_LISTED])} are not floating point "
            f"({entries[not_float[0]].dtype})"
        )

    def value(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        key = release_key(path)
        out = np.zeros(shape, np.float32) if key is None else from_release(entries[key], shape)
        if path == ("encoder_net", "to_latent", "bn", "mean"):  # a batch statistic
            out = out - np.asarray(entries[FOLDED_BIAS], np.float32)
        return out

    return {
        collection: jax.tree_util.tree_map_with_path(
            lambda p, leaf: value(tuple(str(k.key) for k in p), tuple(leaf.shape)), tree
        )
        for collection, tree in templates.items()
    }


def trainable_count(state_dict: dict[str, np.ndarray]) -> int:
    """Trainable parameters of a release state dict: every entry but the BatchNorm buffers."""
    buffers = (".running_mean", ".running_var", ".num_batches_tracked")
    return int(sum(v.size for k, v in state_dict.items() if not k.endswith(buffers)))


@functools.cache
def published_templates(variant: str, dataset: str) -> dict:
    """model_templates' shapes of a release configuration (our release_config of variant and dataset)."""
    return model_templates(release_config(variant, dataset))


@functools.cache
def published_layout(variant: str, dataset: str) -> dict[str, tuple[int, ...]]:
    """expected_layout of a release configuration (our release_config of variant and dataset)."""
    return expected_layout(published_templates(variant, dataset))


def identify(state_dict: dict[str, np.ndarray]) -> Optional[tuple[str, str]]:
    """(variant, dataset) whose release configuration has exactly the keys and shapes of
    `state_dict` (num_batches_tracked aside), or None."""
    shapes = {
        k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")
    }
    for variant in VARIANT_CONFIGS:
        for dataset in DATASETS:
            if published_layout(variant, dataset) == shapes:
                return variant, dataset
    return None


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def convert(
    checkpoint: str | pathlib.Path,
    workdir: str | pathlib.Path,
    config: ml_collections.ConfigDict,
    provenance: Optional[dict] = None,
) -> dict:
    """Writes WORKDIR/config.json, an orbax checkpoint of step 0 (slow = fast parameters, a fresh
    optimizer state) and WORKDIR/official.json from a release state-dict file.

    evaluate.py and the API evaluate the workdir, train.py fine-tunes it (resuming from step 0 with
    the same config). `provenance` (variant, dataset) is added to official.json. Raises ConversionError
    for a file that does not fit `config`'s model, the reader's errors for one that is not a safe
    PyTorch checkpoint, and ConfigError for a workdir that already holds checkpoints, before writing.
    Returns what official.json holds: the source file and its SHA-256, its entries and trainable
    parameters.
    """
    checkpoint, workdir = pathlib.Path(checkpoint), pathlib.Path(workdir)
    held = workdir / "checkpoints"
    if held.is_dir() and any(held.iterdir()):
        raise ConfigError(f"{workdir} already holds checkpoints; convert into a new --workdir")
    state_dict = pt.load_state_dict(checkpoint)
    templates = model_templates(config)
    try:
        variables = to_variables(state_dict, templates, str(checkpoint))
    except ConversionError as error:
        match = identify(state_dict)
        if match is None:
            raise
        variant, dataset = match
        raise ConversionError(
            f"{error}\n  It holds the release's {RELEASE_NAMES[variant]}_{DATASETS[dataset]}: "
            f"convert it with --variant {variant} --dataset {dataset}"
        ) from None
    files.ensure_writable_dir(workdir)
    ckpt = checkpointing.Checkpoints(workdir, writer=True)
    try:
        # one compiled program: op by op, each primitive of the optimizer's init compiles on its own
        tx = train_state.make_optimizer(config)
        state = jax.jit(lambda v: train_state.state_from_variables(v, tx))(variables)
        ckpt.save(0, state)
    finally:
        ckpt.close()
    files.write_json(workdir / "config.json", json.loads(config.to_json()))
    summary = {
        **(provenance or {}),
        "checkpoint": str(checkpoint.resolve()),
        "sha256": _sha256(checkpoint),
        "entries": len(state_dict),
        "trainable_parameters": trainable_count(state_dict),
    }
    files.write_json(workdir / "official.json", summary)
    return summary
