"""Label modes: how label values on disk become targets, outputs, losses and label maps again.

Every case's label is stored once as class indices: index i stands for data.labels[i] (data.labels[0]
is the background). A label mode then reads those indices as R output channels ("channels" below):

  'binary'         1 channel, foreground = any non-background label (BraTS whole tumour, LiTS liver);
                   one sigmoid output.
  'multiclass'     K - 1 channels, one per non-background label; a K-way softmax output, trained with
                   cross-entropy, predicted by arg-max.
  'brats_regions'  one channel per region (default: whole tumour {1, 2, 4}, tumour core {1, 4},
                   enhancing tumour {4}); overlapping sigmoid outputs, written back as the label whose
                   region membership matches the innermost predicted region (BraTS: 2, 1, 4).

The segmentation head always predicts the R channels with sigmoids (a coarse cell may hold several
labels), so its loss and the encoder seed are the same for every mode.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ossnet_jax.data.nifti import DataError
from ossnet_jax.errors import ConfigError

MODES = ("binary", "multiclass", "brats_regions")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The label mode of a config.

    Attributes:
      mode: one of MODES.
      values: label values on disk, background first, e.g. (0, 1, 2, 4).
      names: one name per output channel (R of them).
      table: (K, R) bool, table[i, r] = label index i belongs to channel r.
    """

    mode: str
    values: tuple[int, ...]
    names: tuple[str, ...]
    table: np.ndarray

    @property
    def num_channels(self) -> int:
        """R: segmentation-head channels and metric channels."""
        return self.table.shape[1]

    @property
    def num_outputs(self) -> int:
        """Decoder outputs per location: 1 (binary), K (multiclass) or R (regions)."""
        return len(self.values) if self.mode == "multiclass" else self.num_channels

    def point_loss(self, logits: jax.Array, index: jax.Array) -> jax.Array:
        """Mean loss of decoder logits (B, N[, O]) against class indices (B, N). float32."""
        logits = logits.astype(jnp.float32)
        if self.mode == "multiclass":
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, index))
        target = self.channel_masks(index).astype(jnp.float32)
        if self.mode == "binary":
            target = target[..., 0]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))

    def channel_masks(self, index: jax.Array) -> jax.Array:
        """(..., R) bool channel membership of class indices (...)."""
        return jnp.asarray(self.table)[index.astype(jnp.int32)]

    def predicted_masks(self, logits: jax.Array, threshold: float) -> jax.Array:
        """(..., R) bool predicted channels from decoder logits (..., O) (binary: (...))."""
        if self.mode == "multiclass":
            return self.channel_masks(jnp.argmax(logits, axis=-1))
        if self.mode == "binary":
            logits = logits[..., None]
        return jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """Decoder outputs as probabilities: sigmoid, or softmax over the K classes (multiclass)."""
        logits = logits.astype(jnp.float32)
        return (
            jax.nn.softmax(logits, axis=-1) if self.mode == "multiclass" else jax.nn.sigmoid(logits)
        )

    def decide(self, probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Host-side decisions for M locations from probabilities (M[, O]).

        Returns (foreground score (M,) float32 in [0, 1], compared with `threshold` by the refinement;
        label value (M,) int32). The foreground score is the probability (binary), 1/0 for arg-max not
        background (multiclass), or the largest region probability (regions: refine where any changes).
        """
        probs = np.asarray(probs, np.float32)
        values = np.asarray(self.values, np.int32)
        if self.mode == "binary":
            return probs, (probs > threshold).astype(np.int32)
        if self.mode == "multiclass":
            winner = probs.argmax(axis=-1)
            return (winner != 0).astype(np.float32), values[winner]
        inside = probs > threshold
        return probs.max(axis=-1), self.label_from_channels(inside)

    def label_from_channels(self, inside: np.ndarray) -> np.ndarray:
        """Label values (...) int32 from region membership (..., R): the innermost region's label."""
        depth = np.where(inside.any(-1), inside.shape[-1] - np.argmax(inside[..., ::-1], -1), 0)
        codes = np.zeros(self.num_channels + 1, np.int32)
        for d in range(1, self.num_channels + 1):
            pattern = np.arange(self.num_channels) < d
            match = np.flatnonzero((self.table == pattern).all(axis=1))
            codes[d] = self.values[match[0]]
        return codes[depth]

    def value_masks(self, label: np.ndarray) -> list[np.ndarray]:
        """R bool masks (X, Y, Z) of a label map in label values, one per channel."""
        index = to_index(label, self.values, "label map")
        return [self.table[index, r] for r in range(self.num_channels)]


def label_spec(data: ml_collections.ConfigDict) -> LabelSpec:
    """The LabelSpec of config.data (label_mode, labels, label_names, region_names, region_labels)."""
    mode = data.label_mode
    if mode not in MODES:
        raise ConfigError(f"data.label_mode must be one of {MODES}, got {mode!r}")
    values = tuple(int(v) for v in data.labels)
    if len(values) < 2 or values[0] != 0 or len(set(values)) != len(values) or min(values) < 0:
        raise ConfigError(
            "data.labels must list distinct non-negative label values starting with background 0, "
            f"got {values}"
        )
    names = tuple(data.get("label_names", ()) or ())
    if names and len(names) != len(values):
        raise ConfigError(f"data.label_names has {len(names)} names for {len(values)} labels")
    names = names or tuple(f"label_{v}" for v in values)
    if mode == "binary":
        return LabelSpec(mode, values, ("foreground",), np.array([[v != 0] for v in values]))
    if mode == "multiclass":
        table = np.array([[v == w for w in values[1:]] for v in values])
        return LabelSpec(mode, values, names[1:], table)
    region_names = tuple(data.region_names)
    region_labels = [tuple(int(v) for v in r) for r in data.region_labels]
    if len(region_names) != len(region_labels) or not region_names:
        raise ConfigError(
            "data.region_names and data.region_labels must have the same, non-zero length"
        )
    unknown = sorted({v for r in region_labels for v in r} - set(values[1:]))
    if unknown:
        raise ConfigError(f"data.region_labels uses {unknown}, not among data.labels {values[1:]}")
    table = np.array([[v in r for r in region_labels] for v in values])
    spec = LabelSpec(mode, values, region_names, table)
    for d in range(1, len(region_names) + 1):
        pattern = np.arange(len(region_names)) < d
        if not (table == pattern).all(axis=1).any():
            raise ConfigError(
                "brats_regions needs nested regions (each inside the one before, as whole tumour > "
                f"tumour core > enhancing tumour); no label lies in exactly the first {d} of "
                f"{region_names} with data.region_labels {region_labels}"
            )
    return spec


def to_index(label: np.ndarray, values: tuple[int, ...], path: object) -> np.ndarray:
    """Label values (X, Y, Z) -> uint8 class indices into `values`; DataError naming `path` otherwise."""
    if np.issubdtype(label.dtype, np.floating):
        if not np.array_equal(label, np.round(label)):
            raise DataError(f"{path}: label map holds non-integer values")
    found = np.unique(label)
    unexpected = [v.item() for v in found if v not in values]
    if unexpected:
        raise DataError(
            f"{path}: label values {unexpected} are not in the declared set data.labels = "
            f"{tuple(values)}"
        )
    lookup = np.zeros(int(max(values)) + 1, np.uint8)
    lookup[list(values)] = np.arange(len(values), dtype=np.uint8)
    return lookup[label.astype(np.int64)]
