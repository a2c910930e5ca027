"""
Metrics shared by every model, all in nats per data point where they are densities.

- ``log_likelihood(model, guide, x, num_samples=K)``: log p(x[n]) per data point, exact by
  enumeration for mixtures, importance-sampled with the guide as proposal otherwise.
- ``clustering_accuracy``: accuracy after the best one-to-one matching of clusters to labels
  (Hungarian algorithm), or after mapping each cluster to its majority label.
- ``nmi`` (arithmetic normalization, as scikit-learn's default) and ``ari``.
- ``bic`` and ``aic`` from a total log-likelihood and a number of free parameters.
- ``gradient_variance`` of a stochastic gradient estimator at fixed parameters, with
  ``elbo_gradient`` for one draw of any Pyro ELBO's gradient.
- ``latent_usage(model, guide, x)``: per latent site of the guide, its units, the active ones
  (Burda et al. 2016: Var_x E_q[z_u | x] > 0.01) and its KL term in nats per data point; and
  how much the reconstructions E[x | z ~ q(z | x)] vary across the data (posterior collapse
  makes them one image).
"""

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from inference.batching import (
    Rows,
    arguments,
    check_count,
    check_support,
    runs_on,
    same_random_state,
)
from inference.enumeration import Enumerated, validation_off
from inference.particles import Particles, check_full_terms


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Optional[Callable],
    x,
    *,
    num_samples: int = 1000,
    batch_size: int = 500,
    particle_batch: int = 100,
    data_plate: Optional[str] = None,
    batch_dims=None,
    vectorize_particles: Optional[bool] = None,
    progress: bool = False,
) -> torch.Tensor:
    """log p(x[n]) in nats, shape (N,). ``progress``: a bar over chunks and particle batches.

    Exact when the model's only latent variable is discrete and enumerable (mixtures);
    otherwise an importance-sampled estimate with the guide as proposal,
    log (1/K) sum_k p(x, z_k) / q(z_k | x) with K = ``num_samples``, computed in chunks of
    ``particle_batch`` particles and ``batch_size`` data points so that K = 5000 on 10,000
    MNIST images fits in memory. The estimate is a stochastic lower bound in expectation that
    tightens as K grows. x: a tensor, a tuple or a mapping of the model's arguments (as the
    drivers take them); particles are vectorized where the program broadcasts over them, one
    at a time otherwise (``inference.particles``).
    """
    rows = _rows(x, batch_dims)
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        check_count(name, value)
    check_count("particle_batch", particle_batch)
    n = rows.num_data
    example, whole = probe_rows(rows, batch_size)
    exact = _explained(lambda: _enumerable(model, example), rows, batch_size, model, guide, whole)
    if exact:
        if rows.kind != "tensor":
            raise ValueError("exact log-likelihoods by enumeration take the data as one tensor")
        enum = Enumerated(model, guide, example, data_plate)
        # enumeration runs with validation off: data outside the support are named here
        check_support(model, None, rows.slice(0, batch_size))
        with validation_off():
            return torch.cat(
                [enum.log_px(rows.slice(i, i + batch_size)) for i in range(0, n, batch_size)]
            )
    if guide is None:
        raise ValueError(
            "the model has continuous latent variables: importance sampling needs a guide"
        )
    particles = _particles(
        rows, batch_size, model, guide, example, data_plate, batch_dims, vectorize_particles, whole
    )
    check_support(model, guide, rows.slice(0, batch_size))
    check_full_terms(particles, "an importance-sampled log p(x)")
    steps = math.ceil(n / batch_size) * math.ceil(num_samples / particle_batch)
    bar = tqdm(total=steps, disable=not progress, desc=f"log p(x), K={num_samples}", leave=False)
    with bar:
        log_sum, _ = importance_sums(particles, rows, num_samples, batch_size, particle_batch, bar)
    return log_sum - math.log(num_samples)


def probe_rows(rows: Rows, batch_size: int):
    """The rows a score's set-up runs the program on, and whether they are all the rows it
    will be called on: every row where they fit in one chunk of ``batch_size`` (a program
    with an argument of one entry per row that is not a tensor then scores as it fits), else
    the first four."""
    if rows.num_data <= batch_size:
        return rows.data, True
    return rows.slice(0, 4), False


def _explained(probe: Callable, rows: Rows, batch_size: int, model, guide, whole: bool):
    """``probe()``, a set-up run on the ``probe_rows`` example; where the program fails on a
    chunk but runs on all rows, a ValueError that says so and names ``batch_size``."""
    try:
        return probe()
    except Exception as error:
        if whole or not runs_on(model, guide, rows.data):
            raise
        raise ValueError(
            f"the model and guide fail on a chunk of 4 rows ({type(error).__name__}:"
            f" {str(error).splitlines()[0]}) but run on all {rows.num_data}: a score runs the"
            f" program on chunks of batch_size={batch_size} rows, and something in it is sized"
            " for all of them (an argument with an entry per row that is not a tensor, a size"
            f" fixed from outside). Pass batch_size={rows.num_data} to score every row in one"
            " chunk, or make the program follow the rows it is given"
        ) from error


def _particles(rows, batch_size, model, guide, example, data_plate, batch_dims, vectorize, whole):
    """``Particles`` on the ``probe_rows`` example, failures ``_explained``."""
    return _explained(
        lambda: Particles(model, guide, example, data_plate, batch_dims, vectorize, whole=whole),
        rows,
        batch_size,
        model,
        guide,
        whole,
    )


def importance_sums(particles, rows, num_samples, batch_size=500, particle_batch=100, bar=None):
    """log sum_k w_k and log sum_k w_k^2 per data point, (N,) each, over ``num_samples``
    importance weights of ``particles`` drawn ``particle_batch`` at a time, ``batch_size``
    rows at a time (the second gives an estimate's standard error, ``inference.uses``)."""
    first, second = [], []
    for i in range(0, rows.num_data, batch_size):
        chunk = rows.slice(i, i + batch_size)
        lse1 = lse2 = None
        for k in range(0, num_samples, particle_batch):
            log_w, _ = particles.log_weights(chunk, min(particle_batch, num_samples - k))
            a, b = log_w.logsumexp(0), (2 * log_w).logsumexp(0)
            lse1 = a if lse1 is None else torch.logaddexp(lse1, a)
            lse2 = b if lse2 is None else torch.logaddexp(lse2, b)
            if bar is not None:
                bar.update(1)
        first.append(lse1)
        second.append(lse2)
    return torch.cat(first), torch.cat(second)


@torch.no_grad()
def elbo(
    model,
    guide,
    x,
    *,
    num_samples: int = 1,
    batch_size: int = 500,
    data_plate: Optional[str] = None,
    batch_dims=None,
) -> torch.Tensor:
    """The ELBO per data point, E_q[log p(x, z) - log q(z | x)], from ``num_samples`` draws of
    the guide, shape (N,). Pyro's ``poutine.scale`` factors (a beta on the KL) are left out:
    this is the bound on log p(x) of the unscaled model. x: a tensor, or the tuple (or
    mapping) of the model's arguments (data, condition, ...). A model whose latent variables
    are all discrete and enumerable, with a guide that samples none of them (they are summed
    out, as TraceEnum_ELBO sums them), has the exact log p(x) as its ELBO; a program that
    leaves a latent site to the prior is refused (``particles.check_covers``)."""
    rows = _rows(x, batch_dims)
    check_count("num_samples", num_samples)
    example, whole = probe_rows(rows, batch_size)
    if _enumerable(model, example) and not samples_latents(guide, example):
        # every latent variable summed out, none drawn: the ELBO (TraceEnum_ELBO's) is log p(x)
        return log_likelihood(
            model, guide, x, batch_size=batch_size, data_plate=data_plate, batch_dims=batch_dims
        )
    particles = _particles(
        rows, batch_size, model, guide, example, data_plate, batch_dims, None, whole
    )
    return torch.cat(
        [
            particles.log_weights(rows.slice(i, i + batch_size), num_samples)[0].mean(0)
            for i in range(0, rows.num_data, batch_size)
        ]
    )


@torch.no_grad()
def latent_usage(
    model: Callable,
    guide: Callable,
    x,
    *,
    site: str = "x",
    threshold: float = 0.01,
    data_plate: Optional[str] = None,
) -> dict:
    """How a fitted model uses its latent variables on the rows ``x`` (a few hundred to a few
    thousand: one draw per row), for any model/guide pair with local latents:

    - ``sites``: for each latent site of the guide, ``units`` (its entries per data point),
      ``active`` (those whose guide mean varies across the rows, Var_n E_q[z_u | x_n] >
      ``threshold``; a site whose distribution has no mean is left out) and ``kl``, the
      one-draw estimate of E_q[log q(z | .) - log p(z | .)] in nats per data point;
    - ``reconstruction_spread``: the variance across rows of E[x | z] at the observed ``site``
      (z drawn from the guide), over the data's own variance, averaged over the features: 1
      when the reconstructions vary as the data do, 0 when the decoder gives every input the
      same image (None when the site has no mean or the data do not vary).
    """
    rows = _rows(x, None)
    if not samples_latents(guide, rows.slice(0, 4)):
        raise ValueError(
            "the guide samples no latent variable (they are summed out or point estimates):"
            " latent usage applies to latent sites a guide samples"
        )
    particles = Particles(model, guide, rows.slice(0, 4), data_plate, vectorize=False)
    plate, n = particles.data_plate, rows.num_data
    args, kwargs = arguments(x)
    with validation_off():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    sites = {}
    for name in particles.latents:
        q, p = guide_trace.nodes[name], model_trace.nodes.get(name)
        entry = {"units": None, "active": None, "kl": None}
        value = q["value"]
        event = len(q["fn"].event_shape)
        axis = _plate_axis(q, plate, value.dim() - event)
        if axis is None:
            continue
        entry["units"] = int(value.numel() // value.shape[axis])
        try:
            mean = q["fn"].mean.expand(value.shape)
        except (NotImplementedError, RuntimeError):
            mean = None
        if mean is not None and mean.is_floating_point():
            per_row = mean.movedim(axis, 0).reshape(n, -1)
            entry["active"] = int((per_row.var(0) > threshold).sum())
        if p is not None and not site_is_subsample(p):
            log_q, log_p = (row_log_prob(s, value, lambda f: f.name == plate) for s in (q, p))
            if log_q is not None and log_p is not None:
                entry["kl"] = (log_q - log_p).mean().item()
        sites[name] = entry
    spread = None
    observed = model_trace.nodes.get(site)
    if observed is not None and observed["is_observed"]:
        try:
            recon = observed["fn"].mean
        except NotImplementedError:
            recon = None
        data = observed["value"]
        if recon is not None and recon.shape[-data.dim() :] == data.shape:
            recon = recon.reshape(-1, *data.shape)[0]
            own = data.reshape(n, -1).var(0).mean()
            if own > 0:
                spread = (recon.reshape(n, -1).var(0).mean() / own).item()
    return {"sites": sites, "reconstruction_spread": spread, "threshold": threshold}


@torch.no_grad()
def posterior_summary(
    guide: Callable,
    x,
    *,
    num_samples: int = 1000,
    plates: Sequence[str] = (),
    max_entries: int = 20,
) -> dict:
    """The guide's approximate posterior of its global latent sites (outside ``plates``, the
    data plates), from ``num_samples`` draws: per site its shape and, for a site of at most
    ``max_entries`` entries, entry by entry the mean, standard deviation and 5 %, 50 % and 95 %
    quantiles (a larger site gives its shape only, and keeps no draws). An AutoGuide's
    auxiliary site is left out; its model sites (Pyro records them in the guide's trace) are
    summarized. x: the model's arguments, as the drivers take them."""
    check_count("num_samples", num_samples)
    args, kwargs = arguments(x)
    summary, draws = {}, {}
    with same_random_state(), validation_off():  # the caller's draws stay its own
        for _ in range(num_samples):
            trace = poutine.trace(guide).get_trace(*args, **kwargs)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                    continue
                if site["infer"].get("is_auxiliary"):
                    continue
                if any(frame.name in plates for frame in site["cond_indep_stack"]):
                    continue
                value = site["value"].detach()
                summary.setdefault(name, {"shape": list(value.shape)})
                if value.numel() <= max_entries:
                    draws.setdefault(name, []).append(value.double().cpu().reshape(-1))
    for name, values in draws.items():
        flat = torch.stack(values)  # (S, entries)
        quantiles = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95]).double(), dim=0)
        summary[name].update(
            num_samples=len(values),
            mean=flat.mean(0).tolist(),
            sd=flat.std(0).tolist(),
            q05=quantiles[0].tolist(),
            median=quantiles[1].tolist(),
            q95=quantiles[2].tolist(),
        )
    return summary


def _plate_axis(site, plate: str, ndim: int) -> Optional[int]:
    """Where the ``plate``'s rows lie among ``ndim`` batch dims of a site."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate and frame.dim is not None and ndim + frame.dim >= 0:
            return ndim + frame.dim
    return None


def row_log_prob(site, value, in_rows: Callable) -> Optional[torch.Tensor]:
    """A site's log-density of ``value`` (its mask applied) summed to one number per row of
    the first vectorized plate that ``in_rows(frame)`` accepts, (N,); None outside it."""
    log_prob = site["fn"].log_prob(value)
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and in_rows(frame) and log_prob.dim() + frame.dim >= 0:
            axis = log_prob.dim() + frame.dim
            return log_prob.movedim(axis, 0).reshape(log_prob.shape[axis], -1).sum(-1)
    return None


def _rows(x, batch_dims) -> Rows:
    try:
        return Rows(x, batch_dims)
    except (TypeError, ValueError) as error:
        raise ValueError(f"x: {error}") from error


def samples_latents(guide, example) -> bool:
    """Whether the guide samples any latent variable on the model's arguments ``example`` (an
    empty guide, or None, samples none)."""
    if guide is None:
        return False
    args, kwargs = arguments(example)
    with same_random_state(), validation_off():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return any(
        s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
        for s in trace.nodes.values()
    )


def exact_by_enumeration(model, x, batch_dims=None) -> bool:
    """Whether ``log_likelihood`` computes log p(x) exactly, by enumeration (every latent site
    of the model discrete and enumerable), rather than by importance sampling."""
    return _enumerable(model, probe_rows(_rows(x, batch_dims), 500)[0])


def _enumerable(model, example) -> bool:
    """Whether every latent site of the model is discrete with enumerable support."""
    args, kwargs = arguments(example)
    with same_random_state():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    latents = [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    return bool(latents) and all(getattr(s["fn"], "has_enumerate_support", False) for s in latents)


def _contingency(labels_true, labels_pred) -> np.ndarray:
    a = np.asarray(torch.as_tensor(labels_true).cpu()).ravel()
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("no labels")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table  # (classes, clusters)


def clustering_accuracy(labels_true, labels_pred, mapping: str = "hungarian") -> float:
    """Fraction of points whose cluster maps to their label.

    mapping="hungarian": the best one-to-one matching of clusters to labels (clusters beyond
    the number of labels count as errors); "majority": every cluster maps to its most common
    label, the usual score when there are more clusters than labels.
    """
    table = _contingency(labels_true, labels_pred)  # (labels, clusters)
    if mapping == "majority":
        return float(table.max(0).sum() / table.sum())
    if mapping != "hungarian":
        raise ValueError(f"mapping must be 'hungarian' or 'majority', not {mapping!r}")
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def _entropy(counts) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalized mutual information, I(a; b) / mean(H(a), H(b))."""
    table = _contingency(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    h_a, h_b = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_a == 0 and h_b == 0:
        return 1.0
    outer = np.outer(table.sum(1), table.sum(0))
    nz = table > 0
    mutual = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return mutual / max((h_a + h_b) / 2, 1e-300)


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert and Arabie 1985)."""
    table = _contingency(labels_true, labels_pred).astype(np.float64)

    def pairs(v):
        return (v * (v - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(np.array([table.sum()]))
    expected = rows * cols / total if total > 0 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def bic(total_log_likelihood: float, num_parameters: int, num_data: int) -> float:
    """Bayesian information criterion, -2 log L + p log N (lower is better)."""
    return -2.0 * total_log_likelihood + num_parameters * math.log(num_data)


def aic(total_log_likelihood: float, num_parameters: int) -> float:
    """Akaike information criterion, -2 log L + 2 p (lower is better)."""
    return -2.0 * total_log_likelihood + 2.0 * num_parameters


def gradient_variance(gradient: Callable[[], Sequence[torch.Tensor]], num_draws: int = 100):
    """Variance of a stochastic gradient estimator at fixed parameters.

    ``gradient()`` returns one draw of the gradient (a list of tensors, e.g. from
    ``elbo_gradient``). Returns ``(mean variance per coordinate, squared norm of the mean)``
    over ``num_draws`` draws: the first is what makes an estimator noisy, the second puts it on
    the scale of the signal.
    """
    if num_draws < 2:
        raise ValueError(f"need at least 2 draws to estimate a variance, got {num_draws}")
    draws = torch.stack(
        [torch.cat([g.reshape(-1) for g in gradient()]).double() for _ in range(num_draws)]
    )  # (draws, P)
    return draws.var(0).mean().item(), draws.mean(0).pow(2).sum().item()


def elbo_gradient(elbo, model, guide, *args) -> List[torch.Tensor]:
    """One draw of the gradient of ``elbo``'s loss with respect to every parameter the model
    and guide read (Pyro's ``loss_and_grads``, so score-function terms are included)."""
    from inference.loop import parameters

    params = parameters(model, guide, *args)
    for p in params:
        p.grad = None
    elbo.loss_and_grads(model, guide, *args)
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
