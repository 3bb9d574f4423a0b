"""Atomic file writes: a temporary sibling, then a rename, so readers see the old file or the new one."""

import json
import os
import pathlib
import tempfile
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically; creates the parent folder."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes `payload` as indented JSON to `path` atomically; creates the parent folder."""
    write_text(path, json.dumps(payload, indent=2))


def ensure_writable_dir(path: str | os.PathLike) -> None:
    """Creates the folder `path` if needed and checks that a file can be created in it.

    Raises the OSError subclass of the failure (PermissionError, NotADirectoryError, ...) with a message
    naming the folder, so a run fails before any work instead of at its first checkpoint.
    """
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise type(error)(
            f"cannot write to {path.absolute()}: {error.strerror or error}; "
            "choose a writable --workdir or fix its permissions"
        ) from error


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically; creates the parent folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
