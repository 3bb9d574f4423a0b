"""Checks a dataset before training: every case read and validated, every problem reported at once.

  python -m ossnet_jax.data.check --config configs/oss_net_c.py --config.data.root=data/MICCAI_...
  python -m ossnet_jax.data.check --config configs/oss_net_c.py:lits --config.data.root=data/LiTS

Prints one line per case (shape, voxel spacing in mm, orientation, label values, foreground fraction)
and then every problem with the file it is in; exits with status 1 if there is any problem (2, with the
message alone, for an error outside the cases: cli.py). It reads the files exactly as training does (same
validation), but writes nothing.
"""

import dataclasses
import sys

import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from ossnet_jax import cli
from ossnet_jax.data import dataset, labels, layouts, nifti, preprocess


@dataclasses.dataclass
class CaseReport:
    """What one case holds: shape (x, y, z) and spacing (mm) in file voxel order, orientation codes."""

    id: str
    shape: tuple = ()
    channels: int = 0
    spacing: tuple = ()
    orientation: str = ""
    label_values: tuple = ()
    foreground: float = float("nan")
    problem: str = ""

    def line(self) -> str:
        if self.problem and not self.shape:
            return f"{self.id:<28} PROBLEM"
        spacing = "x".join(f"{s:.2f}" for s in self.spacing)
        values = ",".join(str(v) for v in self.label_values) if self.label_values else "no label"
        fg = "" if np.isnan(self.foreground) else f"{100 * self.foreground:6.2f}%"
        shape = "x".join(str(s) for s in self.shape)
        flag = "  PROBLEM" if self.problem else ""
        return (
            f"{self.id:<28} {shape:<13} {self.channels:>2} ch  {spacing:<16} {self.orientation:<4} "
            f"{values:<12} {fg}{flag}"
        )


def inspect_case(case: layouts.Case, config: ml_collections.ConfigDict) -> CaseReport:
    """Reads one case as training would and reports it; a problem is stored, not raised."""
    report = CaseReport(case.id)
    try:
        spec = labels.label_spec(config.data)
        image, affine = dataset.read_image(case, config.data.num_channels)
        report.shape, report.channels = image.shape[:3], image.shape[-1]
        report.spacing = nifti.voxel_spacing(affine)
        report.orientation = preprocess.axis_codes(affine)
        canonical = preprocess.to_canonical(image[..., :1], affine)[0].shape[:3]
        if not config.data.get("resample", False):
            try:
                preprocess.centre_offsets(canonical, tuple(config.data.grid_shape))
            except ValueError as err:
                raise nifti.DataError(f"{case.image_paths[0]}: {err} (after reorientation)")
        if case.label_path is not None:
            index = dataset.read_label(case, image.shape[:3], affine, spec.values)
            report.label_values = tuple(int(spec.values[i]) for i in np.unique(index))
            report.foreground = float(np.mean(index > 0))
    except nifti.DataError as err:
        report.problem = str(err)
    return report


def check_dataset(config: ml_collections.ConfigDict) -> tuple[list[CaseReport], list[str]]:
    """Reports of every case and the list of problems (each naming its file); reads, never writes."""
    try:
        config = dataset.resolve_data_config(config)
        cases = dataset.find_cases(config)
    except (nifti.DataError, ValueError) as err:
        return [], [str(err)]
    problems = []
    if config.data.get("split_file"):
        try:
            dataset.read_split_file(config.data.split_file, [c.id for c in cases])
        except nifti.DataError as err:
            problems.append(str(err))
    reports = [inspect_case(case, config) for case in cases]
    problems += [r.problem for r in reports if r.problem]
    return reports, problems


_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Configuration (path[:preset])."
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    print(f"dataset {config.data.format!r} at {config.data.root}")
    reports, problems = check_dataset(config)
    if reports:
        print(f"{'case':<28} {'shape':<13} chan  {'spacing (mm)':<16} ori  {'labels':<12} fg")
    for report in reports:
        print(report.line())
    labelled = sum(1 for r in reports if r.label_values)
    print(f"{len(reports)} cases, {labelled} with labels, {len(problems)} problems")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    app.run(cli.guarded(main))
