"""A reader for PyTorch checkpoints (`torch.save` files) that needs no torch and runs no code.

A `.pt` file written by torch >= 1.6 is a zip archive with one top folder `<name>/`:
  <name>/data.pkl     a pickle (protocol 2) of the saved object; tensors appear in it as calls of
                      torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                      backward_hooks[, metadata]), each storage as a persistent id
                      ('storage', torch.<Type>Storage, key, location, numel);
  <name>/data/<key>   the raw bytes of storage `key` (numel elements of its type);
  <name>/byteorder    optional, 'little' or 'big' (absent: little-endian);
  <name>/version      the format version.
The pickle is read by an unpickler that resolves only the few globals a state dict needs
(ALLOWED_GLOBALS): any other one (os.system, builtins.eval, ...) stops the read with UnsafeCheckpointError
naming it, before anything is called, so a malicious file cannot run code. Tensors come back as numpy
arrays (a copy in C order, whatever their strides); storages stay on the CPU whatever device saved them.
"""

import collections
import io
import math
import pathlib
import pickle
import zipfile
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from ossnet_jax.errors import UserError

# torch storage type name -> element type (little-endian; `byteorder` 'big' swaps it)
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
MAX_TENSOR_BYTES = 1 << 34  # 16 GiB: a larger tensor is refused before it is allocated


class CheckpointFormatError(UserError, ValueError):
    """A file that is not a readable PyTorch checkpoint; the message names it and what is wrong."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint whose pickle asks for a global outside ALLOWED_GLOBALS (it could run code)."""


class _StorageType:
    """Stands for torch.<name>Storage in a persistent id: the element type of the storage's bytes."""

    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _Tensor:
    """A rebuilt tensor before validation: the numpy array the unpickler made."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
} | {("torch", name) for name in STORAGE_DTYPES}


def _index_tuple(value: Any, what: str, rank: Optional[int] = None) -> tuple[int, ...]:
    """`value` as a tuple of non-negative ints (a tensor's size or stride); ValueError otherwise."""
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
    if rank is not None and len(value) != rank:
        raise ValueError(f"tensor {what} {tuple(value)} has {len(value)} entries, size has {rank}")
    return tuple(value)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's data.pkl: storages from the archive, tensors as numpy arrays."""

    def __init__(self, data: bytes, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"refuses the global {module}.{name}: a state dict of tensors needs only "
                + ", ".join(sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS if m != "torch"))
                + " and torch storage types"
            )
        if module == "collections":
            return collections.OrderedDict
        if module == "torch":
            return _StorageType(name)
        return self._rebuild_tensor

    def persistent_load(self, pid: Any) -> np.ndarray:
        """('storage', storage type, key, location, numel) -> the storage's elements (numel,)."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise ValueError(f"unsupported persistent id {pid!r} (expected a storage reference)")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise ValueError(f"storage {key} is referenced as two element types")
        return storage

    def _rebuild_tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _Tensor:
        """torch._utils._rebuild_tensor_v2: the strided view of the storage, copied to C order."""
        if not isinstance(storage, np.ndarray) or storage.ndim != 1:
            raise ValueError("a tensor is rebuilt from something that is not a storage")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"tensor storage offset {offset!r} is not a non-negative integer")
        size = _index_tuple(size, "size")
        stride = _index_tuple(stride, "stride", len(size))
        count = math.prod(size)
        if count * storage.itemsize > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor of size {size} is larger than {MAX_TENSOR_BYTES} bytes")
        if count == 0:
            return _Tensor(np.zeros(size, storage.dtype))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(storage):
            raise ValueError(
                f"tensor of size {size}, stride {stride} at offset {offset} reads element {last} of "
                f"a storage of {len(storage)} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False
        )
        return _Tensor(np.array(view, order="C"))


def _archive_prefix(names: list[str]) -> str:
    """The archive's top folder '<name>/', the one holding data.pkl."""
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(
            f"not a PyTorch checkpoint archive: expected one <name>/data.pkl, found {len(pickles)}"
        )
    return pickles[0][: -len("data.pkl")]


def _byte_order(archive: zipfile.ZipFile, prefix: str) -> str:
    """'<' or '>' from the archive's byteorder entry (absent: little-endian, as torch assumes)."""
    if f"{prefix}byteorder" not in archive.namelist():
        return "<"
    order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise ValueError(f"its byteorder entry is {order!r}, not 'little' or 'big'")
    return "<" if order == "little" else ">"


def _storage_reader(
    archive: zipfile.ZipFile, prefix: str
) -> Callable[[str, np.dtype, int], np.ndarray]:
    """A function (key, element type, numel) -> the storage's (numel,) elements in native order."""
    order = _byte_order(archive, prefix)

    def read(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{prefix}data/{key}"
        if name not in archive.namelist():
            raise ValueError(f"storage {key} has no entry {name} in the archive")
        raw = archive.read(name)
        if len(raw) < numel * dtype.itemsize:
            raise ValueError(
                f"storage {key} holds {len(raw)} bytes, its {numel} elements need "
                f"{numel * dtype.itemsize}"
            )
        elements = np.frombuffer(raw, dtype, numel)
        return elements.byteswap() if order == ">" and dtype.itemsize > 1 else elements

    return read


# what a damaged archive or pickle raises while it is read
_READ_ERRORS = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    TypeError,
    EOFError,
    AttributeError,
    IndexError,
    KeyError,
)


def load_pt(path: str | pathlib.Path) -> Any:
    """The object saved in a torch >= 1.6 checkpoint file, tensors as numpy arrays (C order).

    Raises CheckpointFormatError naming the file for anything that is not such a checkpoint (not a
    zip, truncated, a storage shorter than its tensors, a malformed pickle), UnsafeCheckpointError for
    a pickle asking for any global other than those of ALLOWED_GLOBALS, and OSError if the file
    cannot be read.
    """
    path = pathlib.Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CheckpointFormatError(
            f"{path}: not a zip archive ({error}): truncated, or not written by torch.save of "
            "PyTorch >= 1.6 (a legacy checkpoint: load and save it again with a current PyTorch)"
        ) from error
    with archive:
        try:
            prefix = _archive_prefix(archive.namelist())
            pickled = archive.read(f"{prefix}data.pkl")
            unpickler = _RestrictedUnpickler(pickled, _storage_reader(archive, prefix))
            return _arrays(unpickler.load())
        except UnsafeCheckpointError as error:
            raise UnsafeCheckpointError(f"{path}: {error}") from None
        except _READ_ERRORS as error:
            raise CheckpointFormatError(f"{path}: {error}") from error


def _arrays(value: Any) -> Any:
    """The unpickled object with every rebuilt tensor replaced by its array, checked to hold only
    dicts, lists, tuples, strings, numbers, None and tensors."""
    if isinstance(value, _Tensor):
        if not isinstance(value.array, np.ndarray):
            raise ValueError("a tensor holds something that is not an array")
        return value.array
    if isinstance(value, dict):
        return collections.OrderedDict((k, _arrays(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"the checkpoint holds a {type(value).__name__}, not tensors")


def load_state_dict(path: str | pathlib.Path) -> "collections.OrderedDict[str, np.ndarray]":
    """A checkpoint holding `model.state_dict()`: parameter and buffer name -> array, in file order.

    Raises CheckpointFormatError naming the file if it holds anything else (load_pt's errors too).
    """
    saved = load_pt(path)
    if not isinstance(saved, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(saved).__name__}, not a state dict (name -> tensor)"
        )
    wrong = [
        str(k) for k, v in saved.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))
    ]
    if wrong:
        raise CheckpointFormatError(
            f"{path}: not a state dict of tensors: entries {', '.join(wrong[:5])} are not "
            "name -> tensor"
        )
    return saved
