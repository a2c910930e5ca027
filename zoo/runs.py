"""
Run directories: where a fit writes, and the guards that keep one run from ever being lost or
mixed with another::

    with runs.open_for_writing(out, overwrite=False, resume=False) as run:
        run.write_config(config)        # first, so that an interrupted run can resume
        ...                             # fit, checkpointing into run.checkpoint
    model, config = runs.restore(out)   # for evaluate, sample, --resume and runs built on runs
    splits = runs.splits(config)        # the run's data: {"train": (x, y), "test": (x, y)}

- A run is marked by ``.zoo-run`` (JSON: format and model), written when the run starts; a
  folder written before the marker existed counts as a run when its ``config.json`` is the
  CLI's (it names a model and a command).
- A folder that holds anything is refused without ``--overwrite``; ``--overwrite`` is refused on
  a non-empty folder that is not a zoo run (it holds a user's files), and on a run it removes the
  run's own files (checkpoint, temporary files and figures included) before the fit starts.
- One writer at a time: an ``fcntl`` lock on ``.zoo-lock`` (which records the owner's pid) is
  held for the whole fit; a second ``zoo fit`` into the same folder is refused, naming the pid.
- Temporary files that a killed atomic write left (``.NAME.*.tmp``) are removed under the lock.
- ``check_resume`` refuses a resume whose settings would change the run's trajectory, naming
  the flag; a new learning rate from the last good checkpoint is its own explicit option.
"""

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import pyro
import torch

from inference.io import UnreadableFile, save_json, save_torch
from inference.io import load_tensors as load_checked

MARKER = ".zoo-run"
LOCK = ".zoo-lock"
FORMAT = 1
CONFIG_FORMAT = 2  # config.json's layout: every model through the registry (zoo.registry)
# what a run directory holds that a fit wrote: removed by --overwrite (with *.png and temp files)
RUN_FILES = (
    "config.json",
    "params.pt",
    "history.json",
    "metrics.json",
    "checkpoint.pt",
    "samples.pt",
    MARKER,
)


class RunError(Exception):
    """A run directory cannot be used as asked; the message says why and what to do."""


def run_path(text) -> Path:
    """The folder a user named (``~`` expanded, never a literal ``./~``)."""
    return Path(os.path.expanduser(str(text)))


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a zoo run (the marker, or the CLI's config.json of older runs)."""
    if (path / MARKER).exists():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and "command" in config


def read_config(path) -> dict:
    """The run's config.json, checked to be one; RunError naming the file otherwise."""
    path = run_path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory (no such folder)")
    if not file.exists():
        raise RunError(f"{path} is not a run directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except ValueError as error:
        raise RunError(f"{file} is not valid JSON ({error}); the run cannot be read") from None
    if not isinstance(config, dict) or not {"model", "model_config", "data"} <= set(config):
        raise RunError(
            f"{file} is not a zoo run's config (it needs 'model', 'model_config' and 'data')"
        )
    max_data = config.get("max_data")
    if max_data is not None and (not isinstance(max_data, int) or max_data < 1):
        raise RunError(f"{file}: max_data must be a positive integer or null, not {max_data!r}")
    return config


def load_tensors(file: Path, what: str = "parameters") -> dict:
    """``inference.io.load_tensors`` with a RunError: a missing, truncated or foreign file, or
    one holding objects other than tensors (never unpickled), named with what it should hold."""
    try:
        return load_checked(file, what)
    except UnreadableFile as error:
        raise RunError(str(error)) from None


class Run:
    """A run directory held for writing (see ``open_for_writing``)."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def write_config(self, config: dict) -> None:
        save_json(self.path / MARKER, {"format": FORMAT, "model": config.get("model")})
        save_json(self.path / "config.json", config)


@contextlib.contextmanager
def open_for_writing(out, *, overwrite: bool = False, resume: bool = False):
    """Claim ``out`` for one fit: create it, refuse what would lose or mix a run, hold the lock
    for the whole fit, and clean up what a killed write left. Yields a ``Run``."""
    path = run_path(out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder: choose a folder for the run")
    if resume and overwrite:
        raise RunError("--resume continues a run and --overwrite replaces it: choose one")
    path.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        _remove_temporaries(path)
        others = sorted(p.name for p in path.iterdir() if p.name != LOCK)
        if resume:
            if not is_run(path):
                raise RunError(f"nothing to resume: {path} holds no zoo run")
            if not (path / "checkpoint.pt").exists():
                raise RunError(f"nothing to resume: {path / 'checkpoint.pt'} does not exist")
        elif others:
            if not is_run(path):
                shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                raise RunError(
                    f"{path} is not empty ({shown}) and holds no zoo run: choose a new or empty"
                    " folder with --out"
                )
            if not overwrite:
                raise RunError(f"{path} already holds a run; pass --overwrite or another --out")
            _remove_run(path)
        yield Run(path)


@contextlib.contextmanager
def _lock(path: Path):
    handle = open(path / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunError(
                f"another zoo process (pid {owner}) is writing to {path}; wait for it, or choose"
                " another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _remove_temporaries(path: Path) -> None:
    for file in path.glob(".*.tmp"):
        file.unlink(missing_ok=True)


def _remove_run(path: Path) -> None:
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for file in path.glob("*.png"):
        file.unlink()


# ------------------------------------------------------------------------------------ resume

# settings that change what a resumed run computes, with the flag that sets each
TRAJECTORY = {
    "data": "--data",
    "binarize": "--binarize",
    "max_data": "--max-data",
    "inference": "--inference",
}
TRAJECTORY_OPTIONS = {
    "seed": "--seed",
    "batch_size": "--batch-size",
    "loss": "--loss",
    "iwae": "--iwae",
    "lr_decay": "--lr-decay",
}


def check_resume(saved: dict, config: dict, changed_lr: bool = False) -> None:
    """Refuse a resume whose settings differ from the run's where they change its trajectory.

    The learning rate may change only with ``changed_lr`` (``--resume-lr``); the number of
    epochs only when the rate is constant (a decaying rate depends on it).
    """
    if saved.get("model") != config.get("model"):
        raise RunError(
            f"the run holds a {saved.get('model')} fit; it cannot be resumed as a"
            f" {config.get('model')}"
        )
    if saved.get("model_config") != json.loads(json.dumps(config.get("model_config"))):
        raise RunError(
            "--resume with a different model than the run holds: its settings were"
            f" {saved.get('model_config')}"
        )
    for key, flag in TRAJECTORY.items():
        _same(saved.get(key), config.get(key), flag)
    was, now = saved.get("options", {}), config.get("options", {})
    for key, flag in TRAJECTORY_OPTIONS.items():
        if key in was or key in now:
            _same(was.get(key), now.get(key), flag)
    if not changed_lr:
        hint = " (to continue at another rate, pass --resume-lr LR)"
        _same(was.get("lr"), now.get("lr"), "--lr", hint)
    if was.get("lr_decay", 1.0) != 1.0:
        hint = " (the decaying rate depends on it)"
        _same(was.get("epochs"), now.get("epochs"), "--epochs", hint)
    if saved.get("built_on", {}) != config.get("built_on", {}):
        raise RunError(
            f"the run was built on the fitted run(s) {saved.get('built_on')}; resume it on the"
            f" same, unchanged, not {config.get('built_on')}"
        )


def _same(was, now, flag: str, hint: str = "") -> None:
    if was != now:
        raise RunError(
            f"the run was started with {flag} {_show(was)}; resume it with the same value, not"
            f" {_show(now)}{hint}"
        )


def _show(value) -> str:
    return "(unset)" if value is None else str(value)


# ------------------------------------------------------------------------------- what a run holds


def save_parameters(model, path: Path) -> None:
    """A module's state dict, or for a model of plain pyro.params the store's values."""
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
    else:
        state = dict(pyro.get_param_store()._params)
    save_torch(path, {k: v.detach().cpu() for k, v in state.items()})


def digest(run: Path) -> dict:
    """What a run built on another records of it: its path and its parameters' SHA-256."""
    sha = hashlib.sha256((run / "params.pt").read_bytes()).hexdigest()
    return {"run": str(run), "params_sha256": sha}


def split(name: str, which: str, binarize, max_data=None):
    """A split of a zoo data set, or of a user's .csv / .npy file (its rows: no split, no
    labels), as float32 rows and integer labels (None where there are none)."""
    from zoo import data

    if name in data.NAMES:
        x, y = data.load(name, which, binarize)
    else:
        path = run_path(name)
        if path.suffix not in (".csv", ".npy"):
            names = ", ".join(data.NAMES)
            raise data.DataError(f"--data {name}: a data set ({names}) or a .csv / .npy file")
        if which != "train":
            raise ValueError(f"a data file has no {which} split")
        x = data.load_file(path)
        x, y = (data.binarize(x, binarize, seed=0) if binarize else x), None
    if max_data:
        x, y = x[:max_data], None if y is None else y[:max_data]
    return x, y


def splits(config: dict) -> dict:
    """``{"train": (x, y), "test": (x, y)}`` of a run's data as its scores see them (a
    dynamically binarized run's held-out draw); no "test" for a data file."""
    binarize = config.get("held_out_binarize", config.get("binarize"))
    out = {"train": split(config["data"], "train", binarize, config.get("max_data"))}
    try:
        out["test"] = split(config["data"], "test", binarize)
    except ValueError:  # the data have no test split
        pass
    return out


def restore(run):
    """The fitted model of a run directory and its config, or a RunError naming the file and
    what to do."""
    from zoo import registry

    run = run_path(run)
    config = read_config(run)
    if "format" not in config and "held_out_binarize" in config:
        raise RunError(
            f"{run} was written by an older zoo (before its models declared their task"
            " options): its settings are in config.json, but the layout is gone; fit it again"
            f" with the command it records: {config.get('command', 'zoo fit ...')} --overwrite"
        )
    if not (run / "params.pt").exists() and (run / "checkpoint.pt").exists():
        raise RunError(
            f"{run} has no params.pt: its fit did not finish; continue it with zoo fit"
            f" {config['model']} --resume {run}"
        )
    try:
        spec = registry.get(config["model"])
        model = spec.build(config["model_config"])
    except (TypeError, ValueError) as error:
        raise RunError(
            f"{run / 'config.json'}: its model_config does not make a {config['model']} ({error})"
        ) from None
    _load_state(model, load_tensors(run / "params.pt"), run, config)
    return model, config


def _load_state(model, state: dict, run: Path, config: dict) -> None:
    from inference import loop
    from zoo import registry

    pyro.clear_param_store()
    if isinstance(model, torch.nn.Module):
        own = model.state_dict()
    else:  # plain pyro.params: one run of the program on two rows creates them
        binarize = config.get("held_out_binarize", config.get("binarize"))
        x, y = split(config["data"], "train", binarize, 2)
        arguments = registry.model_arguments(model, x, y, "train")
        loop.Parameters(model.model, model.guide, registry.as_data(arguments))
        own = dict(pyro.get_param_store()._params)
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in state):
        raise RunError(
            f"{run / 'params.pt'} does not hold this {config['model']}'s parameters (its names"
            " or shapes differ from those its config.json makes)"
        )
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
