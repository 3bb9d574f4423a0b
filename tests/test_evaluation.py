"""Evaluation plumbing that needs no trained model: configs of older runs, the scoring of rows."""

import json

import pytest

from configs import base
from ossnet_jax import evaluation, reporting


def test_config_of_an_older_run_gets_defaults_for_new_keys(tmp_path):
    saved = base.get_base_config("small").to_dict()
    del saved["eval"]["strategy"], saved["data"]["labels"]
    saved["eval"]["threshold"] = 0.3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = evaluation.load_config(tmp_path)
    assert config.eval.strategy == "band" and tuple(config.data.labels) == (0, 1, 2, 4)
    assert config.eval.threshold == 0.3 and config.data.format == "synthetic"  # saved values win
    with pytest.raises(FileNotFoundError, match="training workdir"):
        evaluation.load_config(tmp_path / "nothing")


def test_means_over_cases_skip_undefined_metrics():
    rows = [
        {"dice": 0.5, "hd95": None, "regions": {"a": {"dice": 1.0}}},
        {"dice": 0.7, "hd95": 4.0, "regions": {"a": {"dice": 0.0}}},
    ]
    mean = reporting.mean_over_cases(rows)
    assert mean == {"dice": pytest.approx(0.6), "hd95": 4.0, "regions": {"a": {"dice": 0.5}}}
