"""Converts a published OSS-Net checkpoint of the official release into an ossnet-jax workdir.

  python -m ossnet_jax.official convert --checkpoint oss_net_c_bra_ts.pt --variant c \
      --dataset brats --workdir runs/official_c
then `python evaluate.py --workdir runs/official_c [--data.root DIR]` evaluates it and
`python train.py --config configs/oss_net_c.py:brats_release --workdir runs/official_c` fine-tunes it.
The workdir's config is configs/<variant>.py with the '<dataset>_release' preset. A file that is not
a safe PyTorch checkpoint, or does not hold the variant's state dict, is refused with a message
naming it and what is wrong (exit status 2); nothing is written then.
"""

from absl import app, flags, logging

from ossnet_jax import cli, runtime
from ossnet_jax.official import conversion

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A release state dict, e.g. oss_net_c_bra_ts.pt.")
flags.DEFINE_enum("variant", None, list(conversion.VARIANT_CONFIGS), "The file's OSS-Net variant.")
flags.DEFINE_enum("dataset", None, list(conversion.DATASETS), "The dataset it was trained on.")
flags.DEFINE_string("workdir", None, "A new directory for config.json and the checkpoint.")
flags.DEFINE_string("data_root", "", "data.root of the workdir's config (default: the preset's).")
flags.DEFINE_string("split_file", "", "data.split_file of the workdir's config, e.g. the release's")
COMMANDS = ("convert",)


@cli.guarded
def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    if argv[1:] != ["convert"]:
        raise app.UsageError(f"expected one command, {' or '.join(COMMANDS)}; got {argv[1:]}")
    for name in ("checkpoint", "variant", "dataset", "workdir"):
        if FLAGS[name].value is None:
            raise app.UsageError(f"convert needs --{name}")
    config = conversion.release_config(FLAGS.variant, FLAGS.dataset)
    if FLAGS.data_root:
        config.data.root = FLAGS.data_root
    if FLAGS.split_file:
        config.data.split_file = FLAGS.split_file
    summary = conversion.convert(
        FLAGS.checkpoint,
        FLAGS.workdir,
        config,
        {"variant": FLAGS.variant, "dataset": FLAGS.dataset},
    )
    print(
        f"{FLAGS.checkpoint}: {summary['entries']} entries, {summary['trainable_parameters']:,} "
        f"trainable parameters -> {FLAGS.workdir} (config.json, checkpoints/0, official.json)"
    )


if __name__ == "__main__":
    runtime.prepare()
    app.run(main)
