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

Where each responsibility lives: the commands and their dispatch here; each model's flags in
``zoo.flags``; the fit pipeline in ``zoo.fitting`` (``fit_run``); the scores and figures of a run
in ``zoo.report``; the run directory (config.json, params.pt, history.json, metrics.json, PNG
figures; restoring a run) in ``zoo.runs``; what a model offers in ``zoo.registry``; the models in
``zoo.models``; the comparisons in ``zoo.comparisons``; the drivers in ``inference`` (the table
``inference.drivers.DRIVERS``). config.json holds everything needed to rebuild the model, and the
command line; params.pt the model's state dict (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
from pathlib import Path

from inference import drivers  # the driver table: names only until a driver is used
from zoo import _help_cache as help_cache
from zoo import catalog, flags, registry  # light: the models load when one is asked for
from zoo._lazy import Lazy as _Lazy

pyro, torch, tdist = _Lazy("pyro"), _Lazy("torch"), _Lazy("torch.distributed")
em, evaluate, loop = _Lazy("inference.em"), _Lazy("inference.evaluate"), _Lazy("inference.loop")
reparam, svi, sparse = _Lazy("inference.reparam"), _Lazy("inference.svi"), _Lazy("inference.sparse")
compiled, batching = _Lazy("inference.compiled"), _Lazy("inference.batching")
particles = _Lazy("inference.particles")
files = _Lazy("inference.io")  # save_json, save_torch
comparisons, data, plots = _Lazy("zoo.comparisons"), _Lazy("zoo.data"), _Lazy("zoo.plots")
runs, fitting, report = _Lazy("zoo.runs"), _Lazy("zoo.fitting"), _Lazy("zoo.report")

LOOP = drivers.LOOP  # the drivers that run the training loop (inference.loop)


# ------------------------------------------------------------------------------ argument types


# ----------------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    print(help_cache.listing())
    return 0


def cmd_fit(args) -> int:
    """``zoo fit MODEL [flags]``: the flags as a ``fitting.FitRequest``, then ``fit_run``."""
    if help_cache.printed_help("fit", args.model, args.rest, flags.fit_parser):
        return 0
    spec = registry.get(args.model)
    parsed = flags.fit_parser(spec).parse_args(flags.with_run_settings(args.model, args.rest))
    try:
        run, metrics = fitting.fit_run(_request(args.model, parsed, [args.model, *args.rest]))
    except fitting.Interrupted as stop:
        if not tdist.is_initialized() or tdist.get_rank() == 0:
            print(
                f"zoo: interrupted; the run's checkpoint in {stop.run} is saved: continue it"
                f" with zoo fit {shlex.quote(args.model)} --resume {shlex.quote(str(stop.run))}",
                file=sys.stderr,
            )
        return 130
    if metrics is not None:
        report.print_metrics(run, metrics)
    return 0


# the flags that are fields of a FitRequest; every other flag given goes into its ``given``
_REQUEST_FLAGS = ("data", "inference", "out", "binarize", "max_data", "seed", "device",
                  "overwrite", "resume", "quiet")  # fmt: skip


def fit_request(command) -> "fitting.FitRequest":
    """The ``FitRequest`` of a ``zoo fit`` command line (``["fit", MODEL, flags...]``), as the
    command would make it: what the benchmarks hand to ``fitting.fit_run``."""
    if len(command) < 2 or command[0] != "fit":
        raise ValueError(f"not a zoo fit command: {command}")
    model, rest = str(command[1]), [str(a) for a in command[2:]]
    parsed = flags.fit_parser(registry.get(model)).parse_args(flags.with_run_settings(model, rest))
    return _request(model, parsed, [model, *rest])


def _request(model: str, parsed, words) -> "fitting.FitRequest":
    fields = {name: getattr(parsed, name) for name in _REQUEST_FLAGS if hasattr(parsed, name)}
    given = {k: v for k, v in vars(parsed).items() if k not in _REQUEST_FLAGS and v is not None}
    return fitting.FitRequest(model, **fields, given=given, command=list(words))


def cmd_evaluate(args) -> int:
    model, config = runs.restore(args.run, trust=args.trust_model)
    run = runs.run_path(args.run)
    model = model.to(report.run_device(config)) if isinstance(model, torch.nn.Module) else model
    metrics = report.metrics(model, config, args.num_samples, not args.quiet)
    old = run / "metrics.json"
    kept = json.loads(old.read_text()) if old.exists() else {}
    if kept:  # the numbers it replaces stay readable, and what changed is said
        files.save_json(run / "metrics_before_evaluate.json", kept)
    files.save_json(old, {**kept, **metrics})  # kept: what only the fit knew (its objective, time)
    report.print_metrics(run, metrics)
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
            pairs = flags.pairs(args.interpolate)
            summary = applications.interpolations(model, config, run, pairs, args.steps)
        except ValueError as error:
            raise SystemExit(f"zoo sample: {error}") from None
        print(f"wrote {run / 'interpolation.pt'} ({summary['steps']} steps, pairs {pairs})")
        return 0
    hook = registry.hook(model, "sample")
    if hook is None:
        raise SystemExit(f"zoo: {config['model']} offers no sample(num_samples): nothing to draw")
    drawn = hook(args.num_samples)
    x, z = drawn if isinstance(drawn, tuple) else (drawn, None)
    saved = {"x": x.detach().cpu(), **({} if z is None else {"z": z.detach().cpu()})}
    files.save_torch(run / "samples.pt", saved)
    own = registry.hook(model, "sample_figure")
    figure = own(x, z) if own else None
    side = int(round(x.shape[-1] ** 0.5))
    if figure is None and x.dim() == 2 and side * side == x.shape[-1]:
        figure = plots.image_grid(x, title=f"samples from {config['model']}")
    if figure is not None:
        plots.save(figure, run / "samples.png")
    print(f"wrote {run / 'samples.pt'}" + (" and samples.png" if figure is not None else ""))
    return 0


def cmd_use(args) -> int:
    """``zoo score`` / ``complete`` / ``denoise`` RUN: what a fitted model is for
    (``zoo.applications``), written into the run directory."""
    from zoo import applications

    model, config = runs.restore(args.run, trust=args.trust_model)
    run = runs.run_path(args.run)
    model = model.to(report.run_device(config)) if isinstance(model, torch.nn.Module) else model
    if isinstance(model, torch.nn.Module):
        model.eval()
    pyro.set_rng_seed(args.seed)
    if args.hide_labels and registry.hook(model, "arguments") is None:
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
    if help_cache.printed_help("compare", args.model, args.rest, flags.compare_parser):
        return 0
    spec = registry.get(args.model)
    parsed = flags.compare_parser(spec).parse_args(args.rest)
    data_name = parsed.data or comparisons.default_data(spec)
    stem = Path(spec.name.split(":")[-1]).name
    out = runs.run_path(parsed.out or f"runs/compare-{stem}-{Path(data_name).stem}")
    settings = {
        k: getattr(parsed, k) for k in comparisons.SETTINGS if getattr(parsed, k, None) is not None
    }
    with runs.open_report(out, overwrite=parsed.overwrite):
        table = comparisons.compare(
            spec.name,
            data=data_name,
            methods=parsed.inference.split(",") if parsed.inference else None,
            seeds=range(parsed.seeds),
            budget=parsed.budget,
            out=out,
            command="zoo compare " + " ".join(shlex.quote(a) for a in [args.model, *args.rest]),
            progress=not parsed.quiet,
            model_options=fitting.FitRequest(spec.name, given=vars(parsed)).model_options(spec),
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
    _add_run_commands(sub)
    uses = {
        "score": "per-point log p(x) of a split, a histogram, ROC AUC against --outliers",
        "complete": "fill hidden entries (--mask) from the posterior given the seen ones",
        "denoise": "the posterior mean of clean data under a noise model (--flip, --noise-scale)",
    }
    for name, text in uses.items():
        _add_use_command(sub, name, text)
    data_cmd = sub.add_parser("data", help="data sets")
    data_sub = data_cmd.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download and verify a data set into the cache")
    fetch.add_argument("name", choices=catalog.NAMES)
    fetch.set_defaults(func=cmd_data_fetch)
    return parser


def _add_run_commands(sub) -> None:
    """``zoo evaluate RUN`` and ``zoo sample RUN``."""
    ev = sub.add_parser("evaluate", help="recompute a run's metrics")
    ev.add_argument("run")
    ev.add_argument(
        "--num-samples",
        type=flags.positive_int,
        default=5000,
        help="importance samples per data point (models scored by importance sampling)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    flags.add_trust_flag(ev)
    ev.set_defaults(func=_holding(cmd_evaluate))
    sample = sub.add_parser("sample", help="draw samples from a fitted model")
    sample.add_argument("run")
    sample.add_argument("--num-samples", type=flags.positive_int, default=100)
    sample.add_argument("--seed", type=flags.seed, default=0)
    sample.add_argument(
        "--interpolate", nargs="?", const="0,1", metavar="A,B[;C,D]",
        help="instead of samples: decode the straight and the great-circle paths between the"
        " codes of test rows A and B (default 0,1), into interpolation.png / .pt",
    )  # fmt: skip
    sample.add_argument(
        "--steps", type=flags.bounded_int(2, flags.MAX_STEPS), default=9,
        help=f"points per path (2 to {flags.MAX_STEPS})",
    )  # fmt: skip
    flags.add_trust_flag(sample)
    sample.set_defaults(func=_holding(cmd_sample))


def _add_use_command(sub, name: str, text: str) -> None:
    """``zoo score`` / ``complete`` / ``denoise RUN``: what a fitted model is for."""
    use = sub.add_parser(name, help=text, description=text)
    use.add_argument("run")
    use.add_argument(
        "--split", choices=("train", "test"),
        help="the data split (default: test; train for a run fitted on a data file, whose"
        " rows are all training rows)",
    )  # fmt: skip
    use.add_argument(
        "--num-samples", type=flags.positive_int, default=1000 if name == "score" else 500,
        help="importance samples per row (models without an exact posterior)",
    )  # fmt: skip
    use.add_argument("--seed", type=flags.seed, default=0)
    use.add_argument(
        "--hide-labels", action="store_true",
        help="hand the model the split without its labels (a model that takes labels as a"
        " condition otherwise gets them: the posterior given the seen data and the label)",
    )  # fmt: skip
    if name == "score":
        _add_score_flags(use)
    else:
        use.add_argument("--num-rows", type=flags.positive_int, default=1000)
    if name == "complete":
        _add_complete_flags(use)
    if name == "denoise":
        use.add_argument("--flip", type=flags.unit_interval, help="bit-flip rate (binary data)")
        use.add_argument("--noise-scale", type=float, help="std. dev. of added Gaussian noise")
    flags.add_trust_flag(use)
    use.set_defaults(func=_holding(cmd_use))


def _add_score_flags(use) -> None:
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


def _add_complete_flags(use) -> None:
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
    use.add_argument("--num-steps", type=flags.positive_int, default=1000, help="chain steps")
    use.add_argument(
        "--proposal", choices=("guide", "prior"), default="guide",
        help="importance sampling: z from the guide on the filled rows, or from the"
        " model's prior (the weights then the seen entries' likelihood: right where"
        " a condition, not the seen pixels, carries the information)",
    )  # fmt: skip


def _holding(command):
    """``command(args)`` on a fitted run, with the run held (``runs.recording``): one writer at
    a time, and what it writes recorded as the run's."""

    def held(args) -> int:
        with runs.recording(args.run):
            return command(args)

    return held


# ---------------------------------------------------------------------------------- one fit


# ---------------------------------------------------------------------- scores and figures


# ----------------------------------------------------------------------------------- helpers


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


def _refused(err: BaseException) -> bool:
    """Whether ``err`` was raised by a ``raise`` statement (a check of the zoo's, Pyro's or
    torch's on the input: its message is for the user), not by an operation that failed (a
    bug, whose traceback is kept)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and (frames[-1].line or "").lstrip().startswith("raise")


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
    except (runs.RunError, fitting.FitError) as err:
        raise SystemExit(f"zoo: {err}") from None
    except (data.DataError, ValueError, TypeError, FloatingPointError) as err:
        if not _refused(err):  # an operation failed, not a check: a bug keeps its traceback
            raise
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
    finally:  # torch.distributed only where this command loaded it (not for zoo list)
        if "torch.distributed" in sys.modules and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
