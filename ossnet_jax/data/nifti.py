"""Validated NIfTI reading and atomic NIfTI writing.

Volumes are returned in the file's voxel order, shape ``(X, Y, Z[, ...])``,
together with the ``(4, 4)`` voxel-to-world affine in millimetres. Every
problem with an input file surfaces as :class:`DataError` whose message names
the file, so a bad case in a large dataset can be found from the log alone.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ossnet_jax.errors import UserError

DEFAULT_MAX_BYTES = 4 * 1024**3

_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


class DataError(UserError, ValueError):
    """An input file or dataset layout is missing, unreadable or invalid."""


def _nifti_suffix(path: Path) -> str:
    """Return ``".nii.gz"`` or ``".nii"`` for ``path``; raise DataError otherwise."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    raise DataError(f"{path}: file name must end in .nii or .nii.gz")


def _open(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """The NIfTI image of `path` with its header read and its voxels not yet; DataError naming the
    file if it is missing, unreadable or not NIfTI."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path), mmap=False)
    except _READ_ERRORS as err:
        raise DataError(f"{path}: not a readable NIfTI file ({err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI file (read as {type(img).__name__})")
    return img


def _affine(img: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> np.ndarray:
    """The image's (4, 4) float64 voxel-to-world affine; DataError naming `path` if not finite."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: affine is missing or not finite")
    return affine


def read_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel shape (X, Y, Z[, C]) and the (4, 4) affine (mm) of a NIfTI file, reading no voxel;
    the checks of `load_nifti` that need no voxel data (DataError naming the file)."""
    path = Path(path)
    img = _open(path)
    return tuple(int(n) for n in img.header.get_data_shape()), _affine(img, path)


def load_nifti(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI-1/2 file fully into memory and validate it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        max_bytes: refuse files whose header declares more than this many bytes
            of voxel data (shape product times bytes per stored voxel). Checked
            before any voxel is read, so a corrupt header cannot exhaust memory.

    Returns:
        ``(data, affine)``: ``data`` has the header's shape, e.g. ``(X, Y, Z)``,
        in the stored dtype (native byte order), or float32 when the header
        applies a scale/offset;
        ``affine`` is ``(4, 4)`` float64 mapping voxel indices to world mm.

    Raises:
        DataError: missing file, not a NIfTI file, truncated or corrupt
            (gzip) data, declared size above ``max_bytes``, non-finite affine,
            or NaN/Inf voxels in floating-point data.
    """
    path = Path(path)
    img = _open(path)
    shape = tuple(int(n) for n in img.header.get_data_shape())
    itemsize = int(img.header.get_data_dtype().itemsize)
    declared = int(np.prod(shape, dtype=object)) * itemsize
    if declared > max_bytes:
        raise DataError(
            f"{path}: header declares shape {shape} x {itemsize} bytes = {declared} bytes "
            f"of voxel data, above the limit of {max_bytes} bytes"
        )

    proxy = img.dataobj
    scaled = not (float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0)
    try:
        if scaled:
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asarray(proxy.get_unscaled())
    except _READ_ERRORS as err:
        raise DataError(f"{path}: truncated or corrupt voxel data ({err})") from err

    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    affine = _affine(img, path)
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DataError(f"{path}: {bad} of {data.size} voxels are NaN or Inf")
    return data, affine


def save_nifti(path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` with ``affine`` to ``path`` atomically.

    The image is written to ``.<name>.tmp-<pid><suffix>`` in the destination
    directory, flushed to disk, then renamed onto ``path`` with ``os.replace``;
    an interrupted or failed write never leaves a partial file at ``path`` and
    never alters a file already there. Parent directories are created.

    Args:
        path: destination ending in ``.nii.gz`` (gzip-compressed) or ``.nii``.
        data: array of shape ``(X, Y, Z[, ...])``; bool is stored as uint8,
            other dtypes as given.
        affine: ``(4, 4)`` voxel-to-world transform in mm, stored as both the
            qform and sform (code 1, scanner coordinates).

    Raises:
        DataError: bad file name, bad affine, or data nibabel cannot store, or
            any error while writing (the original error is chained).
    """
    path = Path(path)
    suffix = _nifti_suffix(path)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: affine must be a finite (4, 4) array, got shape {affine.shape}")
    array = np.asarray(data)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp-{os.getpid()}{suffix}")
    try:
        img = nib.Nifti1Image(array, affine, dtype=array.dtype)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception):
            raise DataError(f"{path}: could not write NIfTI file ({err})") from err
        raise


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis.

    Args:
        affine: ``(4, 4)`` voxel-to-world transform.

    Returns:
        ``(sx, sy, sz)``: Euclidean norms of the columns of ``affine[:3, :3]``.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    sx, sy, sz = np.linalg.norm(matrix, axis=0)
    return float(sx), float(sy), float(sz)
