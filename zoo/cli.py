"""
The ``zoo`` command. It names no model: every model of the registry (``zoo.registry``: the
zoo's, an installed package's, or a user's ``file.py:Class``) is fitted, scored, sampled and
compared from what it declares. Its flags are the model's options (its config dataclass, or its
``__init__``'s typed parameters) plus the shared ones below; a flag that does not apply to the
model or the driver is refused, naming it.

    zoo list
    zoo fit path/to/my_model.py:MyModel --data faithful --my-option 3
    zoo fit gmm --data faithful --out runs/gmm-faithful
    zoo fit bmm --data mnist --components 100 --out runs/bmm-mnist
    zoo fit vae --epochs 50 --z-dim 20 --inference reparam --iwae 5
    zoo fit ssvae --labels 100 --epochs 50
    zoo fit ssvae --labels 100 --stack-on runs/vae-mnist     # M1+M2: M2 over a VAE's latents
    zoo fit hvae --layers 2 --epochs 100 --warmup 20
    zoo fit vae --help                                        # the model's own flags
    zoo compare gmm --data faithful --inference em,svi,nuts,sklearn --seeds 3
    zoo evaluate runs/bmm-mnist
    zoo sample runs/bmm-mnist --num-samples 100
    zoo score runs/bmm-mnist --outliers noise,upside-down
    zoo complete runs/vae-mnist --mask bottom-half
    zoo denoise runs/vae-mnist --flip 0.1
    zoo data fetch mnist

Where each responsibility lives: the flags and the order of a fit here; the run directory
(config.json, params.pt, history.json, metrics.json, PNG figures; restoring a run) in
``zoo.runs``; what a model offers in ``zoo.registry``; the comparisons in ``zoo.comparisons``;
the drivers in ``inference``. config.json holds everything needed to rebuild the model, and the
command line; params.pt the model's state dict (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import shlex
import sys
import time
import typing
import warnings
from pathlib import Path

from inference import drivers  # the driver table: names only until a driver is used
from zoo import catalog, registry  # light: the models load when one is asked for


class _Lazy:
    """A module imported on its first use, so that ``zoo --help`` and argument errors answer
    before torch, Pyro and matplotlib load (seconds on a busy machine)."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        if self._module is None:
            import matplotlib

            matplotlib.use("Agg")  # the CLI only writes files; set before pyplot is imported
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


pyro, torch, tdist = _Lazy("pyro"), _Lazy("torch"), _Lazy("torch.distributed")
em, evaluate, loop = _Lazy("inference.em"), _Lazy("inference.evaluate"), _Lazy("inference.loop")
reparam, svi, sparse = _Lazy("inference.reparam"), _Lazy("inference.svi"), _Lazy("inference.sparse")
compiled, batching = _Lazy("inference.compiled"), _Lazy("inference.batching")
particles = _Lazy("inference.particles")
files = _Lazy("inference.io")  # save_json, save_torch
comparisons, data, plots = _Lazy("zoo.comparisons"), _Lazy("zoo.data"), _Lazy("zoo.plots")
runs = _Lazy("zoo.runs")

LOOP = drivers.LOOP  # the drivers that run the training loop (inference.loop)


# ------------------------------------------------------------------------------ argument types


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:  # numpy's seeds, which pyro.set_rng_seed sets too
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


MAX_STEPS = 200  # interpolation points per path: a grid of that many columns draws in seconds
MAX_PAIRS = 20  # and pairs (two rows of the grid each)


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# The shared fit flags: (name, type, default, the drivers it applies to, help). A flag given
# for another driver is refused; the defaults fill in those that apply and were not given.
class _Default:
    """A flag's default read from the drivers' own ``fit`` signatures (``inference.drivers``)
    when it is needed, never a copy: the driver option it stands for."""

    def __init__(self, option: str):
        self.option = option

    def value(self, names):
        return drivers.default(self.option, names)


def _default(default, names):
    return default.value(names) if isinstance(default, _Default) else default


FIT_FLAGS = (
    ("epochs", _positive_int, _Default("num_epochs"), LOOP, "passes over the training rows"),
    ("batch_size", _positive_int, _Default("batch_size"), LOOP, "minibatch size"),
    ("lr", _positive_float, _Default("lr"), LOOP, "Adam's learning rate"),
    (
        "lr_decay",
        _unit_interval,
        1.0,
        LOOP,
        "factor the learning rate falls to by the last epoch, geometrically per epoch"
        " (1 = constant; Burda et al.'s schedule ends at 0.1)",
    ),
    ("patience", _positive_int, None, LOOP, "early stopping: epochs without a better validation"),
    ("max_steps", _positive_int, None, LOOP, "stop after N steps (smoke runs)"),
    ("eval_samples", _positive_int, 100, LOOP, "importance samples for the held-out scores"),
    ("loss", str, None, ("svi",), "Pyro's ELBO (default: the model's)"),
    (
        "iwae",
        _positive_int,
        _Default("num_particles"),
        ("reparam",),
        "importance-weighted bound with K particles",
    ),
    (
        "tol",
        _positive_float,
        _Default("tol"),
        ("em",),
        "stop when the mean log-likelihood gains less",
    ),
    ("max_iter", _positive_int, _Default("max_iter"), ("em",), "EM iterations"),
    ("n_init", _positive_int, _Default("n_init"), ("em",), "restarts; the best is kept"),
    ("sparse", str, "auto", ("em",), "EM on sparse rows: auto, yes or no"),
)
_CHOICES = {"sparse": ("auto", "yes", "no")}  # and "loss": svi.LOSSES, read when used


# ----------------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    print("models:")
    for name in registry.names():
        spec = registry.get(name)
        print(
            f"  {name:6s} {spec.description}  [inference: {', '.join(spec.drivers)};"
            f" default data: {spec.default_data or 'none'}]"
        )
    print("  (and your own: zoo fit path/to/file.py:Class or package.module:Class)")
    print("  (each model's flags: zoo fit MODEL --help)")
    print("data sets:")
    for name in data.NAMES:
        print(f"  {name}")
    return 0


def cmd_fit(args) -> int:
    """``zoo fit MODEL [flags]``: fit, then write the run directory."""
    spec = registry.get(args.model)
    argv = [args.model, *args.rest]
    flags = _fit_parser(spec).parse_args(_with_run_settings(args.model, args.rest))
    defaults = _data_defaults(spec, flags)
    settings = _settings(spec, flags, defaults)
    out, resume = _fit_target(spec, flags)
    pyro.set_rng_seed(flags.seed)
    pyro.clear_param_store()
    device = _device(flags.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        if flags.inference != "reparam":
            raise SystemExit(
                "zoo: under torchrun only --inference reparam averages gradients across ranks"
            )
        device = _init_distributed(device)
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    fit = _Fit(spec, flags, settings, out, resume, device, argv, defaults)
    fit.load_data()  # bad data or options are refused before the run directory is touched
    fit.build_model()
    claim = runs.open_for_writing(out, overwrite=flags.overwrite, resume=resume)
    try:
        with claim if rank == 0 else contextlib.nullcontext():  # rank 0 writes the run folder
            metrics = fit.run(rank)
    except KeyboardInterrupt:  # the loop saved a checkpoint at the step it had finished
        if rank == 0:
            print(
                f"zoo: interrupted; the run's checkpoint in {out} is saved: continue it with"
                f" zoo fit {shlex.quote(args.model)} --resume {shlex.quote(str(out))}",
                file=sys.stderr,
            )
        return 130
    if metrics is not None:
        _print_metrics(out, metrics)
    return 0


def cmd_evaluate(args) -> int:
    model, config = runs.restore(args.run, trust=args.trust_model)
    run = runs.run_path(args.run)
    model = model.to(_run_device(config)) if isinstance(model, torch.nn.Module) else model
    metrics = _metrics(model, config, args.num_samples, not args.quiet)
    old = run / "metrics.json"
    kept = json.loads(old.read_text()) if old.exists() else {}
    if kept:  # the numbers it replaces stay readable, and what changed is said
        files.save_json(run / "metrics_before_evaluate.json", kept)
    files.save_json(old, {**kept, **metrics})  # kept: what only the fit knew (its objective, time)
    _print_metrics(run, metrics)
    changed = [
        f"  {k}: {kept[k]:.6g} -> {v:.6g}"
        for k, v in metrics.items()
        if isinstance(v, float) and isinstance(kept.get(k), float) and kept[k] != v
    ]
    if changed:
        print(
            f"zoo evaluate: new Monte Carlo draws ({args.num_samples} importance samples per"
            " point where estimated) changed, from the previous metrics.json (kept in"
            " metrics_before_evaluate.json):\n" + "\n".join(changed)
        )
    return 0


def cmd_sample(args) -> int:
    model, config = runs.restore(args.run, trust=args.trust_model)
    run = runs.run_path(args.run)
    pyro.set_rng_seed(args.seed)
    if args.interpolate is not None:
        from zoo import applications

        if isinstance(model, torch.nn.Module):
            model.eval()
        try:
            pairs = _pairs(args.interpolate)
            summary = applications.interpolations(model, config, run, pairs, args.steps)
        except ValueError as error:
            raise SystemExit(f"zoo sample: {error}") from None
        print(f"wrote {run / 'interpolation.pt'} ({summary['steps']} steps, pairs {pairs})")
        return 0
    hook = getattr(model, "sample", None)
    if not callable(hook):
        raise SystemExit(f"zoo: {config['model']} offers no sample(num_samples): nothing to draw")
    drawn = hook(args.num_samples)
    x, z = drawn if isinstance(drawn, tuple) else (drawn, None)
    saved = {"x": x.detach().cpu(), **({} if z is None else {"z": z.detach().cpu()})}
    files.save_torch(run / "samples.pt", saved)
    figure = getattr(model, "sample_figure", lambda x, z: None)(x, z)
    side = int(round(x.shape[-1] ** 0.5))
    if figure is None and x.dim() == 2 and side * side == x.shape[-1]:
        figure = plots.image_grid(x, title=f"samples from {config['model']}")
    if figure is not None:
        plots.save(figure, run / "samples.png")
    print(f"wrote {run / 'samples.pt'}" + (" and samples.png" if figure is not None else ""))
    return 0


def _pairs(text: str):
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


def cmd_use(args) -> int:
    """``zoo score`` / ``complete`` / ``denoise`` RUN: what a fitted model is for
    (``zoo.applications``), written into the run directory."""
    from zoo import applications

    model, config = runs.restore(args.run, trust=args.trust_model)
    run = runs.run_path(args.run)
    model = model.to(_run_device(config)) if isinstance(model, torch.nn.Module) else model
    if isinstance(model, torch.nn.Module):
        model.eval()
    pyro.set_rng_seed(args.seed)
    if args.hide_labels and not callable(getattr(model, "arguments", None)):
        raise SystemExit(
            f"zoo {args.command}: --hide-labels: {config['model']} takes no labels (its only"
            " argument is the data), so there are none to hide; leave the flag out"
        )
    shared = dict(split=args.split, num_samples=args.num_samples, seed=args.seed)
    shared["labels"] = not args.hide_labels
    try:
        if args.command == "score":
            outliers = [o for o in (args.outliers or "").split(",") if o]
            summary = applications.score(
                model, config, run, outliers=outliers, corrected=args.complexity,
                data=args.data, **shared,
            )  # fmt: skip
        elif args.command == "complete":
            summary = applications.complete(
                model, config, run, args.mask, num_rows=args.num_rows, method=args.method,
                num_steps=args.num_steps, proposal=args.proposal, **shared,
            )  # fmt: skip
        else:
            if (args.flip is None) == (args.noise_scale is None):
                raise ValueError("give one noise model: --flip RATE or --noise-scale S")
            summary = applications.denoise(
                model, config, run, flip=args.flip, noise_scale=args.noise_scale,
                num_rows=args.num_rows, **shared,
            )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise SystemExit(f"zoo {args.command}: {error}") from None
    for key, value in summary.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"  {key}: {shown}")
    print(f"wrote into {run}")
    return 0


def cmd_compare(args) -> int:
    """``zoo compare MODEL [flags]``: the model's comparison methods (or its drivers), every
    seed, on one split; a table, a plot and the rows."""
    spec = registry.get(args.model)
    flags = _compare_parser(spec).parse_args(args.rest)
    data_name = flags.data or comparisons.default_data(spec)
    stem = Path(spec.name.split(":")[-1]).name
    out = runs.run_path(flags.out or f"runs/compare-{stem}-{Path(data_name).stem}")
    settings = {
        k: getattr(flags, k) for k in comparisons.SETTINGS if getattr(flags, k, None) is not None
    }
    with runs.open_report(out, overwrite=flags.overwrite):
        table = comparisons.compare(
            spec.name,
            data=data_name,
            methods=flags.inference.split(",") if flags.inference else None,
            seeds=range(flags.seeds),
            budget=flags.budget,
            out=out,
            command="zoo compare " + " ".join(shlex.quote(a) for a in [args.model, *args.rest]),
            progress=not flags.quiet,
            model_options=_given_options(spec, flags),
            **settings,
        )
    print(table.read_text().split("\nNotes:")[0].split("\n###")[0].rstrip())
    print(f"\nreport: {out} (table.md, table.csv, log_likelihood_vs_time.png, rows.json)")
    return 0


def cmd_data_fetch(args) -> int:
    path = data.fetch(args.name)
    print(f"{args.name}: {path}")
    return 0


# ----------------------------------------------------------------------------------- parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list models and data sets").set_defaults(func=cmd_list)
    for name, func, text in (
        ("fit", cmd_fit, "fit a model and write a run directory"),
        ("compare", cmd_compare, "fit one model by several methods and seeds; a table and plot"),
    ):
        command = sub.add_parser(name, help=text, add_help=False)
        command.add_argument("model", help="a model of zoo list, or path/to/file.py:Class")
        command.add_argument("rest", nargs=argparse.REMAINDER, help="its flags (MODEL --help)")
        command.set_defaults(func=func)
    ev = sub.add_parser("evaluate", help="recompute a run's metrics")
    ev.add_argument("run")
    ev.add_argument(
        "--num-samples",
        type=_positive_int,
        default=5000,
        help="importance samples per data point (models scored by importance sampling)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trust_flag(ev)
    ev.set_defaults(func=_holding(cmd_evaluate))
    sample = sub.add_parser("sample", help="draw samples from a fitted model")
    sample.add_argument("run")
    sample.add_argument("--num-samples", type=_positive_int, default=100)
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument(
        "--interpolate", nargs="?", const="0,1", metavar="A,B[;C,D]",
        help="instead of samples: decode the straight and the great-circle paths between the"
        " codes of test rows A and B (default 0,1), into interpolation.png / .pt",
    )  # fmt: skip
    sample.add_argument(
        "--steps", type=_bounded_int(2, MAX_STEPS), default=9,
        help=f"points per path (2 to {MAX_STEPS})",
    )  # fmt: skip
    _add_trust_flag(sample)
    sample.set_defaults(func=_holding(cmd_sample))
    uses = {
        "score": "per-point log p(x) of a split, a histogram, ROC AUC against --outliers",
        "complete": "fill hidden entries (--mask) from the posterior given the seen ones",
        "denoise": "the posterior mean of clean data under a noise model (--flip, --noise-scale)",
    }
    for name, text in uses.items():
        use = sub.add_parser(name, help=text, description=text)
        use.add_argument("run")
        use.add_argument(
            "--split", choices=("train", "test"),
            help="the data split (default: test; train for a run fitted on a data file, whose"
            " rows are all training rows)",
        )  # fmt: skip
        use.add_argument(
            "--num-samples", type=_positive_int, default=1000 if name == "score" else 500,
            help="importance samples per row (models without an exact posterior)",
        )  # fmt: skip
        use.add_argument("--seed", type=_seed, default=0)
        use.add_argument(
            "--hide-labels", action="store_true",
            help="hand the model the split without its labels (a model that takes labels as a"
            " condition otherwise gets them: the posterior given the seen data and the label)",
        )  # fmt: skip
        if name == "score":
            use.add_argument(
                "--outliers",
                help="comma-separated: noise, upside-down, or .npy / .csv files of rows",
            )
            use.add_argument(
                "--data", help="score another data set's --split, or a .csv / .npy file of rows,"
                " instead of the run's own",
            )  # fmt: skip
            use.add_argument(
                "--complexity", action="store_true",
                help="also the complexity-corrected score -log p(x) - compressed length (Serra"
                " et al. 2020), which discounts how simple an input is",
            )  # fmt: skip
        else:
            use.add_argument("--num-rows", type=_positive_int, default=1000)
        if name == "complete":
            use.add_argument(
                "--mask", required=True,
                help="random:P (each entry hidden with probability P), bottom-half,"
                " right-half, quadrants:G (the first G quadrants seen), or a .pt / .npy file"
                " of a boolean (N, D) or (D,) array, True where seen",
            )  # fmt: skip
            use.add_argument(
                "--method", choices=("importance", "chain"), default="importance",
                help="importance sampling with the guide (exact for mixtures), or the"
                " Metropolis-within-Gibbs chain (exact in the limit)",
            )  # fmt: skip
            use.add_argument("--num-steps", type=_positive_int, default=1000, help="chain steps")
            use.add_argument(
                "--proposal", choices=("guide", "prior"), default="guide",
                help="importance sampling: z from the guide on the filled rows, or from the"
                " model's prior (the weights then the seen entries' likelihood: right where"
                " a condition, not the seen pixels, carries the information)",
            )  # fmt: skip
        if name == "denoise":
            use.add_argument("--flip", type=_unit_interval, help="bit-flip rate (binary data)")
            use.add_argument("--noise-scale", type=float, help="std. dev. of added Gaussian noise")
        _add_trust_flag(use)
        use.set_defaults(func=_holding(cmd_use))
    data_cmd = sub.add_parser("data", help="data sets")
    data_sub = data_cmd.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download and verify a data set into the cache")
    fetch.add_argument("name", choices=catalog.NAMES)
    fetch.set_defaults(func=cmd_data_fetch)
    return parser


def _holding(command):
    """``command(args)`` on a fitted run, with the run held (``runs.recording``): one writer at
    a time, and what it writes recorded as the run's."""

    def held(args) -> int:
        with runs.recording(args.run):
            return command(args)

    return held


def _add_trust_flag(parser) -> None:
    parser.add_argument(
        "--trust-model", action="store_true",
        help="import the model code the run's config.json names even where this zoo did not"
        " record it (a run folder from elsewhere) or the file has changed since the fit",
    )  # fmt: skip


def _fit_parser(spec) -> argparse.ArgumentParser:
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
    _add_data_flags(parser, spec)
    parser.add_argument(
        "--inference", choices=tuple(spec.drivers), default=next(iter(spec.drivers))
    )
    parser.add_argument("--out", help="run directory (default: runs/MODEL-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    shared = parser.add_argument_group("the drivers (each flag names those it applies to)")
    for name, kind, default, applies, text in FIT_FLAGS:
        if not set(applies) & set(spec.drivers):
            continue  # a flag for drivers the model does not take: argparse refuses it
        default = _default(default, applies)
        shown = f"{text} [{'|'.join(applies)}" + (f"; default {default}]" if default else "]")
        shared.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            choices=sorted(svi.LOSSES) if name == "loss" else _CHOICES.get(name),
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
        type=_positive_float,
        metavar="LR",
        help="with --resume: continue at rate LR from the last good checkpoint (after a NaN"
        " stop, say); config.json records the change",
    )


def _add_data_flags(parser, spec) -> None:
    parser.add_argument("--data", help="a data set (zoo list) or a .csv / .npy file of rows")
    parser.add_argument(
        "--binarize",
        default="default",
        choices=("default", "none", "static", "dynamic", "threshold"),
        help=f"of the pixels (default for this model: {spec.default_binarize or 'none'};"
        " dynamic draws new pixels every epoch and scores on one fixed draw)",
    )
    parser.add_argument("--max-data", type=_positive_int, help="the first N training rows")


def _compare_parser(spec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"zoo compare {spec.name}", description=spec.description, allow_abbrev=False
    )
    methods = comparisons.method_names(spec)
    parser.add_argument("--data", help="data set (default: the model's first for comparisons)")
    parser.add_argument("--inference", help=f"comma-separated, of {','.join(methods)}")
    parser.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 per method")
    parser.add_argument("--budget", type=_positive_float, help="seconds of fitting per fit")
    parser.add_argument("--out", help="report directory (default: runs/compare-MODEL-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    knobs = parser.add_argument_group("settings (defaults in zoo.comparisons.Setup)")
    for name, kind, text in comparisons.SETTING_FLAGS:  # each a positive number
        kind = {int: _positive_int, float: _positive_float}.get(kind, kind)
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


def _check_applies(spec, given: dict, options: dict) -> None:
    """Refuse a flag given where it does nothing (an option's ``applies_with``)."""
    for option in spec.options():
        needs = option.applies_with or {}
        if option.name not in given or all(options.get(k) == v for k, v in needs.items()):
            continue
        flag = f"--{option.name.replace('_', '-')}"
        wanted = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in needs.items())
        now = ", ".join(f"{k} is {options.get(k)!r}" for k in needs)
        raise SystemExit(f"zoo: {flag} applies with {wanted} only ({now}): leave it out")


def _given_options(spec, args) -> dict:
    """The model options given on the command line (tuples for lists)."""
    given = {o.name: getattr(args, o.name) for o in spec.options() if o.data is None}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def _data_defaults(spec, flags) -> dict:
    """The model's defaults for the data set (``Spec.data_defaults``), less what the command
    line sets; said once, so that a user knows what was chosen for them."""
    name = flags.data or spec.default_data
    defaults = spec.defaults_for(name)
    sizes = {o.name for o in spec.options()}
    unless = defaults.pop("_unless", ())  # given any of these, the model's sizes are the user's
    if any(getattr(flags, n, None) is not None for n in unless):
        defaults = {k: v for k, v in defaults.items() if k not in sizes}
    chosen = {}
    for key, value in defaults.items():
        given = getattr(flags, key, None)
        if given is None or (key == "binarize" and given == "default"):
            chosen[key] = value
    if chosen and not flags.quiet:
        words = {k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                 for k, v in chosen.items()}  # fmt: skip
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in words.items())
        print(f"zoo: {spec.name} on {name}: the model's defaults for these data: {shown}")
    return chosen


def _settings(spec, flags, defaults=None) -> dict:
    """The shared flags that apply to the chosen driver, defaults filled in (the model's own
    for the data set first); a flag given for another driver is refused, naming it and the
    drivers it applies to."""
    defaults = defaults or {}
    driver = flags.inference
    settings = {}
    table = [
        *FIT_FLAGS,
        ("jit", str, False, ("reparam", "svi"), ""),
        ("resume", str, None, LOOP, ""),
    ]
    table.append(("resume_lr", float, None, LOOP, ""))
    if driver == "em" and getattr(flags, "resume", None) is not None:
        raise SystemExit(
            "zoo: EM fits have no checkpoint to resume (they restart in seconds to minutes);"
            " fit again, with --overwrite to replace the run"
        )
    for name, _, default, applies, _ in table:
        value = getattr(flags, name, None)
        if value is not None and driver not in applies:
            raise SystemExit(
                f"zoo: --{name.replace('_', '-')} applies to --inference {'|'.join(applies)},"
                f" and {spec.name} is fitted by --inference {driver} here"
            )
        if driver in applies:
            given = defaults.get(name, _default(default, (driver,)))
            settings[name] = given if value is None else value
    if settings.get("resume_lr") is not None and settings.get("resume") is None:
        raise SystemExit("zoo: --resume-lr continues a run from its checkpoint: pass --resume too")
    if settings.get("resume_lr") is not None:
        settings["lr"] = settings["resume_lr"]  # the rate from here on; config.json records it
    if flags.binarize == "dynamic" and driver not in LOOP:
        raise SystemExit(
            "zoo: --binarize dynamic draws new pixels every epoch: --inference svi or reparam"
        )
    return settings


def _with_run_settings(model: str, rest: list) -> list:
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


def _fit_target(spec, flags):
    """The run directory and whether the fit resumes it."""
    resume = getattr(flags, "resume", None)
    if isinstance(resume, str):
        if flags.out is not None and runs.run_path(flags.out) != runs.run_path(resume):
            raise SystemExit(
                f"zoo: --resume {resume} names the run to continue and --out {flags.out}"
                " another folder: give one of them"
            )
        flags.out = resume
    data_name = flags.data or spec.default_data
    if data_name is None:
        raise SystemExit(f"zoo: {spec.name} has no default data: pass --data NAME or a file")
    stem = Path(spec.name.split(":")[-1]).name
    return runs.run_path(flags.out or f"runs/{stem}-{Path(data_name).stem}"), resume is not None


# ---------------------------------------------------------------------------------- one fit


class _Fit:
    """One ``zoo fit``: its data, model, config, driver and outputs, step by step."""

    def __init__(self, spec, flags, settings, out: Path, resume: bool, device, argv, defaults=None):
        self.spec, self.flags, self.settings = spec, flags, settings
        self.out, self.resume, self.device, self.argv = out, resume, device, argv
        self.data_name = flags.data or spec.default_data
        self.defaults = defaults or {}  # the model's choices for these data (_data_defaults)
        default = self.defaults.get("binarize", spec.default_binarize)
        self.binarize = default if flags.binarize == "default" else _none(flags.binarize)
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
        max_data = self.flags.max_data
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
            **_given_options(self.spec, self.flags),
        }
        self.options = self.spec.complete(given, self.info)
        _check_applies(self.spec, _given_options(self.spec, self.flags), self.options)
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
        if not callable(getattr(self.spec.cls, "build_on", None)):
            raise SystemExit(f"zoo: {self.spec.name} declares {flag} but offers no build_on")
        run = runs.run_path(path)
        if run.resolve() == self.out.resolve():  # --overwrite would destroy the input first
            raise SystemExit(
                f"zoo: {flag} {run} is this fit's own --out: the run built on must be another"
                " folder than the one being written"
            )
        if not (run / "params.pt").exists():
            raise SystemExit(f"zoo: {flag} {run}: no fitted run there (no params.pt)")
        model, config = runs.restore(run)
        if config["data"] != self.data_name:
            raise SystemExit(
                f"zoo: {flag} needs a run fitted on {self.data_name}; {run} holds a"
                f" {config['model']} fitted on {config['data']}"
            )
        if config.get("binarize") != self.binarize:
            raise SystemExit(
                f"zoo: {flag} {run} was fitted on {config['data']} binarized"
                f" {config.get('binarize')!r}, this fit reads it binarized {self.binarize!r}:"
                f" pass --binarize {config.get('binarize') or 'none'}, or build on a run of the"
                " same binarization"
            )
        return model, runs.digest(run)

    def config(self) -> dict:
        """config.json: the model's full options, the data, the driver settings, the command."""
        saved = self.spec.saved_options(self.model) if self.spec.config else self.options
        options = {**self.settings, "seed": self.flags.seed, "device": str(self.device)}
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
            "max_data": self.flags.max_data,
            # the shape of one row, so that a later command on a config.json whose data was
            # changed says so instead of failing in the model
            "row_shape": list(self.train[0].shape[1:]),
            "inference": self.flags.inference,
            "options": options,
            "built_on": self.built_on,
            "data_defaults": self.defaults,
            # the model's code: a user's file by absolute path and SHA-256, sealed by this
            # user's zoo, so that a later restore imports that file only, unchanged
            "model_source": runs.seal(registry.code_record(self.spec)),
            "command": "zoo fit " + " ".join(shlex.quote(a) for a in self.argv),
        }
        return self._resumed(config) if self.resume else config

    def driver_options(self) -> dict:
        """The driver's options: the spec's, the model's ``driver_options``, then --loss; and
        for EM whether it runs on sparse rows."""
        driver = self.flags.inference
        options = dict(self.spec.drivers[driver])
        hook = getattr(self.model, "driver_options", None)
        options.update(hook(driver) if callable(hook) else {})
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
        driver, options = self.flags.inference, dict(config["options"])
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
                progress=not self.flags.quiet,
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
            raise SystemExit(f"zoo: error: {error}{self._nan_hint()}") from None

    def _checkpointed_position(self):
        """(epoch, step) of the main fit's checkpoint when resuming, else None."""
        if not self.resume or self.flags.inference == "em":
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
                progress=not self.flags.quiet,
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
                raise SystemExit(f"zoo: error in stage {stage.name!r}: {error}") from None
        return results

    def loop_options(self, options: dict) -> dict:
        """The training loop's options: the shared flags, the run's checkpoint, the validation
        split, dynamic binarization, and the model's own ``fit_options`` (a KL warm-up)."""
        valid = None if self.valid is None else self.arguments("valid", self.valid)
        if options["patience"] is not None and valid is None:
            raise SystemExit(
                f"zoo: --patience stops on the validation score, and {self.data_name} has no"
                " validation split: leave --patience out"
            )
        out = dict(
            **_run_settings(options),
            checkpoint=self.out / "checkpoint.pt",
            # a run stopped before its first checkpoint starts from the beginning
            resume=self.resume and (self.out / "checkpoint.pt").exists(),
            progress=not self.flags.quiet,
            transform=_dynamic if self.binarize == "dynamic" else None,
            valid_data=None if valid is None else registry.as_data(valid),
            lr_schedule=_lr_schedule(options, self.settings.get("resume_lr")),
            description=f"{self.spec.name} on {self.data_name} ({self.flags.inference})",
        )
        score = getattr(self.model, "validation_score", None)
        self.validated = callable(score) and valid is not None
        if self.validated:  # early stopping watches the model's own score
            out["validate"] = lambda: score(*valid)
        hook = getattr(self.model, "fit_options", None)
        out.update(hook(options["epochs"]) if callable(hook) else {})
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
        hook = getattr(self.model, "after_fit", None)
        if callable(hook):
            keys = ("epochs", "batch_size", "lr", "seed")
            hook(self.arguments("train", self.train), {k: config["options"].get(k) for k in keys})
        runs.save_parameters(self.model, self.out / "params.pt")
        files.save_json(self.out / "history.json", result.history)
        for name, stage in getattr(self, "stage_results", {}).items():
            files.save_json(self.out / f"history_{name}.json", stage.history)
        samples = self.settings.get("eval_samples", 100)
        splits = _device_splits(self.model, config)  # read once for the scores and figures
        metrics = _metrics(self.model, config, samples, not self.flags.quiet, splits)
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
            metrics["latent_usage"] = usage = _latent_usage(self.model, splits)
            _warn_if_diverged(result.history, metrics) or _warn_if_collapsed(usage, self.spec)
        files.save_json(self.out / "metrics.json", metrics)
        _figures(self.model, config, result.history, self.out, self.info, splits)
        return metrics


def _warn_if_diverged(history, metrics) -> bool:
    """Say so when the held-out score ends a hundred times worse than the first training step
    (the loop warns on the epochs' training objectives; a step after the last of them can
    still run the parameters away), and record it in metrics.json."""
    key = next((k for k in HELD_OUT_SCORES if metrics.get(k) is not None), None)
    if key is None or any(r.get("diverging") for r in history):
        return False
    if not loop.diverged(history, metrics[key]):
        return False
    metrics["diverged"] = True
    first = -history[0].get("first_loss", history[0]["loss"])
    print(
        f"zoo: warning: the fit diverged: {key} is {metrics[key]:.4g} per data point, against"
        f" {first:.4g} at the first training step; refit with a lower --lr (and --overwrite)",
        file=sys.stderr,
    )
    return True


HELD_OUT_SCORES = ("test_elbo", "test_log_likelihood", "train_elbo", "train_log_likelihood")
COLLAPSED_KL = 0.1  # nats per data point: a latent site that tells the decoder less is unused
COLLAPSED_SPREAD = 0.05  # reconstructions varying less than this share of the data's: one image


def _latent_usage(model, splits, rows: int = 1000):
    """``evaluate.latent_usage`` on the first ``rows`` held-out rows (the training rows where
    there are none), or why it does not apply (no local latent variables, say)."""
    split = "test" if "test" in splits else "train"
    x, y = splits[split]
    try:  # the labels hidden where the model can go without them (an SSVAE's class is latent)
        arguments = registry.model_arguments(model, x[:rows], None, split)
    except ValueError:  # it conditions on them (a CVAE)
        arguments = registry.model_arguments(model, x[:rows], y[:rows], split)
    try:
        return evaluate.latent_usage(model.model, model.guide, registry.as_data(arguments))
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
        return {"not_available": f"{type(error).__name__}: {error}"}


def _warn_if_collapsed(usage: dict, spec) -> None:
    """A warning, naming the flags that help, when the guide carries almost nothing about the
    data (its KL terms sum to under ``COLLAPSED_KL`` nats per data point: the posterior is the
    prior and the decoder ignores z), when the reconstructions hardly vary across the inputs
    (under ``COLLAPSED_SPREAD`` of the data's variance: one image for every input), or when a
    latent site is unused (no unit of it varies with the data, and its KL is under
    ``COLLAPSED_KL``)."""
    sites = {n: v for n, v in usage.get("sites", {}).items() if v["kl"] is not None}
    if not sites:
        return
    total = sum(v["kl"] for v in sites.values())
    unused = [n for n, v in sites.items() if v["kl"] < COLLAPSED_KL and v["active"] == 0]
    spread = usage.get("reconstruction_spread")
    flat = spread is not None and spread < COLLAPSED_SPREAD
    if total >= COLLAPSED_KL and not unused and not flat:
        return
    named = unused or [n for n, v in sites.items() if v["active"] == 0] or list(sites)
    shown = ", ".join(
        f"{n} (KL {sites[n]['kl']:.3f} nats, {sites[n]['active']} of {sites[n]['units']} units"
        " active)"
        for n in named
    )
    options = {o.name for o in spec.options()}
    flags = [
        f"--{n.replace('_', '-')}" for n in ("z_dim", "z_dims", "hidden", "warmup") if n in options
    ]
    said = "" if spread is None else f"; reconstructions vary {spread:.0%} as much as the data"
    if total >= COLLAPSED_KL and not unused:  # the codes differ, the decoder ignores them
        what = (
            f"the decoder gives every input nearly the same image (reconstructions vary"
            f" {spread:.0%} as much as the data) whatever its latent site(s) {shown} say"
        )
    else:
        what = f"latent site(s) {shown} carry almost nothing about the data{said}"
    print(
        f"zoo: warning: posterior collapse: {what}. Remedies: more optimizer steps (more"
        " --epochs, a smaller --batch-size), a higher --lr"
        + (f", a smaller network or latent ({', '.join(flags)})" if flags else "")
        + "; see latent_usage in metrics.json",
        file=sys.stderr,
    )


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
    takes = getattr(model, "takes_sparse_data", False)
    if choice == "no" or (choice == "auto" and not takes):
        return False
    if not takes:
        raise SystemExit(
            f"zoo: --sparse yes: {type(model).__name__} takes dense data only (sparse rows are"
            " for models whose products take CSR data)"
        )
    x = arguments[0] if len(arguments) == 1 else None  # the model's arguments: one tensor
    if not isinstance(x, torch.Tensor):
        return False
    return choice == "yes" or (x.numel() >= 2**22 and (x != 0).float().mean().item() <= 0.3)


# ---------------------------------------------------------------------- scores and figures


def _device_splits(model, config) -> dict:
    """The run's data splits (``runs.splits``), on the model's device."""
    device = _model_device(model)
    return {k: (x.to(device), y) for k, (x, y) in runs.splits(config).items()}


def _metrics(model, config, num_samples, progress, splits=None) -> dict:
    """The model's own ``metrics(splits, ...)``, and unless those hold a log-likelihood or an
    ELBO the shared scores of the held-out split (the training rows where there is none): the
    importance-sampled log-likelihood (exact where the latents are enumerable) and, for the
    loop's drivers, the ELBO."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    splits = _device_splits(model, config) if splits is None else splits
    hook = getattr(model, "metrics", None)
    own = dict(hook(splits, num_samples, progress)) if callable(hook) else {}
    if any(key.endswith(("_log_likelihood", "_elbo")) for key in own):
        return own  # the model scored the held-out data itself
    split = "test" if "test" in splits else "train"
    value = registry.as_data(registry.model_arguments(model, *splits[split], split))
    shared = {"units": "nats per data point"}
    try:
        log_px = evaluate.log_likelihood(
            model.model, model.guide, value, num_samples=num_samples, progress=progress
        )
    except particles.GlobalLatents as error:  # a Bayesian model: whole-data scores instead
        shared.update(_global_scores(model, config, value, split, num_samples, error))
    else:
        exact = evaluate.exact_by_enumeration(model.model, value)
        shared[f"{split}_log_likelihood"] = log_px.mean().item()
        shared[f"{split}_log_likelihood_method"] = (
            "exact (the latent variables summed out by enumeration)"
            if exact
            else f"importance sampling, K={num_samples} draws of the guide"
        )
        # over the data points: what a difference between two models is read against
        if len(log_px) > 1:
            error = (log_px.std() / len(log_px) ** 0.5).item()
            shared[f"{split}_log_likelihood_std_error"] = error
        if not exact:
            shared["log_likelihood_samples"] = num_samples
        if config["inference"] != "em":
            shared.update(_elbo(model, config, value, split, exact, log_px))
    shared[f"num_{split}"] = len(splits[split][0])
    if config.get("held_out_binarize"):
        shared[f"{split}_binarization"] = config["held_out_binarize"]
    return {**shared, **own}


def _elbo(model, config, value, split, exact, log_px) -> dict:
    """The held-out ELBO and how it was computed: log p(x) itself where every latent variable
    is summed out by enumeration and the guide samples none; one draw of the guide per data
    point otherwise; for a program that enumerates some latent variables and samples others,
    TraceEnum_ELBO over the split (the mean only)."""
    if exact and not evaluate.samples_latents(model.guide, value):
        return {
            f"{split}_elbo": log_px.mean().item(),
            f"{split}_elbo_method": "exact: every latent variable summed out (TraceEnum_ELBO)",
        }
    try:
        elbo = evaluate.elbo(model.model, model.guide, value).mean().item()
        how = "one draw of the guide per data point"
    except particles.Uncovered as error:
        if not error.enumerated:
            raise
        loss = svi.make_loss("TraceEnum_ELBO")
        elbo = svi.elbo_per_datum(model.model, model.guide, value, loss)
        how = "TraceEnum_ELBO (enumerated sites summed out, the others drawn once)"
    return {f"{split}_elbo": elbo, f"{split}_elbo_method": how}


def _global_scores(model, config, value, split, num_samples, why) -> dict:
    """The scores of a model whose guide has global latent variables (a Bayesian model under
    an AutoGuide): its whole-data ELBO per data point, averaged over ``num_samples`` draws,
    and the posterior of the globals; a per-point log-likelihood is left out, and says why."""
    loss = (config.get("options") or {}).get("loss") or "Trace_ELBO"
    draws = min(num_samples, 100)
    elbo = svi.elbo_per_datum(
        model.model,
        model.guide,
        value,
        svi.make_loss(loss.replace("Jit", ""), num_particles=draws, vectorize_particles=False),
    )
    try:
        plates = batching.data_plates(model.model, None, value, per_point=True, whole=True)
        posterior = evaluate.posterior_summary(model.guide, value, plates=plates)
    except ValueError as error:  # no data plate to tell the globals by
        posterior = {"not_available": f"{type(error).__name__}: {error}"}
    reason = (
        f"left out: the guide's latent site {why.site!r} is global (outside the data plate"
        f" {why.plate!r}), so there are no per-point importance weights; metrics.json holds the"
        " whole-data ELBO and the posterior of the global sites instead. For a per-point"
        " score, declare a metrics() hook on the model class, or fit a guide whose latent"
        " variables are local to a data point"
    )
    print(f"zoo: the {split} log-likelihood per data point is {reason}", file=sys.stderr)
    return {
        f"{split}_elbo": elbo,
        f"{split}_elbo_method": f"{loss} over the whole {split} split, {draws} draws of the guide",
        f"{split}_log_likelihood": None,
        f"{split}_log_likelihood_method": reason,
        "posterior": posterior,
    }


def _figures(model, config, history, out: Path, info=None, splits=None) -> None:
    """The learning curve, and the model's own ``figures`` (``{file name: Figure}``)."""
    if config["inference"] == "em":
        fig = plots.curve(
            history,
            "log_likelihood",
            ylabel="mean log-likelihood (nats)",
            title=f"EM on {config['data']}",
        )
        plots.save(fig, out / "log_likelihood.png")
    else:
        plots.save(_learning_curve(history, config, model), out / "learning_curve.png")
    hook = getattr(model, "figures", None)
    if callable(hook):
        splits = _device_splits(model, config) if splits is None else splits
        with torch.no_grad():
            for name, figure in hook(splits, history, info).items():
                plots.save(figure, out / name)


def _learning_curve(history, config, model=None):
    """Training and validation objective per epoch; a long run gets log epochs and a y range
    fitted to its last nine tenths, so its slow late gains show. The objective is named as the
    model names it (``objective_label``: an SSVAE's includes its classification term), and a
    model's own validation score on a scale of its own (``validation_label``: an accuracy)
    gets its own axis."""
    k = (config.get("options") or {}).get("iwae") or 1
    own = getattr(model, "objective_label", None)
    label = own or ("ELBO" if k == 1 else f"IWAE bound (K={k})")
    fig = plots.curve(
        history,
        "objective",
        xkey="epoch" if history and "epoch" in history[0] else "step",
        ylabel="nats per data point",
        title=f"{config['model']} on {config['data']}: {label}",
    )
    fig.axes[0].title.set_fontsize(10 if len(label) > 30 else 12)
    axis = fig.axes[0]
    if history and "valid_objective" in history[0]:
        epochs = [r["epoch"] for r in history]
        valid = [r["valid_objective"] for r in history]
        named = getattr(model, "validation_label", None)  # a score on a scale of its own
        if named:
            other = axis.twinx()
            other.plot(epochs, valid, color="tab:orange", label=named)
            other.set_ylabel(named)
            axis.legend(["training"], loc="lower left")
            other.legend(loc="lower right")
        else:
            axis.plot(epochs, valid, label="validation")
            axis.legend(["training", "validation"])
    if len(history) >= 50:
        keys = ("objective", "valid_objective")
        late = [r.get(k) for r in history[len(history) // 10 :] for k in keys]
        late = [v for v in late if v is not None and math.isfinite(v)]
        low, high = min(late), max(late)
        axis.set_xscale("log")
        axis.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
        axis.set_title(axis.get_title() + " (log epochs)", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------- helpers


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"zoo: --device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"zoo: --device {name!r}: zoo runs on cpu or cuda (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zoo: --device cuda asked for, but torch sees no CUDA device")
    return device


def _run_device(config) -> torch.device:
    """Where a restored run is scored: the device it was fitted on, while there is one."""
    name = (config.get("options") or {}).get("device", "cpu")
    return torch.device(name if name.startswith("cuda") and torch.cuda.is_available() else "cpu")


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _print_metrics(out: Path, metrics: dict) -> None:
    print(f"run: {out}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")


def _raised_at(err: BaseException) -> str:
    """ " in FILE, line N" of the last frame of the traceback in the program's own code (not
    the zoo's, torch's or Pyro's), where there is one."""
    import traceback

    skip = (str(Path(__file__).parent), str(Path(loop.__file__).parent), "<")
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not f.filename.startswith(skip) and "site-packages" not in f.filename
    ]
    return f" in {frames[-1].filename}, line {frames[-1].lineno}" if frames else ""


def _os_error(err: OSError, command: str = "fit") -> str:
    """An operating system's refusal in a sentence: what, where, and that nothing saved is
    damaged (every file the zoo writes is written whole or not at all)."""
    name = Path(err.filename) if err.filename else None
    if name is not None and name.name.startswith(".") and name.suffix == ".tmp":
        name = name.with_name(name.name[1:].rsplit(".", 2)[0])  # the file it was to become
    where = f" ({name})" if name is not None else ""
    full = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    what = "the disk is full or a file-size limit was reached" if full else err.strerror or err
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and name is not None:
        what = f"{what}: the folder {name.parent} cannot be written (read-only, or not yours)"
    again = (
        "a fit continues from its last checkpoint with --resume once this is fixed"
        if command == "fit"
        else "run the command again once this is fixed"
    )
    return (
        f"{what}{where}. Files are written whole or not at all, so what was saved before is"
        f" intact; {again}"
    )


def _attached(argv: list) -> list:
    """``--interpolate -1,2`` as ``--interpolate=-1,2``, so that a value that starts with a
    minus sign reaches the flag's own check instead of argparse's "unrecognized arguments"."""
    out = []
    for word in argv:
        if out and out[-1] == "--interpolate" and word[:2].startswith("-") and word[1:2].isdigit():
            out[-1] = f"--interpolate={word}"
        else:
            out.append(word)
    return out


def main(argv=None) -> int:
    argv = _attached(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except runs.RunError as err:
        raise SystemExit(f"zoo: {err}") from None
    except (data.DataError, ValueError, TypeError, FloatingPointError) as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch's, from inside a program (a user's model, say)
        print(f"zoo: error: {type(err).__name__}{_raised_at(err)}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into a reader that stopped (head)
        return 1
    except OSError as err:  # a read-only folder, a full disk, a file-size limit
        print(f"zoo: error: {_os_error(err, args.command)}", file=sys.stderr)
        return 1
    finally:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
