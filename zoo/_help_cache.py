"""What ``zoo list`` and ``zoo fit|compare MODEL --help`` print, kept between runs so that they
answer without importing torch and every model (seconds on a busy machine). A command that did
import them writes the text; a later one reads it back while nothing it depends on has changed:
the key hashes the zoo's and the drivers' source files, the installed ``zoo.models`` entry
points, the Python, torch and Pyro versions and the terminal's width. Kept in
``catalog.cache_dir()``."""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

from zoo import catalog, registry

_PACKAGES = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "inference")


def _key() -> str:
    digest = hashlib.sha256()
    for folder in _PACKAGES:
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder.parent)).encode())
            digest.update(path.read_bytes())
    points = sorted(f"{p.name}={p.value}" for p in metadata.entry_points(group="zoo.models"))
    width = shutil.get_terminal_size().columns
    versions = [_version(name) for name in ("torch", "pyro-ppl")]  # Pyro's ELBOs are choices
    digest.update(json.dumps([points, width, sys.version, versions]).encode())
    return digest.hexdigest()[:20]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _path() -> Path:
    return catalog.cache_dir() / f"help-{_key()}.json"


def read(command: str) -> Optional[str]:
    """The text ``command`` printed when it last ran on this code, or None."""
    try:
        return json.loads(_path().read_text()).get(command)
    except (OSError, ValueError):
        return None


def write(command: str, text: str) -> None:
    """Keep ``text`` for ``command`` (best effort: an unwritable cache only costs time)."""
    path = _path()
    try:
        kept = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        kept = {}
    kept[command] = text
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob("help-*.json"):  # written by older code: never read again
            if old != path:
                old.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".help-", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(kept, handle)
        os.replace(tmp, path)  # whole or not at all
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def listing() -> str:
    """What ``zoo list`` prints: the models (imported once, then kept) and the data sets."""
    text = read("list")
    if text is None:
        lines = ["models:"]
        for name in registry.names():
            spec = registry.get(name)
            lines.append(
                f"  {name:6s} {spec.description}  [inference: {', '.join(spec.drivers)};"
                f" default data: {spec.default_data or 'none'}]"
            )
        lines += [
            "  (and your own: zoo fit path/to/file.py:Class or package.module:Class)",
            "  (each model's flags: zoo fit MODEL --help)",
            "data sets:",
            *(f"  {name}" for name in catalog.NAMES),
        ]
        text = "\n".join(lines)
        write("list", text)
    return text


def printed_help(command: str, model: str, rest, parser_of) -> bool:
    """``zoo fit|compare MODEL --help``: printed from the cache where this code printed it
    before (no model imported), else from the model's parser, and kept; True if printed. A
    user's file (``file.py:Class``) is read afresh every time: it may change."""
    if not {"-h", "--help"} & set(rest):
        return False
    key = f"{command} {model}"
    text = read(key) if ":" not in model else None
    if text is None:
        text = parser_of(registry.get(model)).format_help()
        if ":" not in model:
            write(key, text)
    print(text, end="")
    return True
