"""Evaluates the best checkpoint of a training workdir densely on its validation cases.

  python evaluate.py --workdir runs/demo [--overwrite]
Writes WORKDIR/eval/metrics.json and WORKDIR/eval/predictions/<case>.nii.gz. Cases already predicted
for the same checkpoint step are kept (a rerun after an interruption continues), unless --overwrite.
"""

from absl import app, flags, logging

from ossnet_jax import evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by train.py.")
flags.mark_flag_as_required("workdir")
flags.DEFINE_bool(
    "overwrite", False, "Predict every case again, even if already done for this step."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = evaluation.load_config(FLAGS.workdir)
    result = evaluation.evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
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


if __name__ == "__main__":
    app.run(main)
