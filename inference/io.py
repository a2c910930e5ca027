"""Small file helpers shared by the drivers, the data cache and the CLI.

Every write goes to a temporary file in the destination folder and is moved into place with
``os.replace``, which is atomic on POSIX and Windows: a reader sees the old file or the new one,
never half of either, even if the process is killed mid-write.
"""

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[object], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary binary file, then move it to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:  # a write names no file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def save_json(path: PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_torch(path: PathLike, obj) -> Path:
    """``torch.save`` made atomic; load back with ``torch.load(path, weights_only=True)``.

    Serialized in memory first: torch's own file writer turns a full disk or a file-size
    limit into a RuntimeError ("unexpected pos"), a plain write into the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


class UnreadableFile(ValueError):
    """A file of tensors is missing, truncated, foreign, or holds other objects."""


def load_tensors(path: PathLike, what: str = "tensors"):
    """``torch.load(path, weights_only=True)``, with errors that name the file and what it
    should hold: missing, truncated or foreign, or a pickle of other objects (never unpickled:
    ``save_torch`` writes torch's zip archive of tensors, so a bare pickle is refused unread)."""
    path = Path(path)
    if not path.exists():
        raise UnreadableFile(f"{path} does not exist: no saved {what}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:1] == b"\x80":
        raise UnreadableFile(
            f"{path} is a pickle of Python objects, not a file of tensors that zoo writes; it is"
            " not unpickled (it may run code)"
        )
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises several kinds for a bad file
        text = str(error)
        if head == b"PK\x03\x04" and "WeightsUnpickler" in text:
            raise UnreadableFile(
                f"{path} holds objects other than tensors; only files of tensors are read, and"
                " this one is not unpickled (it may run code)"
            ) from None
        reason = text.splitlines()[0][:120] if head == b"PK\x03\x04" else "not a tensor file"
        raise UnreadableFile(
            f"{path} cannot be read ({type(error).__name__}: {reason}): it is truncated or was"
            f" not written by zoo, so its {what} are lost"
        ) from None
