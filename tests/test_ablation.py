"""The ablation's pieces: every variant builds, rows merge and resume, the table's statistics."""

import json
import statistics

import pytest

from benchmarks import ablation
from ossnet_jax import families, training
from tests.test_compare import tiny_spec


@pytest.mark.parametrize("variant", list(ablation.VARIANTS))
def test_every_variant_sets_its_keys_and_builds_on_the_small_preset(variant):
    config = ablation.variant_config(ablation.DEFAULT_BASE, {"train.steps": 50}, 0, variant, 2)
    for key, value in ablation.VARIANTS[variant].items():
        section, field = key.split(".")
        assert config[section][field] == value
    assert config.train.seed == 2 and config.train.steps == (800 if variant == "steps_800" else 50)
    families.get_family(config).build_model(config)  # the model's own checks (odd patch sizes)


def _row(dataset, variant, seed, dice, **extra):
    return {
        "dataset": dataset,
        "variant": variant,
        "overrides": ablation.VARIANTS.get(variant, {"model.x": [1, 2]}),
        "seed": seed,
        "base": "configs/oss_net_c.py:small",
        "steps": 400,
        "grid_shape": [96, 96, 64],
        "dice": dice,
        "hd95": 3.0,
        "train_s": 100.0 + seed,
        "inference_s": 2.0,
        "params": 1234,
        "wall_s": 200.0,
        "machine": "cpu",
        **extra,
    }


def test_merge_replaces_rows_of_the_same_key_and_orders_them():
    old = [_row("tumour", "border_0", 0, 0.5), _row("tumour", "baseline", 1, 0.8)]
    old += [_row("vessels", "baseline", 0, 0.6)]
    new = [_row("tumour", "border_0", 0, 0.7), _row("tumour", "baseline", 0, 0.9)]
    new += [_row("tumour", "retired_variant", 0, 0.1)]
    merged = ablation.merge(old, new)
    assert [ablation.row_key(r) for r in merged] == [
        ("tumour", "baseline", 0),
        ("tumour", "baseline", 1),
        ("tumour", "border_0", 0),
        ("tumour", "retired_variant", 0),
        ("vessels", "baseline", 0),
    ]
    assert merged[2]["dice"] == 0.7


def test_pending_skips_finished_runs_unless_rerun():
    rows = [_row("tumour", "baseline", 0, 0.8), _row("vessels", "border_0", 1, 0.6)]
    variants, seeds = ["baseline", "border_0"], [0, 1]
    assert ablation.pending(rows, "tumour", variants, seeds, False) == [
        ("baseline", 1),
        ("border_0", 0),
        ("border_0", 1),
    ]
    assert ablation.pending(rows, "vessels", variants, seeds, False) == [
        ("baseline", 0),
        ("baseline", 1),
        ("border_0", 0),
    ]
    assert len(ablation.pending(rows, "tumour", variants, seeds, True)) == 4


def _summary_rows():
    rows = [_row("tumour", "baseline", s, d) for s, d in ((0, 0.80), (1, 0.82), (2, 0.84))]
    rows += [_row("tumour", "border_0", 0, 0.70), _row("tumour", "border_0", 1, 0.74)]
    rows += [_row("tumour", "patch_5", 5, 0.75)]  # no baseline of seed 5
    rows += [_row("tumour", "width_64", 0, None), _row("tumour", "width_64", 1, 0.85)]
    return ablation.merge([], rows + [_row("vessels", "border_0", 0, 0.5)])


def test_summary_gives_the_mean_and_sd_over_seeds_and_the_paired_difference():
    lines = {(s["dataset"], s["variant"]): s for s in ablation.summarise(_summary_rows())}
    base, border = lines["tumour", "baseline"], lines["tumour", "border_0"]
    assert base["seeds"] == [0, 1, 2] and base["dice"] == pytest.approx(0.82)
    assert base["dice_sd"] == pytest.approx(0.02) and base["delta"] == pytest.approx(0.0)
    assert border["dice"] == pytest.approx(0.72)
    assert border["dice_sd"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert border["delta"] == pytest.approx(-0.09)  # (0.70 - 0.80 + 0.74 - 0.82) / 2
    assert border["delta_sd"] == pytest.approx(statistics.stdev([-0.10, -0.08]))
    assert border["train_s"] == pytest.approx(100.5) and border["steps"] == [400]
    assert (
        lines["tumour", "patch_5"]["delta"] is None
        and lines["tumour", "patch_5"]["dice_sd"] is None
    )
    width = lines["tumour", "width_64"]  # a case without Dice counts nowhere
    assert width["dice"] == pytest.approx(0.85) and width["delta"] == pytest.approx(0.03)
    assert lines["vessels", "border_0"]["delta"] is None  # the tumour baseline is not its baseline


def test_markdown_has_one_table_per_dataset_and_the_commands():
    payload = {
        "rows": _summary_rows(),
        "commands": [["--dataset_name", "tumour"], ["--seeds", "1 2"]],
    }
    text = ablation.markdown(payload)
    assert text.index("## tumour") < text.index("## vessels") < text.index("## Commands")
    tumour = text[text.index("## tumour") : text.index("## vessels")].splitlines()
    table = {line.split(" | ")[0]: line for line in tumour if line.startswith("| ")}
    assert "| 0.8200 ± 0.0200 | — |" in table["| baseline"]
    assert (
        "| border_0 | train.border_fraction=0.0 | 0, 1 | 400 | 1,234 | 0.7200 ± 0.0283 | "
        in (table["| border_0"])
    )
    assert "| -0.0900 ± 0.0141 | 3.00 | 100.5 | 2.00 |" in table["| border_0"]
    assert "| 0.7500 | n/a |" in table["| patch_5"]
    assert "python -m benchmarks.ablation --dataset_name tumour" in text
    assert "python -m benchmarks.ablation --seeds '1 2'" in text


def test_record_accumulates_rows_and_commands_across_invocations(tmp_path):
    out = tmp_path / "results" / "ablation"
    ablation.record(out, [_row("tumour", "baseline", 0, 0.8)], ["--dataset_name", "tumour"])
    ablation.record(out, [_row("vessels", "baseline", 0, 0.6)], ["--dataset_name", "vessels"])
    ablation.record(out, [_row("tumour", "baseline", 0, 0.9)], ["--dataset_name", "tumour"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [(r["dataset"], r["dice"]) for r in saved["rows"]] == [("tumour", 0.9), ("vessels", 0.6)]
    assert saved["commands"] == [["--dataset_name", "tumour"], ["--dataset_name", "vessels"]]
    assert "| 0.9000 | — |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_ablation_trains_a_variant_then_skips_it(synthetic_root, tmp_path, monkeypatch):
    """A 2-step baseline of the tiny config with --set overrides: its row, its run folder and
    config; the same command again trains nothing."""
    spec = tiny_spec(tmp_path, synthetic_root)
    sets = {"eval.meshes": False, "eval.pictures": False}
    out, workdir = tmp_path / "results" / "ablation", tmp_path / "runs"
    args = (spec, sets, "tiny", ["baseline"], [1], 2, workdir, out)
    (row,) = ablation.ablate(*args, command=["--base", spec])
    run_dir = workdir / "tiny" / "baseline-s1"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["seed"] == 1 and saved["train"]["steps"] == 2
    assert not saved["eval"]["meshes"]
    assert (row["dataset"], row["variant"], row["seed"], row["steps"]) == ("tiny", "baseline", 1, 2)
    assert row["dice"] is not None and row["hd95"] is not None and row["params"] > 0
    assert row["train_s"] > 0 and row["inference_s"] > 0 and row["wall_s"] > row["train_s"]
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == [row]

    def train_and_evaluate(config, workdir):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(training, "train_and_evaluate", train_and_evaluate)
    assert ablation.ablate(*args, command=["--base", spec]) == []
    assert "| baseline | — | 1 | 2 |" in out.with_suffix(".md").read_text()
