"""
The fit pipeline: one function from a request (a model, its data, a driver and its settings, a
run folder) to a fitted, scored run directory. ``zoo fit``, the benchmarks and a script call it
alike::

    from zoo import fitting
    run, metrics = fitting.fit_run(fitting.FitRequest("vae", data="digits", out="runs/v",
                                                      given={"epochs": 5, "z_dim": 4}))

Its steps, in order (``Fit``): the model's defaults for the data set, the driver's settings
(defaults read from the driver's own signature, ``inference.drivers``), the data (refused before
the run folder is touched), the model (built on fitted runs where it declares so), the run
folder claimed (``zoo.runs``), config.json, the driver, the model's further stages, then
params.pt, history.json, and the scores and figures (``zoo.report``). A request the fit cannot
honour raises ``FitError`` naming the setting; an interrupted fit raises ``Interrupted``, whose
``run`` is the folder to resume.
"""

import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pyro
import torch
import torch.distributed as tdist

from inference import drivers, em, loop, sparse
from inference import io as files
from inference.drivers import LOOP
from zoo import data, registry, report, runs


class FitError(Exception):
    """A fit request that cannot be honoured; the message names the setting and the fix."""


class Interrupted(KeyboardInterrupt):
    """The fit was stopped by SIGINT after saving a checkpoint at the step it finished."""

    def __init__(self, run: Path):
        super().__init__(f"interrupted; the checkpoint in {run} is saved")
        self.run = run


@dataclasses.dataclass
class FitRequest:
    """One fit, as the command line or a script asks for it. ``given``: the model's options and
    the drivers' settings that were chosen (by name: ``z_dim``, ``epochs``, ``lr``, ...); the
    rest come from the model's defaults for the data, then its config's and the driver's.
    ``command``: the words after ``zoo fit`` that config.json records (made from the request
    where None)."""

    model: str
    data: Optional[str] = None
    inference: Optional[str] = None
    out: Optional[str] = None
    given: Dict[str, Any] = dataclasses.field(default_factory=dict)
    binarize: str = "default"
    max_data: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    resume: Optional[str] = None
    quiet: bool = True
    command: Optional[List[str]] = None

    def value(self, name: str):
        """A chosen value by name: a field of the request, else ``given``'s; None if unset."""
        if name in self.given:
            return self.given[name]
        return getattr(self, name, None) if name in _FIELDS else None

    def model_options(self, spec) -> dict:
        """The model options chosen (tuples for lists), less those the data set."""
        names = [o.name for o in spec.options() if o.data is None]
        given = {n: self.given.get(n) for n in names if self.given.get(n) is not None}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}

    def command_line(self) -> str:
        """``zoo fit ...`` as config.json records it: the command given, else one that asks
        for the same fit."""
        words = self.command if self.command is not None else self._words()
        return "zoo fit " + " ".join(shlex.quote(str(a)) for a in words)

    def _words(self) -> list:
        words = [self.model]
        for name in ("data", "inference", "out", "binarize", "max_data", "seed", "device"):
            value = getattr(self, name)
            if value is not None and value != _DEFAULTS.get(name):
                words += [f"--{name.replace('_', '-')}", value]
        for name, value in self.given.items():
            flag = f"--{name.replace('_', '-')}"
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{name.replace('_', '-')}")
            elif isinstance(value, (list, tuple)):
                words += [flag, *value]
            elif value is not None:
                words += [flag, value]
        return words + (["--overwrite"] if self.overwrite else [])


_FIELDS = {f.name for f in dataclasses.fields(FitRequest)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FitRequest)}


def fit_run(request: FitRequest) -> Tuple[Path, Optional[dict]]:
    """Fit and write the run ``request`` asks for: (its folder, its metrics; None on a torchrun
    rank other than 0, which writes nothing)."""
    spec = registry.get(request.model)
    inference = request.inference or next(iter(spec.drivers))
    if inference not in spec.drivers:
        raise FitError(
            f"{spec.name} is fitted by {', '.join(spec.drivers)}, not --inference {inference}"
        )
    request = dataclasses.replace(request, inference=inference)
    defaults = data_defaults(spec, request)
    settings = driver_settings(spec, request, defaults)
    out, resume = fit_target(spec, request)
    pyro.set_rng_seed(request.seed)
    pyro.clear_param_store()
    where = device(request.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        if inference != "reparam":
            raise FitError(
                "under torchrun only --inference reparam averages gradients across ranks"
            )
        where = _init_distributed(where)
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    fit = Fit(spec, request, settings, out, resume, where, defaults)
    fit.load_data()  # bad data or options are refused before the run directory is touched
    fit.build_model()
    claim = runs.open_for_writing(out, overwrite=request.overwrite, resume=resume)
    try:
        with claim if rank == 0 else contextlib.nullcontext():  # rank 0 writes the run folder
            return out, fit.run(rank)
    except KeyboardInterrupt:  # the loop saved a checkpoint at the step it had finished
        raise Interrupted(out) from None


class _Default:
    """A flag's default read from the drivers' own ``fit`` signatures (``inference.drivers``)
    when it is needed, never a copy: the driver option it stands for."""

    def __init__(self, option: str):
        self.option = option

    def value(self, names):
        return drivers.default(self.option, names)


def _default(default, names):
    return default.value(names) if isinstance(default, _Default) else default


# The shared fit settings: (name, default, the drivers it applies to, help). A setting given
# for another driver is refused; the defaults fill in those that apply and were not given.
SETTINGS = (
    ("epochs", _Default("num_epochs"), LOOP, "passes over the training rows"),
    ("batch_size", _Default("batch_size"), LOOP, "minibatch size"),
    ("lr", _Default("lr"), LOOP, "Adam's learning rate"),
    (
        "lr_decay",
        1.0,
        LOOP,
        "factor the learning rate falls to by the last epoch, geometrically per epoch"
        " (1 = constant; Burda et al.'s schedule ends at 0.1)",
    ),
    ("patience", None, LOOP, "early stopping: epochs without a better validation"),
    ("max_steps", None, LOOP, "stop after N steps (smoke runs)"),
    ("eval_samples", 100, LOOP, "importance samples for the held-out scores"),
    ("loss", None, ("svi",), "Pyro's ELBO (default: the model's)"),
    (
        "iwae",
        _Default("num_particles"),
        ("reparam",),
        "importance-weighted bound with K particles",
    ),
    (
        "tol",
        _Default("tol"),
        ("em",),
        "stop when the mean log-likelihood gains less",
    ),
    ("max_iter", _Default("max_iter"), ("em",), "EM iterations"),
    ("n_init", _Default("n_init"), ("em",), "restarts; the best is kept"),
    ("sparse", "auto", ("em",), "EM on sparse rows: auto, yes or no"),
)


CHOICES = {"sparse": ("auto", "yes", "no")}  # and "loss": svi.LOSSES, read when used


def _check_applies(spec, given: dict, options: dict) -> None:
    """Refuse a flag given where it does nothing (an option's ``applies_with``)."""
    for option in spec.options():
        needs = option.applies_with or {}
        if option.name not in given or all(options.get(k) == v for k, v in needs.items()):
            continue
        flag = f"--{option.name.replace('_', '-')}"
        wanted = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in needs.items())
        now = ", ".join(f"{k} is {options.get(k)!r}" for k in needs)
        raise FitError(f"{flag} applies with {wanted} only ({now}): leave it out")


def data_defaults(spec, request) -> dict:
    """The model's defaults for the data set (``Spec.data_defaults``), less what the command
    line sets; said once, so that a user knows what was chosen for them."""
    name = request.data or spec.default_data
    defaults = spec.defaults_for(name)
    sizes = {o.name for o in spec.options()}
    unless = defaults.pop("_unless", ())  # given any of these, the model's sizes are the user's
    if any(request.value(n) is not None for n in unless):
        defaults = {k: v for k, v in defaults.items() if k not in sizes}
    chosen = {}
    for key, value in defaults.items():
        given = request.value(key)
        if given is None or (key == "binarize" and given == "default"):
            chosen[key] = value
    if chosen and not request.quiet:
        words = {k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                 for k, v in chosen.items()}  # fmt: skip
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in words.items())
        print(f"zoo: {spec.name} on {name}: the model's defaults for these data: {shown}")
    return chosen


def driver_settings(spec, request, defaults=None) -> dict:
    """The shared flags that apply to the chosen driver, defaults filled in (the model's own
    for the data set first); a flag given for another driver is refused, naming it and the
    drivers it applies to."""
    defaults = defaults or {}
    driver = request.inference
    settings = {}
    table = [
        *SETTINGS,
        ("jit", False, LOOP, ""),
        ("resume", None, LOOP, ""),
        ("resume_lr", None, LOOP, ""),
    ]
    if driver == "em" and request.resume is not None:
        raise FitError(
            "EM fits have no checkpoint to resume (they restart in seconds to minutes);"
            " fit again, with --overwrite to replace the run"
        )
    for name, default, applies, _ in table:
        value = request.value(name)
        if value is not None and driver not in applies:
            raise FitError(
                f"--{name.replace('_', '-')} applies to --inference {'|'.join(applies)},"
                f" and {spec.name} is fitted by --inference {driver} here"
            )
        if driver in applies:
            given = defaults.get(name, _default(default, (driver,)))
            settings[name] = given if value is None else value
    if settings.get("resume_lr") is not None and settings.get("resume") is None:
        raise FitError("--resume-lr continues a run from its checkpoint: pass --resume too")
    if settings.get("resume_lr") is not None:
        settings["lr"] = settings["resume_lr"]  # the rate from here on; config.json records it
    if request.binarize == "dynamic" and driver not in LOOP:
        raise FitError(
            "--binarize dynamic draws new pixels every epoch: --inference svi or reparam"
        )
    return settings


def fit_target(spec, request):
    """The run directory and whether the fit resumes it."""
    resume = request.resume
    if isinstance(resume, str):
        if request.out is not None and runs.run_path(request.out) != runs.run_path(resume):
            raise FitError(
                f"--resume {resume} names the run to continue and --out {request.out}"
                " another folder: give one of them"
            )
    data_name = request.data or spec.default_data
    if data_name is None:
        raise FitError(f"{spec.name} has no default data: pass --data NAME or a file")
    stem = Path(spec.name.split(":")[-1]).name
    out = resume if isinstance(resume, str) else request.out
    return runs.run_path(out or f"runs/{stem}-{Path(data_name).stem}"), resume is not None


class Fit:
    """One ``zoo fit``: its data, model, config, driver and outputs, step by step."""

    def __init__(self, spec, request, settings, out: Path, resume: bool, device, defaults=None):
        self.spec, self.request, self.settings = spec, request, settings
        self.out, self.resume, self.device = out, resume, device
        self.data_name = request.data or spec.default_data
        self.defaults = defaults or {}  # the model's choices for these data (_data_defaults)
        default = self.defaults.get("binarize", spec.default_binarize)
        self.binarize = default if request.binarize == "default" else _none(request.binarize)
        self.held_out = "static" if self.binarize == "dynamic" else self.binarize

    def run(self, rank: int):
        """Fit and write the run (after ``load_data`` and ``build_model``); the metrics (None
        on ranks other than 0)."""
        config = self.config()
        if rank == 0:
            runs.Run(self.out).write_config(config)  # first, so that an interrupted run resumes
        started = time.time()
        done = self._checkpointed_position()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", em.ConvergenceWarning)
            result = self.fit(config)
            # a later stage fitted on what this one made is stale once this one moved on
            moved = done is None or done != (len(result.history), 0)
            self.stage_results = self.fit_stages(config, fresh=moved)
        for warning in caught:  # said once, plainly, and recorded in metrics.json below
            if issubclass(warning.category, em.ConvergenceWarning):
                print(f"zoo: warning: {warning.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        if rank != 0:  # every rank holds the same parameters; rank 0 writes the run directory
            return None
        return self.write(config, result, started)

    def load_data(self) -> None:
        train_binarize = None if self.binarize == "dynamic" else self.binarize
        max_data = self.request.max_data
        self.train = runs.split(self.data_name, "train", train_binarize, max_data)
        if self.binarize == "dynamic":  # intensities in [0, 1], checked before the first epoch
            data.binarize(self.train[0][:64], "dynamic", generator=torch.Generator())
        try:
            self.valid = runs.split(self.data_name, "valid", self.held_out, max_data)
        except ValueError:  # the data set has no validation split
            self.valid = None
        columns = data.columns(self.data_name)
        self.info = registry.DataInfo.of(*self.train, self.data_name, self.binarize, columns)

    def build_model(self) -> None:
        """The model from its options, completed from the data; a model built on fitted runs
        (an option of ``metadata={"run": True}``) gets them restored, by ``build_on``."""
        names = {o.name for o in self.spec.options()}
        given = {
            **{k: v for k, v in self.defaults.items() if k in names},
            **self.request.model_options(self.spec),
        }
        self.options = self.spec.complete(given, self.info)
        _check_applies(self.spec, self.request.model_options(self.spec), self.options)
        self.built_on, fitted = {}, {}
        for option in self.spec.options():
            path = self.options.get(option.name) if option.run else None
            if path:
                fitted[option.name], self.built_on[option.name] = self._restore_input(option, path)
        if fitted:
            x = self.train[0]
            if self.binarize == "dynamic":  # judged on one fixed draw of the training pixels
                x = data.binarize(x, "static", seed=0)
            self.model = self.spec.cls.build_on(self.options, fitted, x)
        else:
            self.model = self.spec.build(self.options)
        if isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device)

    def _restore_input(self, option, path):
        flag = f"--{option.name.replace('_', '-')}"
        if registry.hook(self.spec.cls, "build_on") is None:
            raise FitError(f"{self.spec.name} declares {flag} but offers no build_on")
        run = runs.run_path(path)
        if run.resolve() == self.out.resolve():  # --overwrite would destroy the input first
            raise FitError(
                f"{flag} {run} is this fit's own --out: the run built on must be another"
                " folder than the one being written"
            )
        if not (run / "params.pt").exists():
            raise FitError(f"{flag} {run}: no fitted run there (no params.pt)")
        model, config = runs.restore(run)
        if config["data"] != self.data_name:
            raise FitError(
                f"{flag} needs a run fitted on {self.data_name}; {run} holds a"
                f" {config['model']} fitted on {config['data']}"
            )
        if config.get("binarize") != self.binarize:
            raise FitError(
                f"{flag} {run} was fitted on {config['data']} binarized"
                f" {config.get('binarize')!r}, this fit reads it binarized {self.binarize!r}:"
                f" pass --binarize {config.get('binarize') or 'none'}, or build on a run of the"
                " same binarization"
            )
        return model, runs.digest(run)

    def config(self) -> dict:
        """config.json: the model's full options, the data, the driver settings, the command."""
        saved = self.spec.saved_options(self.model) if self.spec.config else self.options
        options = {**self.settings, "seed": self.request.seed, "device": str(self.device)}
        options.pop("resume", None)
        options.pop("resume_lr", None)
        self.declared = self.driver_options()  # computed once: EM's sparse check reads the data
        options.update(self.declared)
        config = {
            "format": runs.CONFIG_FORMAT,
            "model": self.spec.name,
            "model_config": json.loads(json.dumps(saved, default=list)),
            "data": self.data_name,
            "binarize": self.binarize,
            "held_out_binarize": self.held_out,
            "max_data": self.request.max_data,
            # the shape of one row, so that a later command on a config.json whose data was
            # changed says so instead of failing in the model
            "row_shape": list(self.train[0].shape[1:]),
            "inference": self.request.inference,
            "options": options,
            "built_on": self.built_on,
            "data_defaults": self.defaults,
            # the model's code: a user's file by absolute path and SHA-256, sealed by this
            # user's zoo, so that a later restore imports that file only, unchanged
            "model_source": runs.seal(registry.code_record(self.spec)),
            "command": self.request.command_line(),
        }
        return self._resumed(config) if self.resume else config

    def driver_options(self) -> dict:
        """The driver's options: the spec's, the model's ``driver_options``, then --loss; and
        for EM whether it runs on sparse rows."""
        driver = self.request.inference
        options = dict(self.spec.drivers[driver])
        hook = registry.hook(self.model, "driver_options")
        options.update(hook(driver) if hook else {})
        if driver == "svi" and self.settings.get("loss"):
            options["loss"] = self.settings["loss"]
        if driver == "em":
            arguments = registry.model_arguments(self.model, *self.train, "train")
            options["sparse"] = _sparse(self.settings["sparse"], self.model, arguments)
        return options

    def _resumed(self, config: dict) -> dict:
        saved = runs.read_config(self.out)
        changed_lr = self.settings.get("resume_lr") is not None
        runs.check_resume(saved, config, changed_lr=changed_lr)
        if changed_lr:  # a deliberate new rate, from the last good checkpoint
            position = runs.load_tensors(self.out / "checkpoint.pt", "checkpoint")["position"]
            lr = config["options"]["lr"]
            change = {"lr": lr, "was": saved["options"].get("lr"), "epoch": position["epoch"]}
            config["lr_changes"] = saved.get("lr_changes", []) + [change]
        # the run stays the one its first command started; each resume is listed after it
        config["resumes"] = saved.get("resumes", []) + [config["command"]]
        config["command"] = saved["command"]
        return config

    def arguments(self, split, rows):
        """The model's arguments for a split, on the fit's device."""
        x, y = rows
        x = x.to(self.device)
        arguments = registry.model_arguments(self.model, x, y, split)
        return tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in arguments)

    def fit(self, config):
        driver, options = self.request.inference, dict(config["options"])
        declared = {k: v for k, v in self.declared.items() if k != "sparse"}
        train = self.arguments("train", self.train)
        value = registry.as_data(train)
        if driver == "em":
            value = sparse.SparseRows(value) if options["sparse"] else value
            settings = {k: options[k] for k in ("tol", "max_iter", "n_init", "seed")}
            return drivers.fit(
                "em",
                self.model.model,
                self.model.guide,
                value,
                progress=not self.request.quiet,
                **settings,
                **declared,
            )
        loop_options = self.loop_options(options)
        declared["jit"] = options["jit"]
        if driver == "reparam":
            declared["num_particles"] = options["iwae"]
        model, guide = self.model.model, self.model.guide
        try:
            return drivers.fit(driver, model, guide, value, **declared, **loop_options)
        except FloatingPointError as error:
            raise FitError(f"error: {error}{self._nan_hint()}") from None

    def _checkpointed_position(self):
        """(epoch, step) of the main fit's checkpoint when resuming, else None."""
        if not self.resume or self.request.inference == "em":
            return None
        try:
            position = runs.load_tensors(self.out / "checkpoint.pt", "checkpoint")["position"]
        except runs.RunError:  # the fit's own resume names what is wrong with the file
            return None
        return position["epoch"], position["step"]

    def fit_stages(self, config, fresh: bool = True) -> dict:
        """The model's further stages (``stages()``, a VQ-VAE's prior), each on the data the
        fitted model makes of the training (and validation) split, with the run's epochs,
        batch size, rate and seed and a checkpoint of its own; {name: FitResult}. ``fresh``:
        the stages start over (the first stage took steps in this command, so what they were
        fitted on before is gone), their old checkpoints removed; else they resume."""
        results = {}
        options = config["options"]
        for stage in registry.stages(self.model):
            checkpoint = self.out / f"checkpoint_{stage.name}.pt"
            if fresh and self.resume:
                checkpoint.unlink(missing_ok=True)
            valid = None
            if self.valid is not None:
                valid = registry.stage_data(stage, self.arguments("valid", self.valid))
                valid = registry.as_data(valid)
            loop = dict(
                **_run_settings(options),
                checkpoint=checkpoint,
                resume=self.resume and checkpoint.exists(),
                progress=not self.request.quiet,
                valid_data=valid,
                lr_schedule=_lr_schedule(options, self.settings.get("resume_lr")),
                description=stage.name,
            )
            value = registry.stage_data(stage, self.arguments("train", self.train))
            try:
                results[stage.name] = drivers.fit(
                    stage.driver,
                    stage.model,
                    stage.guide,
                    registry.as_data(value),
                    **stage.options,
                    **loop,
                )
            except FloatingPointError as error:
                raise FitError(f"error in stage {stage.name!r}: {error}") from None
        return results

    def loop_options(self, options: dict) -> dict:
        """The training loop's options: the shared flags, the run's checkpoint, the validation
        split, dynamic binarization, and the model's own ``fit_options`` (a KL warm-up)."""
        valid = None if self.valid is None else self.arguments("valid", self.valid)
        if options["patience"] is not None and valid is None:
            raise FitError(
                f"--patience stops on the validation score, and {self.data_name} has no"
                " validation split: leave --patience out"
            )
        out = dict(
            **_run_settings(options),
            checkpoint=self.out / "checkpoint.pt",
            # a run stopped before its first checkpoint starts from the beginning
            resume=self.resume and (self.out / "checkpoint.pt").exists(),
            progress=not self.request.quiet,
            transform=_dynamic if self.binarize == "dynamic" else None,
            valid_data=None if valid is None else registry.as_data(valid),
            lr_schedule=_lr_schedule(options, self.settings.get("resume_lr")),
            description=f"{self.spec.name} on {self.data_name} ({self.request.inference})",
        )
        score = registry.hook(self.model, "validation_score")
        self.validated = score is not None and valid is not None
        if self.validated:  # early stopping watches the model's own score
            out["validate"] = lambda: score(*valid)
        hook = registry.hook(self.model, "fit_options")
        out.update(hook(options["epochs"]) if hook else {})
        return out

    def _nan_hint(self) -> str:
        if not (self.out / "checkpoint.pt").exists():
            return ""
        lr = self.settings["lr"]
        return (
            f"\nzoo: to continue from the last good checkpoint at a lower rate: zoo fit"
            f" {self.spec.name} --resume {self.out} --resume-lr {lr / 10:g} (and the run's"
            " other flags)"
        )

    def write(self, config, result, started) -> dict:
        """After the fit: the model's ``after_fit``, then params, history, metrics, figures."""
        hook = registry.hook(self.model, "after_fit")
        if hook:
            keys = ("epochs", "batch_size", "lr", "seed")
            hook(self.arguments("train", self.train), {k: config["options"].get(k) for k in keys})
        runs.save_parameters(self.model, self.out / "params.pt")
        files.save_json(self.out / "history.json", result.history)
        for name, stage in getattr(self, "stage_results", {}).items():
            files.save_json(self.out / f"history_{name}.json", stage.history)
        samples = self.settings.get("eval_samples", 100)
        splits = report.device_splits(self.model, config)  # read once for the scores and figures
        metrics = report.metrics(self.model, config, samples, not self.request.quiet, splits)
        # training time summed over the run's resumes (the loop's clock continues across them)
        seconds = result.history[-1].get("time") if result.history else None
        steps = "iterations" if config["inference"] == "em" else "epochs"  # what num_steps counts
        metrics.update(
            fit_seconds=seconds if seconds is not None else time.time() - started,
            **{steps: result.num_steps},
            converged=result.converged,
            stop_reason=result.stop_reason,
            objective=result.objective,
        )
        for name, stage in getattr(self, "stage_results", {}).items():
            metrics.update({
                f"{name}_objective": stage.objective,
                f"{name}_epochs": stage.num_steps,
                f"{name}_fit_seconds": stage.history[-1]["time"] if stage.history else None,
            })  # fmt: skip
        if result.valid_objective is not None:  # the model's validation_score, else the ELBO
            name = "score" if getattr(self, "validated", False) else "objective"
            metrics[f"best_valid_{name}"] = result.valid_objective
        if config["inference"] != "em":
            metrics["latent_usage"] = usage = report.latent_usage(self.model, splits)
            if not report.warn_if_diverged(result.history, metrics):
                report.warn_if_collapsed(usage, self.spec)
        files.save_json(self.out / "metrics.json", metrics)
        report.figures(self.model, config, result.history, self.out, self.info, splits)
        return metrics


def _run_settings(options: dict) -> dict:
    """The training loop's settings from a run's flags, shared by a fit and its stages."""
    keys = {"batch_size": "batch_size", "num_epochs": "epochs", "lr": "lr", "seed": "seed"}
    keys.update(patience="patience", max_steps="max_steps")
    return {name: options[flag] for name, flag in keys.items()}


def _dynamic(batch, generator):
    """Dynamic binarization: a fresh Bernoulli draw of every pixel of the first argument."""
    if isinstance(batch, torch.Tensor):
        return data.binarize(batch, "dynamic", generator=generator)
    return (data.binarize(batch[0], "dynamic", generator=generator), *batch[1:])


def _lr_schedule(options, resume_lr):
    """The factor on the rate per epoch: decaying with --lr-decay; with --resume-lr a constant
    1, so that the new rate replaces the one the checkpoint's optimizer state carries."""
    if options["lr_decay"] != 1:
        return loop.exponential_lr(options["lr_decay"], options["epochs"])
    return (lambda epoch: 1.0) if resume_lr is not None else None


def _sparse(choice: str, model, arguments) -> bool:
    """Whether EM runs on ``SparseRows(x)``: for a model whose products take CSR data
    (``takes_sparse_data``); 'auto' picks it for data that are mostly zeros and large enough
    for it to pay (on MNIST, 13 % ones: 1.6-3x faster iterations, benchmarks/results/em.md)."""
    takes = registry.attribute(model, "takes_sparse_data", False)
    if choice == "no" or (choice == "auto" and not takes):
        return False
    if not takes:
        raise FitError(
            f"--sparse yes: {type(model).__name__} takes dense data only (sparse rows are"
            " for models whose products take CSR data)"
        )
    x = arguments[0] if len(arguments) == 1 else None  # the model's arguments: one tensor
    if not isinstance(x, torch.Tensor):
        return False
    return choice == "yes" or (x.numel() >= 2**22 and (x != 0).float().mean().item() <= 0.3)


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _stop_with_parent()
    return device


def _stop_with_parent() -> None:
    """On Linux, have the kernel send this rank SIGTERM when its launcher dies (a kill -9 of
    torchrun): the loop then saves a checkpoint at the step it finished and exits, instead of
    running on, orphaned, holding the run's lock."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _none(value):
    return None if value in (None, "none") else value


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FitError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise FitError(f"--device {name!r}: zoo runs on cpu or cuda (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FitError("--device cuda asked for, but torch sees no CUDA device")
    return device
