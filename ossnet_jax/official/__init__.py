"""The official OSS-Net release's published checkpoints in ossnet-jax (README: "Use the published
models").

  pt.py          a PyTorch checkpoint reader that needs no torch and refuses to run code
  conversion.py  a release state dict -> a workdir (config.json + orbax checkpoint) that evaluate.py,
                 train.py (fine-tuning) and the API use as any other
  parity.py      occupancy(workdir, image, locations): what a parity check against the release calls
  __main__.py    python -m ossnet_jax.official convert --checkpoint FILE --variant c --dataset brats
                 --workdir DIR
"""

from ossnet_jax.official.conversion import convert, release_config
from ossnet_jax.official.parity import occupancy
from ossnet_jax.official.pt import load_state_dict

__all__ = ["convert", "load_state_dict", "occupancy", "release_config"]
