"""Op census of OSS-Net's programs as a platform gets them: which kernel forms reach which backend.

  python -m benchmarks.lowering --platform cuda --config configs/oss_net_c.py:brats --check
  python -m benchmarks.lowering --platform cpu --config configs/oss_net_c.py:small
  python -m benchmarks.lowering --platform tpu --config configs/oss_net_c.py:small --kernels cpu
  python -m benchmarks.lowering --platform cuda --config configs/oss_net_c.py:small --batch 2 \
      --points 256 --grid 64 64 32 --devices 2 --check

Builds the programs of an OSS-Net config from shapes only (jax.ShapeDtypeStruct: nothing is
allocated or run, so any platform and the official sizes work on a CPU) with config.model.kernels
set to what 'auto' resolves to on --platform (ossnet_jax.kernels.resolve; --kernels names another):
  'prepare'  oss_net_step.prepare_inputs: augmentation, location sampling, patches, downscaling, targets
  'update'   oss_net_step.update_step: encoder, decoder, loss, gradients, optimizer (state donated)
  'encode'   the Predictor's encoder pass on one volume
  'decode'   the Predictor's decoder on eval.batch_points locations
and prints one JSON line per program:
  {"program", "platform", "kernels", "stage", "conv3d", "conv2d", "while", "all_gather",
   "all_reduce", "custom_call", "custom_call_targets"}
conv<n>d counts the convolutions by their number of spatial dimensions (a conv1d or conv4d key
appears only where there is one), custom_call_targets maps each target to its count.

stage 'lowered' (without --devices): the StableHLO text of
jax.jit(f).trace(*shapes).lower(lowering_platforms=(platform,)), before any XLA pass: what the
program asks the platform's compiler for. Each function of the module is counted once however often
it is called, and a lax.scan or fori_loop is one while loop.

stage 'compiled' (--devices N): collectives only exist once XLA's SPMD partitioner has split the
program, so the two train programs are compiled for N host CPU devices (the process sets
--xla_force_host_platform_device_count=N in XLA_FLAGS before JAX starts its CPU backend), the batch
split over parallel.AXIS as train.py does (parallel.data_mesh, parameters and optimizer state
replicated), with the kernels --platform would use; everything is counted in compiled.as_text()
(XLA:CPU's passes have run, so e.g. a 1x1 convolution may have become a dot). The inference
programs run on one device and are left out. train.batch_size must divide by N.

--check exits with status 1, naming each finding, if for platform cuda or tpu
  - a program holds a conv2d: OSS-Net has only 3D convolutions (the patch encoder's too), so a 2D
    one is a 3D convolution folded into 2D over X-shifted copies, the CPU form;
  - a lowered program holds a while loop: the plain formulation has none (the CPU kernel gradient
    is a lax.scan over slabs; jnp.searchsorted's default method, which location sampling uses with
    train.border_fraction > 0, is one too). Compiled rows are exempt: they are XLA:CPU's programs,
    and JAX lowers jax.random's threefry for the CPU as a rolled loop that cuda and tpu unroll;
  - with --devices, a train program holds an all-gather. Data parallelism needs all-reduces only
    (gradients, batch-norm statistics, loss terms and counts are sums over the batch) while every
    activation stays on the device holding its volumes. An all-gather means the partitioner could
    not keep an operand split along the batch and collected it whole on every device: a batch-sized
    operand, so any all-gather counts.
Platform cpu is never checked: the CPU forms are what it should get.
"""

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
from collections import Counter
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from ossnet_jax import families, kernels, parallel, runtime
from ossnet_jax.data import dataset
from ossnet_jax.families.oss_net import predictor as oss_net_predictor
from ossnet_jax.train_state import make_optimizer

PLATFORMS = ("cpu", "cuda", "tpu")
TRAIN_PROGRAMS = ("prepare", "update")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# lowered StableHLO: `stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, 2, f]x[...]->[...]`
_MLIR_CONV = re.compile(r"stablehlo\.convolution\b")
_MLIR_CONV_DIMS = re.compile(r"stablehlo\.convolution\b.*?dim_numbers = \[([^\]]*)\]")
_MLIR_OPS = {
    "while": re.compile(r"\bstablehlo\.while\b"),
    "all_gather": re.compile(r"\bstablehlo\.all_gather\b"),
    "all_reduce": re.compile(r"\bstablehlo\.all_reduce\b"),
}
_MLIR_CUSTOM_CALL = re.compile(r"\bstablehlo\.custom_call @([\w$.\-]+)")
# compiled HLO: `name = f32[...] convolution(...), window={...}, dim_labels=b012f_012io->b012f`
_HLO_CONV = re.compile(r"\sconvolution\(")
_HLO_CONV_DIMS = re.compile(r"\sconvolution\(.*?dim_labels=([^_,\s]+)_")
_HLO_OPS = {
    "while": re.compile(r"\swhile\("),
    "all_gather": re.compile(r"\sall-gather(?:-start)?\("),
    "all_reduce": re.compile(r"\sall-reduce(?:-start)?\("),
}
_HLO_CUSTOM_CALL = re.compile(r"\scustom-call\(.*?custom_call_target=\"([^\"]+)\"")


@dataclasses.dataclass
class Program:
    """A jitted function and the shapes (pytree of jax.ShapeDtypeStruct) of its arguments."""

    fn: Callable
    args: tuple


def load_config(spec: str) -> ml_collections.ConfigDict:
    """get_config(arg) of 'path/to/config.py[:arg]' (ml_collections config_flags style)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_census_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return dataset.resolve_data_config(module.get_config(arg) if arg else module.get_config())


def sized(
    config: ml_collections.ConfigDict,
    batch: Optional[int] = None,
    points: Optional[int] = None,
    grid: Optional[tuple[int, int, int]] = None,
) -> ml_collections.ConfigDict:
    """A copy of `config` with train.batch_size = batch, train.num_points = eval.batch_points =
    points and data.grid_shape = grid, for each one given."""
    config = ml_collections.ConfigDict(config.to_dict())
    if batch is not None:
        config.train.batch_size = batch
    if points is not None:
        config.train.num_points = points
        config.eval.batch_points = points
    if grid is not None:
        config.data.grid_shape = tuple(grid)
    return config


def _placed(shapes: Any, sharding: Optional[NamedSharding]) -> Any:
    """The same shapes carrying `sharding` (unchanged for None)."""
    if sharding is None:
        return shapes
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def programs(config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> dict[str, Program]:
    """The programs of an OSS-Net config by name (see the module docstring), from shapes only.

    The batch is (train.batch_size, X, Y, Z[, C]) of data.grid_shape; with a mesh the train
    programs' batch-led arguments are split over parallel.AXIS and the rest replicated, and the
    inference programs are left out.
    """
    if config.model.name != "oss_net":
        raise ValueError(
            f"model.name {config.model.name!r}: the census covers OSS-Net configs only"
        )
    family = families.get_family(config)
    net = family.build_model(config)
    tx = make_optimizer(config)
    split = None if mesh is None else parallel.batch_sharding(mesh)
    whole = None if mesh is None else parallel.replicated(mesh)
    state = _placed(
        jax.eval_shape(lambda: family.init_state(config, net, tx, jax.random.key(0))), whole
    )
    rng = _placed(jax.eval_shape(lambda: jax.random.key(0)), whole)
    step = _placed(jax.ShapeDtypeStruct((), jnp.int32), whole)
    b, shape, channels = (
        config.train.batch_size,
        tuple(config.data.grid_shape),
        config.data.num_channels,
    )
    batch = _placed(
        {
            "image": jax.ShapeDtypeStruct((b,) + shape + (channels,), jnp.float32),
            "target": jax.ShapeDtypeStruct((b,) + shape, jnp.uint8),
            "band": jax.ShapeDtypeStruct((b,) + shape, jnp.bool_),
        },
        split,
    )
    prepare = jax.jit(functools.partial(family.prepare_inputs, config=config))
    inputs = _placed(jax.eval_shape(prepare, batch, rng, step), split)
    update = jax.jit(
        functools.partial(family.update_step, model=net, tx=tx, config=config), donate_argnums=0
    )
    found = {
        "prepare": Program(prepare, (batch, rng, step)),
        "update": Program(update, (state, inputs, rng)),
    }
    if mesh is not None:
        return found
    variables = {"params": state.params.slow, "batch_stats": state.batch_stats}
    predictor = oss_net_predictor.Predictor(config, net, variables)
    image = jax.ShapeDtypeStruct(shape + (channels,), jnp.float32)
    latents, _, source = jax.eval_shape(predictor.encode, variables, image)
    locations = jax.ShapeDtypeStruct((config.eval.batch_points, 3), jnp.int32)
    found["encode"] = Program(predictor.encode, (variables, image))
    found["decode"] = Program(predictor.decode, (variables, latents, source, locations))
    return found


def _conv_key(dims: str) -> str:
    """'conv<n>d' for the input dimension labels of a convolution ('b, 0, 1, f' or 'b01f')."""
    return f"conv{sum(c.isdigit() for c in dims)}d"


def census(text: str, stage: str) -> dict:
    """Op counts of a lowered StableHLO ('lowered') or compiled HLO ('compiled') module text.

    Returns {"conv2d", "conv3d"[, other "conv<n>d"], "while", "all_gather", "all_reduce",
    "custom_call", "custom_call_targets": {target: count}}.
    """
    if stage == "lowered":
        conv, conv_dims, ops, custom = _MLIR_CONV, _MLIR_CONV_DIMS, _MLIR_OPS, _MLIR_CUSTOM_CALL
    else:
        conv, conv_dims, ops, custom = _HLO_CONV, _HLO_CONV_DIMS, _HLO_OPS, _HLO_CUSTOM_CALL
    convs = Counter({"conv2d": 0, "conv3d": 0})
    for line in text.splitlines():
        if conv.search(line):
            dims = conv_dims.search(line)
            if dims is None:
                raise ValueError(
                    f"a convolution whose dimensions were not recognised: {line.strip()}"
                )
            convs[_conv_key(dims.group(1))] += 1
    targets = Counter(custom.findall(text))
    return {
        **dict(sorted(convs.items())),
        **{name: len(pattern.findall(text)) for name, pattern in ops.items()},
        "custom_call": sum(targets.values()),
        "custom_call_targets": dict(sorted(targets.items())),
    }


def program_census(
    program: Program, platform: str, mesh: Optional[Mesh] = None
) -> tuple[str, dict]:
    """(stage, census) of one program: lowered for `platform`, or compiled on the mesh's devices."""
    traced = program.fn.trace(*program.args)
    if mesh is None:
        return "lowered", census(traced.lower(lowering_platforms=(platform,)).as_text(), "lowered")
    return "compiled", census(traced.lower().compile().as_text(), "compiled")


def findings(rows: list[dict]) -> list[str]:
    """What --check rejects in the census rows of one run (see the module docstring)."""
    found = []
    for row in rows:
        if row["platform"] == "cpu":
            continue
        where = f"{row['program']} ({row['platform']}, kernels {row['kernels']!r}, {row['stage']})"
        if row["conv2d"]:
            found.append(f"{where}: {row['conv2d']} conv2d (3D convolutions folded to 2D)")
        if row["stage"] == "lowered" and row["while"]:
            found.append(f"{where}: {row['while']} while loop(s)")
        if row["program"] in TRAIN_PROGRAMS and row["all_gather"]:
            found.append(f"{where}: {row['all_gather']} all-gather(s) (an operand collected whole)")
    return found


def host_device_flags(flags: str, count: int) -> str:
    """XLA_FLAGS `flags` with DEVICE_COUNT_FLAG set to `count` (replacing one already there)."""
    kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG + "=")]
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])


def run(
    config: ml_collections.ConfigDict,
    platform: str,
    kernel_set: str = "auto",
    devices: Optional[int] = None,
) -> list[dict]:
    """Census rows of every program of `config` with model.kernels = kernels.resolve(kernel_set,
    platform).

    devices: compile the train programs split over that many of this process's CPU devices instead
    of lowering for `platform` (see the module docstring).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.kernels = kernels.resolve(kernel_set, platform)
    mesh = None
    if devices is not None:
        if config.train.batch_size % devices:
            raise ValueError(
                f"train.batch_size {config.train.batch_size} must divide by {devices} devices"
            )
        mesh = parallel.data_mesh(config.train.batch_size, jax.devices("cpu")[:devices])
    rows = []
    for name, program in programs(config, mesh).items():
        stage, counts = program_census(program, platform, mesh)
        rows.append(
            {
                "program": name,
                "platform": platform,
                "kernels": config.model.kernels,
                "stage": stage,
                **counts,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", required=True, choices=PLATFORMS)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--kernels", default="auto", choices=kernels.NAMES)
    parser.add_argument("--devices", type=int, help="compile the train programs on N CPU devices")
    parser.add_argument("--batch", type=int, help="train.batch_size")
    parser.add_argument("--points", type=int, help="train.num_points and eval.batch_points")
    parser.add_argument("--grid", type=int, nargs=3, help="data.grid_shape X Y Z")
    parser.add_argument("--check", action="store_true", help="exit 1 on accelerator findings")
    args = parser.parse_args()
    if args.devices is not None:
        if args.devices < 2:
            parser.error("--devices needs at least 2 devices")
        os.environ["XLA_FLAGS"] = host_device_flags(os.environ.get("XLA_FLAGS", ""), args.devices)
    runtime.prepare()
    if args.devices is not None and len(jax.devices("cpu")) < args.devices:
        parser.error(f"JAX started with {len(jax.devices('cpu'))} CPU devices, not {args.devices}")
    config = sized(load_config(args.config), args.batch, args.points, args.grid)
    rows = run(config, args.platform, args.kernels, args.devices)
    for row in rows:
        print(json.dumps(row), flush=True)
    problems = findings(rows) if args.check else []
    if problems:
        sys.exit("--check failed:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
