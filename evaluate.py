"""Evaluates the best checkpoint of a training workdir densely, on its validation cases or another dataset.

  python evaluate.py --workdir runs/demo [--overwrite]
  python evaluate.py --workdir runs/demo --data.root data/MICCAI_BraTS2020_ValidationData
  python evaluate.py --workdir runs/demo --input scans/ --output predictions/
Writes WORKDIR/eval/metrics.json and WORKDIR/eval/predictions/<case>.nii.gz; with --data.root, every
case of that dataset is predicted into WORKDIR/eval/<folder name>/ (labels optional: cases without a
label get a prediction and no metrics). Cases already predicted for the same checkpoint step are kept
(a rerun after an interruption continues), unless --overwrite. With --input (an image file, a case
folder or a folder of either; ossnet_jax/data/scans.py) the scans are predicted into --output as
<id>.nii.gz, each in its input file's geometry, without labels or metrics.
"""

import pathlib

from absl import app, flags, logging

from ossnet_jax import cli, evaluation, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by train.py.")
flags.DEFINE_string(
    "data.root", "", "Predict every case of this dataset instead of the validation split."
)
flags.DEFINE_string("data.format", "", "Format of --data.root if it differs from training's.")
flags.DEFINE_string("data.subset", "", "MSD: 'training' or 'test' (imagesTs) for --data.root.")
flags.mark_flag_as_required("workdir")
flags.DEFINE_bool(
    "overwrite", False, "Predict every case again, even if already done for this step."
)
flags.DEFINE_string(
    "input", "", "Scans to predict, no metrics: an image file, a case folder or a folder of them."
)
flags.DEFINE_string(
    "output", "", "Folder for the predictions of --input, one <id>.nii.gz per scan."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.input and (not FLAGS.output or FLAGS["data.root"].value):
        raise app.UsageError("--input needs --output DIR, and excludes --data.root")
    config = evaluation.load_config(FLAGS.workdir)
    if FLAGS.input:
        written = evaluation.predict_scans(config, FLAGS.workdir, FLAGS.input, FLAGS.output)
        print(f"{len(written)} predictions written to {FLAGS.output}")
        return
    cases, out_dir = None, None
    root = FLAGS["data.root"].value
    if root:
        config, cases = evaluation.dataset_cases(
            config, root, FLAGS["data.format"].value, FLAGS["data.subset"].value
        )
        out_dir = pathlib.Path(FLAGS.workdir) / "eval" / pathlib.Path(root).resolve().name
    result = evaluation.evaluate(config, FLAGS.workdir, cases, out_dir, FLAGS.overwrite)
    for case in result["cases"]:
        scores = f"Dice {case['dice']:.4f} IoU {case['iou']:.4f} " if "dice" in case else ""
        print(
            f"{case['id']}: {scores}{case['decoder_points']} decoder points, {case['seconds']:.2f} s"
        )
    if "mean" in result:
        print(
            f"mean Dice {result['mean']['dice']:.4f} IoU {result['mean']['iou']:.4f} "
            f"(checkpoint step {result['step']})"
        )
    print(f"written to {out_dir or pathlib.Path(FLAGS.workdir) / 'eval'}")


if __name__ == "__main__":
    runtime.prepare()
    app.run(cli.guarded(main))
