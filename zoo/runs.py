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
import hmac
import json
import os
import secrets
import shutil
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
    bad = isinstance(max_data, bool) or not isinstance(max_data, int) or max_data < 1
    if max_data is not None and bad:
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
        files = _marker(self.path).get("files", [])  # a resumed run keeps its record
        marker = {"format": FORMAT, "model": config.get("model"), "files": files}
        save_json(self.path / MARKER, marker)
        save_json(self.path / "config.json", config)


@contextlib.contextmanager
def open_for_writing(out, *, overwrite: bool = False, resume: bool = False):
    """Claim ``out`` for one fit: refuse what would lose or mix a run or touch a folder that
    is not the zoo's (before anything is created or removed in it), create it, hold the lock
    for the whole fit, clean up what a killed write left, and on ``overwrite`` remove every
    file the old run wrote. Yields a ``Run``; what the fit writes is recorded (``recording``)."""
    path = run_path(out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder: choose a folder for the run")
    if resume and overwrite:
        raise RunError("--resume continues a run and --overwrite replaces it: choose one")
    _check_claim(path, overwrite, resume)  # nothing created or removed in a user's folder
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create the run folder {path}: {error.strerror}") from None
    with _lock(path):
        replace = _check_claim(path, overwrite, resume)  # again, now that it is held
        _remove_temporaries(path)
        if replace:
            _remove_run(path)
        with _recorded(path):
            yield Run(path)


def _check_claim(path: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse a folder the fit may not write to; True where a run is to be replaced."""
    if not path.exists():
        if resume:
            raise RunError(f"nothing to resume: {path} does not exist")
        return False
    others = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if resume:
        if not is_run(path):
            raise RunError(f"nothing to resume: {path} holds no zoo run")
        if not (path / "checkpoint.pt").exists() and (path / "params.pt").exists():
            raise RunError(f"nothing to resume: {path / 'checkpoint.pt'} does not exist")
        # no checkpoint and no parameters: stopped before its first checkpoint, the run starts
        # from the beginning on its own settings
        return False
    return _replaceable(path, others, overwrite, is_run(path), ("zoo run", "run"))


def _replaceable(path: Path, others, overwrite: bool, ours: bool, what) -> bool:
    """The rule for a non-empty folder: never another's (``ours`` False), one of ours only with
    ``overwrite``; True where it is to be replaced. ``what``: (its name with no, with a)."""
    if not others:
        return False
    if not ours:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise RunError(
            f"{path} is not empty ({shown}) and holds no {what[0]}: choose a new or empty"
            " folder with --out"
        )
    if not overwrite:
        raise RunError(f"{path} already holds a {what[1]}; pass --overwrite or another --out")
    return True


@contextlib.contextmanager
def recording(run):
    """Hold a fitted run for a command that adds files to it (evaluate, sample, score,
    complete, denoise): one writer at a time (a fit in progress is named), and every file the
    command writes is recorded in the run's marker, so that ``--overwrite`` removes it."""
    path = run_path(run)
    if not (path.is_dir() and is_run(path)):  # restore says what is wrong with it
        yield path
        return
    with _lock(path):
        with _recorded(path):
            yield path


@contextlib.contextmanager
def _recorded(path: Path, marker_name: str = MARKER):
    """Add the files (and folders) that appear in ``path`` while the block runs to its
    marker's list (also when the block fails: what it wrote before is the run's)."""
    before = {p.name for p in path.iterdir()}
    try:
        yield
    finally:
        new = {p.name for p in path.iterdir()} - before - {LOCK, marker_name}
        new = {name for name in new if not (name.startswith(".") and name.endswith(".tmp"))}
        if new and (path / marker_name).exists():
            marker = _marker(path, marker_name)
            marker["files"] = sorted(set(marker.get("files", [])) | new)
            save_json(path / marker_name, marker)


def _marker(path: Path, marker_name: str = MARKER) -> dict:
    try:
        marker = json.loads((path / marker_name).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


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
                f"another zoo process (pid {owner}) is writing to {path}; wait for it to"
                " finish, or choose another folder"
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


# ------------------------------------------------------------------- a comparison's report

REPORT_MARKER = ".zoo-compare"
# what reports wrote before they recorded their files, removed by --overwrite too
OLD_REPORT_FILES = ("table.md", "table.csv", "rows.json", "gradient_variance.json", "*.png")


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a report of ``zoo compare`` (its marker, or an older report's
    table.md beside rows.json)."""
    if (path / REPORT_MARKER).exists():
        return True
    return (path / "table.md").exists() and (path / "rows.json").exists()


@contextlib.contextmanager
def open_report(out, *, overwrite: bool = False):
    """Claim ``out`` for a comparison's report under ``zoo fit``'s rules: never a zoo run's
    folder or a user's non-empty one, an existing report only with ``overwrite`` (its files
    removed first), checked before anything is created there; one writer at a time; every
    file written recorded in the report's marker. Yields the folder."""
    path = run_path(out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder: choose a folder for the report")
    _check_report(path, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create the report folder {path}: {error.strerror}") from None
    with _lock(path):
        if _check_report(path, overwrite):
            _remove_report(path)
        save_json(path / REPORT_MARKER, {"format": FORMAT, "files": []})
        with _recorded(path, REPORT_MARKER):
            yield path


def _check_report(path: Path, overwrite: bool) -> bool:
    """Refuse a folder a report may not be written to; True where one is to be replaced."""
    if not path.exists():
        return False
    if is_run(path):
        raise RunError(
            f"{path} holds a zoo run (zoo fit's): a comparison's report goes in a folder of its"
            " own; choose another --out"
        )
    others = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    return _replaceable(path, others, overwrite, is_report(path), ("comparison",) * 2)


def _remove_report(path: Path) -> None:
    for name in _marker(path, REPORT_MARKER).get("files", []):
        target = path / name
        if "/" in name or name in (REPORT_MARKER, LOCK) or not target.exists():
            continue
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for pattern in OLD_REPORT_FILES:
        for file in path.glob(pattern):
            file.unlink(missing_ok=True)
    for folder in path.glob("nuts-seed*"):
        if folder.is_dir():
            shutil.rmtree(folder)


# what runs wrote before they recorded their files in the marker, removed by --overwrite too
OLD_RUN_PATTERNS = (
    "*.png",
    "history_*.json",
    "checkpoint_*.pt",
    "metrics_before_evaluate.json",
    "scores_*",
    "completion_*",
    "denoising_*",
    "interpolation.*",
)


def _remove_run(path: Path) -> None:
    """Every file the old run wrote: those its marker records, and (for runs from before the
    record) the names a run writes; the marker last, so that a kill midway leaves a run."""
    for name in _marker(path).get("files", []):
        if "/" not in name and name not in (MARKER, LOCK):
            (path / name).unlink(missing_ok=True)
    for name in RUN_FILES:
        if name != MARKER:
            (path / name).unlink(missing_ok=True)
    for pattern in OLD_RUN_PATTERNS:
        for file in path.glob(pattern):
            file.unlink(missing_ok=True)
    (path / MARKER).unlink(missing_ok=True)


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
    was_code, now_code = saved.get("model_source") or {}, config.get("model_source") or {}
    if was_code.get("sha256") and was_code.get("sha256") != now_code.get("sha256"):
        raise RunError(
            f"the run was fitted with the model file {was_code.get('path')} (SHA-256"
            f" {was_code['sha256'][:12]}...); {now_code.get('path')} is not that code (SHA-256"
            f" {str(now_code.get('sha256'))[:12]}...): resume with the same, unchanged file"
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


# ------------------------------------------------------------------------ the model's code


def _key() -> bytes:
    """This user's secret for sealing runs' code records (``seal``), made once, readable by the
    user alone, in the zoo's cache folder (``$ZOO_DATA``)."""
    from zoo import data

    path = data.cache_dir() / "run-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise RunError(f"{path} is not a zoo run key (32 bytes): remove it to make a new one")
    return key


def _seal_of(record: dict) -> str:
    text = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return hmac.new(_key(), text.encode(), hashlib.sha256).hexdigest()


def seal(record: dict) -> dict:
    """``record`` (``registry.code_record``) with an HMAC by this user's key: a record that
    this zoo wrote, not one copied in with a run folder or edited since."""
    return {**record, "seal": _seal_of(record)}


def model_spec(run: Path, config: dict, trust: bool = False):
    """The registry spec of a run's model, importing no code the run folder merely names.

    A zoo model or an installed entry point's is looked up by name. A user's file is imported
    from the absolute path the fit recorded, only when the record is sealed by this user's
    zoo (``seal``) and the file's SHA-256 is still the recorded one; a user's module likewise
    by its sealed record. Anything else (a run copied from elsewhere, an edited config.json, a
    run written before records were kept) is refused, naming what it would import, unless
    ``trust`` (``--trust-model``)."""
    from zoo import registry

    name = config["model"]
    if registry.installed(name):
        return registry.get(name)
    record = config.get("model_source")
    sealed = isinstance(record, dict) and record.get("name") == name
    sealed = sealed and hmac.compare_digest(str(record.get("seal")), _seal_of(record))
    if not sealed:
        if not trust:
            raise RunError(
                f"{run / 'config.json'} names the model {name!r}, code outside the zoo that this"
                " zoo's fits did not record (a run folder copied from elsewhere, an edited"
                " config.json, or a run from before the zoo recorded its model's file): it is"
                " not imported. If you trust the folder and the code it names, pass"
                " --trust-model"
            )
        return registry.get(name)
    if record["kind"] == "file":
        path = Path(record["path"])
        if not path.exists():
            raise RunError(
                f"{run} was fitted with the model file {path} (recorded as {name}), which no"
                " longer exists: put it back, or fit the model again"
            )
        now = registry.file_sha256(path)
        if now != record["sha256"] and not trust:
            raise RunError(
                f"the model file {path} has changed since {run} was fitted (SHA-256"
                f" {record['sha256'][:12]}... then, {now[:12]}... now): its parameters may not"
                " fit the new code. Restore the file, fit again, or pass --trust-model to use"
                " the file as it is"
            )
        return registry.get(f"{path}:{record['class']}")
    return registry.get(name)


def restore(run, trust: bool = False):
    """The fitted model of a run directory and its config, or a RunError naming the file and
    what to do. The model's code is found as ``model_spec`` finds it."""
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
        spec = model_spec(run, config, trust)
    except (TypeError, ValueError) as error:
        raise RunError(f"{run / 'config.json'}: {error}") from None
    try:
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
