"""
The command line's flags, read from what a model and the drivers declare: ``zoo fit MODEL``'s
and ``zoo compare MODEL``'s parsers (the model's options from its config dataclass or its
``__init__``, the drivers' settings from ``zoo.fitting.SETTINGS`` with defaults read from the
drivers' own signatures), the argument types that refuse a bad value by name, and the flags a
``--resume`` carries from the run's own command.
"""

import argparse
import math
import shlex
import typing

from inference.drivers import LOOP
from zoo import registry
from zoo._lazy import Lazy

fitting, runs = Lazy("zoo.fitting"), Lazy("zoo.runs")  # torch: loaded when used
svi, comparisons = Lazy("inference.svi"), Lazy("zoo.comparisons")
compiled = Lazy("inference.compiled")


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:  # numpy's seeds, which pyro.set_rng_seed sets too
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# how the command line reads each of the drivers' settings (zoo.fitting.SETTINGS); str if not
_SETTING_TYPES = {
    **dict.fromkeys(
        ("epochs", "batch_size", "patience", "max_steps", "eval_samples"), positive_int
    ),
    **dict.fromkeys(("iwae", "max_iter", "n_init"), positive_int),
    "lr": positive_float,
    "tol": positive_float,
    "lr_decay": unit_interval,
}


def add_trust_flag(parser) -> None:
    parser.add_argument(
        "--trust-model", action="store_true",
        help="import the model code the run's config.json names even where this zoo did not"
        " record it (a run folder from elsewhere) or the file has changed since the fit",
    )  # fmt: skip


def fit_parser(spec) -> argparse.ArgumentParser:
    """The flags of ``zoo fit`` for one model: the shared ones, then the model's options."""
    lines = [
        f"on {name}: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in chosen.items() if k != "_unless")
        for name, chosen in spec.data_defaults.items()
    ]
    epilog = "the model's defaults per data set (flags you give win): " + "; ".join(lines)
    parser = argparse.ArgumentParser(
        prog=f"zoo fit {spec.name}",
        description=spec.description,
        allow_abbrev=False,
        epilog=epilog if lines else None,
    )
    add_data_flags(parser, spec)
    parser.add_argument(
        "--inference", choices=tuple(spec.drivers), default=next(iter(spec.drivers))
    )
    parser.add_argument("--out", help="run directory (default: runs/MODEL-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    shared = parser.add_argument_group("the drivers (each flag names those it applies to)")
    for name, default, applies, text in fitting.SETTINGS:
        if not set(applies) & set(spec.drivers):
            continue  # a flag for drivers the model does not take: argparse refuses it
        kind = _SETTING_TYPES.get(name, str)
        default = fitting._default(default, applies)
        shown = f"{text} [{'|'.join(applies)}" + (f"; default {default}]" if default else "]")
        shared.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            choices=sorted(svi.LOSSES) if name == "loss" else fitting.CHOICES.get(name),
            help=shown,
        )
    if set(LOOP) & set(spec.drivers):
        _add_loop_flags(shared, "reparam" in spec.drivers)
    _add_model_options(parser, spec)
    return parser


def _add_loop_flags(group, reparameterized: bool) -> None:
    """--jit (for the reparameterized driver), --resume and --resume-lr."""
    if reparameterized:
        group.add_argument(
            "--jit",
            nargs="?",
            const="jit",
            choices=compiled.BACKENDS,
            help="compile the ELBO or IWAE bound (models without data-dependent branches): with"
            " torch.jit, or --jit inductor by TorchInductor, which compiles the whole step with"
            " the default Adam (needs a C++ compiler on CPU) [reparam; svi: inductor, for"
            " Trace_ELBO or TraceMeanField_ELBO]. Shorter epochs: benchmarks/results/vae_speed.md",
        )
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the run in --out (or in RUN) from its checkpoint, with the same settings"
        " [svi|reparam]",
    )
    group.add_argument(
        "--resume-lr",
        type=positive_float,
        metavar="LR",
        help="with --resume: continue at rate LR from the last good checkpoint (after a NaN"
        " stop, say); config.json records the change",
    )


def add_data_flags(parser, spec) -> None:
    parser.add_argument("--data", help="a data set (zoo list) or a .csv / .npy file of rows")
    parser.add_argument(
        "--binarize",
        default="default",
        choices=("default", "none", "static", "dynamic", "threshold"),
        help=f"of the pixels (default for this model: {spec.default_binarize or 'none'};"
        " dynamic draws new pixels every epoch and scores on one fixed draw)",
    )
    parser.add_argument("--max-data", type=positive_int, help="the first N training rows")


def compare_parser(spec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"zoo compare {spec.name}", description=spec.description, allow_abbrev=False
    )
    methods = comparisons.method_names(spec)
    parser.add_argument("--data", help="data set (default: the model's first for comparisons)")
    parser.add_argument("--inference", help=f"comma-separated, of {','.join(methods)}")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per method")
    parser.add_argument("--budget", type=positive_float, help="seconds of fitting per fit")
    parser.add_argument("--out", help="report directory (default: runs/compare-MODEL-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    knobs = parser.add_argument_group("settings (defaults in zoo.comparisons.Setup)")
    for name, kind, text in comparisons.SETTING_FLAGS:  # each a positive number
        kind = {int: positive_int, float: positive_float}.get(kind, kind)
        knobs.add_argument(f"--{name.replace('_', '-')}", type=kind, help=text)
    _add_model_options(parser, spec)
    return parser


def _add_model_options(parser, spec) -> None:
    """A flag for each of the model's options, less those the data set."""
    group = parser.add_argument_group(f"{spec.name} options")
    for option in spec.options():
        if option.data is None:
            _add_option(group, option)


def _add_option(group, option) -> None:
    kind, nargs = _flag_type(option.type)
    flags = [f"--{option.name.replace('_', '-')}", *option.flags]
    default = f" (default {option.default})" if option.default is not None else ""
    text = (option.help or "") + default
    if kind is bool:
        group.add_argument(
            *flags, dest=option.name, action=argparse.BooleanOptionalAction, help=text or None
        )
        return
    extra = {"choices": option.choices} if option.choices else {}
    group.add_argument(*flags, dest=option.name, type=kind, nargs=nargs, help=text or None, **extra)


def _flag_type(annotation):
    """(element type, nargs) of an option's annotation: int, float, str, bool, Optional[T],
    Tuple[T, ...]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[T]
        return _flag_type(next(a for a in args if a is not type(None)))
    if origin in (tuple, list):
        return (args[0] if args else str), "+"
    if annotation in (int, float, str, bool, registry.number_or_text):
        return annotation, None
    return str, None


def with_run_settings(model: str, rest: list) -> list:
    """With ``--resume DIR``, the flags the run was fitted with (its command's, then each
    earlier resume's) before those given now, which win: a resume continues with the run's
    own settings unless told otherwise (and ``check_resume`` refuses what would change its
    trajectory). The run's folder, --overwrite and an earlier --resume-lr are not carried."""
    run = _flag_value(rest, "--resume")
    if run is None:
        return rest
    try:
        saved = runs.read_config(run)
    except runs.RunError:  # the fit says what is wrong with the folder
        return rest
    if saved.get("model") != model:  # check_resume names the model the run holds
        return rest
    carried = []
    for command in [saved.get("command", ""), *saved.get("resumes", [])]:
        words = shlex.split(command)[3:]  # zoo fit MODEL ...
        carried += _without(words, ("--resume", "--out", "--resume-lr"), ("--overwrite",))
    return carried + list(rest)


def _flag_value(words, flag: str):
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def _without(words, valued, switches) -> list:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in valued:
            skip = True
        elif word in switches or word.split("=", 1)[0] in valued:
            continue
        else:
            out.append(word)
    return out


MAX_STEPS = 200  # interpolation points per path: a grid of that many columns draws in seconds
MAX_PAIRS = 20  # and pairs (two rows of the grid each)


def pairs(text: str):
    """``0,1`` or ``0,1;5,9``: pairs of row numbers."""
    pairs = []
    for part in text.split(";"):
        items = part.split(",")
        digits = all(i.strip().isascii() and i.strip().isdecimal() for i in items)
        if len(items) != 2 or not digits:
            raise ValueError(
                "--interpolate takes pairs of row numbers like 0,1 or 0,1;5,9 (each 0 or more),"
                f" not {text!r}"
            )
        pairs.append((int(items[0]), int(items[1])))
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"--interpolate: at most {MAX_PAIRS} pairs, not {len(pairs)}")
    return pairs
