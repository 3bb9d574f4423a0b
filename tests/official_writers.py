"""PyTorch checkpoint files written without torch, for the tests of ossnet_jax.official.

`write_pt` writes what `torch.save(state_dict)` writes: a zip (stored, not compressed) with
<name>/data.pkl, a protocol-2 pickle of a collections.OrderedDict whose tensors are calls of
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks), each
storage a persistent id ('storage', torch.<Type>Storage, key, location, numel); <name>/data/<key>, the
storages' little-endian bytes; <name>/byteorder and <name>/version. The pickle is assembled opcode by
opcode (pickle's own Pickler needs the torch globals to be importable). `release_state_dict` makes a
state dict with the official key names and shapes of a release configuration
(tests/fixtures/official-state-dicts.tsv) or of any key -> shape layout.
"""

import dataclasses
import pathlib
import struct
import zipfile
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from ossnet_jax.data.nifti import save_nifti

# every key and shape of the release's ten configurations (a copy of shared/reference/'s)
TSV = pathlib.Path(__file__).parent / "fixtures" / "official-state-dicts.tsv"
STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


@dataclasses.dataclass(frozen=True)
class Global:
    """A module-level name, pickled by reference (GLOBAL opcode)."""

    module: str
    name: str


@dataclasses.dataclass(frozen=True)
class Call:
    """func(*args) at load time (REDUCE)."""

    func: Any
    args: tuple


@dataclasses.dataclass(frozen=True)
class Persistent:
    """A persistent id (BINPERSID): what the unpickler's persistent_load resolves."""

    pid: tuple


@dataclasses.dataclass(frozen=True)
class OrderedDict:
    """collections.OrderedDict() filled with `items` (SETITEMS), then given the attributes of
    `attributes` ((name, value) pairs, BUILD), as a state dict's `_metadata`."""

    items: tuple
    attributes: tuple = ()


@dataclasses.dataclass(frozen=True)
class Dict:
    """A plain dict of `items` ((key, value) pairs)."""

    items: tuple


@dataclasses.dataclass(frozen=True)
class Strided:
    """A tensor viewing storage `key` (in write_pt's `storages`) at an offset with strides."""

    key: str
    offset: int
    size: tuple
    stride: tuple


def dumps(value: Any) -> bytes:
    """A protocol-2 pickle of `value` (None, bool, int, float, str, tuple and the classes above)."""
    out = bytearray(b"\x80\x02")
    _emit(out, value)
    out += b"."
    return bytes(out)


def _emit(out: bytearray, v: Any) -> None:
    if v is None:
        out += b"N"
    elif isinstance(v, bool):
        out += b"\x88" if v else b"\x89"
    elif isinstance(v, int):
        if -(2**31) <= v < 2**31:
            out += b"J" + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            out += b"\x8a" + bytes([len(raw)]) + raw
    elif isinstance(v, float):
        out += b"G" + struct.pack(">d", v)
    elif isinstance(v, str):
        raw = v.encode("utf-8")
        out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(v, tuple):
        out += b"("
        for item in v:
            _emit(out, item)
        out += b"t"
    elif isinstance(v, Global):
        out += f"c{v.module}\n{v.name}\n".encode("ascii")
    elif isinstance(v, Call):
        _emit(out, v.func)
        _emit(out, tuple(v.args))
        out += b"R"
    elif isinstance(v, Persistent):
        _emit(out, v.pid)
        out += b"Q"
    elif isinstance(v, OrderedDict):
        _emit(out, Call(Global("collections", "OrderedDict"), ()))
        _emit_items(out, v.items)
        if v.attributes:
            _emit(out, Dict(v.attributes))
            out += b"b"
    elif isinstance(v, Dict):
        out += b"}"
        _emit_items(out, v.items)
    else:
        raise TypeError(f"cannot pickle {type(v).__name__}")


def _emit_items(out: bytearray, items: tuple) -> None:
    """SETITEMS of (key, value) pairs into the dict on the stack."""
    if items:
        out += b"("
        for key, item in items:
            _emit(out, key)
            _emit(out, item)
        out += b"u"


def tensor(
    key: str, storage_type: str, numel: int, offset: int, size: tuple, stride: tuple
) -> Call:
    """The pickled form of a tensor on storage `key` (saved from a GPU, as the published files)."""
    storage = Persistent(("storage", Global("torch", storage_type), key, "cuda:0", numel))
    hooks = OrderedDict(())
    return Call(
        Global("torch._utils", "_rebuild_tensor_v2"),
        (storage, offset, tuple(size), tuple(stride), False, hooks),
    )


def contiguous_strides(size: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def write_archive(
    path: pathlib.Path, pickled: bytes, storages: Mapping[str, bytes], name: str = "archive"
) -> pathlib.Path:
    """A torch zip of a given pickle and raw storages."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/data.pkl", pickled)
        archive.writestr(f"{name}/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"{name}/data/{key}", raw)
        archive.writestr(f"{name}/version", "3\n")
    return path


def write_pt(
    path: pathlib.Path,
    state: Mapping[str, Any],
    storages: Optional[Mapping[str, np.ndarray]] = None,
    name: str = "archive",
) -> pathlib.Path:
    """torch.save of a state dict: an OrderedDict with torch's `_metadata` attribute (a version per
    module); arrays are saved contiguous on storages of their own, Strided entries view `storages`
    (1-D arrays, one element type each)."""
    storages = dict(storages or {})
    raws = {
        k: np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
        for k, v in storages.items()
    }
    items = []
    for i, (key, value) in enumerate(state.items()):
        if isinstance(value, Strided):
            array = storages[value.key]
            items.append(
                (
                    key,
                    tensor(
                        value.key,
                        STORAGE_NAMES[array.dtype],
                        array.size,
                        value.offset,
                        value.size,
                        value.stride,
                    ),
                )
            )
            continue
        value = np.asarray(value)
        storage_key = f"t{i}"
        raws[storage_key] = (
            np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        )
        items.append(
            (
                key,
                tensor(
                    storage_key,
                    STORAGE_NAMES[value.dtype],
                    value.size,
                    0,
                    value.shape,
                    contiguous_strides(value.shape),
                ),
            )
        )
    modules = sorted({""} | {k.rsplit(".", 1)[0] for k in state if "." in k})
    metadata = OrderedDict(tuple((m, Dict((("version", 1),))) for m in modules))
    pickled = dumps(OrderedDict(tuple(items), (("_metadata", metadata),)))
    return write_archive(path, pickled, raws, name)


def release_layout(configuration: str) -> dict[str, tuple]:
    """Key -> shape of a release configuration (e.g. 'oss_net_full_bra_ts'), from the reference TSV."""
    layout = {}
    for line in TSV.read_text().splitlines()[1:]:
        name, key, shape = line.split("\t")
        if name == configuration:
            layout[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    if not layout:
        raise KeyError(f"{configuration} is not in {TSV}")
    return layout


def release_state_dict(layout: Mapping[str, tuple], seed: int = 0, scale: float = 0.1) -> dict:
    """A state dict of `layout` with the release's buffers: random weights (normal, `scale`), positive
    running variances, PAU coefficients near the release's initialisation, and an int64
    num_batches_tracked after every BatchNorm's running_var (ignored by the converter)."""
    rng = np.random.default_rng(seed)
    numerator = np.array([0.03356, 0.505, 1.65344, 2.01001, 0.9319, 0.15242], np.float32)
    denominator = np.array([3.3e-6, 3.98022, 5.1e-7, 0.30183], np.float32)
    state = {}
    for key, shape in layout.items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("weight_numerator"):
            value = numerator + rng.normal(0, 0.05, shape)
        elif key.endswith("weight_denominator"):
            value = denominator + rng.normal(0, 0.05, shape)
        else:
            value = scale * rng.standard_normal(shape, np.float32)
        state[key] = value.astype(np.float32)
        if key.endswith("running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(1234, np.int64)
    return state


def tiny_release_config(variant_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A variant's release config shrunk to test sizes: a 32x32x16 grid of 4 channels, encoder
    (8, 16) (latent grid 4x4x2 = 32 values), a 16-wide decoder of 2 blocks, small eval batches."""
    config = variant_config
    config.data.grid_shape = (32, 32, 16)
    config.data.num_channels = 4
    config.data.band_size = 5
    config.model.encoder_channels = (8, 16)
    config.model.decoder_width = 16
    config.model.decoder_blocks = 2
    config.eval.batch_points = 512
    return config


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS files' voxel axes: left, posterior, superior
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")


def write_brats_case(root: pathlib.Path, number: int, shape: tuple, seed: int) -> dict:
    """BraTS20_Training_<number>/ with four modalities (positive intensities in an ellipsoid
    'head', 0 outside) and a label (0/1/2/4 blobs inside it), LPS as BraTS; returns the arrays as
    stored: {'image' (x, y, z, 4) float32, 'label' (x, y, z) uint8}."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    head = (grid**2).sum(-1) < 0.9
    centre = rng.uniform(-0.3, 0.3, 3)
    radius = np.sqrt(((grid - centre) ** 2).sum(-1))
    label = np.select([radius < 0.15, radius < 0.3, radius < 0.45], [4, 1, 2], 0).astype(np.uint8)
    label[~head] = 0
    case = f"BraTS20_Training_{number:03d}"
    channels = []
    for i, modality in enumerate(BRATS_MODALITIES):
        values = rng.uniform(50, 150, shape) + 80.0 * (label > 0) * (i + 1)
        values = np.where(head, values, 0.0).astype(np.float32)
        save_nifti(root / case / f"{case}_{modality}.nii.gz", values, LPS)
        channels.append(values)
    save_nifti(root / case / f"{case}_seg.nii.gz", label, LPS)
    return {"image": np.stack(channels, -1), "label": label}
