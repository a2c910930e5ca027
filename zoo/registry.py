"""
The model surface, and the registry the CLI, the comparisons and the run directories read. It
knows no model: zoo models register themselves (``@register`` in their own file), third-party
packages through the ``zoo.models`` entry-point group, and a user's class is named by path::

    from zoo import registry
    spec = registry.get("vae")                       # a zoo model
    spec = registry.get("my_model.py:MyModel")      # a user's file (or "package.module:MyModel")
    model = spec.build({"z_dim": 8}, registry.DataInfo.of(x, y))

What a model declares (``Spec``): its name, a description, the drivers that fit it with their
default options, its default data and binarization, the defaults it chooses per data set
(``data_defaults={"digits": {"z_dim": 8, "lr": 3e-3, "binarize": "threshold"}}``: its options,
the training loop's flags and the binarization, used wherever the user sets none; a model sized
for MNIST collapses on the 8x8 digits; ``"_unless": ("layers",)`` drops its option defaults
when the user gives one of those), and its options: the fields of its config
dataclass (a zoo model: ``cls(Config(**options))``), or the typed parameters of ``__init__``
(a user's class: ``cls(**options)``). A field's ``metadata`` may hold ``help``, ``flags``
(other spellings), ``choices`` and ``data``: the name of a ``DataInfo`` attribute that sets the
field (``"dim"``: the data's width; ``"num_classes"``), which is then not a flag.

What a model may offer beyond ``model`` and ``guide`` is declared once, with its signature and
meaning, by ``ModelHooks`` below; the CLI, the fit pipeline, the reports and the comparisons
read a hook through ``hook(model, name)`` (a callable or None) or ``attribute(model, name,
default)``, which refuse a name ``ModelHooks`` does not declare. One meaning per name across
models.

A model that offers none of the optional ones is fitted, scored by the shared metrics
(``inference.evaluate``) and drawn by the shared figures; what needs an offer it lacks is refused
with a message naming it. Comparisons: ``comparison=`` of ``register`` (see ``zoo.comparisons``).
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import traceback
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from inference.drivers import LOOP
from inference.drivers import NAMES as DRIVERS  # the driver table's names (inference.drivers)

ENTRY_POINTS = "zoo.models"


@typing.runtime_checkable
class ZooModel(Protocol):
    """What every model offers; the optional surface is listed in the module docstring."""

    def model(self, *args, **kwargs): ...

    def guide(self, *args, **kwargs): ...


class ModelHooks:
    """Every optional hook a model may offer, with its signature and meaning; a model offers
    none, some or all of them (plain methods and attributes of its class: no base class)."""

    takes_sparse_data: bool = False  # EM may hand it ``SparseRows`` (CSR chunks) of its data
    objective_label: Optional[str] = None  # what the drivers maximize, where not the ELBO
    validation_label: Optional[str] = None  # the scale of validation_score, where its own
    # the options that size its latent code and networks (and a KL warm-up): what the
    # posterior-collapse warning names as remedies
    capacity_options: Tuple[str, ...] = ()

    def sample(self, num_samples: int, **condition):
        """New data: an (N, D) tensor (mixtures return (x, z))."""

    def arguments(self, x, y, split: str) -> tuple:
        """The model's arguments for a split (default ``(x,)``): (x, labels with most hidden)
        for the training split of a semi-supervised model."""

    @classmethod
    def from_data(cls, options: dict, info: "DataInfo") -> dict:
        """Options completed from the data (sizes, a likelihood for binary data); ValueError
        when the data do not suit the model."""

    @classmethod
    def build_on(cls, options: dict, fitted: dict, x):
        """The model built on fitted runs, for options declared ``metadata={"run": True}``:
        ``fitted`` maps each to its restored model; ``x``: the training rows."""

    def fit_options(self, num_epochs: int) -> dict:
        """Extra options for the training loop (a KL warm-up schedule)."""

    def driver_options(self, driver: str) -> dict:
        """The driver's options where they depend on the config."""

    def validation_score(self, *arguments) -> float:
        """What early stopping watches instead of the validation ELBO (higher is better)."""

    def after_fit(self, arguments: tuple, settings: dict) -> None:
        """Work after the driver has finished (a baseline network trained for the same epochs;
        ``settings``: epochs, batch_size, lr, seed)."""

    def metrics(self, splits: dict, num_samples: int, progress: bool) -> dict:
        """Scores, a dict of numbers; ``splits`` maps "train" and "test" to ``(x, y)``. They
        join the shared scores, which are left out where it reports a ``*_log_likelihood`` or
        ``*_elbo`` of its own."""

    def log_likelihood(self, x):
        """The exact log p(x) per row."""

    def elbo(self, x, num_samples: int):
        """Its own ELBO per row (the comparisons' held-out score where there is no exact one)."""

    def stages(self) -> tuple:
        """Further programs fitted after its own, each a ``Stage`` on data the fitted model
        makes (a VQ-VAE's PixelCNN prior on the codes of the training images)."""

    def figures(self, splits: dict, history: list, info: "DataInfo") -> dict:
        """``{file name: matplotlib Figure}``."""

    def sample_figure(self, x, z):
        """How to show its samples (default: an image grid for square images)."""

    def encode(self, x):
        """The guide's parameters of q(z | x) per row."""

    def reconstruct(self, x):
        """x through the guide's mean code and the decoder."""

    def predict(self, x):
        """A cluster or class per row (mixtures: the most probable component)."""

    def classify(self, x):
        """A class per row (a semi-supervised model's classifier)."""

    def bayesian(self, x) -> dict:
        """The Bayesian version of the model for NUTS: {"model", "to_params", ...}."""


HOOKS = frozenset(n for n in vars(ModelHooks) if not n.startswith("_"))


def hook(model, name: str) -> Optional[Callable]:
    """The model's hook ``name`` (a ``ModelHooks`` method) where it offers one, else None."""
    if name not in HOOKS:
        raise KeyError(f"{name!r} is not a hook ModelHooks declares")
    value = getattr(model, name, None)
    return value if callable(value) else None


def attribute(model, name: str, default=None):
    """The model's attribute ``name`` (a ``ModelHooks`` attribute), else ``default``."""
    if name not in HOOKS:
        raise KeyError(f"{name!r} is not an attribute ModelHooks declares")
    return getattr(model, name, default)


@dataclass(frozen=True)
class DataInfo:
    """What a model may read of its data to complete its options."""

    name: str
    dim: int
    binary: bool
    binarize: Optional[str] = None
    num_classes: Optional[int] = None
    columns: Optional[Tuple[str, ...]] = None  # names of the features, where the data has them

    @property
    def likelihood(self) -> str:
        """The observation model the data call for: "bernoulli" for binary, else "gaussian"."""
        return "bernoulli" if self.binary else "gaussian"

    @classmethod
    def of(cls, x, y=None, name="", binarize=None, columns=None) -> "DataInfo":
        binary = bool(((x == 0) | (x == 1)).all()) if x.numel() else False
        classes = int(y.max()) + 1 if y is not None and y.numel() else None
        dim = int(x[0].numel())
        return cls(name, dim, binary or binarize is not None, binarize, classes, columns)


@dataclass(frozen=True)
class Option:
    """One option of a model: a command-line flag and a field of its config."""

    name: str
    type: Any
    default: Any
    help: str = ""
    flags: Tuple[str, ...] = ()
    data: Optional[str] = None  # a DataInfo attribute that sets it (not a flag)
    choices: Optional[Tuple[Any, ...]] = None
    run: bool = False  # the value is a fitted run's directory, handed to ``build_on``
    # the other options' values this one applies with ({"likelihood": "grey"}): the flag given
    # with others is refused rather than ignored
    applies_with: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class Spec:
    """A model's declaration: what the CLI, the comparisons and the run directories read."""

    name: str
    cls: type
    description: str
    drivers: Dict[str, Dict[str, Any]]
    default_data: Optional[str] = None
    default_binarize: Optional[str] = None
    config: Optional[type] = None  # the config dataclass (None: options are __init__'s)
    source: str = "zoo"
    comparison: Dict[str, Any] = field(default_factory=dict)
    data_defaults: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def defaults_for(self, data_name: Optional[str]) -> Dict[str, Any]:
        """What the model chooses for this data set where the user chooses nothing."""
        return dict(self.data_defaults.get(data_name, {}))

    def options(self) -> Tuple[Option, ...]:
        """The model's options; a config field with ``metadata={"internal": True}`` (set by
        the model itself, such as a stacked model's parts) is not one."""
        if self.config is not None:
            fields = dataclasses.fields(self.config)
            hints = _type_hints(self.config)  # postponed annotations ("int") resolved
            return tuple(
                _option(f, hints.get(f.name, f.type))
                for f in fields
                if f.init and not f.metadata.get("internal")
            )
        return _signature_options(self.cls)

    def complete(self, options: Dict[str, Any], info: DataInfo) -> Dict[str, Any]:
        """``options`` with the unset ones that the data determine filled in, then the model's
        own ``from_data`` applied; ValueError if the data do not suit the model."""
        out = dict(options)
        for option in self.options():
            if option.data is not None and getattr(info, option.data) is not None:
                out[option.name] = getattr(info, option.data)
        from_data = hook(self.cls, "from_data")
        return from_data(out, info) if from_data else out

    def build(self, options: Dict[str, Any]):
        """The model for these (complete) options."""
        known = {f.name for f in dataclasses.fields(self.config)} if self.config else set()
        known |= {o.name for o in self.options()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{self.name} has no option(s) {', '.join(unknown)}; its options are"
                f" {', '.join(sorted(known)) or 'none'}"
            )
        if self.config is not None:
            return self.cls(self.config(**options))
        return self.cls(**options)

    def saved_options(self, model) -> Dict[str, Any]:
        """What config.json records to build the model again."""
        if self.config is not None:
            return dataclasses.asdict(model.config)
        return dict(getattr(model, "_zoo_options", {}))


@dataclass(frozen=True)
class Stage:
    """A program fitted after the model's own (``stages()``): ``model`` and ``guide`` go to
    ``driver`` ("reparam" or "svi", with ``options``) on ``data(arguments)``, where
    ``arguments`` are the model's own arguments for a split (``model_arguments``). ``name``
    labels its files (``checkpoint_NAME.pt``, ``history_NAME.json``) and scores (``NAME_...``)."""

    name: str
    model: Callable
    guide: Callable
    data: Callable[[tuple], Any]
    driver: str = "reparam"
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.driver not in LOOP:
            raise ValueError(f"stage {self.name!r}: driver must be one of {', '.join(LOOP)}")


def stages(model) -> Tuple[Stage, ...]:
    """The model's further stages (``stages()``), none when it offers none."""
    offered = hook(model, "stages")
    out = tuple(offered()) if offered else ()
    for stage in out:
        if not isinstance(stage, Stage):
            raise TypeError(f"stages() must return registry.Stage objects, got {stage!r}")
    return out


def stage_data(stage: Stage, arguments: tuple) -> tuple:
    """A stage's arguments, as a tuple, from the model's own for a split."""
    value = stage.data(arguments)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def model_arguments(model, x, y, split: str) -> tuple:
    """The model's arguments for a split: its own ``arguments(x, y, split)``, else ``(x,)``."""
    own = hook(model, "arguments")
    return tuple(own(x, y, split)) if own else (x,)


def as_data(arguments: tuple):
    """What the drivers take for these arguments: the tensor itself when there is one."""
    return arguments[0] if len(arguments) == 1 else arguments


_REGISTRY: Dict[str, Spec] = {}


def register(
    name: str,
    *,
    description: str,
    drivers: Dict[str, Dict[str, Any]],
    default_data: Optional[str] = None,
    default_binarize: Optional[str] = None,
    config: Optional[type] = None,
    comparison: Optional[Dict[str, Any]] = None,
    data_defaults: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Callable[[type], type]:
    """Class decorator: add a model to the registry under ``name``."""
    bad = sorted(set(drivers) - set(DRIVERS))
    if bad:
        raise ValueError(f"unknown driver(s) {bad}; drivers are {DRIVERS}")

    def add(cls: type) -> type:
        _REGISTRY[name] = Spec(
            name,
            cls,
            description,
            {k: dict(v) for k, v in drivers.items()},
            default_data,
            default_binarize,
            config,
            comparison=dict(comparison or {}),
            data_defaults={k: dict(v) for k, v in (data_defaults or {}).items()},
        )
        return cls

    return add


def names() -> Tuple[str, ...]:
    """The registered models: the zoo's, then those of installed packages' entry points."""
    _load_builtin()
    _load_entry_points()
    return tuple(_REGISTRY)


def get(name: str) -> Spec:
    """The spec of a registered model, or of a user's class named ``file.py:Class`` or
    ``package.module:Class``."""
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _user_spec(name)
    raise ValueError(
        f"unknown model {name!r}: choose one of {', '.join(names())}, or name your own class"
        " as path/to/file.py:ClassName or package.module:ClassName"
    )


def installed(name: str) -> bool:
    """Whether ``name`` is a zoo model or an installed entry point's: restoring it imports only
    the zoo's and installed packages' code, never a file or module a run folder names."""
    _load_builtin()
    if name in _REGISTRY:
        return True
    _load_entry_points()
    return name in _REGISTRY


def code_record(spec: Spec) -> dict:
    """What a run records of the code that defines its model: nothing to check for a zoo model
    or an installed entry point's; for a user's file or module, its absolute path and the
    SHA-256 of its bytes, so that a later restore imports that file only, and only unchanged."""
    if installed(spec.name):
        return {"kind": "installed", "name": spec.name}
    where = spec.name.rpartition(":")[0]
    module = sys.modules.get(spec.cls.__module__)
    path = Path(getattr(module, "__file__", "") or "").resolve()
    kind = "file" if where.endswith(".py") else "module"
    return {
        "kind": kind,
        "name": spec.name,
        "module": None if kind == "file" else where,
        "class": spec.name.rpartition(":")[2],
        "path": str(path),
        "sha256": file_sha256(path),
    }


def file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# the zoo's models: every module of zoo/models/ but the shared helpers (a name starting with
# "_") and nets.py; a new model is one new file there
_HELPERS = {"nets"}


def _load_builtin() -> None:
    import pkgutil

    from zoo import models

    for module in pkgutil.iter_modules(models.__path__):
        if not module.name.startswith("_") and module.name not in _HELPERS:
            importlib.import_module(f"zoo.models.{module.name}")


_loaded_entry_points = []


def _load_entry_points() -> None:
    if _loaded_entry_points:
        return
    _loaded_entry_points.append(True)
    for point in metadata.entry_points(group=ENTRY_POINTS):
        cls = point.load()
        if point.name not in _REGISTRY:
            _REGISTRY[point.name] = _spec_of(cls, point.name, f"entry point {point.value}")


def _user_spec(name: str) -> Spec:
    where, _, attr = name.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.exists():
            raise ValueError(f"model file {path} does not exist")
        module_name = f"_zoo_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        with _importing(name, f"the model file {path}"):
            spec.loader.exec_module(module)
    else:
        try:
            with _importing(name, f"the module {where}"):
                module = importlib.import_module(where)
        except ImportError as error:
            raise ValueError(f"cannot import {where!r} for model {name!r}: {error}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"{where} has no {attr!r} (model {name!r})")
    for spec in _REGISTRY.values():  # a file of a zoo model, or one that registered itself
        if spec.cls is cls:
            return spec
    return _spec_of(cls, name, f"file {where}" if where.endswith(".py") else f"module {where}")


class UserCodeError(ValueError):
    """A user's model file or module failed while it was imported."""


@contextlib.contextmanager
def _importing(name: str, what: str):
    """Turn an exception (or a ``sys.exit``) raised by a user's code at import into a
    ``UserCodeError`` that names the file and the line, not the zoo's traceback."""
    try:
        yield
    except ImportError:
        raise
    except SystemExit as error:
        raise UserCodeError(
            f"{what} called sys.exit({error.code!r}) while it was imported for model {name!r}:"
            " a model file must define its class without running a program at import (put"
            " that under if __name__ == '__main__':)"
        ) from None
    except Exception as error:
        ours = str(Path(__file__).parent)
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith((ours, "<frozen"))
        ]
        where = f" (line {frames[-1].lineno} of {frames[-1].filename})" if frames else ""
        if isinstance(error, SyntaxError):
            where = f" (line {error.lineno} of {error.filename})"
        raise UserCodeError(
            f"{what} raised {type(error).__name__} while it was imported for model"
            f" {name!r}{where}: {error}"
        ) from None


def _spec_of(cls, name: str, source: str) -> Spec:
    """A spec for a class that did not register itself: what it declares as class attributes
    (``drivers``, ``default_data``, ``default_binarize``, ``description``, ``Config``), else
    SVI with Trace_ELBO and its __init__'s typed parameters as options."""
    if not isinstance(cls, type) or not all(
        callable(getattr(cls, a, None)) for a in ("model", "guide")
    ):
        raise ValueError(f"{name}: a model is a class with model and guide methods")
    drivers = getattr(cls, "drivers", None) or {"svi": {"loss": "Trace_ELBO"}}
    if not isinstance(drivers, dict) or not all(isinstance(v, dict) for v in drivers.values()):
        raise ValueError(
            f"{name}: drivers must map driver names to their options, e.g. {{'svi': {{'loss':"
            f" 'Trace_ELBO'}}}}, not {drivers!r}"
        )
    bad = sorted(set(drivers) - set(DRIVERS))
    if bad:
        raise ValueError(
            f"{name} declares drivers={{{', '.join(map(repr, bad))}: ...}}, which the zoo does not"
            f" have: the drivers are {', '.join(DRIVERS)}"
        )
    doc = (inspect.getdoc(cls) or "").split("\n")[0]
    return Spec(
        name,
        cls,
        getattr(cls, "description", None) or doc or f"{cls.__name__} ({source})",
        {k: dict(v) for k, v in drivers.items()},
        getattr(cls, "default_data", None),
        getattr(cls, "default_binarize", None),
        getattr(cls, "Config", None),
        source=source,
        data_defaults=dict(getattr(cls, "data_defaults", None) or {}),
    )


def _type_hints(obj) -> dict:
    """``typing.get_type_hints``: annotations as types, also in a file that starts with
    ``from __future__ import annotations`` (where they are strings); {} where one cannot be
    resolved (the option then reads its text as a number or text)."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # a name the module does not define: the raw annotations stay
        return {}


def _option(f: dataclasses.Field, kind=None) -> Option:
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    meta = f.metadata or {}
    return Option(
        f.name,
        f.type if kind is None else kind,
        default,
        meta.get("help", ""),
        tuple(meta.get("flags", ())),
        meta.get("data"),
        meta.get("choices"),
        bool(meta.get("run", False)),
        meta.get("applies_with"),
    )


_DATA_NAMES = {"x_dim": "dim", "dim": "dim", "num_classes": "num_classes"}


def number_or_text(text: str):
    """The value of an option with neither a type nor a default: an int or a float where the
    text is one (as a user writing --init-scale 0.5 means), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _signature_options(cls) -> Tuple[Option, ...]:
    """The options of a user's class: its __init__'s parameters with a default or a type;
    ``x_dim``/``dim`` and ``num_classes`` are filled from the data when not given."""
    hints = _type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        kind = hints.get(p.name, type(default) if default is not None else number_or_text)
        out.append(Option(p.name, kind, default, "", (), _DATA_NAMES.get(p.name)))
    return tuple(out)
