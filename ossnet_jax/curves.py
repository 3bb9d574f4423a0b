"""Training curves to look at: TensorBoard event files in WORKDIR and WORKDIR/curves.png.

Both show the rows of WORKDIR/metrics.jsonl (training.py), x = the training step:

  TensorBoard tag            metrics.jsonl key     what
  train/loss                 loss                  the training loss (train.log_every)
  train/<part>_loss          <part>_loss           its parts (e.g. the segmentation head's)
  train/dice                 dice                  Dice of the batch at its sampled locations
                                                   (OSS-Net) or voxels (U-Nets)
  train/learning_rate        learning_rate
  train/locations_per_s      points_per_s          supervised locations (voxels) per second
  train/input_wait_fraction  input_wait_fraction   share of the time the loop waited for inputs
  train/skipped_nonfinite    skipped_nonfinite     1 at an update skipped for NaN/Inf
  val/dice, val/iou          val_dice, val_iou     validation (train.eval_every)

`tensorboard --logdir WORKDIR` (or the folder of several workdirs) shows them; curves.png is redrawn
from metrics.jsonl at each validation and at the last step. A resumed run writes a new event file
that starts with a purge marker at its first step, so TensorBoard drops the first run's points of the
steps run again (as metrics.jsonl drops their rows).
"""

import io
import json
import math
import os
import pathlib
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboardX import SummaryWriter

from ossnet_jax import files

TAGS = {
    "loss": "train/loss",
    "dice": "train/dice",
    "learning_rate": "train/learning_rate",
    "points_per_s": "train/locations_per_s",
    "input_wait_fraction": "train/input_wait_fraction",
    "skipped_nonfinite": "train/skipped_nonfinite",
    "val_dice": "val/dice",
    "val_iou": "val/iou",
}


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: TAGS, or train/<key> for others (loss parts)."""
    return TAGS.get(key, f"train/{key}")


def _scalars(row: dict) -> Iterable[tuple[str, float]]:
    """(key, value) of a row's finite numbers, without 'step'."""
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            yield key, float(value)


class EventLog:
    """TensorBoard scalars of metrics.jsonl rows, in an event file in `workdir` (tensorboardX).

    `start` is the step training resumes from (0 for a new run): the rows of later steps are
    written again, so TensorBoard is told to drop earlier files' points from step start + 1 on.
    """

    def __init__(self, workdir: str | os.PathLike, start: int):
        self.writer = SummaryWriter(
            str(workdir), purge_step=start + 1 if start else None, flush_secs=30
        )

    def add(self, row: dict) -> None:
        """One scalar per number of `row` ({"step": int, key: value, ...}) at row["step"]."""
        for key, value in _scalars(row):
            self.writer.add_scalar(tag(key), value, int(row["step"]))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file, skipping a torn (unparsable) line; [] if it is missing."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a finite `key`."""
    pairs = [(r["step"], v) for r in rows for k, v in _scalars(r) if k == key]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, float), np.asarray(values, float)


def _panel(
    ax: Any, rows: Sequence[dict], keys: Sequence[str], title: str, log: bool, unit: Optional[tuple]
) -> None:
    """One subplot: a line (with points) per key present in `rows`; `unit` fixes the y range."""
    drawn = 0
    for key in keys:
        steps, values = _series(rows, key)
        if not len(steps):
            continue
        ax.plot(steps, values, marker=".", markersize=4, linewidth=1.2, label=tag(key))
        drawn += 1
        if log and not np.all(values > 0):
            log = False
    if not drawn:
        ax.text(0.5, 0.5, "not logged yet", transform=ax.transAxes, ha="center", va="center")
    elif log:
        ax.set_yscale("log")
    if unit is not None:
        ax.set_ylim(*unit)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def curves_png(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Writes the training curves of metrics.jsonl `rows` to `path` (PNG, atomically).

    Four panels against the step: the loss and its parts (log scale), Dice (training at sampled
    locations, validation Dice and IoU; 0 to 1), the learning rate (log scale) and locations per
    second. Drawn with matplotlib's Agg renderer through its object-oriented API.
    """
    loss_keys = ["loss"] + sorted(
        {k for r in rows for k in r if k.endswith("_loss") and k != "loss"}
    )
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.08, top=0.9))
    fig.subplots_adjust(wspace=0.2, hspace=0.35)  # fixed: tight_layout would double the time
    _panel(axes[0, 0], rows, loss_keys, "loss", log=True, unit=None)
    _panel(axes[0, 1], rows, ["dice", "val_dice", "val_iou"], "Dice / IoU", False, (-0.02, 1.02))
    _panel(axes[1, 0], rows, ["learning_rate"], "learning rate", log=True, unit=None)
    _panel(axes[1, 1], rows, ["points_per_s"], "locations per second", log=False, unit=None)
    last = max((r.get("step", 0) for r in rows), default=0)
    fig.suptitle(f"training curves up to step {last}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    files.write_bytes(path, buffer.getvalue())
