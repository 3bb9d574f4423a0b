"""The PyTorch checkpoint reader (ossnet_jax/official/pt.py) on files written in torch.save's format:
round trips of every storage type and of strided tensors, and hostile or damaged files refused without
running anything."""

import collections
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ossnet_jax.official import pt
from tests import official_writers as w


def test_tensors_of_every_storage_type_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "float32": rng.normal(size=(3, 4, 5)).astype(np.float32),
        "float64": rng.normal(size=(7,)),
        "float16": rng.normal(size=(2, 3)).astype(np.float16),
        "int64": np.array([-(2**40), 0, 2**62], np.int64),
        "int32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "int16": np.array([-300, 300], np.int16),
        "int8": np.array([-128, 127], np.int8),
        "uint8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(1234, np.int64),  # a num_batches_tracked
        "empty": np.zeros((0, 3), np.float32),
    }
    loaded = pt.load_state_dict(w.write_pt(tmp_path / "m.pt", state, name="oss_net_c_bra_ts"))
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
    for key, want in state.items():
        got = loaded[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous and got.flags.writeable


def test_bfloat16_storage(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x7F80], np.uint16)  # 1.0, -2.0, inf as bfloat16 bit patterns
    path = w.write_archive(
        tmp_path / "b.pt",
        w.dumps(w.OrderedDict((("x", w.tensor("0", "BFloat16Storage", 3, 0, (3,), (1,))),))),
        {"0": bits.astype("<u2").tobytes()},
    )
    got = pt.load_state_dict(path)["x"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), [1.0, -2.0, np.inf])


def test_strided_views_of_shared_storages(tmp_path):
    storage = np.arange(60, dtype=np.float32)
    state = {
        "transposed": w.Strided("s", 0, (5, 12), (1, 5)),  # a (12, 5) tensor's .T
        "every_other": w.Strided("s", 3, (2, 3, 4), (30, 10, 2)),  # offset and a step of 2
        "expanded": w.Strided("s", 7, (3, 4), (0, 1)),  # stride 0: a broadcast row
        "whole": w.Strided("s", 0, (60,), (1,)),
    }
    loaded = pt.load_state_dict(w.write_pt(tmp_path / "s.pt", state, {"s": storage}))
    np.testing.assert_array_equal(loaded["transposed"], storage.reshape(12, 5).T)
    i, j, k = np.indices((2, 3, 4))
    np.testing.assert_array_equal(loaded["every_other"], storage[3 + 30 * i + 10 * j + 2 * k])
    np.testing.assert_array_equal(loaded["expanded"], np.broadcast_to(storage[7:11], (3, 4)))
    np.testing.assert_array_equal(loaded["whole"], storage)
    loaded["whole"][0] = -1.0  # every tensor owns its memory
    assert loaded["transposed"][0, 0] == 0.0


def test_big_endian_archive(tmp_path):
    values = np.array([1.5, -2.25, 3e30], np.float32)
    path = tmp_path / "be.pt"
    pickled = w.dumps(w.OrderedDict((("x", w.tensor("0", "FloatStorage", 3, 0, (3,), (1,))),)))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", values.astype(">f4").tobytes())
    np.testing.assert_array_equal(pt.load_state_dict(path)["x"], values)


@pytest.mark.parametrize(
    "module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("torch", "load")]
)
def test_a_pickle_calling_any_other_global_is_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
    payload = w.Call(w.Global(module, name), (command,))
    path = w.write_archive(tmp_path / "evil.pt", w.dumps(w.OrderedDict((("x", payload),))), {})
    with pytest.raises(
        pt.UnsafeCheckpointError, match=rf"evil.pt: refuses the global {module}\.{name}"
    ):
        pt.load_state_dict(path)
    assert not marker.exists()


def test_a_global_hidden_in_a_tensor_rebuild_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hook = w.Call(w.Global("os", "system"), (f"touch {marker}",))
    bad = w.Call(
        w.Global("torch._utils", "_rebuild_tensor_v2"),
        (
            w.Persistent(("storage", w.Global("torch", "FloatStorage"), "0", "cpu", 1)),
            0,
            (1,),
            (1,),
            False,
            hook,
        ),
    )
    path = w.write_archive(
        tmp_path / "hook.pt", w.dumps(w.OrderedDict((("x", bad),))), {"0": bytes(4)}
    )
    with pytest.raises(pt.UnsafeCheckpointError, match="os.system"):
        pt.load_state_dict(path)
    assert not marker.exists()


def test_a_truncated_file_is_refused_with_its_name(tmp_path):
    whole = w.write_pt(tmp_path / "whole.pt", {"x": np.ones((100,), np.float32)})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(pt.CheckpointFormatError, match="cut.pt: not a zip archive"):
        pt.load_state_dict(cut)


def test_a_damaged_storage_is_refused(tmp_path):
    path = w.write_pt(tmp_path / "crc.pt", {"x": np.ones((100,), np.float32)})
    data = bytearray(path.read_bytes())
    at = data.find(np.float32(1.0).tobytes() * 4)  # inside the stored storage bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(pt.CheckpointFormatError, match="crc.pt: Bad CRC-32"):
        pt.load_state_dict(path)


def test_a_storage_shorter_than_its_tensor_is_refused(tmp_path):
    short = w.dumps(w.OrderedDict((("x", w.tensor("0", "FloatStorage", 10, 0, (10,), (1,))),)))
    path = w.write_archive(tmp_path / "short.pt", short, {"0": bytes(4 * 6)})
    with pytest.raises(
        pt.CheckpointFormatError,
        match=r"short.pt: storage 0 holds 24 bytes, its 10 elements need 40",
    ):
        pt.load_state_dict(path)
    beyond = w.dumps(w.OrderedDict((("x", w.tensor("0", "FloatStorage", 6, 2, (3, 2), (2, 1))),)))
    path = w.write_archive(tmp_path / "beyond.pt", beyond, {"0": bytes(4 * 6)})
    with pytest.raises(
        pt.CheckpointFormatError, match=r"beyond.pt: tensor of size \(3, 2\).* reads element 7"
    ):
        pt.load_state_dict(path)
    twice = w.dumps(
        w.OrderedDict(
            (
                ("x", w.tensor("0", "FloatStorage", 2, 0, (2,), (1,))),
                ("y", w.tensor("0", "LongStorage", 1, 0, (1,), (1,))),
            )
        )
    )
    path = w.write_archive(tmp_path / "twice.pt", twice, {"0": bytes(8)})
    with pytest.raises(
        pt.CheckpointFormatError, match="storage 0 is referenced as two element types"
    ):
        pt.load_state_dict(path)
    huge = w.dumps(
        w.OrderedDict((("x", w.tensor("0", "FloatStorage", 1, 0, (2**20, 2**20), (0, 0))),))
    )
    path = w.write_archive(tmp_path / "huge.pt", huge, {"0": bytes(4)})
    with pytest.raises(pt.CheckpointFormatError, match="larger than"):
        pt.load_state_dict(path)


def test_other_files_are_refused_with_what_they_are(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # a pre-1.6 torch.save header
    with pytest.raises(pt.CheckpointFormatError, match="legacy.pt: not a zip archive.*legacy"):
        pt.load_state_dict(legacy)
    listed = w.write_archive(tmp_path / "list.pt", w.dumps((1, 2)), {})
    with pytest.raises(pt.CheckpointFormatError, match="list.pt: holds a tuple, not a state dict"):
        pt.load_state_dict(listed)
    empty = tmp_path / "empty.pt"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("archive/version", "3\n")
    with pytest.raises(pt.CheckpointFormatError, match="empty.pt: .*expected one <name>/data.pkl"):
        pt.load_state_dict(empty)


def test_torch_save_files_read_bit_identical(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state = collections.OrderedDict(
        weight=torch.randn(3, 4, 2, 2, 2),
        transposed=base.t(),
        sliced=base[1:, ::2],
        half=torch.randn(5).half(),
        bf16=torch.randn(5).bfloat16(),
        counter=torch.tensor(7, dtype=torch.int64),
        mask=torch.tensor([True, False]),
    )
    torch.save(state, tmp_path / "torch.pt")
    loaded = pt.load_state_dict(tmp_path / "torch.pt")
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        want = tensor.contiguous()
        if want.dtype == torch.bfloat16:
            want_bits, got_bits = want.view(torch.int16).numpy(), loaded[key].view(np.int16)
        else:
            want_bits, got_bits = want.numpy(), loaded[key]
        assert got_bits.shape == want_bits.shape and got_bits.tobytes() == want_bits.tobytes(), key
    # and the test writer's files are what torch.load reads, with torch's own restricted loader
    written = w.write_pt(tmp_path / "ours.pt", {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    back = torch.load(written, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(back["a"].numpy(), np.arange(6).reshape(2, 3))
