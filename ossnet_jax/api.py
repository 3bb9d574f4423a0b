"""A trained OSS-Net as a Python object: its occupancy field at any point, in world millimetres.

    from ossnet_jax import api
    model = api.load("runs/demo")                 # config.json + best checkpoint (or step=...)
    field = model.field(case)                     # a path the configured format reads, or (array, affine)
    p = field(points_mm)                          # (N, 3) world mm -> (N,) or (N, outputs)
    labels, affine = field.segment(spacing=0.5)   # label map at any spacing, its affine
    verts, faces = field.mesh(level=0.5, spacing=0.5)   # world mm, outward faces

A field encodes its case once; queries are decoded in zero-padded batches of the predictor's two
compiled sizes (eval.batch_points and 1/8 of it). Points must lie inside the scanned volume (each
voxel coordinate within half a voxel of the volume's voxel centres); `segment` at the input's spacing
is what evaluate.py writes for the case, at another spacing the field sampled on that grid
(families/oss_net/resolution.py); `mesh` is the field's level set (inference/field_mesh.py).
"""

import pathlib
import tempfile
from typing import Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from ossnet_jax import evaluation
from ossnet_jax.data import dataset, nifti, scans
from ossnet_jax.data.layouts import Case
from ossnet_jax.families.oss_net import resolution

CaseInput = str | pathlib.Path | tuple[np.ndarray, np.ndarray] | dataset.PreparedCase


def load(workdir: str | pathlib.Path, step: Optional[int] = None) -> "Model":
    """The model of a train.py workdir: WORKDIR/config.json and the best checkpoint (or `step`).

    Raises FileNotFoundError when WORKDIR holds no config.json, ValueError for a U-Net run (no
    occupancy field)."""
    config = evaluation.load_config(workdir)
    if config.model.name != "oss_net":
        raise ValueError(
            f"{workdir}: model.name {config.model.name!r} has no occupancy field; api.load needs an "
            "OSS-Net or O-Net run"
        )
    predictor, step = evaluation.restore_predictor(config, workdir, step)
    return Model(config, predictor, step)


def _rounded(vector: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(x), 3) for x in vector)


class Model:
    """A restored OSS-Net: its config, checkpoint step and predictor (families/oss_net/predictor.py)."""

    def __init__(self, config: ml_collections.ConfigDict, predictor, step: int):
        self.config = config
        self.predictor = predictor
        self.step = step

    def prepare(self, case: CaseInput) -> dataset.PreparedCase:
        """A case read and preprocessed as the training data (in memory, no cache).

        `case`: a path data/scans.py reads as one scan for data.format (a BraTS case folder, an MSD
        or LiTS image file), an (image (X, Y, Z[, C]), affine (4, 4)) pair in the scanner's voxel
        order and intensities, or an already prepared case. DataError names a path that is not one
        case; ValueError a bad array."""
        if isinstance(case, dataset.PreparedCase):
            return case
        if isinstance(case, tuple):
            return self._prepare_array(*case)
        found = scans.find_scans(case, dataset.layout_format(self.config))
        if len(found) != 1:
            names = ", ".join(scan.id for scan in found[:5])
            raise nifti.DataError(
                f"{case}: holds {len(found)} scans ({names}); give one case folder or image file"
            )
        return dataset.read_case(found[0], self.config)

    def _prepare_array(self, image: np.ndarray, affine: np.ndarray) -> dataset.PreparedCase:
        image = np.asarray(image, np.float32)
        channels = self.config.data.num_channels
        if image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4 or image.shape[-1] != channels:
            raise ValueError(
                f"image must be (X, Y, Z, {channels}) for this model (data.num_channels), got "
                f"shape {image.shape}"
            )
        with tempfile.TemporaryDirectory(prefix="ossnet_api_") as tmp:
            path = pathlib.Path(tmp) / "array.nii.gz"
            nifti.save_nifti(path, image, np.asarray(affine, np.float64))
            return dataset.read_case(Case("array", (path,), None), self.config)

    def field(self, case: CaseInput) -> "Field":
        """The occupancy field of one case (see `prepare`), encoded once."""
        prepared = self.prepare(case)
        image = jnp.asarray(np.asarray(prepared.image))
        encoded = self.predictor.encode(self.predictor.variables, image)
        return Field(self, prepared, encoded)


class _Encoded:
    """The predictor's interface for evaluation.predict_case on a volume already encoded."""

    def __init__(self, predictor, encoded: tuple, grid_shape: tuple[int, int, int]):
        self._predictor, self.encoded, self._grid_shape = predictor, encoded, grid_shape

    def predict(self, image, ev: Optional[ml_collections.ConfigDict] = None):
        return self._predictor.predict_encoded(self.encoded, self._grid_shape, ev)


class Field:
    """The occupancy field of one encoded case.

    Attributes:
      case: the prepared case (data/dataset.py PreparedCase).
      encoded: what the predictor's `encode` returned for its image: latents (1, K, L), the
        encoder's segmentation (or None) and the patch source (families/oss_net/field.py).
      grid_affine: (4, 4) model-grid voxel -> world mm.
    """

    def __init__(self, model: Model, case: dataset.PreparedCase, encoded: tuple):
        self.model = model
        self.case = case
        self.encoded = encoded
        self._grid_shape = tuple(np.asarray(case.image).shape[:3])
        self.grid_affine = resolution.grid_affine(case, self._grid_shape)
        self._world_to_grid = np.linalg.inv(self.grid_affine)
        self._world_to_volume = np.linalg.inv(resolution.canonical_affine(case))

    def _grid_coordinates(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) float32 model-grid coordinates; ValueError for points outside."""
        points = np.asarray(points_mm, np.float64)
        if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
            raise ValueError(f"points_mm must be finite (N, 3) world mm, got shape {points.shape}")
        volume = points @ self._world_to_volume[:3, :3].T + self._world_to_volume[:3, 3]
        shape = np.asarray(self.case.shape, np.float64)
        outside = np.any((volume < -0.5 - 1e-6) | (volume > shape - 0.5 + 1e-6), axis=1)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{int(outside.sum())} of {len(points)} points lie outside the scanned volume of "
                f"case {self.case.id} ({tuple(self.case.shape)} voxels, RAS): point {i} at "
                f"{_rounded(points[i])} mm is at voxel {_rounded(volume[i])}, beyond -0.5 .. n - 0.5"
            )
        grid = points @ self._world_to_grid[:3, :3].T + self._world_to_grid[:3, 3]
        upper = np.asarray(self._grid_shape, np.float64) - 1.0
        return np.clip(grid, 0.0, upper).astype(np.float32)

    def _decode(self, grid_coordinates: np.ndarray) -> np.ndarray:
        latents, _, source = self.encoded
        return self.model.predictor.decode_all(latents, source, grid_coordinates)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """Probabilities at (N, 3) world points (mm): (N,) for one output, (N, O) for several
        (the softmax over classes, or one sigmoid per region). ValueError for points outside the
        scanned volume."""
        return self._decode(self._grid_coordinates(points_mm))

    def segment(
        self, spacing: float | Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The label map (x, y, z) int32 in label values, in the input file's voxel order, and its
        (4, 4) affine, at `spacing` mm (one value or one per file axis; None: the input's).

        At the input's spacing it is evaluate.py's prediction of the case (eval.* settings); at
        another spacing the configured strategy runs on that grid (resolution.py)."""
        predictor = self.model.predictor
        ev = self.model.config.eval
        if resolution.is_native(self.case, spacing):
            shim = _Encoded(predictor, self.encoded, self._grid_shape)
            prediction = evaluation.predict_case(shim, np.asarray(self.case.image), ev)
            labels = self.case.to_file_geometry(prediction.labels).astype(np.int32)
            return labels, np.asarray(self.case.affine, np.float64)
        labels, grid, _ = resolution.predict_at(predictor, self.encoded, self.case, spacing, ev)
        return labels.astype(np.int32), grid.affine

    def mesh(
        self,
        level: Optional[float] = None,
        spacing: float | Sequence[float] | None = None,
        normals: bool = False,
        refine_steps: int = 0,
    ) -> tuple[np.ndarray, ...]:
        """The foreground's surface from the field: (vertices (V, 3) world mm, faces (F, 3) wound
        outward[, unit outward normals (V, 3) from the field's gradient]).

        Marching cubes at `level` (default eval.threshold) of the foreground probability evaluated
        on the surface band of `segment(spacing)`'s label map (inference/field_mesh.py);
        `refine_steps` Newton steps move the vertices onto the level set."""
        level = self.model.config.eval.threshold if level is None else float(level)
        labels, _ = self.segment(spacing)
        return resolution.case_mesh(
            self.model.predictor,
            self.encoded,
            self.case,
            labels,
            spacing,
            level,
            refine_steps,
            normals,
        )
