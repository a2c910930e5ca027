"""The data sets the zoo knows by name, and where it keeps what it fetches: a module of names
alone, so that the command line can offer them (``zoo data fetch NAME``, ``zoo --help``) without
importing torch (``zoo.data`` loads them)."""

import os
from pathlib import Path

NAMES = ("mnist", "digits", "faithful", "gmm-synthetic", "bmm-synthetic")


def cache_dir() -> Path:
    """``$ZOO_DATA`` if set, else ``$XDG_CACHE_HOME/zoo`` (default ``~/.cache/zoo``)."""
    if os.environ.get("ZOO_DATA"):
        return Path(os.environ["ZOO_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zoo"
