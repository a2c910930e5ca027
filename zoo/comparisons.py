"""
Comparisons of inference methods on one model and one data set, generic over the registry: a
model declares its methods (``comparison=`` of ``zoo.registry.register``) and this module fits
each of them, every seed, on the same split; ``inference.compare`` runs them and writes the
report. A model that declares none is compared by its drivers, each with its declared options.
It names no model::

    from zoo import comparisons
    table = comparisons.compare("gmm", data="faithful", seeds=(0, 1, 2),
                                out="runs/compare-gmm-faithful")
    # zoo compare gmm --data faithful --inference em,svi,nuts,sklearn --seeds 3

What a model declares (every key optional)::

    data       the data sets it is compared on, the first the default
    options    model options per data set ({"faithful": {"num_components": 2}})
    settings   its defaults for the fields of ``Setup`` (a mixture's SVI: 1000 epochs, lr 0.05)
    binarize   the binarization of image data (default: the model's, dynamic made static)
    seeded     model options set to each run's seed (which labelled subset an SSVAE sees)
    gradient_variance   add the section that measures each method's gradient variance
    methods    {name: method}; a method is a dict of
        driver       "em", "svi", "reparam", "nuts" (the model's ``bayesian(x)``, below) or
                     "reference" (the model's ``reference(seed, tol, max_iter)``: an estimator
                     with scikit-learn's fit / score / predict)
        description  the row's label
        options      model options of this method (alpha = 0: no classification term)
        loss, num_particles, ...   the driver's options, over those the model declares
        guide        "score_function": the guide with reparameterization switched off
        start        "em": the parameters start at EM's start (``inference.em.initialize``)
        warm_up      run once untimed first (fast methods whose first call pays set-up costs)

``bayesian(x)`` returns the model's Bayesian version for NUTS: ``model`` (a function of the
data), ``data``, ``predictive(draws, rows)`` (the posterior predictive log density per row),
and ``inference.mcmc.sample_posterior``'s ``to_draws``, ``relabel``, ``summarize`` and ``dims``.

Budget (seconds of fitting per method and seed): EM and the loop's drivers stop after the first
iteration or epoch past it, NUTS starts no further chain, a reference estimator runs to its own
tolerance (its iterations are reported).

Held-out log-likelihood: the model's own ``log_likelihood(x)`` where it has one (exact), else
its own ``elbo(x, num_samples)`` where it has one (a bound), else
``inference.evaluate.log_likelihood``: exact where the latents are enumerable, otherwise
importance-sampled with the guide as proposal (K stated); the posterior predictive for NUTS.
Curves: the held-out figure at geometrically spaced steps, evaluation time excluded.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch

from inference import compare as runner
from inference import drivers, em, evaluate, mcmc, reparam, svi
from inference.io import save_json
from zoo import registry, runs


@dataclass
class Setup:
    """Everything a comparison needs beyond the methods; the model may change the defaults."""

    max_iter: int = field(default_factory=lambda: drivers.default("max_iter"))  # EM
    # EM's and the references' tolerance on the mean log-likelihood: tighter than EM's own
    # default (inference.em.fit's tol), so that methods are compared at their optima
    tol: float = 1e-6
    # the loop's drivers: their own defaults (inference.drivers)
    epochs: int = field(default_factory=lambda: drivers.default("num_epochs"))
    batch_size: int = field(default_factory=lambda: drivers.default("batch_size", drivers.LOOP))
    lr: float = field(default_factory=lambda: drivers.default("lr", drivers.LOOP))
    chains: int = 2  # NUTS
    nuts_warmup: int = 150
    nuts_samples: int = 150
    max_data: Optional[int] = None  # training rows kept (the first ones)
    heldout: int = 1000  # held-out rows scored (the first of the test split)
    num_samples: int = 100  # K of the importance-sampled held-out log-likelihood
    gradient_draws: int = 100  # draws of each gradient estimator (gradient_variance)


SETTINGS = tuple(f.name for f in dataclasses.fields(Setup))
SETTING_FLAGS = (  # (name, type, help) for the command line
    ("max_iter", int, "EM and reference iterations"),
    ("tol", float, "EM and reference tolerance"),
    ("epochs", int, "epochs of SVI and the reparameterized driver"),
    ("batch_size", int, "their minibatch size"),
    ("lr", float, "their Adam learning rate"),
    ("chains", int, "NUTS chains"),
    ("nuts_warmup", int, "NUTS warm-up steps per chain"),
    ("nuts_samples", int, "NUTS draws per chain"),
    ("max_data", int, "use only the first N training rows"),
    ("heldout", int, "score the first N test rows"),
    ("num_samples", int, "K of the importance-sampled held-out log-likelihood"),
    ("gradient_draws", int, "draws per gradient-variance estimate"),
)


@dataclass
class _Task:
    """One comparison: the spec, the model options, the settings, the split, the report."""

    spec: registry.Spec
    data: str
    options: Dict
    setup: Setup
    train: tuple = field(repr=False)
    test: tuple = field(repr=False)
    out: Path = None


def default_data(spec) -> str:
    """The data set a model is compared on by default."""
    declared = spec.comparison.get("data")
    if declared:
        return declared[0]
    if spec.default_data is None:
        raise SystemExit(f"zoo: {spec.name} has no default data: pass --data NAME")
    return spec.default_data


def methods_of(spec) -> Dict[str, Dict]:
    """The model's declared methods, else one per driver with the driver's declared options."""
    declared = spec.comparison.get("methods")
    if declared:
        return {name: dict(method) for name, method in declared.items()}
    return {
        d: {"driver": d, "description": f"{d}, as {spec.name} declares it"} for d in spec.drivers
    }


def method_names(spec) -> tuple:
    return tuple(methods_of(spec))


def compare(
    model: str,
    data: Optional[str] = None,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0,),
    budget: Optional[float] = None,
    out="runs/compare",
    command: Optional[str] = None,
    progress: bool = True,
    model_options: Optional[Dict] = None,
    **options,
) -> Path:
    """Fit ``model`` (a registry name, or ``file.py:Class``) on ``data`` by every method and
    seed; write the report into ``out``. Returns the path of the Markdown table.

    options: fields of ``Setup`` (epochs, max_data, num_samples, chains, ...), or the model's
    own options (z_dim, num_components, labels, ...), which ``model_options`` may hold too.
    """
    spec = registry.get(model)
    task = _task(spec, data, methods, model_options, options, Path(out))
    names = list(methods or methods_of(spec))
    declared = methods_of(spec)
    built = [_method(task, name, declared[name]) for name in names]
    rows = runner.run(built, seeds=seeds, budget=budget, progress=progress)
    extra = []
    if spec.comparison.get("gradient_variance"):
        extra += _gradient_variance_section(task, {n: declared[n] for n in names})
    for row in rows:
        extra += row.pop("details", [])
    title = f"{spec.name} on {task.data}: " + ", ".join(names)
    given = {**(model_options or {}), **options}
    command = command or _command(spec.name, task.data, names, seeds, budget, given)
    return runner.report(rows, task.out, command=command, title=title, extra_markdown=extra)


def _task(spec, data_name, methods, model_options, options, out) -> _Task:
    """The comparison's settings, model options and split, every request checked first."""
    data_name = data_name or default_data(spec)
    allowed = spec.comparison.get("data")
    if allowed and data_name not in allowed:
        raise ValueError(f"{spec.name} is compared on {', '.join(allowed)}, not {data_name!r}")
    declared = methods_of(spec)
    names = list(methods or declared)
    unknown = [m for m in names if m not in declared]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)} for {spec.name!r}; choose from"
            f" {', '.join(declared)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice: {names}")
    own = {o.name for o in spec.options()}
    bad = sorted(set(options) - set(SETTINGS) - own)
    if bad:
        raise TypeError(
            f"unknown option(s) {', '.join(bad)}; choose from {', '.join(SETTINGS)} or the"
            f" model's {', '.join(sorted(own))}"
        )
    settings = {**spec.comparison.get("settings", {})}
    settings.update({k: v for k, v in options.items() if k in SETTINGS})
    given = dict(spec.comparison.get("options", {}).get(data_name, {}))
    given.update(model_options or {})
    given.update({k: v for k, v in options.items() if k in own and k not in SETTINGS})
    setup = Setup(**settings)
    train, test = _split(spec, data_name, setup)
    return _Task(spec, data_name, given, setup, train, test, out)


def _command(model, data_name, methods, seeds, budget, options) -> str:
    words = ["zoo compare", model, "--data", data_name, "--inference", ",".join(methods)]
    words += ["--seeds", str(len(seeds))]
    if budget is not None:
        words += ["--budget", f"{budget:g}"]
    for key, value in options.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        words += [f"--{key.replace('_', '-')}", *(str(v) for v in values)]
    return " ".join(words)


def _split(spec, data_name: str, setup: Setup):
    """The training rows (the first ``max_data``) and held-out rows (the first ``heldout`` of
    the test split), binarized once (a model fitted on dynamic binarization: one fixed draw)."""
    binarize = spec.comparison.get("binarize", spec.default_binarize)
    binarize = "static" if binarize == "dynamic" else binarize
    train = runs.split(data_name, "train", binarize, setup.max_data)
    x_test, y_test = runs.split(data_name, "test", binarize)
    test = (x_test[: setup.heldout], None if y_test is None else y_test[: setup.heldout])
    return train, test


class _Curve:
    """Scores the held-out set at geometrically spaced steps, off the clock."""

    def __init__(self, recorder, score, growth: float = 1.25):
        self.recorder, self.score, self.growth, self.next = recorder, score, growth, 1

    def __call__(self, record) -> bool:
        done = record.get("epoch", record.get("iteration"))  # the loop's, or EM's
        if done >= self.next:
            self.next = max(done + 1, math.ceil(done * self.growth))
            with self.recorder.paused():
                self.recorder.point(self.score())
        return self.recorder.out_of_time()  # True stops the driver


# ------------------------------------------------------------------------------------ methods


def _method(task: _Task, name: str, method: Dict) -> runner.Method:
    driver = method["driver"]
    run = {"nuts": _nuts_run, "reference": _reference_run}.get(driver, _driver_run)
    description = method.get("description", name)
    warm_up = bool(method.get("warm_up", driver in ("em", "reference") or "start" in method))

    def fit(seed, recorder):
        return run(task, method, seed, recorder)

    return runner.Method(name, fit, description, warm_up=warm_up)


def _model(task: _Task, method: Dict, seed: int):
    """A fresh model of the method's options, for one seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    options = {**task.options, **method.get("options", {})}
    options.update({k: seed for k in task.spec.comparison.get("seeded", ())})
    info = registry.DataInfo.of(*task.train, task.data)
    return task.spec.build(task.spec.complete(options, info))


def _arguments(model, rows, split):
    return registry.as_data(registry.model_arguments(model, *rows, split))


def _driver_options(task: _Task, model, method: Dict) -> Dict:
    """The driver's options: the spec's, the model's ``driver_options``, then the method's."""
    driver = method["driver"]
    options = dict(task.spec.drivers.get(driver, {}))
    hook = registry.hook(model, "driver_options")
    options.update(hook(driver) if hook else {})
    skip = ("driver", "description", "options", "guide", "start", "warm_up")
    options.update({k: v for k, v in method.items() if k not in skip})
    return options


def _driver_run(task: _Task, method: Dict, seed: int, recorder) -> Dict:
    """A fit by EM, SVI or the reparameterized driver, scored along the way."""
    model = _model(task, method, seed)
    value = _arguments(model, task.train, "train")
    score, how = _scorer(task, model)
    curve = _Curve(recorder, score)
    options = _driver_options(task, model, method)
    setup, driver = task.setup, method["driver"]
    if method.get("start") == "em":  # only the optimizer differs from EM's fit
        em.initialize(model.model, model.guide, value, seed=seed)
    if driver == "em":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.ConvergenceWarning)
            result = drivers.fit(
                "em",
                model.model,
                model.guide,
                value,
                tol=setup.tol,
                max_iter=setup.max_iter,
                seed=seed,
                callback=curve,
                **options,
            )
    else:
        guide = (
            svi.score_function(model.guide)
            if method.get("guide") == "score_function"
            else model.guide
        )
        batch_size = min(setup.batch_size, len(task.train[0]))
        result = drivers.fit(
            driver,
            model.model,
            guide,
            value,
            lr=setup.lr,
            batch_size=batch_size,
            num_epochs=setup.epochs,
            seed=seed,
            callback=curve,
            **options,
        )
    with recorder.paused():
        heldout = score()
        recorder.point(heldout)
        row = {"objective": result.objective, "heldout_log_likelihood": heldout}
        row.update(heldout_method=how, iterations=result.num_steps, **_row_extras(task, model))
    return row


def _scorer(task: _Task, model):
    """The held-out score of ``model`` (a function) and how it is computed."""
    held_out = _arguments(model, task.test, "test")
    own = registry.hook(model, "log_likelihood")
    if callable(own):
        return (lambda: own(held_out).mean().item()), "exact"
    k = task.setup.num_samples
    bound = registry.hook(model, "elbo")
    if callable(bound):  # the model's own bound (a diffusion model's: no exact score)
        return (lambda: bound(held_out, k).mean().item()), f"the model's ELBO (K={k})"

    def score():
        return (
            evaluate.log_likelihood(model.model, model.guide, held_out, num_samples=k).mean().item()
        )

    enumerable = evaluate._enumerable(model.model, held_out)
    return score, "exact" if enumerable else f"importance sampling, K={k}"


def _row_extras(task: _Task, model) -> Dict:
    """What a row adds where the model offers it: the clustering accuracy of ``predict``, the
    accuracy of ``classify`` on the held-out labels, and the component locations."""
    x_test, y_test = task.test
    out = {}
    if y_test is not None and registry.hook(model, "predict"):
        out["accuracy"] = evaluate.clustering_accuracy(
            y_test, model.predict(x_test), mapping="majority"
        )
    elif y_test is not None and registry.hook(model, "classify"):
        out["accuracy"] = (model.classify(x_test) == y_test).float().mean().item()
    locs = getattr(model, "locs", None)
    if isinstance(locs, torch.Tensor) and locs.numel() <= 1000:
        out["locs"] = locs.detach().tolist()
    return out


def _reference_run(task: _Task, method: Dict, seed: int, recorder) -> Dict:
    """The model's reference implementation (``reference(seed, tol, max_iter)``), such as
    scikit-learn's GaussianMixture: the row to check the zoo's fits against."""
    model = _model(task, method, seed)
    reference = model.reference(seed, task.setup.tol, task.setup.max_iter)
    x = task.train[0].double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its ConvergenceWarning; iterations are reported
        reference.fit(x)
    x_test, y_test = task.test
    with recorder.paused():
        heldout = float(reference.score(x_test.double().numpy()))
        recorder.point(heldout)
        row = {
            "objective": float(reference.score(x)),
            "heldout_log_likelihood": heldout,
            "heldout_method": "exact",
            "iterations": int(reference.n_iter_),
        }
        if y_test is not None:
            predicted = reference.predict(x_test.double().numpy())
            row["accuracy"] = evaluate.clustering_accuracy(y_test, predicted, mapping="majority")
        if hasattr(reference, "means_"):
            row["locs"] = reference.means_.tolist()
    return row


# --------------------------------------------------------------------------------------- NUTS


def sample_posterior(
    model: str,
    x: torch.Tensor,
    num_components: Optional[int] = None,
    chains: int = 2,
    warmup: int = 150,
    samples: int = 150,
    seed: int = 0,
    recorder: Optional[runner.Recorder] = None,
    progress: bool = False,
    **options,
) -> Dict:
    """NUTS on the Bayesian version of a registered model (its ``bayesian(x)``), by
    ``inference.mcmc.sample_posterior``, which returns the draws, the arviz InferenceData and
    the diagnostics (see there). ``options``: the model's options (``num_components`` too)."""
    spec = registry.get(model)
    if num_components is not None:
        options["num_components"] = num_components
    built = spec.build(spec.complete(options, registry.DataInfo.of(x)))
    return _posterior(built, x, chains, warmup, samples, seed, recorder, progress)[0]


def _posterior(model, x, chains, warmup, samples, seed, recorder, progress):
    """(the posterior of ``inference.mcmc.sample_posterior``, the model's ``bayesian(x)``)."""
    hook = registry.hook(model, "bayesian")
    if hook is None:
        raise ValueError(f"{type(model).__name__} offers no bayesian(x): nothing for NUTS")
    bayes = hook(x)
    posterior = mcmc.sample_posterior(
        bayes["model"],
        bayes["data"],
        chains=chains,
        warmup=warmup,
        samples=samples,
        seed=seed,
        recorder=recorder,
        progress=progress,
        to_draws=bayes.get("to_draws"),
        relabel=bayes.get("relabel"),
        summarize=bayes.get("summarize", ()),
        dims=bayes.get("dims"),
        observed={"x": x.numpy()},
    )
    return posterior, bayes


def _nuts_run(task: _Task, method: Dict, seed: int, recorder) -> Dict:
    (x, _), (x_test, _) = task.train, task.test
    setup = task.setup
    model = _model(task, method, seed)
    posterior, bayes = _posterior(
        model, x, setup.chains, setup.nuts_warmup, setup.nuts_samples, seed, recorder, False
    )
    predictive, relabel = bayes["predictive"], bayes.get("relabel")
    draws = posterior["draws"]  # relabelled, (chains, samples, ...), original scale
    # the curve: the posterior predictive from the draws available at each moment
    with recorder.paused():
        flat = {k: torch.as_tensor(v).flatten(0, 1) for k, v in draws.items()}
        times = posterior["sample_times"]
        for count in np.unique(np.geomspace(1, len(times), 15).astype(int)):
            first = {k: v[:count] for k, v in flat.items()}  # in the order they were drawn
            recorder.point(predictive(first, x_test).mean().item(), elapsed=times[count - 1])
        heldout = predictive(flat, x_test).mean().item()
        train_lppd = predictive(flat, x).mean().item()
        how = f"{relabel.__module__}.{relabel.__name__}" if relabel else "no relabelling"
        details = mcmc.write_posterior(posterior, task.out, seed, how)
    return {
        "objective": train_lppd,
        "heldout_log_likelihood": heldout,
        "heldout_method": "posterior predictive",
        "iterations": posterior["chains"] * (setup.nuts_warmup + setup.nuts_samples),
        "locs": flat["locs"].mean(0).tolist() if "locs" in flat else None,
        "r_hat_max": posterior["r_hat_max"],
        "r_hat_max_before_relabelling": posterior["r_hat_max_raw"],
        "ess_bulk_min": posterior["ess_bulk_min"],
        "relabelled_fraction": posterior["relabelled_fraction"],
        "divergences": posterior["divergences"],
        "notes": (
            f"{posterior['chains']} chains x ({setup.nuts_warmup} warm-up +"
            f" {setup.nuts_samples} draws), {_how_chains_ran(posterior)} (a budget stops before"
            f" a new group of chains); the potential ran {posterior['potential']}; objective ="
            " mean log posterior predictive of the training data"
        ),
        "potential": posterior["potential"],
        "details": details,
    }


def _how_chains_ran(posterior: Dict) -> str:
    if posterior["workers"] == 1:
        return "one after the other"
    return (
        f"{posterior['workers']} at a time in worker processes, whose memory (at most"
        f" {posterior['worker_peak_memory_mib']:.0f} MiB of growth each) the peak-memory column"
        " leaves out"
    )


# ---------------------------------------------------------------------------- gradient variance


def gradient_estimators(model, batch: torch.Tensor, methods: Optional[Dict] = None) -> Dict:
    """One draw of each method's gradient of -bound per data point, at the current parameters,
    on ``batch``: the functions ``evaluate.gradient_variance`` takes. ``methods``: declarations
    as in the module docstring (by default the model's registered ones)."""
    if methods is None:
        spec = next(s for s in map(registry.get, registry.names()) if isinstance(model, s.cls))
        methods = methods_of(spec)
    return {name: _estimator(model, batch, method) for name, method in methods.items()}


def _estimator(model, batch, method: Dict):
    if method["driver"] == "reparam":
        k = method.get("num_particles", 1)
        objective = reparam.Objective(model.model, model.guide, batch, len(batch), k)
        params = list(model.parameters())

        def draw():
            grads = torch.autograd.grad(objective(batch), params, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

        return draw
    if method["driver"] != "svi":
        raise ValueError(f"no gradient estimator for the {method['driver']} driver")
    guide = (
        svi.score_function(model.guide) if method.get("guide") == "score_function" else model.guide
    )
    elbo = svi.make_loss(method.get("loss", "Trace_ELBO"))
    return lambda: [g / len(batch) for g in evaluate.elbo_gradient(elbo, model.model, guide, batch)]


def _with_state(task: _Task, method: Dict, state: Dict):
    """A fresh model of the method's options holding the parameters ``state``, alone in
    Pyro's param store (so that its first run cannot swap in another model's tensors)."""
    model = _model(task, method, 0)
    model.load_state_dict(state)
    return model


def _gradient_variance_section(task: _Task, methods: Dict) -> List[str]:
    """Every method's gradient variance at the same parameters (the model after one epoch of
    Trace_ELBO, seed 0) on the same minibatch of training rows; each method's model built
    with its own options (a module: the zoo's models)."""
    model = _model(task, {}, 0)
    x = _arguments(model, task.train, "train")
    setup = task.setup
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
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    figures = {}
    for name, method in methods.items():
        # the method's own model (its options: all levels, say) with the same parameters
        estimator = _estimator(_with_state(task, method, state), batch, method)
        variance, signal = evaluate.gradient_variance(estimator, setup.gradient_draws)
        figures[name] = {"variance": variance, "squared_norm_of_mean": signal}
    save_json(task.out / "gradient_variance.json", figures)
    base_name = "trace" if "trace" in figures else next(iter(figures))
    base = figures[base_name]["variance"]
    lines = [
        "### Gradient variance at fixed parameters",
        "",
        f"The model after one epoch of Trace_ELBO (seed 0); {setup.gradient_draws} draws of"
        f" each estimator's gradient of -bound per data point on the same {len(batch)} training"
        " rows. Mean variance per parameter coordinate, and the squared norm of the mean"
        " gradient.",
        "",
        f"| estimator | variance per coordinate | vs {base_name} | squared norm of mean |",
        "|---|---|---|---|",
    ]
    for name, f in figures.items():
        ratio = f"{f['variance'] / base:.3g}x" if base else "-"
        lines.append(
            f"| {name} | {f['variance']:.4g} | {ratio} | {f['squared_norm_of_mean']:.4g} |"
        )
    return lines + [""]
