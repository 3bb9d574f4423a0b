"""Trains an OSS-Net variant and evaluates it densely on the validation cases.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/oss_net_c.py:small --workdir runs/c --config.train.steps=300
Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints. Ctrl-C (SIGINT)
or SIGTERM saves a checkpoint of the current step and exits with status 130 or 143.

Several processes (hosts): run the same command on each with --coordinator_address=HOST:PORT (process
0's host), --num_processes=P and --process_id=p (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or, where a cluster launcher started them (Cloud TPU pod slice, SLURM srun, Open MPI
mpirun, Kubernetes), with --distributed=auto alone; see ossnet_jax/distributed.py.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ossnet_jax import cli, distributed, runtime, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Configuration file (path[:preset]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and predictions.")
flags.mark_flag_as_required("workdir")
flags.DEFINE_enum(
    "distributed",
    "manual",
    list(distributed.MODES),
    "How a multi-process run starts. 'manual': from --coordinator_address, --num_processes and "
    "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); a single "
    "process without a coordinator address. 'auto': jax.distributed.initialize() with no "
    "arguments detects them from the cluster (Cloud TPU pod slice, SLURM, Open MPI, Kubernetes); "
    "leave the three flags out.",
)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    distributed.initialize(
        distributed.settings(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            mode=FLAGS.distributed,
        )
    )
    try:
        result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    if "mean" in result:
        print(
            f"validation (dense, {len(result['cases'])} cases): mean Dice {result['mean']['dice']:.4f}"
            f" IoU {result['mean']['iou']:.4f}; written to {FLAGS.workdir}/eval/metrics.json"
        )


if __name__ == "__main__":
    runtime.prepare()
    app.run(cli.guarded(main))
