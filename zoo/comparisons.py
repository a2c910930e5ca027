"""
Which inference methods the zoo compares on which model, and how each is fitted and scored.
``inference.compare`` runs them (every method with every seed, on the same split) and writes the
report; like ``zoo/cli.py``, this module ties models to drivers.

    from zoo import comparisons
    table = comparisons.compare("gmm", data="faithful", seeds=(0, 1, 2),
                                out="runs/compare-gmm-faithful")
    # zoo compare gmm --data faithful --inference em,svi,nuts,sklearn --seeds 3

Methods (the first data set is the default):
  gmm    faithful, gmm-synthetic
         em         closed-form EM (k-means++ start)
         svi        SVI with TraceEnum_ELBO: the same maximum-likelihood objective, z summed out,
                    Adam on the unconstrained parameters from EM's starting point
         nuts       NUTS on the Bayesian GMM (``gmm.bayesian_model``), chains run one after the
                    other; arviz InferenceData, summary (r_hat, ESS), trace and posterior plots,
                    label switching detected and undone (``gmm.relabel``)
         sklearn    scikit-learn's GaussianMixture with the same tolerance: the reference row
  bmm    bmm-synthetic, digits, mnist:  em, svi, nuts (the Bayesian Bernoulli mixture,
         ``bernoulli_mixture.bayesian_model``; K (D + 1) unknowns, so not on all of MNIST)
  vae    mnist, digits
         trace      Trace_ELBO, Monte Carlo KL          meanfield  TraceMeanField_ELBO, analytic KL
         iwae5      importance-weighted bound, K = 5    iwae50     K = 50
         tracegraph TraceGraph_ELBO with the guide's reparameterization switched off: the
                    score-function estimator, the high-variance contrast
         plus the variance of each estimator's gradient at fixed parameters
  ssvae  mnist, digits (``labels`` of the training rows kept)
         sampled    y sampled from q(y | x), Trace_ELBO, no classification term
         enumerated y summed out (TraceEnum_ELBO), no classification term
         classifier y summed out plus alpha * log q(y | x) on the labelled rows (M2 as published)

Budget (seconds of fitting per method and seed): EM, SVI and the deep models stop after the
first iteration or epoch past it, NUTS starts no further chain, scikit-learn runs to its own
tolerance (its iterations are reported).

Held-out log-likelihood: exact for the mixtures, the posterior predictive for NUTS, and an
importance-sampled estimate with the guide as proposal (K stated) for the deep models. Curves:
the held-out figure at geometrically spaced steps, evaluation time excluded from the clock.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch

from inference import compare as runner
from inference import em, evaluate, mcmc, reparam, svi
from inference.io import save_json
from zoo import bernoulli_mixture as bmm_module
from zoo import data
from zoo import gmm as gmm_module
from zoo.bernoulli_mixture import BernoulliMixture, BMMConfig
from zoo.gmm import GaussianMixture, GMMConfig
from zoo.ssvae import SSVAE, SSVAEConfig
from zoo.vae import VAE, VAEConfig

METHODS = {
    "gmm": ("em", "svi", "nuts", "sklearn"),
    "bmm": ("em", "svi", "nuts"),
    "vae": ("trace", "meanfield", "iwae5", "iwae50", "tracegraph"),
    "ssvae": ("sampled", "enumerated", "classifier"),
}
DATA = {
    "gmm": ("faithful", "gmm-synthetic"),
    "bmm": ("bmm-synthetic", "digits", "mnist"),
    "vae": ("mnist", "digits"),
    "ssvae": ("mnist", "digits"),
}
_COMPONENTS = {"faithful": 2, "gmm-synthetic": 3, "bmm-synthetic": 4}  # else 10 (digit classes)
_BINARY = {"mnist": "static", "digits": "static", "bmm-synthetic": None}


@dataclass
class Setup:
    """Everything a comparison needs beyond the method names; defaults suit the default data."""

    model: str
    data: str
    components: Optional[int] = None  # mixtures; default: per data set (_COMPONENTS)
    max_iter: int = 500  # EM / scikit-learn iterations
    tol: float = 1e-6  # EM / scikit-learn tolerance on the mean log-likelihood
    svi_steps: int = 1000  # SVI on a mixture: full-batch steps (or epochs of minibatches)
    svi_lr: float = 0.05
    chains: int = 2  # NUTS
    warmup: int = 150
    samples: int = 150
    epochs: int = 10  # deep models
    batch_size: int = 128
    lr: float = 1e-3
    max_data: Optional[int] = None  # training rows kept (the first ones)
    heldout: int = 1000  # held-out rows scored (the first of the test split)
    num_samples: int = 100  # K of the importance-sampled held-out log-likelihood
    labels: int = 100  # ssvae: labelled training rows
    gradient_draws: int = 100  # vae: draws of each gradient estimator
    z_dim: int = 50
    hidden: tuple = (200, 200)
    out: Optional[Path] = None  # where methods put their own artefacts (NUTS posteriors)
    train: tuple = field(default=None, repr=False)
    test: tuple = field(default=None, repr=False)


# the fields of Setup a caller may set (the rest are filled in by compare)
SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(Setup)
    if f.name not in ("model", "data", "out", "train", "test")
)


def compare(
    model: str,
    data: Optional[str] = None,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0,),
    budget: Optional[float] = None,
    out="runs/compare",
    command: Optional[str] = None,
    progress: bool = True,
    **options,
) -> Path:
    """Fit ``model`` on ``data`` with every method and seed; write the report into ``out``.

    options: fields of ``Setup`` (components, epochs, max_data, num_samples, chains, ...).
    Returns the path of the Markdown table.
    """
    if model not in METHODS:
        raise ValueError(f"no comparison for model {model!r}; choose one of {', '.join(METHODS)}")
    data_name = data or DATA[model][0]
    if data_name not in DATA[model]:
        raise ValueError(
            f"model {model!r} is compared on {', '.join(DATA[model])}, not {data_name!r}"
        )
    methods = list(methods or METHODS[model])
    unknown = [m for m in methods if m not in METHODS[model]]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)} for {model!r}; choose from"
            f" {', '.join(METHODS[model])}"
        )
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is named twice: {methods}")
    bad = sorted(set(options) - set(SETTINGS))
    if bad:
        raise TypeError(
            f"unknown option(s) {', '.join(bad)}; choose from {', '.join(sorted(SETTINGS))}"
        )
    out = Path(out)
    setup = Setup(model=model, data=data_name, out=out, **options)
    if setup.components is None:
        setup.components = _COMPONENTS.get(data_name, 10)
    setup.train, setup.test = _split(setup)
    built = [BUILDERS[model][name](setup) for name in methods]
    rows = runner.run(built, seeds=seeds, budget=budget, progress=progress)
    extra = []
    if model == "vae":
        extra += _gradient_variance_section(setup, methods, out)
    for row in rows:
        extra += row.pop("details", [])
    title = f"{model} on {data_name}: " + ", ".join(methods)
    command = command or _command(model, data_name, methods, seeds, budget, options)
    return runner.report(rows, out, command=command, title=title, extra_markdown=extra)


def _command(model, data_name, methods, seeds, budget, options) -> str:
    words = ["zoo compare", model, "--data", data_name, "--inference", ",".join(methods)]
    words += ["--seeds", str(len(seeds))]
    if budget is not None:
        words += ["--budget", f"{budget:g}"]
    for key, value in options.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        words += [f"--{key.replace('_', '-')}", *(str(v) for v in values)]
    return " ".join(words)


def _split(setup: Setup):
    binarize = _BINARY.get(setup.data) if setup.model != "gmm" else None
    x, y = data.load(setup.data, "train", binarize)
    if setup.max_data is not None:
        x, y = x[: setup.max_data], None if y is None else y[: setup.max_data]
    x_test, y_test = data.load(setup.data, "test", binarize)
    x_test = x_test[: setup.heldout]
    y_test = None if y_test is None else y_test[: setup.heldout]
    return (x, y), (x_test, y_test)


class _Curve:
    """Scores the held-out set at geometrically spaced steps, off the clock."""

    def __init__(self, recorder, score, growth: float = 1.25):
        self.recorder, self.score, self.growth, self.next = recorder, score, growth, 1

    def __call__(self, record) -> bool:
        if record["step"] >= self.next:
            self.next = max(record["step"] + 1, math.ceil(record["step"] * self.growth))
            with self.recorder.paused():
                self.recorder.point(self.score())
        return self.recorder.out_of_time()  # True stops the driver


# ------------------------------------------------------------------------------------ mixtures


def _mixture(setup: Setup, x):
    if setup.model == "gmm":
        return GaussianMixture(GMMConfig(num_components=setup.components, dim=x.shape[1]))
    return BernoulliMixture(BMMConfig(num_components=setup.components, dim=x.shape[1]))


def _mixture_figures(setup, recorder, objective, iterations, score, predict, locs) -> Dict:
    """The row of a mixture fit: ``score(x)`` is the mean exact log-likelihood of rows x and
    ``predict(x)`` their clusters; both run off the clock."""
    x_test, y_test = setup.test
    with recorder.paused():
        heldout = score(x_test)
        recorder.point(heldout)
        figures = {
            "objective": objective,
            "heldout_log_likelihood": heldout,
            "heldout_method": "exact",
            "iterations": iterations,
            "locs": locs,
        }
        if y_test is not None:
            figures["accuracy"] = evaluate.clustering_accuracy(
                y_test, predict(x_test), mapping="majority"
            )
    return figures


def _zoo_mixture_figures(model, setup, result, recorder) -> Dict:
    return _mixture_figures(
        setup,
        recorder,
        result.objective,
        result.num_steps,
        lambda rows: model.log_likelihood(rows).mean().item(),
        model.predict,
        model.locs.detach().tolist() if setup.model == "gmm" else None,
    )


def _em_method(setup: Setup) -> runner.Method:
    def run(seed, recorder):
        x = setup.train[0]
        model = _mixture(setup, x)
        curve = _Curve(recorder, lambda: model.log_likelihood(setup.test[0]).mean().item())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.ConvergenceWarning)
            result = em.fit(
                model.model,
                model.guide,
                x,
                tol=setup.tol,
                max_iter=setup.max_iter,
                seed=seed,
                callback=curve,
            )
        return _zoo_mixture_figures(model, setup, result, recorder)

    return runner.Method("em", run, f"closed-form EM, tol {setup.tol:g}", warm_up=True)


def _svi_mixture_method(setup: Setup) -> runner.Method:
    def run(seed, recorder):
        x = setup.train[0]
        model = _mixture(setup, x)
        # EM's start (k-means++ labels, one closed-form M-step), so that only the optimizer differs
        labels = em.kmeans(x, setup.components, generator=torch.Generator().manual_seed(seed))
        resp = torch.nn.functional.one_hot(labels, setup.components).to(x)
        model.m_step(model.sufficient_statistics(x, resp))
        curve = _Curve(recorder, lambda: model.log_likelihood(setup.test[0]).mean().item())
        batch = min(len(x), 1000)
        result = svi.fit(
            model.model,
            model.guide,
            x,
            loss="TraceEnum_ELBO",
            max_plate_nesting=1,
            lr=setup.svi_lr,
            batch_size=batch,
            num_epochs=setup.svi_steps,
            seed=seed,
            callback=curve,
        )
        return _zoo_mixture_figures(model, setup, result, recorder)

    return runner.Method("svi", run, "SVI, TraceEnum_ELBO (MAP), Adam", warm_up=True)


def _sklearn_method(setup: Setup) -> runner.Method:
    from sklearn.mixture import GaussianMixture as Reference

    def run(seed, recorder):
        x = setup.train[0].double().numpy()
        reference = Reference(
            setup.components,
            tol=setup.tol,
            max_iter=setup.max_iter,
            reg_covar=GMMConfig.reg_covar,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its ConvergenceWarning; iterations are reported
            reference.fit(x)
        with recorder.paused():
            objective = float(reference.score(x))
        return _mixture_figures(
            setup,
            recorder,
            objective,
            reference.n_iter_,
            lambda rows: float(reference.score(rows.double().numpy())),
            lambda rows: reference.predict(rows.double().numpy()),
            reference.means_.tolist(),
        )

    return runner.Method("sklearn", run, "scikit-learn GaussianMixture (reference)", warm_up=True)


def _nuts_method(setup: Setup) -> runner.Method:
    def run(seed, recorder):
        (x, _), (x_test, _) = setup.train, setup.test
        posterior = sample_posterior(
            setup.model,
            x,
            setup.components,
            setup.chains,
            setup.warmup,
            setup.samples,
            seed,
            recorder,
        )
        predictive = _BAYESIAN[setup.model]["predictive"]
        draws = posterior["draws"]  # relabelled, (chains, samples, ...), original scale
        # the curve: the posterior predictive from the draws available at each moment
        with recorder.paused():
            flat = {k: torch.as_tensor(v).flatten(0, 1) for k, v in draws.items()}
            times = posterior["sample_times"]
            for count in np.unique(np.geomspace(1, len(times), 15).astype(int)):
                recorder.point(
                    predictive(_first(flat, count), x_test).mean().item(),
                    elapsed=times[count - 1],
                )
            heldout = predictive(flat, x_test).mean().item()
            train_lppd = predictive(flat, x).mean().item()
            details = mcmc.write_posterior(posterior, setup.out, seed, "zoo.gmm.relabel")
        return {
            "objective": train_lppd,
            "heldout_log_likelihood": heldout,
            "heldout_method": "posterior predictive",
            "iterations": posterior["chains"] * (setup.warmup + setup.samples),
            "locs": flat["locs"].mean(0).tolist() if "locs" in flat else None,
            "r_hat_max": posterior["r_hat_max"],
            "r_hat_max_before_relabelling": posterior["r_hat_max_raw"],
            "ess_bulk_min": posterior["ess_bulk_min"],
            "relabelled_fraction": posterior["relabelled_fraction"],
            "divergences": posterior["divergences"],
            "notes": (
                f"{posterior['chains']} chains x ({setup.warmup} warm-up + {setup.samples} draws),"
                " chains one after the other (a budget stops before a new chain);"
                " objective = mean log posterior predictive of the training data"
            ),
            "details": details,
        }

    label = {"gmm": "GMM", "bmm": "Bernoulli mixture"}[setup.model]
    return runner.Method("nuts", run, f"NUTS on the Bayesian {label}")


def _first(flat: Dict, count: int) -> Dict:
    """The first ``count`` draws in the order they were made (chain 0's, then chain 1's, ...)."""
    return {k: v[:count] for k, v in flat.items()}


_BAYESIAN = {
    "gmm": {
        "model": gmm_module.bayesian_model,
        "relabel": gmm_module.relabel,
        "predictive": gmm_module.posterior_log_predictive,
        "summarize": ("weights", "locs", "scales"),
        "dims": {
            "weights": ["component"],
            "locs": ["component", "coordinate"],
            "scales": ["component", "coordinate"],
            "corr": ["component", "row", "column"],
        },
        "standardize": True,
    },
    "bmm": {
        "model": bmm_module.bayesian_model,
        "relabel": bmm_module.relabel,
        "predictive": bmm_module.posterior_log_predictive,
        "summarize": ("weights", "probs"),
        "dims": {"weights": ["component"], "probs": ["component", "pixel"]},
        "standardize": False,
    },
}
_NUTS_MAX_DIM = 5000  # continuous unknowns NUTS is asked to explore on a CPU in minutes


def sample_posterior(
    model: str,
    x: torch.Tensor,
    num_components: int,
    chains: int = 2,
    warmup: int = 150,
    samples: int = 150,
    seed: int = 0,
    recorder: Optional[runner.Recorder] = None,
    progress: bool = False,
) -> Dict:
    """NUTS on the Bayesian version of a zoo mixture ("gmm": ``gmm.bayesian_model`` on
    standardized ``x``, draws mapped back; "bmm": ``bernoulli_mixture.bayesian_model``), by
    ``inference.mcmc.sample_posterior``, which returns the draws, the arviz InferenceData and
    the diagnostics (see there)."""
    spec = _BAYESIAN[model]
    dim = num_components * (x.shape[1] + 1)
    if dim > _NUTS_MAX_DIM:
        raise ValueError(
            f"NUTS on this mixture explores about K (D + 1) = {dim} continuous unknowns, more"
            f" than {_NUTS_MAX_DIM} is impractical here: use fewer components or smaller data"
            " (bmm-synthetic, digits)"
        )
    mean, sd = (x.mean(0), x.std(0)) if spec["standardize"] else (None, None)
    data = (x - mean) / sd if spec["standardize"] else x
    back = (lambda d: gmm_module.unstandardize(d, mean, sd)) if spec["standardize"] else None
    return mcmc.sample_posterior(
        partial(spec["model"], num_components=num_components),
        data,
        chains=chains,
        warmup=warmup,
        samples=samples,
        seed=seed,
        recorder=recorder,
        progress=progress,
        to_draws=back,
        relabel=spec["relabel"],
        summarize=spec["summarize"],
        dims=spec["dims"],
        observed={"x": x.numpy()},
    )


def _vae(setup: Setup) -> VAE:
    x = setup.train[0]
    return VAE(VAEConfig(x_dim=x.shape[1], z_dim=setup.z_dim, hidden=tuple(setup.hidden)))


def _deep_run(setup, recorder, model, fit, extra=None) -> Dict:
    """Fit with ``fit(callback)`` and score the held-out rows by importance sampling (K =
    ``setup.num_samples``), along the way and at the end; shared by the VAE and the SSVAE."""

    def score():
        x_test = setup.test[0]
        log_px = evaluate.log_likelihood(
            model.model, model.guide, x_test, num_samples=setup.num_samples
        )
        return log_px.mean().item()

    curve = _Curve(recorder, score)
    result = fit(curve)
    with recorder.paused():
        heldout = score()
        recorder.point(heldout)
    figures = {
        "objective": result.curve()[-1],
        "heldout_log_likelihood": heldout,
        "heldout_method": f"importance sampling, K={setup.num_samples}",
        "iterations": result.num_steps,
    }
    if extra is not None:
        with recorder.paused():
            figures.update(extra())
    return figures


def _vae_method(name: str, setup: Setup) -> runner.Method:
    particles = {"iwae5": 5, "iwae50": 50}.get(name, 1)

    def run(seed, recorder):
        x = setup.train[0]
        model = _vae(setup)
        options = dict(
            batch_size=setup.batch_size,
            num_epochs=setup.epochs,
            lr=setup.lr,
            seed=seed,
        )

        def fit(callback):
            if particles > 1:
                return reparam.fit(
                    model.model,
                    model.guide,
                    x,
                    num_particles=particles,
                    callback=callback,
                    **options,
                )
            guide = svi.score_function(model.guide) if name == "tracegraph" else model.guide
            loss = _VAE_LOSSES[name]
            return svi.fit(model.model, guide, x, loss=loss, callback=callback, **options)

        return _deep_run(setup, recorder, model, fit)

    return runner.Method(name, run, _VAE_DESCRIPTIONS[name])


_VAE_LOSSES = {
    "trace": "Trace_ELBO",
    "meanfield": "TraceMeanField_ELBO",
    "tracegraph": "TraceGraph_ELBO",
}
_VAE_DESCRIPTIONS = {
    "trace": "Trace_ELBO (Monte Carlo KL)",
    "meanfield": "TraceMeanField_ELBO (analytic KL)",
    "iwae5": "importance-weighted bound, K = 5",
    "iwae50": "importance-weighted bound, K = 50",
    "tracegraph": "TraceGraph_ELBO, score function (no reparameterization)",
}


def gradient_estimators(model: VAE, batch: torch.Tensor) -> Dict[str, callable]:
    """One draw of each estimator's gradient of -bound per data point, at the current
    parameters, on ``batch``: the functions ``evaluate.gradient_variance`` takes."""

    def pyro_loss(loss, guide):
        elbo = svi.make_loss(loss)
        return lambda: [
            g / len(batch) for g in evaluate.elbo_gradient(elbo, model.model, guide, batch)
        ]

    def iwae(k):
        objective = reparam.Objective(model.model, model.guide, batch, len(batch), k)
        params = [p for p in model.parameters()]

        def draw():
            grads = torch.autograd.grad(objective(batch), params, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

        return draw

    return {
        "trace": pyro_loss("Trace_ELBO", model.guide),
        "meanfield": pyro_loss("TraceMeanField_ELBO", model.guide),
        "iwae5": iwae(5),
        "iwae50": iwae(50),
        "tracegraph": pyro_loss("TraceGraph_ELBO", svi.score_function(model.guide)),
    }


def _gradient_variance_section(setup: Setup, methods, out: Path) -> List[str]:
    """Every estimator's gradient variance at the same parameters (a VAE after one epoch of
    Trace_ELBO, seed 0) on the same minibatch of training rows."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = setup.train[0]
    model = _vae(setup)
    svi.fit(
        model.model,
        model.guide,
        x,
        loss="Trace_ELBO",
        lr=setup.lr,
        batch_size=setup.batch_size,
        num_epochs=1,
        seed=0,
    )
    batch = x[: setup.batch_size]
    estimators = gradient_estimators(model, batch)
    figures = {}
    for name in methods:
        variance, signal = evaluate.gradient_variance(estimators[name], setup.gradient_draws)
        figures[name] = {"variance": variance, "squared_norm_of_mean": signal}
    save_json(out / "gradient_variance.json", figures)
    base = figures.get("trace", {}).get("variance")
    lines = [
        "### Gradient variance at fixed parameters",
        "",
        f"A VAE after one epoch of Trace_ELBO (seed 0); {setup.gradient_draws} draws of each"
        f" estimator's gradient of -bound per data point on the same {len(batch)} training rows."
        " Mean variance per parameter coordinate, and the squared norm of the mean gradient.",
        "",
        "| estimator | variance per coordinate | vs trace | squared norm of mean |",
        "|---|---|---|---|",
    ]
    for name, f in figures.items():
        ratio = f"{f['variance'] / base:.3g}x" if base else "-"
        lines.append(
            f"| {name} | {f['variance']:.4g} | {ratio} | {f['squared_norm_of_mean']:.4g} |"
        )
    return lines + [""]


def _ssvae_method(name: str, setup: Setup) -> runner.Method:
    def run(seed, recorder):
        (x, y), (x_test, y_test) = setup.train, setup.test
        if y is None:
            raise ValueError(f"the SSVAE needs labels; {setup.data!r} has none")
        labels = data.partial_labels(y, setup.labels, seed=seed)
        config = SSVAEConfig(
            x_dim=x.shape[1],
            num_classes=int(y.max()) + 1,
            z_dim=setup.z_dim,
            hidden=tuple(setup.hidden[:1]),
            enumerate=name != "sampled",
        )
        if name != "classifier":
            config.alpha = 0.0
        model = SSVAE(config)
        loss = "Trace_ELBO" if name == "sampled" else "TraceEnum_ELBO"

        def fit(callback):
            return svi.fit(
                model.model,
                model.guide,
                (x, labels),
                loss=loss,
                max_plate_nesting=1,
                lr=setup.lr,
                batch_size=setup.batch_size,
                num_epochs=setup.epochs,
                seed=seed,
                callback=callback,
            )

        def accuracy():
            return {"accuracy": model.accuracy(x_test, y_test)}

        return _deep_run(setup, recorder, model, fit, accuracy)

    descriptions = {
        "sampled": "y sampled, Trace_ELBO, alpha = 0",
        "enumerated": "y enumerated, TraceEnum_ELBO, alpha = 0",
        "classifier": f"y enumerated, TraceEnum_ELBO, alpha = {SSVAEConfig.alpha:g}",
    }
    return runner.Method(name, run, descriptions[name])


BUILDERS = {
    "gmm": {
        "em": _em_method,
        "svi": _svi_mixture_method,
        "nuts": _nuts_method,
        "sklearn": _sklearn_method,
    },
    "bmm": {"em": _em_method, "svi": _svi_mixture_method, "nuts": _nuts_method},
    "vae": {name: partial(_vae_method, name) for name in METHODS["vae"]},
    "ssvae": {name: partial(_ssvae_method, name) for name in METHODS["ssvae"]},
}


# ------------------------------------------------------------ any model, through the registry


def compare_declared(
    spec,
    model_options: Dict,
    data_name: str,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0,),
    budget: Optional[float] = None,
    out="runs/compare",
    command: Optional[str] = None,
    progress: bool = True,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_samples: int = 100,
    max_data: Optional[int] = None,
) -> Path:
    """Compare the drivers a model declares (``registry.Spec.drivers``), each with its
    declared options, on the same split: the comparison of a model that brings no methods of
    its own (a user's class). Held-out figure: the exact log-likelihood where the model's
    latents are enumerable, else importance-sampled with the guide (K = ``num_samples``)."""
    from zoo import registry

    methods = list(methods or spec.drivers)
    unknown = [m for m in methods if m not in spec.drivers]
    if unknown:
        raise ValueError(
            f"{spec.name} declares the drivers {', '.join(spec.drivers)}, not {', '.join(unknown)}"
        )
    (x, y), (x_test, y_test) = _split(Setup(model=spec.name, data=data_name, max_data=max_data))
    info = registry.DataInfo.of(x, y, data_name)
    options = spec.complete(model_options, info)
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, num_samples=num_samples)
    built = [
        runner.Method(
            m, partial(_declared_run, spec, options, m, (x, y), (x_test, y_test), settings)
        )
        for m in methods
    ]
    rows = runner.run(built, seeds=seeds, budget=budget, progress=progress)
    title = f"{spec.name} on {data_name}: " + ", ".join(methods)
    command = command or f"zoo compare {spec.name} --data {data_name}"
    return runner.report(rows, Path(out), command=command, title=title)


def _declared_run(spec, options, driver, train, test, settings, seed, recorder) -> Dict:
    from zoo import registry

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = spec.build(options)
    value = registry.as_data(registry.model_arguments(model, *train, "train"))
    held_out = registry.as_data(registry.model_arguments(model, *test, "test"))
    k = settings["num_samples"]

    def score():
        log_px = evaluate.log_likelihood(model.model, model.guide, held_out, num_samples=k)
        return log_px.mean().item()

    curve = _Curve(recorder, score)
    declared = dict(spec.drivers[driver])
    if driver == "em":
        result = em.fit(model.model, model.guide, value, seed=seed, callback=curve, **declared)
    else:
        fit = svi.fit if driver == "svi" else reparam.fit
        loop_options = dict(
            num_epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"]
        )
        result = fit(
            model.model, model.guide, value, seed=seed, callback=curve, **declared, **loop_options
        )
    with recorder.paused():
        heldout = score()
        recorder.point(heldout)
    enumerable = evaluate._enumerable(model.model, held_out)
    return {
        "objective": result.objective,
        "heldout_log_likelihood": heldout,
        "heldout_method": "exact" if enumerable else f"importance sampling, K={k}",
        "iterations": result.num_steps,
    }
