"""Decoder throughput of every OSS-Net variant at the official sizes, against this machine's GEMM rate.

  python -m benchmarks.throughput [--points 8192] [--repeats 2] [--step-repeats 1]
                                  [--models oss_net_c,o_net] [--gemm 4096] [--step-points 4096]
                                  [--no-step] [--dtype float32]
Quick run: --points 2048 --repeats 2 --gemm 2048 --models oss_net_c --no-step.

Writes benchmarks/results/throughput.json and throughput.md:
  rows {"model", "points", "kernels", "fwd_points_per_s", "train_points_per_s", "flops_per_point",
        "flops_per_point_all", "flops_per_point_xla", "gemm_gflops", "mfu"} for the BraTS preset
        (decoder 512 wide, 5 blocks, encoder (16, 32, 64, 128), 4 channels, grid 256x256x160), one
        volume of `points` locations;
  "flops_source": where the FLOP counts come from (below);
  "step": the full jitted train step of OSS-Net C (augmentation, sampling, patches, encoder, decoder,
        loss, RAdam + Lookahead) for 2 volumes x `step_points` locations on that grid, in seconds, its
        two parts timed alone (prepare_inputs: augmentation, sampling, patches, downscaling;
        update_step: network, loss, optimizer; the host loop runs them as two programs, the first in
        the prefetch thread), and the encoder's forward / forward + backward alone for those 2 volumes.
fwd = decoder forward in evaluation mode (patch encoder included, given patches and latents);
train = decoder forward + backward in training mode (batch statistics, gradients of the parameters
and of the latents, no optimizer). The FLOP counts are of that forward as the row's kernel set
executes it (ossnet_jax/models/flops.py, `decoder_flops`, per-volume work spread over the locations):
flops_per_point its matrix products and convolutions, flops_per_point_all with the elementwise work
too, flops_per_point_xla XLA's own count (cost analysis) of the compiled forward that was timed, which
flops_per_point_all should match. gemm_gflops is a float32 (n x n) @ (n x n) matmul and mfu = fwd
locations/s x flops_per_point / GEMM FLOP/s: the products' share of the GEMM rate (the elementwise work
runs in fused loops, not at GEMM speed). Every time is the minimum over `repeats` (`step-repeats` for
the train step and the encoder) runs after one compiling run. The GEMM is timed before every model and
after the last; gemm_gflops is the best of these, so a busy moment does not inflate MFU.
"""

import argparse
import importlib
import json
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ossnet_jax import families, losses, runtime
from ossnet_jax import kernels as kernel_sets
from ossnet_jax.families.oss_net.model import OSSNet, build_model, downscale, patch_channels
from ossnet_jax.models.flops import compiled_flops, decoder_flops, latent_size
from ossnet_jax.train_state import make_optimizer

MODELS = ("o_net", "oss_net_a", "oss_net_b", "oss_net_c", "oss_net_d")
RESULTS = pathlib.Path(__file__).parent / "results"
FLOPS_SOURCE = (
    "flops_per_point: ossnet_jax/models/flops.py decoder_flops(part='matmul') / points, the decoder"
    " forward's matrix products and convolutions as the row's kernel set executes them;"
    " flops_per_point_all: the same with the elementwise work (part='total');"
    " flops_per_point_xla: XLA's cost_analysis()['flops'] of the compiled forward / points"
)


def min_seconds(fn: Callable, *args, repeats: int) -> float:
    """Minimum wall time of fn(*args) over `repeats` runs, after one (compiling) run."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(n: int, repeats: int) -> float:
    """float32 GFLOP/s of one (n x n) @ (n x n) product."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    seconds = min_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def model_config(name: str, dtype: str):
    config = importlib.import_module(f"configs.{name}").get_config("brats")
    config.train.dtype = dtype
    config.eval.dtype = dtype
    return config


def decoder_inputs(config, points: int, key: jax.Array) -> tuple:
    """Random (locations (1, N, 3), patches (1, N, S, S, S, Cp) or None, latents (1, K, L))."""
    k1, k2, k3 = jax.random.split(key, 3)
    grid = jnp.asarray(config.data.grid_shape)
    locs = jax.random.randint(k1, (1, points, 3), 0, grid)
    patches = None
    if config.model.patches:
        s = config.model.patch_size
        patches = jax.random.normal(k2, (1, points, s, s, s, patch_channels(config)))
    k = config.model.decoder_blocks + 1 if config.model.encoder == "skip" else 1
    latents = jax.nn.relu(jax.random.normal(k3, (1, k, latent_size(config))))
    return locs, patches, latents


def decoder_rates(
    config, points: int, repeats: int, train: bool = True
) -> tuple[float, Optional[float]]:
    """(forward, training forward + backward) decoder locations per second for one volume.

    The second is None with train=False (the training program is then neither compiled nor run).
    """
    measured = decoder_measurements(config, points, repeats, train)
    return measured["fwd_points_per_s"], measured["train_points_per_s"]


def decoder_measurements(config, points: int, repeats: int, train: bool = True) -> dict:
    """{'fwd_points_per_s', 'train_points_per_s', 'fwd_xla_flops'} of one volume: `decoder_rates`'
    two rates (the second None with train=False) and XLA's FLOP count of the timed forward program."""
    model = build_model(config)
    locs, patches, latents = decoder_inputs(config, points, jax.random.key(0))
    variables = jax.jit(
        lambda: model.init(
            jax.random.key(1), locs, patches, latents, train=False, method=OSSNet.decode
        )
    )()
    target = (locs[..., 0] % 2).astype(jnp.float32)

    def forward(v, locs, patches, latents):
        return model.apply(v, locs, patches, latents, train=False, method=OSSNet.decode)

    def loss(params, latents, stats, locs, patches):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": stats},
            locs,
            patches,
            latents,
            train=True,
            method=OSSNet.decode,
            mutable=["batch_stats"],
        )
        return losses.bce(logits, target), mutated

    fn = jax.jit(forward)  # timed through jit's dispatch, as train.py and evaluate.py call programs
    compiled = fn.lower(variables, locs, patches, latents).compile()
    measured = {"fwd_xla_flops": compiled_flops(compiled), "train_points_per_s": None}
    fwd = min_seconds(fn, variables, locs, patches, latents, repeats=repeats)
    measured["fwd_points_per_s"] = points / fwd
    if not train:
        return measured
    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    train_s = min_seconds(
        jax.jit(grad),
        variables["params"],
        latents,
        variables["batch_stats"],
        locs,
        patches,
        repeats=repeats,
    )
    measured["train_points_per_s"] = points / train_s
    return measured


def step_setup(config, points: Optional[int]) -> tuple:
    """(family, model, kwargs, state, batch) for train steps of 2 volumes (x `points` locations for
    OSS-Net; None keeps the config's own, and the U-Nets' crops or slices).

    The batch is noise with one foreground box filling the middle fifth of each axis; kwargs are the
    keyword arguments of the family's step functions.
    """
    config.train.batch_size = 2
    if points is not None:
        config.train.num_points = points
    family = families.get_family(config)
    model = family.build_model(config)
    tx = make_optimizer(config)
    state = jax.jit(lambda: family.init_state(config, model, tx, jax.random.key(0)))()
    grid = tuple(config.data.grid_shape)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2,) + grid + (config.data.num_channels,)).astype(np.float32)
    target = np.zeros((2,) + grid, np.uint8)
    target[(slice(None),) + tuple(slice(2 * n // 5, 3 * n // 5) for n in grid)] = 1
    batch = {
        "image": jnp.asarray(image),
        "target": jnp.asarray(target),
        "band": jnp.asarray(target > 0),
    }
    return family, model, dict(model=model, tx=tx, config=config), state, batch


def host_loop_seconds(family, kwargs: dict, state, batch: dict, repeats: int) -> tuple:
    """(prepare_inputs seconds, update_step seconds, the prepared inputs) for key 2, as the host
    loop runs the two programs."""
    config, key = kwargs["config"], jax.random.key(2)
    prepare = jax.jit(lambda b, r, n: family.prepare_inputs(b, r, n, config))
    prepare_s = min_seconds(prepare, batch, key, state.step, repeats=repeats)
    inputs = prepare(batch, key, state.step)
    update = jax.jit(lambda s, i, r: family.update_step(s, i, r, **kwargs))
    return prepare_s, min_seconds(update, state, inputs, key, repeats=repeats), inputs


def full_step_seconds(config, points: int, repeats: int) -> dict:
    """Seconds of OSS-Net C's whole train step and of its encoder for 2 volumes of the config's grid."""
    family, model, kwargs, state, batch = step_setup(config, points)
    grid = tuple(config.data.grid_shape)
    step = jax.jit(lambda s, b, r: family.train_step(s, b, r, **kwargs))
    step_s = min_seconds(step, state, batch, jax.random.key(2), repeats=repeats)
    prepare_s, update_s, inputs = host_loop_seconds(family, kwargs, state, batch, repeats)

    low = jax.jit(lambda x: downscale(x, config.data.downscale))(batch["image"])
    variables = {"params": state.params.fast, "batch_stats": state.batch_stats}

    def encode(params, low):
        (latents, seg), _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            low,
            train=True,
            method=OSSNet.encode,
            mutable=["batch_stats"],
        )
        return jnp.sum(latents) + jnp.sum(seg)

    enc_fwd = min_seconds(jax.jit(encode), variables["params"], low, repeats=repeats)
    enc_train = min_seconds(jax.jit(jax.grad(encode)), variables["params"], low, repeats=repeats)
    return {
        "model": "oss_net_c",
        "volumes": 2,
        "points_per_volume": points,
        "grid": list(grid),
        "train_step_s": step_s,
        "prepare_s": prepare_s,
        "update_s": update_s,
        "encoder_fwd_s": enc_fwd,
        "encoder_fwd_bwd_s": enc_train,
    }


def write_result(path: str, result: dict, table: str) -> None:
    """Writes result to path (JSON) and table beside it (.md), and prints the table."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def markdown(result: dict) -> str:
    lines = [
        f"GEMM float32: {result['gemm_gflops']:.1f} GFLOP/s ({result['gemm_n']}^3); dtype"
        f" {result['dtype']}; times are minima over {result['repeats']} runs.",
        "",
        "MFLOP/loc: the decoder forward's matrix products and convolutions as the kernel set executes"
        " them (ossnet_jax/models/flops.py); all: with the elementwise work; XLA: XLA's cost analysis"
        " of the timed program. fwd GFLOP/s and MFU (of the GEMM rate) use MFLOP/loc.",
        "",
        "| model | kernels | points | fwd loc/s | train loc/s | MFLOP/loc | all | XLA |"
        " fwd GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['kernels']} | {r['points']} | {r['fwd_points_per_s']:.0f} |"
            f" {r['train_points_per_s']:.0f} | {r['flops_per_point'] / 1e6:.2f} |"
            f" {r['flops_per_point_all'] / 1e6:.2f} | {r['flops_per_point_xla'] / 1e6:.2f} |"
            f" {r['fwd_points_per_s'] * r['flops_per_point'] / 1e9:.1f} | {r['mfu']:.1%} |"
        )
    if result.get("step"):
        s = result["step"]
        lines += [
            "",
            f"OSS-Net C train step, {s['volumes']} x {s['points_per_volume']} locations, grid"
            f" {'x'.join(map(str, s['grid']))}: {s['train_step_s']:.2f} s as one program; its two"
            f" parts as the host loop runs them (prepare in the prefetch thread): prepare_inputs"
            f" {s['prepare_s']:.2f} s, update_step {s['update_s']:.2f} s; encoder alone"
            f" forward {s['encoder_fwd_s']:.2f} s, forward + backward {s['encoder_fwd_bwd_s']:.2f} s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--gemm", type=int, default=4096, help="n of the n^3 GEMM")
    parser.add_argument("--step-points", type=int, default=4096)
    parser.add_argument("--no-step", action="store_true", help="skip the full train step")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args()

    gemm_runs = []
    rows = []
    for name in args.models.split(","):
        gemm_runs.append(gemm_gflops(args.gemm, args.repeats))
        config = model_config(name, args.dtype)
        kernels = kernel_sets.of_config(config)
        measured = decoder_measurements(config, args.points, args.repeats)
        count = lambda part: decoder_flops(config, args.points, kernels=kernels, part=part)
        rows.append(
            {
                "model": name,
                "points": args.points,
                "kernels": kernels,
                "fwd_points_per_s": measured["fwd_points_per_s"],
                "train_points_per_s": measured["train_points_per_s"],
                "flops_per_point": count("matmul") / args.points,
                "flops_per_point_all": count("total") / args.points,
                "flops_per_point_xla": measured["fwd_xla_flops"] / args.points,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    gemm_runs.append(gemm_gflops(args.gemm, args.repeats))
    gemm = max(gemm_runs)
    print(f"GEMM {args.gemm}^3 float32: {gemm:.1f} GFLOP/s (runs: {gemm_runs})", flush=True)
    for row in rows:
        row["gemm_gflops"] = gemm
        row["mfu"] = row["fwd_points_per_s"] * row["flops_per_point"] / (gemm * 1e9)
    step = None
    if not args.no_step:
        step = full_step_seconds(
            model_config("oss_net_c", args.dtype), args.step_points, args.step_repeats
        )
        print(json.dumps(step), flush=True)
    result = {
        "dtype": args.dtype,
        "gemm_n": args.gemm,
        "gemm_gflops": gemm,
        "gemm_runs_gflops": gemm_runs,
        "repeats": args.repeats,
        "flops_source": FLOPS_SOURCE,
        "rows": rows,
        "step": step,
    }
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    runtime.prepare()
    main()
