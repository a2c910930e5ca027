"""Small file helpers shared by the drivers, the data cache and the CLI.

Every write goes to a temporary file in the destination folder and is moved into place with
``os.replace``, which is atomic on POSIX and Windows: a reader sees the old file or the new one,
never half of either, even if the process is killed mid-write.
"""

import json
import os
import tempfile
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def save_json(path: PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_torch(path: PathLike, obj) -> Path:
    """``torch.save`` made atomic; load back with ``torch.load(path, weights_only=True)``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
