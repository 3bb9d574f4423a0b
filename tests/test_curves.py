"""TensorBoard scalars and curves.png from metrics.jsonl rows (ossnet_jax/curves.py)."""

import json

import pytest
from tensorboardX.proto import event_pb2

from ossnet_jax import curves
from tests.events import read_events, scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(scale: float) -> list[dict]:
    """Two logged steps and a validation, as training.py writes them; `scale` changes the values."""
    return [
        {"step": 2, "loss": 1.2 * scale, "seg_loss": 0.7, "learning_rate": 1e-3, "dice": 0.2,
         "points_per_s": 900.0, "input_wait_fraction": 0.1},
        {"step": 4, "loss": 0.8 * scale, "seg_loss": 0.5, "learning_rate": 1e-4, "dice": 0.4,
         "points_per_s": 1100.0, "input_wait_fraction": 0.0},
        {"step": 4, "val_dice": 0.5 * scale, "val_iou": 0.33},
        {"step": 5, "skipped_nonfinite": 1},
    ]  # fmt: skip


def test_event_log_writes_every_number_under_its_tag_at_its_step(tmp_path):
    log = curves.EventLog(tmp_path, start=0)
    for row in rows(1.0) + [{"step": 6, "loss": float("nan"), "note": "text"}]:
        log.add(row)
    log.close()
    got = scalars(tmp_path)
    assert set(got) == {
        "train/loss", "train/seg_loss", "train/learning_rate", "train/dice",
        "train/locations_per_s", "train/input_wait_fraction", "val/dice", "val/iou",
        "train/skipped_nonfinite",
    }  # fmt: skip
    assert got["train/loss"] == [(2, pytest.approx(1.2)), (4, pytest.approx(0.8))]  # NaN left out
    assert got["val/dice"] == [(4, 0.5)] and got["train/skipped_nonfinite"] == [(5, 1.0)]
    assert [s for s, _ in got["train/locations_per_s"]] == [2, 4]


def test_a_resumed_log_marks_the_steps_run_again_for_tensorboard_to_drop(tmp_path):
    curves.EventLog(tmp_path / "new", start=0).close()
    log = curves.EventLog(tmp_path / "resumed", start=4)
    log.add({"step": 5, "loss": 0.3})
    log.close()
    fresh = read_events(next((tmp_path / "new").glob("events.out.tfevents.*")))
    assert not any(e.HasField("session_log") for e in fresh)
    events = read_events(next((tmp_path / "resumed").glob("events.out.tfevents.*")))
    starts = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [5]


def test_curves_png_is_a_png_that_changes_with_the_rows(tmp_path):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "again", "empty")]
    for path, data in zip(paths, (rows(1.0), rows(1.5), rows(1.0), [])):
        curves.curves_png(path, data)
    a, b, again, empty = (p.read_bytes() for p in paths)
    assert all(png.startswith(PNG_SIGNATURE) for png in (a, b, empty))
    assert a == again and a != b and a != empty
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left


def test_read_rows_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(1.0)) + '{"step": 6, "lo')
    assert curves.read_rows(path) == rows(1.0)
    assert curves.read_rows(tmp_path / "missing.jsonl") == []
