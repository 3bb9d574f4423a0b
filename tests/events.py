"""A minimal reader of TensorBoard event files, for tests: TFRecord framing of tensorboardX's Event protos.

Each record is an 8-byte little-endian length, a 4-byte CRC of it, the serialized Event and a 4-byte
CRC of that (the CRCs are not checked here).
"""

import pathlib
import struct

from tensorboardX.proto import event_pb2


def read_events(path: pathlib.Path) -> list:
    """Every Event proto of one event file, in file order."""
    data = path.read_bytes()
    events, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        at += 12
        events.append(event_pb2.Event.FromString(data[at : at + length]))
        at += length + 4
    return events


def scalars(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of the simple scalars in every event file of `folder`."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
