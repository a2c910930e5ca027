"""
The ``zoo`` command. Any model of the registry (``zoo.registry``: the zoo's, an installed
package's, or a user's ``file.py:Class``) is fitted, scored, sampled and compared from what it
declares, with flags from its options: the mixtures, users' models and third-party ones take
that path (the functions after "any model, through the registry" below). The four deep models
of the zoo still take the older path through ``MODELS``, whose flags and run settings live
here, until their task options (the CVAE's condition, the SSVAE's labels, ...) move into them.

    zoo list
    zoo fit path/to/my_model.py:MyModel --data faithful --my-option 3
    zoo fit gmm --data faithful --out runs/gmm-faithful
    zoo fit bmm --data mnist --components 100 --out runs/bmm-mnist
    zoo fit ssvae --labels 100 --epochs 50
    zoo fit ssvae --labels 100 --stack-on runs/vae-mnist     # M1+M2: M2 over a VAE's latents
    zoo fit hvae --layers 2 --epochs 100 --warmup 20
    zoo compare gmm --data faithful --inference em,svi,nuts,sklearn --seeds 3
    zoo evaluate runs/bmm-mnist
    zoo sample runs/bmm-mnist --num-samples 100
    zoo data fetch mnist

A run directory holds config.json (everything needed to rebuild the model, and the command line),
params.pt (the model's state dict; load with ``torch.load(..., weights_only=True)``),
history.json, metrics.json and PNG plots.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # the CLI only writes files; set before pyplot is imported

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from inference import em, evaluate, loop, reparam, svi  # noqa: E402
from inference.io import save_json, save_torch  # noqa: E402
from inference.sparse import SparseRows  # noqa: E402
from zoo import comparisons, data, plots, registry, runs  # noqa: E402
from zoo.cvae import CVAE, Baseline, CVAEConfig, one_hot, quadrant_task  # noqa: E402
from zoo.hvae import HVAE, HVAEConfig  # noqa: E402
from zoo.ssvae import SSVAE, SSVAEConfig  # noqa: E402
from zoo.vae import VAE, VAEConfig  # noqa: E402


@dataclass
class Entry:
    description: str
    model_class: type
    config_class: type
    default_data: str
    default_binarize: Optional[str]
    inferences: Tuple[str, ...]
    config_from_args: Callable


def _vae_config(args, dim, binary):
    return VAEConfig(
        x_dim=dim,
        z_dim=args.z_dim,
        hidden=tuple(args.hidden),
        likelihood="bernoulli" if binary else "gaussian",
        beta=args.beta,
    )


def _cvae_config(args, dim, binary):
    if not binary:
        raise SystemExit("zoo: the CVAE has a Bernoulli decoder: binarize the data")
    y_dim = 10 if args.condition == "label" else dim
    return CVAEConfig(x_dim=dim, y_dim=y_dim, z_dim=args.z_dim, hidden=tuple(args.hidden))


def _ssvae_config(args, dim, binary):
    if not binary:
        raise SystemExit("zoo: the SSVAE has a Bernoulli decoder: binarize the data")
    return SSVAEConfig(
        x_dim=dim,
        z_dim=args.z_dim,
        hidden=tuple(args.hidden),
        alpha=args.alpha,
        enumerate=not args.sample_y,
    )


def _hvae_config(args, dim, binary):
    if not binary:
        raise SystemExit("zoo: the ladder VAE has a Bernoulli decoder: binarize the data")
    return HVAEConfig.with_layers(args.layers, x_dim=dim)


MODELS = {
    "cvae": Entry(
        "conditional VAE: a digit label, or the visible quadrants of an image",
        CVAE,
        CVAEConfig,
        "mnist",
        "static",
        ("reparam", "svi"),
        _cvae_config,
    ),
    "vae": Entry(
        "variational autoencoder (beta knob, Bernoulli or Gaussian decoder)",
        VAE,
        VAEConfig,
        "mnist",
        "dynamic",
        ("reparam", "svi"),
        _vae_config,
    ),
    "ssvae": Entry(
        "semi-supervised VAE (Kingma et al. 2014, M2): a classifier from few labels",
        SSVAE,
        SSVAEConfig,
        "mnist",
        "dynamic",
        ("svi",),
        _ssvae_config,
    ),
    "hvae": Entry(
        "hierarchical ladder VAE (Sonderby et al. 2016) with L stochastic layers",
        HVAE,
        HVAEConfig,
        "mnist",
        "dynamic",
        ("reparam", "svi"),
        _hvae_config,
    ),
}


# ----------------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    print("models:")
    for name in registry.names():
        spec = registry.get(name)
        inferences = MODELS[name].inferences if name in MODELS else tuple(spec.drivers)
        print(
            f"  {name:6s} {spec.description}  [inference: {', '.join(inferences)};"
            f" default data: {spec.default_data or 'none'}]"
        )
    print("  (and your own: zoo fit path/to/file.py:Class or package.module:Class)")
    print("data sets:")
    for name in data.NAMES:
        print(f"  {name}")
    return 0


def cmd_fit(args) -> int:
    entry = MODELS[args.model]
    inference = args.inference or entry.inferences[0]
    if inference not in entry.inferences:
        raise SystemExit(
            f"zoo: model {args.model!r} supports --inference "
            f"{'|'.join(entry.inferences)}, not {inference!r}"
        )
    args.inference = inference
    resume = args.resume is not None
    if isinstance(args.resume, str):
        if args.out is not None and runs.run_path(args.out) != runs.run_path(args.resume):
            raise SystemExit(
                f"zoo: --resume {args.resume} names the run to continue and --out {args.out}"
                " another folder: give one of them"
            )
        args.out = args.resume
    if args.resume_lr is not None and not resume:
        raise SystemExit("zoo: --resume-lr continues a run from its checkpoint: pass --resume too")
    out = runs.run_path(args.out or f"runs/{args.model}-{args.data or entry.default_data}")
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = _device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        if args.inference != "reparam":
            raise SystemExit(
                "zoo: under torchrun only --inference reparam averages gradients across ranks"
            )
        device = _init_distributed(device)
    data_name = args.data or entry.default_data
    binarize = entry.default_binarize if args.binarize == "default" else _none(args.binarize)
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    claim = runs.open_for_writing(out, overwrite=args.overwrite, resume=resume)
    with claim if rank == 0 else contextlib.nullcontext():  # rank 0 writes the run directory
        return _fit_deep(args, entry, out, device, data_name, binarize, resume)


def _fit_deep(args, entry, out, device, data_name, binarize, resume) -> int:
    """Fit a deep model with the SVI or reparameterized driver; write the run directory."""
    if args.iwae > 1 and args.inference != "reparam":
        raise SystemExit("zoo: --iwae K needs --inference reparam")
    # dynamic binarization: train on intensities and draw fresh pixels for every batch;
    # validate and test on one fixed (static) draw so that numbers are comparable
    held_out_binarize = "static" if binarize == "dynamic" else binarize
    if binarize == "dynamic" and args.model == "cvae":
        raise SystemExit("zoo: the CVAE trains on a static or threshold binarization")
    if args.jit and args.inference != "reparam":
        raise SystemExit(
            "zoo: --jit compiles the reparameterized driver's bound (--inference reparam); for"
            " SVI choose a Jit loss with --loss"
        )
    if args.model == "ssvae" and args.iwae > 1:
        raise SystemExit("zoo: the SSVAE is fitted by SVI; --iwae does not apply")
    if args.loss is not None and args.inference == "reparam":
        raise SystemExit(
            "zoo: --loss picks Pyro's ELBO for --inference svi; the reparameterized driver has"
            " its own bound (the ELBO, or the IWAE bound with --iwae K)"
        )
    if args.resume_lr is not None:
        args.lr = args.resume_lr  # the rate from here on; config.json records the change
    loss = args.loss or ("TraceEnum_ELBO" if args.model == "ssvae" else "TraceMeanField_ELBO")
    if args.model == "ssvae" and args.sample_y and args.loss is None:
        loss = "Trace_ELBO"  # y is sampled: the score-function estimator of Pyro's tutorial
    train_binarize = None if binarize == "dynamic" else binarize
    x, _ = _load(data_name, "train", train_binarize, 1)
    binary = binarize is not None
    model = entry.model_class(entry.config_from_args(args, x.shape[1], binary))
    stack = None
    if args.stack_on:
        model, stack = _stack(args, model, data_name, binarize)
    model.to(device)
    config = {
        "model": args.model,
        "model_config": dataclasses.asdict(model.config),
        "data": data_name,
        "binarize": binarize,
        "held_out_binarize": held_out_binarize,
        "max_data": args.max_data,
        "inference": args.inference,
        "options": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_decay": args.lr_decay,
            "iwae": args.iwae,
            "jit": args.jit,
            "loss": loss,
            "patience": args.patience,
            "seed": args.seed,
            "device": str(device),
            "condition": args.condition if args.model == "cvae" else None,
            "given": args.given,
            "labels": args.labels if args.model == "ssvae" else None,
            "label_seed": args.label_seed if args.model == "ssvae" else None,
            "stack_on": stack,
            "warmup": _warmup_epochs(args) if args.model == "hvae" else None,
        },
        "command": "zoo " + " ".join(shlex.quote(a) for a in args.argv),
    }
    train = _model_args(config, "train", train_binarize, args.max_data, device)
    try:
        valid = _model_args(config, "valid", held_out_binarize, args.max_data, device)
    except ValueError:  # the data set has no validation split
        valid = None
    if args.patience is not None and valid is None:
        raise SystemExit(
            f"zoo: --patience stops on the validation score, and {data_name} has no validation"
            " split: leave --patience out"
        )
    if resume:
        saved = runs.read_config(out)
        runs.check_resume(saved, config, changed_lr=args.resume_lr is not None)
        if args.resume_lr is not None:  # a deliberate new rate, from the last good checkpoint
            position = runs.load_tensors(out / "checkpoint.pt", "checkpoint")["position"]
            change = {"lr": args.lr, "was": saved["options"].get("lr"), "epoch": position["epoch"]}
            config["lr_changes"] = saved.get("lr_changes", []) + [change]
        # the run stays the one its first command started; each resume is listed after it
        config["resumes"] = saved.get("resumes", []) + [config["command"]]
        config["command"] = saved["command"]
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    if rank == 0:
        runs.Run(out).write_config(config)  # first, so that an interrupted run can resume

    def dynamic(batch, generator):  # a fresh Bernoulli draw of every pixel, every epoch
        if isinstance(batch, torch.Tensor):
            return data.binarize(batch, "dynamic", generator=generator)
        return (data.binarize(batch[0], "dynamic", generator=generator), *batch[1:])

    options = dict(
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        seed=args.seed,
        patience=args.patience,
        checkpoint=out / "checkpoint.pt",
        resume=resume,
        progress=not args.quiet,
        transform=dynamic if binarize == "dynamic" else None,
        valid_data=None if valid is None else (valid[0] if len(valid) == 1 else valid),
        max_steps=args.max_steps,
        lr=args.lr,
        lr_schedule=_lr_schedule(args),
    )
    if isinstance(model, HVAE):
        options["schedule"] = model.warmup(config["options"]["warmup"])
    if isinstance(model, SSVAE) and valid is not None:
        x_valid, y_valid = valid
        options["validate"] = lambda: model.accuracy(x_valid, y_valid)  # early stop on this
    started = time.time()
    data_args = train[0] if len(train) == 1 else train
    try:
        if args.inference == "reparam":
            result = reparam.fit(
                model.model,
                model.guide,
                data_args,
                num_particles=args.iwae,
                jit=args.jit,
                **options,
            )
        else:
            nesting = 1 if isinstance(model, SSVAE) else None  # y is enumerated left of the plate
            result = svi.fit(
                model.model, model.guide, data_args, loss=loss, max_plate_nesting=nesting, **options
            )
    except FloatingPointError as error:
        hint = ""
        if (out / "checkpoint.pt").exists():
            hint = (
                f"\nzoo: to continue from the last good checkpoint at a lower rate: zoo fit"
                f" {args.model} --resume {out} --resume-lr {args.lr / 10:g} (and the run's other"
                " flags)"
            )
        raise SystemExit(f"zoo: error: {error}{hint}") from None
    # training time summed over the run's resumes (the loop's clock continues across them)
    seconds = result.history[-1]["time"] if result.history else time.time() - started
    if rank != 0:  # every rank holds the same parameters; rank 0 writes the run directory
        return 0
    if config["options"]["condition"] == "quadrants":  # the deterministic network to beat
        _fit_baseline(train, args, out, device)
    save_torch(out / "params.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    save_json(out / "history.json", result.history)
    metrics = _deep_metrics(model, config, args.eval_samples, device, out, not args.quiet)
    metrics.update(
        fit_seconds=seconds,
        epochs=result.num_steps,
        stop_reason=result.stop_reason,
        objective=result.objective,
    )
    if isinstance(model, SSVAE) and "validate" in options:  # early stopping watched accuracy
        metrics.update(best_valid_accuracy=result.valid_objective)
    save_json(out / "metrics.json", metrics)
    _deep_plots(model, config, result.history, out, device, metrics)
    _print_metrics(out, metrics)
    return 0


def _lr_schedule(args):
    """The factor on the rate per epoch: decaying with --lr-decay; with --resume-lr a constant 1,
    so that the new rate replaces the one the checkpoint's optimizer state carries."""
    if args.lr_decay != 1:
        return loop.exponential_lr(args.lr_decay, args.epochs)
    return (lambda epoch: 1.0) if args.resume_lr is not None else None


def _stack(args, m2: SSVAE, data_name, binarize):
    """M1+M2: the SSVAE ``m2`` rebuilt over the latent space of the VAE run ``--stack-on``,
    with the units that VAE uses on the training images. Returns the model and what the run
    records of its M1 (path and a digest of its weights, checked on resume)."""
    if args.model != "ssvae":
        raise SystemExit("zoo: --stack-on is for the SSVAE (M1+M2)")
    run = Path(args.stack_on)
    if not (run / "params.pt").exists():
        raise SystemExit(f"zoo: --stack-on {run}: no fitted run there (no params.pt)")
    m1, m1_config = _restore(run)
    if m1_config["model"] != "vae" or m1_config["data"] != data_name:
        raise SystemExit(
            f"zoo: --stack-on needs a VAE fitted on {data_name}; {run} holds a"
            f" {m1_config['model']} fitted on {m1_config['data']}"
        )
    x, _ = _load(data_name, "train", None if binarize == "dynamic" else binarize, args.max_data)
    if binarize == "dynamic":  # the units in use, judged on one draw of the training pixels
        x = data.binarize(x, "static", seed=0)
    kept = ("z_dim", "hidden", "alpha", "enumerate", "num_classes")
    options = {key: getattr(m2.config, key) for key in kept}
    try:
        model = SSVAE.stacked_on(m1, x, **options)
    except ValueError as error:
        raise SystemExit(f"zoo: --stack-on {run}: {error}") from None
    digest = hashlib.sha256((run / "params.pt").read_bytes()).hexdigest()
    return model, {"run": str(run), "params_sha256": digest}


_QUADRANT_SEEDS = {"train": 0, "valid": 1, "test": 2}


def _model_args(config, split, binarize, max_data=None, device="cpu"):
    """The model's positional arguments for a split: (x,), (x, label) or (x, visible, mask)."""
    x, y = _load(config["data"], split, binarize, max_data)
    condition = config["options"].get("condition")
    if config["model"] == "ssvae":
        if y is None:
            raise SystemExit(f"zoo: {config['data']} has no labels for the SSVAE")
        if split == "train":  # a class-balanced labelled subset; every other label is unknown
            y = data.partial_labels(y, config["options"]["labels"], config["options"]["label_seed"])
        out = (x, y)
    elif condition == "label":
        if y is None:
            raise SystemExit(f"zoo: {config['data']} has no labels for --condition label")
        out = (x, one_hot(y, 10))
    elif condition == "quadrants":
        side = int(round(x.shape[1] ** 0.5))
        visible, target, mask = quadrant_task(
            x, config["options"]["given"], seed=_QUADRANT_SEEDS[split], side=side
        )
        out = (target, visible, mask)
    else:
        out = (x,)
    return tuple(t.to(device) for t in out)


def _fit_baseline(train, args, out: Path, device) -> None:
    """Train the quadrant task's deterministic baseline for the same epochs and batch size."""
    target, visible, mask = train
    torch.manual_seed(args.seed)
    baseline = Baseline(target.shape[1], tuple(args.hidden)).to(device)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(target), generator=generator).split(args.batch_size):
            optimizer.zero_grad()
            baseline.loss(target[idx], visible[idx], mask[idx]).mean().backward()
            optimizer.step()
    save_torch(out / "baseline.pt", {k: v.cpu() for k, v in baseline.state_dict().items()})


@torch.no_grad()
def _deep_metrics(
    model, config, num_samples, device, run: Optional[Path] = None, progress: bool = False
) -> dict:
    """Test ELBO and importance-sampled log-likelihood (K = num_samples), nats per data point;
    for the CVAE these are of x given its condition, and in the quadrant task of the hidden
    pixels only, beside the baseline's negative log-likelihood of the same pixels."""
    test = _model_args(config, "test", config["held_out_binarize"], None, device)
    if isinstance(model, SSVAE):
        return _ssvae_metrics(model, test, num_samples, progress)
    data_args = test[0] if len(test) == 1 else test
    model.eval()
    elbo = evaluate.elbo(model.model, model.guide, data_args, num_samples=1)
    log_px = evaluate.log_likelihood(
        model.model, model.guide, data_args, num_samples=num_samples, progress=progress
    )
    metrics = {
        "test_elbo": elbo.mean().item(),
        "test_log_likelihood": log_px.mean().item(),
        "log_likelihood_samples": num_samples,
        "test_binarization": config["held_out_binarize"],
        "num_test": len(test[0]),
        "units": "nats per data point",
    }
    if isinstance(model, HVAE):
        units = model.active_units(test[0][:5000])
        metrics["active_units"] = {f"z{i + 1}": n for i, n in enumerate(units)}
        metrics["latent_units"] = {f"z{i + 1}": n for i, n in enumerate(model.config.z_dims)}
    if config["options"].get("condition") == "quadrants" and run is not None:
        baseline = _restore_baseline(run, test[0].shape[1], config).to(device)
        metrics["test_baseline_nll"] = baseline.loss(*test).mean().item()
        metrics["test_cvae_nll"] = -metrics["test_log_likelihood"]
        metrics["quadrants_given"] = config["options"]["given"]
    return metrics


@torch.no_grad()
def _ssvae_metrics(model, test, num_samples, progress=False) -> dict:
    """Test accuracy of q(y | x) and of the generative classifier argmax_y L(x, y), and the
    bounds on log p(x) with the test labels hidden."""
    x, y = test
    log_px = evaluate.log_likelihood(
        model.model, model.guide, x, num_samples=num_samples, progress=progress
    )
    enumerated, model.config.enumerate = model.config.enumerate, True  # the ELBO exact in y
    try:
        elbo = svi.make_loss("TraceEnum_ELBO", max_plate_nesting=1)
        test_elbo = svi.elbo_per_datum(model.model, model.guide, x, elbo)
    finally:
        model.config.enumerate = enumerated
    # the generative model's own classification, argmax over y of L(x, y), 1000 images at a time
    by_label = torch.cat([model.elbo_by_label(chunk) for chunk in x.split(1000)])
    return {
        "test_accuracy": model.accuracy(x, y),
        "generative_accuracy": (by_label.argmax(-1) == y).float().mean().item(),
        "test_elbo": test_elbo,
        "test_log_likelihood": log_px.mean().item(),
        "log_likelihood_samples": num_samples,
        "num_test": len(x),
        "units": "nats per data point (labels hidden; y and z importance-sampled)",
    }


def _warmup_epochs(args) -> int:
    """KL warm-up length: --warmup, or a fifth of the epochs."""
    return args.warmup if args.warmup is not None else max(1, args.epochs // 5)


def _restore_baseline(run: Path, dim, config):
    baseline = Baseline(dim, tuple(config["model_config"]["hidden"]))
    baseline.load_state_dict(torch.load(run / "baseline.pt", weights_only=True))
    return baseline


def _learning_curve(history, config):
    """Training and validation objective per epoch; a long run gets log epochs and a y range
    fitted to its last nine tenths, so its slow late gains show."""
    k = (config.get("options") or {}).get("iwae") or 1
    fig = plots.curve(
        history,
        "objective",
        xkey="epoch",
        ylabel=("ELBO" if k == 1 else f"IWAE bound (K={k})") + " per data point (nats)",
        title=f"{config['model']} on {config['data']}: training objective",
    )
    axis = fig.axes[0]
    if history and "valid_objective" in history[0]:
        axis.plot(
            [r["epoch"] for r in history],
            [r["valid_objective"] for r in history],
            label="validation",
        )
        axis.legend(["training", "validation"])
    if len(history) >= 50:
        keys = ("objective", "valid_objective")
        late = [r.get(k) for r in history[len(history) // 10 :] for k in keys]
        late = [v for v in late if v is not None and math.isfinite(v)]
        low, high = min(late), max(late)
        axis.set_xscale("log")
        axis.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
        axis.set_title(axis.get_title() + " (log epochs)", fontsize=10)
    return fig


@torch.no_grad()
def _deep_plots(model, config, history, out: Path, device, metrics: dict) -> None:
    fig = _learning_curve(history, config)
    plots.save(fig, out / "learning_curve.png")
    side = int(round(model.config.x_dim**0.5))
    if side * side != model.config.x_dim:
        return  # not square images: no image plots
    if isinstance(model, CVAE):
        _cvae_plots(model, config, out, device)
        return
    if isinstance(model, SSVAE):
        _ssvae_plots(model, config, out, device)
        return
    if isinstance(model, HVAE):
        _hvae_plots(model, out, metrics)
        return
    plots.save(
        plots.image_grid(model.sample(64), num_cols=8, title="samples (decoder means)"),
        out / "samples.png",
    )
    x, y = _load(config["data"], "test", config["held_out_binarize"], None)
    x = x[:10].to(device)
    pairs = torch.cat([x, model.reconstruct(x)])
    plots.save(
        plots.image_grid(pairs, num_cols=10, title="inputs (top), reconstructions"),
        out / "reconstructions.png",
    )
    x, y = _load(config["data"], "test", config["held_out_binarize"], None)
    loc, _ = model.encode(x[:2000].to(device))
    plots.save(
        plots.latent_space(loc.cpu(), None if y is None else y[:2000]), out / "latent_space.png"
    )


@torch.no_grad()
def _cvae_plots(model, config, out: Path, device) -> None:
    test = _model_args(config, "test", config["held_out_binarize"], None, device)
    if config["options"]["condition"] == "label":
        labels = torch.arange(10, device=device).repeat_interleave(8)
        images = model.generate(one_hot(labels, 10))
        plots.save(
            plots.image_grid(images, num_cols=8, title="one row per digit"), out / "digits.png"
        )
        x, y = test[0][:8], test[1][:8]
        moved = model.style_transfer(x, y, torch.eye(10, device=device))  # (8, 10, X)
        grid = torch.cat([x.unsqueeze(1), moved], 1).reshape(-1, x.shape[1])
        title = "style transfer: each input, then its z decoded with every digit"
        plots.save(plots.image_grid(grid, num_cols=11, title=title), out / "style_transfer.png")
        return
    target, visible, mask = (t[:8] for t in test)
    shown = torch.where(mask.bool(), torch.full_like(target, 0.5), target)  # hidden: grey
    completions = [torch.where(mask.bool(), model.generate(visible), target) for _ in range(3)]
    baseline = _restore_baseline(out, target.shape[1], config).to(device)
    predicted = torch.where(mask.bool(), torch.sigmoid(baseline(visible)), target)
    rows = torch.cat([shown, target, predicted, *completions])
    title = "rows: given, truth, baseline, three CVAE completions"
    plots.save(plots.image_grid(rows, num_cols=8, title=title), out / "completions.png")


@torch.no_grad()
def _ssvae_plots(model, config, out: Path, device) -> None:
    labels = torch.arange(10, device=device).repeat_interleave(8)
    images = model.generate(labels)
    title = "samples per label: one row per digit, z from the prior"
    plots.save(plots.image_grid(images, num_cols=8, title=title), out / "digits.png")
    x, _ = _load(config["data"], "test", config["held_out_binarize"], None)
    x = x[:8].to(device)
    grid = torch.cat([x.unsqueeze(1), model.analogies(x)], 1).reshape(-1, x.shape[1])
    title = "analogies: each test image, then its style z decoded as every digit"
    plots.save(plots.image_grid(grid, num_cols=11, title=title), out / "analogies.png")


@torch.no_grad()
def _hvae_plots(model, out: Path, metrics: dict) -> None:
    """Samples layer by layer, and the active units ``_deep_metrics`` counted on test data."""
    layers = model.num_layers
    rows = [model.sample(10, random_layers=k) for k in range(1, layers + 1)]
    title = "row k: the top k layers drawn at random, the layers below at their means"
    plots.save(
        plots.image_grid(torch.cat(rows), num_cols=10, title=title), out / "layer_samples.png"
    )
    units = [metrics["active_units"][f"z{i + 1}"] for i in range(layers)]
    plots.save(plots.active_units(units, model.config.z_dims), out / "active_units.png")


def cmd_compare(args) -> int:
    out = Path(
        args.out or f"runs/compare-{args.model}-{args.data or comparisons.DATA[args.model][0]}"
    )
    if (out / "table.md").exists() and not args.overwrite:
        raise SystemExit(
            f"zoo: {out} already holds a comparison; pass --overwrite or another --out"
        )
    methods = [m.strip() for m in args.inference.split(",")] if args.inference else None
    options = {
        name: getattr(args, name)
        for name in comparisons.SETTINGS
        if getattr(args, name, None) is not None
    }
    table = comparisons.compare(
        args.model,
        data=args.data,
        methods=methods,
        seeds=range(args.seeds),
        budget=args.budget,
        out=out,
        command="zoo " + " ".join(shlex.quote(a) for a in args.argv),
        progress=not args.quiet,
        **options,
    )
    print(table.read_text().split("\nNotes:")[0].split("\n###")[0].rstrip())
    print(f"\nreport: {out} (table.md, table.csv, log_likelihood_vs_time.png, rows.json)")
    return 0


def cmd_evaluate(args) -> int:
    model, config = _restore(Path(args.run))
    if config["model"] not in MODELS:
        metrics = _any_metrics(model, config, args.num_samples, not args.quiet)
        old = Path(args.run) / "metrics.json"
        kept = json.loads(old.read_text()) if old.exists() else {}
        save_json(old, {**kept, **metrics})  # kept: what only the fit knew (its objective)
        _print_metrics(Path(args.run), metrics)
        return 0
    device = torch.device(config["options"]["device"] if torch.cuda.is_available() else "cpu")
    metrics = _deep_metrics(
        model.to(device), config, args.num_samples, device, Path(args.run), not args.quiet
    )
    old = Path(args.run) / "metrics.json"
    if old.exists():
        metrics = {**json.loads(old.read_text()), **metrics}
    save_json(old, metrics)
    _print_metrics(Path(args.run), metrics)
    return 0


def cmd_sample(args) -> int:
    run = Path(args.run)
    model, config = _restore(run)
    pyro.set_rng_seed(args.seed)
    if config["model"] not in MODELS:
        _sample_any(model, config, run, args.num_samples)
        return 0
    if isinstance(model, (CVAE, SSVAE)):
        plot = _cvae_plots if isinstance(model, CVAE) else _ssvae_plots
        plot(model, config, run, torch.device("cpu"))
        print(f"wrote the {config['model'].upper()}'s figures in {run}")
        return 0
    x = model.sample(args.num_samples)
    save_torch(run / "samples.pt", {"x": x.cpu()})
    plots.save(plots.image_grid(x, title=f"samples from {config['model']}"), run / "samples.png")
    print(f"wrote {run / 'samples.png'} and {run / 'samples.pt'}")
    return 0


def cmd_data_fetch(args) -> int:
    path = data.fetch(args.name)
    print(f"{args.name}: {path}")
    return 0


# ----------------------------------------------------------------------------------- helpers


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


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


def _load(name, split, binarize, max_data):
    x, y = data.load(name, split, binarize)
    if max_data:
        x, y = x[:max_data], None if y is None else y[:max_data]
    return x, y


def _restore(run: Path):
    """The fitted model of a run directory and its config, or a clear error naming the file."""
    run = runs.run_path(run)
    config = runs.read_config(run)
    entry = MODELS.get(config["model"])
    if entry is None:
        try:
            return _restore_any(run, config), config
        except ValueError as error:
            raise runs.RunError(f"{run / 'config.json'}: {error}") from None
    try:
        model = entry.model_class(entry.config_class(**config["model_config"]))
    except (TypeError, ValueError) as error:
        raise runs.RunError(
            f"{run / 'config.json'}: its model_config does not make a {config['model']} ({error})"
        ) from None
    pyro.clear_param_store()
    if not (run / "params.pt").exists() and (run / "checkpoint.pt").exists():
        raise runs.RunError(
            f"{run} has no params.pt: its fit did not finish; continue it with zoo fit"
            f" {config['model']} --resume {run}"
        )
    state = runs.load_tensors(run / "params.pt")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise runs.RunError(
            f"{run / 'params.pt'} does not hold this {config['model']}'s parameters"
            f" ({str(error).splitlines()[0][:200]})"
        ) from None
    return model, config


def _print_metrics(out: Path, metrics: dict) -> None:
    print(f"run: {out}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")


# ----------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list models and data sets").set_defaults(func=cmd_list)

    fit = sub.add_parser("fit", help="fit a model and write a run directory")
    fit.add_argument("model", help="a model of zoo list, or path/to/file.py:Class")
    fit.add_argument("--data", choices=data.NAMES, help="data set (default: the model's own)")
    fit.add_argument("--inference", help="reparam or svi (the deep models); see zoo list")
    fit.add_argument("--out", help="run directory (default: runs/MODEL-DATA)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing run")
    fit.add_argument(
        "--binarize",
        default="default",
        choices=("default", "none", "static", "dynamic", "threshold"),
    )
    fit.add_argument("--max-data", type=_positive_int, help="use only the first N training rows")
    fit.add_argument("--seed", type=_seed, default=0)
    fit.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    deep = fit.add_argument_group("deep models (vae, cvae, ssvae, hvae)")
    deep.add_argument("--epochs", type=_positive_int, default=10)
    deep.add_argument("--batch-size", type=_positive_int, default=128)
    deep.add_argument("--lr", type=float, default=1e-3)
    deep.add_argument(
        "--lr-decay",
        type=_unit_interval,
        default=1.0,
        help="factor the learning rate falls to by the last epoch, geometrically per epoch"
        " (1 = constant; Burda et al.'s schedule ends at 0.1)",
    )
    deep.add_argument("--z-dim", type=_positive_int, default=50)
    deep.add_argument("--hidden", type=_positive_int, nargs="+", default=[200, 200])
    deep.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    deep.add_argument(
        "--iwae",
        type=_positive_int,
        default=1,
        help="importance-weighted bound with K particles (reparam)",
    )
    deep.add_argument(
        "--jit",
        nargs="?",
        const="jit",
        default=False,
        choices=reparam.BACKENDS,
        help="compile the ELBO or IWAE bound (--inference reparam; models without data-dependent"
        " branches): with torch.jit, or with --jit inductor by torch.compile, which fuses"
        " elementwise work (needs a C++ compiler on CPU; half a minute to compile). Shorter"
        " epochs: benchmarks/results/vae_speed.md",
    )
    deep.add_argument(
        "--loss",
        choices=sorted(svi.LOSSES),
        help="Pyro ELBO for --inference svi (default TraceEnum_ELBO for the SSVAE,"
        " TraceMeanField_ELBO otherwise)",
    )
    deep.add_argument("--patience", type=_positive_int, help="early stopping on validation")
    deep.add_argument("--max-steps", type=_positive_int, help="stop after N steps (smoke runs)")
    deep.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=100,
        help="importance samples for the test log-likelihood after fitting",
    )
    deep.add_argument(
        "--condition",
        choices=("label", "quadrants"),
        default="label",
        help="CVAE: condition on the digit label or on the visible quadrants",
    )
    deep.add_argument(
        "--given",
        type=int,
        choices=(1, 2, 3),
        default=1,
        help="CVAE quadrant task: how many quadrants are visible",
    )
    deep.add_argument(
        "--labels",
        type=_positive_int,
        default=100,
        help="SSVAE: labelled training images (class-balanced; a multiple of 10)",
    )
    deep.add_argument("--label-seed", type=int, default=0, help="SSVAE: which labelled subset")
    deep.add_argument(
        "--alpha",
        type=float,
        default=46.0,
        help="SSVAE: weight of the classification term on labelled data (0 = none)",
    )
    deep.add_argument(
        "--stack-on",
        metavar="RUN",
        help="SSVAE: Kingma's M1+M2, an M2 over the latent space of the fitted VAE in RUN"
        " (kept frozen) instead of over the pixels",
    )
    deep.add_argument(
        "--sample-y",
        action="store_true",
        help="SSVAE: sample y in the guide (Trace_ELBO) instead of enumerating it",
    )
    deep.add_argument(
        "--layers", type=_positive_int, default=2, help="ladder VAE: stochastic layers (1-5)"
    )
    deep.add_argument(
        "--warmup",
        type=int,
        help="ladder VAE: KL warm-up epochs, 0 to 1 linearly (default: a fifth of --epochs)",
    )
    deep.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the run in --out (or in RUN) from its checkpoint, with the same settings",
    )
    deep.add_argument(
        "--resume-lr",
        type=_positive_float,
        metavar="LR",
        help="with --resume: continue at learning rate LR from the last good checkpoint (after"
        " a NaN stop, say); config.json records the change",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)

    cmp = sub.add_parser(
        "compare",
        help="fit one model with several inference methods and seeds; write a table and a plot",
    )
    cmp.add_argument("model", choices=sorted(comparisons.METHODS))
    cmp.add_argument("--data", help="data set (default: the model's first; see zoo.comparisons)")
    cmp.add_argument(
        "--inference",
        help="comma-separated methods (default: all for the model): gmm em,svi,nuts,sklearn;"
        " bmm em,svi; vae trace,meanfield,iwae5,iwae50,tracegraph;"
        " ssvae sampled,enumerated,classifier",
    )
    cmp.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 per method")
    cmp.add_argument(
        "--budget", type=_positive_float, help="seconds of fitting per method and seed"
    )
    cmp.add_argument("--out", help="report directory (default: runs/compare-MODEL-DATA)")
    cmp.add_argument("--overwrite", action="store_true", help="replace an existing report")
    cmp.add_argument("--quiet", action="store_true", help="no progress bar")
    knobs = cmp.add_argument_group("settings (defaults in zoo.comparisons.Setup)")
    for flag, kind, text in (
        ("--components", _positive_int, "mixture components"),
        ("--max-iter", _positive_int, "EM and scikit-learn iterations"),
        ("--tol", float, "EM and scikit-learn tolerance"),
        ("--svi-steps", _positive_int, "SVI epochs on a mixture"),
        ("--chains", _positive_int, "NUTS chains"),
        ("--warmup", _positive_int, "NUTS warm-up steps per chain"),
        ("--samples", _positive_int, "NUTS draws per chain"),
        ("--epochs", _positive_int, "deep models: epochs"),
        ("--batch-size", _positive_int, "deep models: minibatch size"),
        ("--lr", float, "deep models: Adam learning rate"),
        ("--max-data", _positive_int, "use only the first N training rows"),
        ("--heldout", _positive_int, "score the first N test rows"),
        ("--num-samples", _positive_int, "K of the importance-sampled held-out log-likelihood"),
        ("--labels", _positive_int, "SSVAE: labelled training rows"),
        ("--gradient-draws", _positive_int, "VAE: draws per gradient-variance estimate"),
        ("--z-dim", _positive_int, "deep models: latent size"),
    ):
        knobs.add_argument(flag, type=kind, help=text)
    knobs.add_argument("--hidden", type=_positive_int, nargs="+", help="deep models: widths")
    cmp.set_defaults(func=cmd_compare)

    ev = sub.add_parser("evaluate", help="recompute a run's metrics")
    ev.add_argument("run")
    ev.add_argument(
        "--num-samples",
        type=_positive_int,
        default=5000,
        help="importance samples per data point (deep models)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)

    sample = sub.add_parser("sample", help="draw samples from a fitted model")
    sample.add_argument("run")
    sample.add_argument("--num-samples", type=_positive_int, default=100)
    sample.add_argument("--seed", type=_seed, default=0)
    sample.set_defaults(func=cmd_sample)

    data_cmd = sub.add_parser("data", help="data sets")
    data_sub = data_cmd.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download and verify a data set into the cache")
    fetch.add_argument("name", choices=data.NAMES)
    fetch.set_defaults(func=cmd_data_fetch)
    return parser


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    any_model = len(argv) > 1 and not argv[1].startswith("-")
    if any_model and argv[0] == "fit" and argv[1] not in MODELS:  # from the registry or a file
        args = argparse.Namespace(func=lambda _: cmd_fit_any(argv[1:]))
    elif any_model and argv[0] == "compare" and argv[1] not in comparisons.METHODS:
        args = argparse.Namespace(func=lambda _: cmd_compare_any(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in config.json as the command that reproduces a run
    try:
        return args.func(args)
    except runs.RunError as err:
        raise SystemExit(f"zoo: {err}") from None
    except (data.DataError, ValueError, TypeError, FloatingPointError) as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    finally:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------ any model, through the registry
#
# A model that the tables above do not list (a user's class, ``file.py:Class`` or
# ``package.module:Class``, or one an installed package registers) is fitted from what it
# declares (``zoo.registry``): its options become flags, its drivers the --inference choices.


def _model_flag_parser(spec) -> argparse.ArgumentParser:
    """The flags of one model: its options (``registry.Spec.options``), less those the data
    set, and the shared ones."""
    parser = argparse.ArgumentParser(prog=f"zoo fit {spec.name}", description=spec.description)
    parser.add_argument("--data", help="a data set name or a .csv / .npy file of rows")
    binarize = ("default", "none", "static", "threshold")
    parser.add_argument("--binarize", default="default", choices=binarize)
    first = next(iter(spec.drivers))
    parser.add_argument("--inference", choices=tuple(spec.drivers), default=first)
    parser.add_argument("--out", help="run directory (default: runs/MODEL-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run")
    parser.add_argument("--resume", nargs="?", const=True, metavar="RUN")
    parser.add_argument("--max-data", type=_positive_int, help="the first N training rows")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    em_flags = parser.add_argument_group("--inference em")
    em_flags.add_argument("--tol", type=_positive_float, default=1e-4)
    em_flags.add_argument("--max-iter", type=_positive_int, default=500)
    em_flags.add_argument("--n-init", type=_positive_int, default=1, help="restarts; best kept")
    em_flags.add_argument("--sparse", choices=("auto", "yes", "no"), default="auto")
    deep = parser.add_argument_group("--inference svi or reparam")
    deep.add_argument("--epochs", type=_positive_int, default=10)
    deep.add_argument("--batch-size", type=_positive_int, default=128)
    deep.add_argument("--lr", type=_positive_float, default=1e-3)
    deep.add_argument("--loss", choices=sorted(svi.LOSSES), help="--inference svi")
    deep.add_argument("--eval-samples", type=_positive_int, default=100)
    _add_model_options(parser, spec)
    return parser


def _add_model_options(parser, spec) -> None:
    """A flag for each of the model's options, less those the data set."""
    group = parser.add_argument_group(f"{spec.name} options")
    for option in spec.options():
        if option.data is None:
            _add_option(group, option)


def _given_options(spec, args) -> dict:
    """The model options given on the command line (tuples for lists)."""
    given = {o.name: getattr(args, o.name) for o in spec.options() if o.data is None}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def _add_option(group, option) -> None:
    kind, nargs = _flag_type(option.type)
    flags = [f"--{option.name.replace('_', '-')}", *option.flags]
    extra = {"choices": option.choices} if option.choices else {}
    if kind is bool:
        group.add_argument(*flags, dest=option.name, action=argparse.BooleanOptionalAction)
        return
    group.add_argument(
        *flags, dest=option.name, type=kind, nargs=nargs, help=option.help or None, **extra
    )


def _flag_type(annotation):
    """(element type, nargs) of an option's annotation: int, float, str, bool, Optional[T],
    Tuple[T, ...]."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[T]
        return _flag_type(next(a for a in args if a is not type(None)))
    if origin in (tuple, list):
        return (args[0] if args else str), "+"
    if annotation in (int, float, str, bool):
        return annotation, None
    return str, None


def cmd_fit_any(argv) -> int:
    """``zoo fit MODEL ...`` for a model the tables above do not list."""
    spec = registry.get(argv[0])
    args = _model_flag_parser(spec).parse_args(argv[1:])
    if args.resume is not None:
        if args.inference == "em":
            raise SystemExit(
                "zoo: EM fits have no checkpoint to resume (they restart in seconds to"
                " minutes); fit again, with --overwrite to replace the run"
            )
        raise SystemExit(f"zoo: --resume is for the zoo's deep models; fit {spec.name} again")
    data_name = args.data or spec.default_data
    if data_name is None:
        raise SystemExit(f"zoo: {spec.name} has no default data: pass --data NAME or a file")
    binarize = spec.default_binarize if args.binarize == "default" else _none(args.binarize)
    x, y = _any_split(data_name, "train", binarize, args.max_data)
    info = registry.DataInfo.of(x, y, data_name, binarize, data.columns(data_name))
    given = _given_options(spec, args)
    options = spec.complete(given, info)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = _device(args.device)
    model = spec.build(options)
    model = model.to(device) if isinstance(model, torch.nn.Module) else model
    name = Path(spec.name.split(":")[-1]).name
    out = runs.run_path(args.out or f"runs/{name}-{Path(data_name).stem}")
    with runs.open_for_writing(out, overwrite=args.overwrite) as run:
        config = {
            "model": spec.name,
            "model_config": json.loads(json.dumps(options, default=list)),
            "data": data_name,
            "binarize": binarize,
            "max_data": args.max_data,
            "inference": args.inference,
            "options": {k: v for k, v in vars(args).items() if k not in given},
            "command": "zoo fit " + " ".join(shlex.quote(a) for a in argv),
        }
        sparse = args.inference == "em" and _sparse(
            args.sparse, model, registry.model_arguments(model, x, y, "train")
        )
        config["options"]["sparse"] = sparse  # what the fit runs on, not the flag
        run.write_config(config)
        metrics = _fit_and_score(spec, model, args, config, (x.to(device), y), info, out)
    _print_metrics(out, metrics)
    return 0


def _fit_and_score(spec, model, args, config, train, info, out: Path) -> dict:
    """Fit, then write the run's parameters, history, metrics and figures."""
    started = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", em.ConvergenceWarning)
        result = _fit_with_driver(
            spec, model, args, config, registry.model_arguments(model, *train, "train")
        )
    for warning in caught:  # said once, plainly, and recorded in metrics.json below
        print(f"zoo: warning: {warning.message}", file=sys.stderr)
    _save_parameters(model, out / "params.pt")
    save_json(out / "history.json", result.history)
    metrics = _any_metrics(model, config, args.eval_samples, not args.quiet)
    metrics.update(
        fit_seconds=time.time() - started,
        iterations=result.num_steps,
        converged=result.converged,
        stop_reason=result.stop_reason,
        objective=result.objective,
    )
    save_json(out / "metrics.json", metrics)
    _any_figures(model, config, result.history, out, info)
    return metrics


def _fit_with_driver(spec, model, args, config, train):
    """One fit of ``model`` with the driver ``args.inference`` and the spec's default options."""
    options = dict(spec.drivers[args.inference])
    hook = getattr(model, "driver_options", None)
    options.update(hook(args.inference) if callable(hook) else {})
    value = train[0] if len(train) == 1 else train
    if args.inference == "em":
        value = SparseRows(value) if config["options"]["sparse"] else value
        em_options = dict(tol=args.tol, max_iter=args.max_iter, n_init=args.n_init, seed=args.seed)
        em_options.update(progress=not args.quiet, **options)
        return em.fit(model.model, model.guide, value, **em_options)
    loop_options = dict(
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
    )
    hook = getattr(model, "fit_options", None)
    loop_options.update(hook(args.epochs) if callable(hook) else {})
    if args.inference == "svi":
        if args.loss:
            options["loss"] = args.loss
        return svi.fit(model.model, model.guide, value, **options, **loop_options)
    if args.loss:
        raise SystemExit("zoo: --loss picks Pyro's ELBO for --inference svi")
    return reparam.fit(model.model, model.guide, value, **options, **loop_options)


def _sparse(choice: str, model, x) -> bool:
    """Whether EM runs on ``SparseRows(x)``: for a model whose products take CSR data
    (``takes_sparse_data``); 'auto' picks it for data that are mostly zeros and large enough
    for it to pay (on MNIST, 13 % ones: 1.6-3x faster iterations, benchmarks/results/em.md)."""
    takes = getattr(model, "takes_sparse_data", False)
    if choice == "no" or (choice == "auto" and not takes):
        return False
    if not takes:
        raise SystemExit(
            f"zoo: --sparse yes: {type(model).__name__} takes dense data only (sparse rows are"
            " for models whose products take CSR data, such as the Bernoulli mixture)"
        )
    x = x[0] if len(x) == 1 else None  # the model's arguments: one tensor of rows
    if not isinstance(x, torch.Tensor):
        return False
    return choice == "yes" or (x.numel() >= 2**22 and (x != 0).float().mean().item() <= 0.3)


def _any_split(name, split, binarize, max_data):
    """A split of a zoo data set, or of a user's .csv / .npy file (its rows: no split, no
    labels), as float32 tensors."""
    if name in data.NAMES:
        return _load(name, split, binarize, max_data)
    path = runs.run_path(name)
    if path.suffix not in (".csv", ".npy"):
        names = ", ".join(data.NAMES)
        raise SystemExit(f"zoo: --data {name}: a data set ({names}) or a .csv / .npy file")
    if split != "train":
        raise ValueError(f"a data file has no {split} split")
    x = data.load_file(path)
    if max_data:
        x = x[:max_data]
    return data.binarize(x, binarize, seed=0) if binarize else x, None


def _save_parameters(model, path: Path) -> None:
    """A module's state dict, or for a model of plain pyro.params the store's values."""
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
    else:
        state = dict(pyro.get_param_store()._params)
    save_torch(path, {k: v.detach().cpu() for k, v in state.items()})


def _restore_any(run: Path, config: dict):
    spec = registry.get(config["model"])
    try:
        model = spec.build(config["model_config"])
    except (TypeError, ValueError) as error:
        raise runs.RunError(
            f"{run / 'config.json'}: its model_config does not make a {spec.name} ({error})"
        ) from None
    state = runs.load_tensors(run / "params.pt")
    if not isinstance(model, torch.nn.Module):
        x, y = _any_split(config["data"], "train", config["binarize"], 2)
        loop.Parameters(
            model.model,
            model.guide,
            registry.as_data(registry.model_arguments(model, x, y, "train")),
        )
        model_state = dict(pyro.get_param_store()._params)
    else:
        model_state = model.state_dict()
    if set(state) != set(model_state) or any(state[k].shape != model_state[k].shape for k in state):
        raise runs.RunError(
            f"{run / 'params.pt'} does not hold this {spec.name}'s parameters (its names or"
            " shapes differ from those its config.json makes)"
        )
    with torch.no_grad():
        for name, value in state.items():
            model_state[name].copy_(value)
    return model


def _splits(config) -> dict:
    """``{"train": (x, y), "test": (x, y)}`` of the run's data (no test: a data file)."""
    splits = {"train": _any_split(config["data"], "train", config["binarize"], config["max_data"])}
    try:
        splits["test"] = _any_split(config["data"], "test", config["binarize"], None)
    except ValueError:  # the data have no test split
        pass
    return splits


def _any_metrics(model, config, num_samples, progress) -> dict:
    """The model's own ``metrics(splits, ...)``, else the shared ones: the exact (mixtures) or
    importance-sampled log-likelihood, and for the deep drivers the ELBO, of the held-out
    split (the training rows where there is none)."""
    device = _model_device(model)
    splits = {k: (x.to(device), y) for k, (x, y) in _splits(config).items()}
    hook = getattr(model, "metrics", None)
    if callable(hook):
        return dict(hook(splits, num_samples, progress))
    split = "test" if "test" in splits else "train"
    value = registry.as_data(registry.model_arguments(model, *splits[split], split))
    log_px = evaluate.log_likelihood(
        model.model, model.guide, value, num_samples=num_samples, progress=progress
    )
    metrics = {f"{split}_log_likelihood": log_px.mean().item(), "units": "nats per data point"}
    if config["inference"] != "em":
        metrics[f"{split}_elbo"] = evaluate.elbo(model.model, model.guide, value).mean().item()
        metrics["log_likelihood_samples"] = num_samples
    return metrics


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _any_figures(model, config, history, out: Path, info=None) -> None:
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
        fig = plots.curve(
            history, "objective", ylabel="ELBO per data point (nats)", title="training objective"
        )
        plots.save(fig, out / "learning_curve.png")
    hook = getattr(model, "figures", None)
    if callable(hook):
        with torch.no_grad():
            for name, figure in hook(_splits(config), history, info).items():
                plots.save(figure, out / name)


def _sample_any(model, config, run: Path, num_samples: int) -> None:
    hook = getattr(model, "sample", None)
    if not callable(hook):
        raise SystemExit(f"zoo: {config['model']} offers no sample(num_samples): nothing to draw")
    drawn = hook(num_samples)
    x, z = drawn if isinstance(drawn, tuple) else (drawn, None)
    saved = {"x": x.detach().cpu(), **({} if z is None else {"z": z.detach().cpu()})}
    save_torch(run / "samples.pt", saved)
    figure = getattr(model, "sample_figure", lambda x, z: None)(x, z)
    side = int(round(x.shape[-1] ** 0.5))
    if figure is None and x.dim() == 2 and side * side == x.shape[-1]:
        figure = plots.image_grid(x, title=f"samples from {config['model']}")
    if figure is not None:
        plots.save(figure, run / "samples.png")
    print(f"wrote {run / 'samples.pt'}" + (" and samples.png" if figure is not None else ""))


def cmd_compare_any(argv) -> int:
    """``zoo compare MODEL ...`` for a model with no comparison of its own: its drivers."""
    spec = registry.get(argv[0])
    parser = argparse.ArgumentParser(prog=f"zoo compare {spec.name}")
    parser.add_argument("--data")
    parser.add_argument("--inference", help=f"comma-separated, of {','.join(spec.drivers)}")
    parser.add_argument("--seeds", type=_positive_int, default=3)
    parser.add_argument("--budget", type=_positive_float)
    parser.add_argument("--out")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    for flag, kind, default in (
        ("--epochs", _positive_int, 10),
        ("--batch-size", _positive_int, 128),
        ("--lr", _positive_float, 1e-3),
        ("--num-samples", _positive_int, 100),
        ("--max-data", _positive_int, None),
    ):
        parser.add_argument(flag, type=kind, default=default)
    _add_model_options(parser, spec)
    args = parser.parse_args(argv[1:])
    data_name = args.data or spec.default_data
    if data_name is None:
        raise SystemExit(f"zoo: {spec.name} has no default data: pass --data NAME")
    stem = Path(spec.name.split(":")[-1]).name
    out = runs.run_path(args.out or f"runs/compare-{stem}-{data_name}")
    if (out / "table.md").exists() and not args.overwrite:
        raise SystemExit(
            f"zoo: {out} already holds a comparison; pass --overwrite or another --out"
        )
    given = _given_options(spec, args)
    table = comparisons.compare_declared(
        spec,
        given,
        data_name,
        methods=args.inference.split(",") if args.inference else None,
        seeds=range(args.seeds),
        budget=args.budget,
        out=out,
        command="zoo compare " + " ".join(shlex.quote(a) for a in argv),
        progress=not args.quiet,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_samples=args.num_samples,
        max_data=args.max_data,
    )
    print(table.read_text().split("\nNotes:")[0].split("\n###")[0].rstrip())
    print(f"\nreport: {out} (table.md, table.csv, log_likelihood_vs_time.png, rows.json)")
    return 0
