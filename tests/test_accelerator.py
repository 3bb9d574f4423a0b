"""benchmarks/accelerator.py: device slugs, the FLOP count used for utilisation, and a smoke run."""

import json
import subprocess
import sys

import pytest

from benchmarks import accelerator
from tests.conftest import tiny_preset


def test_device_slug():
    assert accelerator.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert accelerator.device_slug("TPU v5 lite") == "tpu-v5-lite"
    assert accelerator.device_slug("cpu") == "cpu"


def _run(kernels: str, flops: float, loops: int) -> dict:
    return {"kernels": kernels, "programs": {"update": {"flops": flops, "while_loops": loops}}}


def test_programs_with_while_loops_take_the_xla_programs_flops():
    plain, looped = _run("xla", 10.0, 0), _run("cpu", 4.0, 2)
    entry = looped["programs"]["update"]
    flops, source = accelerator.flops_for_utilisation("update", entry, [plain, looped])
    assert flops == 10.0 and "'xla' program" in source
    flops, source = accelerator.flops_for_utilisation("update", entry, [looped])
    assert flops == 4.0 and "lower bound" in source
    own = plain["programs"]["update"]
    assert accelerator.flops_for_utilisation("update", own, [plain]) == (10.0, "cost_analysis")


@pytest.mark.slow
def test_smoke_run_writes_positive_numbers(tmp_path):
    out = tmp_path / "result" / "accelerator.json"
    command = [sys.executable, "-m", "benchmarks.accelerator", "--config", tiny_preset(tmp_path)]
    command += ["--batch", "2", "--points", "64", "--kernels", "cpu", "--repeats", "1"]
    command += ["--gemm", "128", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| cpu |") == 5
    assert result["backend"] == result["device_kind"] == "cpu"
    assert result["sizes"] == {
        "batch": 2,
        "points": 64,
        "decode_points": 64,
        "grid": [32, 32, 16],
        "downscale": 2,
        "train_dtype": "float32",
        "eval_dtype": "float32",
    }
    assert result["gemm"]["float32_flops_per_s"] > 0 and result["gemm"]["bfloat16_flops_per_s"] > 0
    (run,) = result["runs"]
    assert run["kernels"] == "cpu" and set(run["programs"]) == {
        "prepare",
        "update",
        "encode",
        "decode",
    }
    for key in ("train_step_s", "train_locations_per_s", "update_locations_per_s"):
        assert run[key] > 0, key
    assert run["decode_locations_per_s"] > 0 and run["train_mfu"] > 0
    for name, program in run["programs"].items():
        for key in ("seconds", "compile_s", "flops", "mfu_flops", "mfu", "total_bytes"):
            assert program[key] > 0, (name, key)
        assert program["argument_bytes"] > 0 and program["peak_bytes_in_use"] is None
        assert program["flops_source"].startswith("cost_analysis")
