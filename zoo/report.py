"""
What a fitted run says about itself: the one scoring policy and the shared figures, for ``zoo
fit`` (``zoo.fitting``), ``zoo evaluate`` and the benchmarks alike.

- ``metrics``: the model's own ``metrics`` hook, and unless that reports a log-likelihood or an
  ELBO, the held-out split's importance-sampled (or exact, where the latents are enumerable)
  log-likelihood and ELBO per data point (``inference.evaluate``); a model with global latent
  variables gets its whole-data ELBO and the posterior of its globals instead;
- ``latent_usage`` and ``warn_if_collapsed``: the latent sites' KL and active units, and the
  posterior-collapse warning with its remedies (the model's own size flags named);
- ``warn_if_diverged``: a held-out score a hundred times worse than the first training step;
- ``figures``: the learning curve and the model's own ``figures`` hook.
"""

import math
import sys
from pathlib import Path

import torch

from inference import batching, evaluate, loop, particles, svi
from zoo import plots, registry, runs


def warn_if_diverged(history, metrics) -> bool:
    """Say so when the held-out score ends a hundred times worse than the first training step
    (the loop warns on the epochs' training objectives; a step after the last of them can
    still run the parameters away), and record it in metrics.json."""
    key = next((k for k in HELD_OUT_SCORES if metrics.get(k) is not None), None)
    if key is None or any(r.get("diverging") for r in history):
        return False
    if not loop.diverged(history, metrics[key]):
        return False
    metrics["diverged"] = True
    first = loop.first_objective(history)
    print(
        f"zoo: warning: the fit diverged: {key} is {metrics[key]:.4g} per data point, against"
        f" {first:.4g} at the first training step; refit with a lower --lr (and --overwrite)",
        file=sys.stderr,
    )
    return True


HELD_OUT_SCORES = ("test_elbo", "test_log_likelihood", "train_elbo", "train_log_likelihood")

COLLAPSED_KL = 0.1  # nats per data point: a latent site that tells the decoder less is unused

COLLAPSED_SPREAD = 0.05  # reconstructions varying less than this share of the data's: one image


def latent_usage(model, splits, rows: int = 1000):
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


def warn_if_collapsed(usage: dict, spec) -> None:
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
    remedies = registry.attribute(spec.cls, "capacity_options", ())
    flags = [f"--{n.replace('_', '-')}" for n in remedies if n in options]
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


def device_splits(model, config) -> dict:
    """The run's data splits (``runs.splits``), on the model's device."""
    device = model_device(model)
    return {k: (x.to(device), y) for k, (x, y) in runs.splits(config).items()}


def metrics(model, config, num_samples, progress, splits=None) -> dict:
    """The model's own ``metrics(splits, ...)``, and unless those hold a log-likelihood or an
    ELBO the shared scores of the held-out split (the training rows where there is none): the
    importance-sampled log-likelihood (exact where the latents are enumerable) and, for the
    loop's drivers, the ELBO."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    splits = device_splits(model, config) if splits is None else splits
    hook = registry.hook(model, "metrics")
    own = dict(hook(splits, num_samples, progress)) if hook else {}
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


def figures(model, config, history, out: Path, info=None, splits=None) -> None:
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
        plots.save(learning_curve(history, config, model), out / "learning_curve.png")
    hook = registry.hook(model, "figures")
    if callable(hook):
        splits = device_splits(model, config) if splits is None else splits
        with torch.no_grad():
            for name, figure in hook(splits, history, info).items():
                plots.save(figure, out / name)


def learning_curve(history, config, model=None):
    """Training and validation objective per epoch; a long run gets log epochs and a y range
    fitted to its last nine tenths, so its slow late gains show. The objective is named as the
    model names it (``objective_label``: an SSVAE's includes its classification term), and a
    model's own validation score on a scale of its own (``validation_label``: an accuracy)
    gets its own axis."""
    k = (config.get("options") or {}).get("iwae") or 1
    own = registry.attribute(model, "objective_label")
    label = own or ("ELBO" if k == 1 else f"IWAE bound (K={k})")
    fig = plots.curve(
        history,
        "objective",
        ylabel="nats per data point",
        title=f"{config['model']} on {config['data']}: {label}",
    )
    fig.axes[0].title.set_fontsize(10 if len(label) > 30 else 12)
    axis = fig.axes[0]
    if history and "valid_objective" in history[0]:
        epochs = [r["epoch"] for r in history]
        valid = [r["valid_objective"] for r in history]
        named = registry.attribute(model, "validation_label")  # a score on a scale of its own
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


def model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def run_device(config) -> torch.device:
    """Where a restored run is scored: the device it was fitted on, while there is one."""
    name = (config.get("options") or {}).get("device", "cpu")
    return torch.device(name if name.startswith("cuda") and torch.cuda.is_available() else "cpu")


def print_metrics(out: Path, metrics: dict) -> None:
    print(f"run: {out}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
