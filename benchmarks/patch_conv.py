"""Patch encoder formulations: XLA 3D convolution on 7^3 patches vs one GEMM with a kernel-built matrix.

  python -m benchmarks.patch_conv [--points 8192]
Writes benchmarks/results/patch_conv.json (rows {"formulation", "points", "cin", "cout", "seconds",
"gflops_dense"}) and prints a table. GFLOP/s count the dense 343 x 343 work of a 'same' 7^3 conv on a
7^3 patch (2 * 343 * 343 * cin * cout per location) for both, so the numbers compare directly.
"""

import argparse
import json
import pathlib
import time

import jax

from ossnet_jax.kernels.cpu.patch_conv import conv_matrix


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def _conv(kernel, x):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


def _gemm(kernel, x):
    n = x.shape[0]
    return (x.reshape(n, -1) @ conv_matrix(kernel, 7)).reshape(n, 7, 7, 7, kernel.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "patch_conv.json")
    )
    args = parser.parse_args()
    rows = []
    for cin, cout in [(4, 2), (2, 1), (8, 4)]:
        key = jax.random.key(0)
        x = jax.random.normal(key, (args.points, 7, 7, 7, cin))
        kernel = jax.random.normal(key, (7, 7, 7, cin, cout)) * 0.1
        flops = 2 * args.points * 343 * 343 * cin * cout
        for name, fn in [("xla_conv3d", _conv), ("gemm", _gemm)]:
            seconds = _time(jax.jit(fn), kernel, x, repeats=2 if name == "xla_conv3d" else 5)
            rows.append(
                {
                    "formulation": name,
                    "points": args.points,
                    "cin": cin,
                    "cout": cout,
                    "seconds": seconds,
                    "gflops_dense": flops / seconds / 1e9,
                }
            )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "rows": rows}, indent=2))
    print("| formulation | cin->cout | points | seconds | GFLOP/s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['formulation']} | {r['cin']}->{r['cout']} | {r['points']} | {r['seconds']:.4f} "
            f"| {r['gflops_dense']:.1f} |"
        )


if __name__ == "__main__":
    main()
