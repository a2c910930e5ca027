"""
What a fitted generative model is for, for any Pyro model/guide pair: scores, completion and
denoising, all from the posterior given what is seen::

    s = uses.scores(model, guide, x, num_samples=1000)          # log p(x[n]) and its std. error
    c = uses.complete(model, guide, x, observed, num_samples=1000)  # E[x_missing | x_observed]
    d = uses.denoise(model, guide, noisy, flip=0.1)             # E[x_clean | noisy], bit flips
    d = uses.denoise(model, guide, noisy, noise_scale=0.3)      # additive Gaussian noise

Each works on the model's observed site (``site="x"``), whose distribution must be
``Independent`` over the features of a data point (``dist.Bernoulli(...).to_event(1)``) or
elementwise inside a plate over them. The posterior over the latent variables given what is
seen is

- exact, by Pyro's parallel enumeration, when the model's one latent variable is discrete
  (mixtures; ``exact=True`` in the result): the K values with weights p(z = k | seen);
- importance-sampled otherwise: ``num_samples`` draws of the guide, each weighted by
  p(seen, z) / q(z | x), where the guide reads x with its missing entries filled by their
  observed column means (any proposal is valid; a closer one needs fewer draws).

What is "seen" is the model's own likelihood, changed at the observed site only:

- completion masks the unobserved entries out of it (Pyro's ``.mask`` on the per-feature
  distribution, so no second copy of the likelihood is written), and the prediction of each
  missing entry is the posterior average of its likelihood mean;
- denoising replaces it by the likelihood of the noisy data, p(noisy | z) = sum_clean
  p(clean | z) p(noisy | clean): a Bernoulli with probability pi (1 - r) + (1 - pi) r under bit
  flips at rate r, a Normal with variance sigma^2 + s^2 under added N(0, s^2) noise; the
  prediction is the posterior average of E[clean | noisy, z], Bayes' rule per entry.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from inference.batching import (
    Rows,
    arguments,
    check_count,
    check_support,
    run_program,
    same_random_state,
)
from inference.enumeration import Enumerated, validation_off
from inference.evaluate import (
    _enumerable,
    _rows,
    importance_sums,
    log_likelihood,
    probe_rows,
    row_log_prob,
)
from inference.particles import Particles, check_covers, check_full_terms, is_delta


@dataclass
class Scores:
    """log p(x[n]) per data point (N,), its standard error (zeros where it is exact) and how
    it was computed."""

    log_prob: torch.Tensor
    std_error: torch.Tensor
    exact: bool
    num_samples: Optional[int]
    point_mass: Optional[str] = None  # a Delta guide site: log p(x, z = v), not log p(x)


@dataclass
class Prediction:
    """The posterior prediction of a completion or a denoising, (N, D): ``mean`` is the
    posterior mean of every entry (the data where an entry is observed, for a completion);
    ``log_evidence`` (N,) is log p(what is seen), exact or importance-sampled; ``ess`` (N,)
    the effective number of weighted draws (the K values, where exact)."""

    mean: torch.Tensor
    log_evidence: torch.Tensor
    ess: torch.Tensor
    exact: bool
    num_samples: Optional[int]


@torch.no_grad()
def scores(
    model: Callable,
    guide: Optional[Callable],
    x,
    *,
    num_samples: int = 1000,
    batch_size: int = 500,
    particle_batch: int = 100,
    data_plate: Optional[str] = None,
) -> Scores:
    """log p(x[n]) for each data point: exact by enumeration for a discrete latent, else the
    importance-sampled estimate log (1/K) sum_k w_k with the guide as proposal, and its
    standard error by the delta method, sqrt(Var(w) / K) / mean(w) (read with care when the
    weights are heavy-tailed: the error of an error). A guide with a point-mass (Delta) site
    gives log p(x, z = v) at its point v, not an estimate of log p(x): a lower bound on it
    when the site is discrete (a VQ-VAE's codes), not even that for a continuous one;
    ``point_mass`` names the site."""
    rows = _rows(x, None)
    check_count("num_samples", num_samples)
    example, whole = probe_rows(rows, batch_size)
    if _enumerable(model, example):  # the exact log p(x), as evaluate computes it
        log_px = log_likelihood(model, guide, x, batch_size=batch_size, data_plate=data_plate)
        return Scores(log_px, torch.zeros_like(log_px), True, None)
    if guide is None:
        raise ValueError(
            "the model has continuous latent variables: importance sampling needs a guide"
        )
    particles = Particles(model, guide, example, data_plate, whole=whole)
    check_full_terms(particles, "an importance-sampled log p(x)")
    check_support(model, guide, rows.slice(0, batch_size))
    point_mass = particles.point_mass
    lse1, lse2 = importance_sums(particles, rows, num_samples, batch_size, particle_batch)
    log_mean = lse1 - math.log(num_samples)
    # mean(w^2) / mean(w)^2 - 1 = Var(w) / mean(w)^2, computed in log space
    ratio = torch.exp(lse2 - math.log(num_samples) - 2 * log_mean)
    errors = ((ratio - 1).clamp_min(0) / num_samples).sqrt()
    return Scores(log_mean, errors, False, num_samples, point_mass)


@torch.no_grad()
def complete(
    model: Callable,
    guide: Optional[Callable],
    x: torch.Tensor,
    observed: torch.Tensor,
    *,
    site: str = "x",
    num_samples: int = 1000,
    batch_size: int = 500,
    data_plate: Optional[str] = None,
    method: str = "importance",
    num_steps: int = 1000,
    burn_in: Optional[int] = None,
    fill: Optional[torch.Tensor] = None,
    rounds: int = 3,
    condition: tuple = (),
    proposal: str = "guide",
) -> Prediction:
    """The posterior mean of every missing entry of ``x`` (N, D) given its observed ones.

    observed: a boolean tensor, (N, D) or (D,) for the same entries in every row, True where
        the entry is seen. The values of ``x`` at unobserved entries are never read (NaN is
        fine). A row with nothing observed is refused (that is sampling, not completion).
    method: "importance" (``num_samples`` weighted draws of the guide, or exact enumeration),
        or "chain": Metropolis-within-Gibbs (Mattei and Frellsen 2018), exact in the limit of
        ``num_steps``: z is moved by an independence Metropolis-Hastings step proposing from
        the guide on the current completion, then the missing entries are drawn from
        p(x_missing | z); the prediction averages the likelihood's mean after ``burn_in``
        steps (default a fifth). ``ess`` then holds each row's acceptance rate.
    fill: what the guide reads at the missing entries, (N, D) (only there): any values give
        a valid proposal, closer ones a better one (a few rounds of a model's reconstructions,
        say). Default: each column's observed mean, rounded for binary data.
    rounds: importance sampling only: the guide reads the completion of the previous round
        at the missing entries (the first reads ``fill``), so that its proposal moves towards
        the posterior given the seen entries; each round is a valid estimate, the last is
        returned. A median effective sample size below 5 % of the draws is warned about.
    condition: the model's further positional arguments after ``x``, held fixed: a
        conditional model's labels or condition, (N, ...) tensors sliced by row with ``x``
        (other values are passed whole). The model and guide are called as
        ``model(x, *condition)``.
    proposal: importance sampling only: "guide" (the guide reads the filled rows), or
        "prior": the latents drawn from the model itself (its observed sites left out), so
        that each weight is the likelihood of the seen entries alone; right where little is
        seen (a conditional model whose condition carries the information, such as a CVAE
        given a quadrant: the weights are then all equal), poor where much is.
    """
    x, observed = _check_completion(x, observed)
    condition = _check_condition(condition, len(x))
    if method not in ("importance", "chain"):
        raise ValueError(f"method must be 'importance' or 'chain', not {method!r}")
    guide = _proposal(model, guide, proposal, method)
    filled = _filled(x, observed, fill)
    if method == "chain":
        check_count("num_steps", num_steps)
        burn_in = num_steps // 5 if burn_in is None else burn_in
        if not 0 <= burn_in < num_steps:
            raise ValueError(f"burn_in must be in [0, num_steps), got {burn_in}")
        mean, rate = _gibbs_chain(
            model, guide, x, observed, filled, site, num_steps, burn_in, condition
        )
        nan = torch.full((len(x),), math.nan, dtype=x.dtype, device=x.device)
        return Prediction(torch.where(observed, x, mean), nan, rate, False, num_steps)

    def transform(fn, rows):
        return _per_feature(fn, site).mask(observed[rows]).to_event(_event_dims(fn))

    def predict(fns, rows, value):
        return _mean(fns, site)

    check_count("rounds", rounds)
    for _ in range(rounds):
        mean, log_ev, ess, exact = _posterior_average(
            model, guide, filled, site, transform, predict, num_samples, batch_size, data_plate,
            condition,
        )  # fmt: skip
        if exact:
            break
        filled = torch.where(observed, x, mean.to(x))
    if not exact:
        _warn_if_degenerate(ess, num_samples)
    return Prediction(
        torch.where(observed, x, mean), log_ev, ess, exact, None if exact else num_samples
    )


def _filled(x, observed, fill):
    """``x`` with its hidden entries filled: by ``fill``, else by the mean of each feature's
    seen entries (rounded for binary data, which stay binary)."""
    seen = torch.where(observed, x, torch.zeros_like(x))
    counts = observed.sum(0)
    fill_mean = torch.where(counts > 0, seen.sum(0) / counts.clamp_min(1), torch.zeros_like(x[0]))
    binary = bool(((seen == 0) | (seen == 1)).all())
    if fill is None:
        fill = fill_mean.round() if binary else fill_mean
    elif not isinstance(fill, torch.Tensor) or fill.shape != x.shape:
        raise ValueError(f"fill must be a tensor of the data's shape {tuple(x.shape)}")
    return torch.where(observed, x, fill.to(x).expand_as(x))


@torch.no_grad()
def denoise(
    model: Callable,
    guide: Optional[Callable],
    noisy: torch.Tensor,
    *,
    flip: Optional[float] = None,
    noise_scale: Optional[float] = None,
    site: str = "x",
    num_samples: int = 1000,
    batch_size: int = 500,
    data_plate: Optional[str] = None,
    condition: tuple = (),
) -> Prediction:
    """The posterior mean of the clean data given ``noisy`` (N, D) under a stated noise model:
    ``flip``, each binary entry flipped independently with that probability (a Bernoulli
    likelihood), or ``noise_scale``, N(0, s^2) added to each entry (a Normal likelihood).
    ``condition``: the model's further arguments after the data, as for ``complete``."""
    if (flip is None) == (noise_scale is None):
        raise ValueError(
            "give one noise model: flip=RATE (binary data) or noise_scale=S (continuous)"
        )
    if flip is not None and not 0 <= flip < 0.5:
        raise ValueError(f"flip must be a probability in [0, 0.5), got {flip!r}")
    if noise_scale is not None and not (noise_scale > 0 and math.isfinite(noise_scale)):
        raise ValueError(f"noise_scale must be a positive finite number, got {noise_scale!r}")
    noisy = _check_rows_2d(noisy, "noisy")
    if flip is not None and not ((noisy == 0) | (noisy == 1)).all():
        raise ValueError(
            "flip= is a noise model of binary data, and noisy holds values other than 0 and 1;"
            " for continuous data use noise_scale="
        )
    condition = _check_condition(condition, len(noisy))

    def transform(fn, rows):
        base = _per_feature(fn, site)
        if flip is not None:
            if not isinstance(base, dist.Bernoulli):
                raise ValueError(
                    f"flip= is a noise model of binary data; site {site!r} is {type(base).__name__}"
                )
            return dist.Bernoulli(probs=base.probs * (1 - flip) + (1 - base.probs) * flip).to_event(
                _event_dims(fn)
            )
        if not isinstance(base, dist.Normal):
            raise ValueError(
                f"noise_scale= is a noise model of continuous data; site {site!r} is"
                f" {type(base).__name__}"
            )
        scale = (base.scale**2 + noise_scale**2).sqrt()
        return dist.Normal(base.loc, scale).to_event(_event_dims(fn))

    def predict(fns, rows, value):
        return _clean_mean(_per_feature(fns, site), value, flip, noise_scale)

    mean, log_ev, ess, exact = _posterior_average(
        model, guide, noisy, site, transform, predict, num_samples, batch_size, data_plate,
        condition,
    )  # fmt: skip
    if not exact:
        _warn_if_degenerate(ess, num_samples)
    return Prediction(mean, log_ev, ess, exact, None if exact else num_samples)


def _clean_mean(base, value, flip, noise_scale):
    """E[clean | noisy, z] per entry: Bayes' rule for bit flips; for Gaussian noise the
    precision-weighted mean of the model's loc and the noisy value."""
    if flip is not None:  # p(clean = 1 | noisy, z)
        p = base.probs
        keep, turn = p.new_tensor(1 - flip), p.new_tensor(flip)  # in p's dtype
        like1 = torch.where(value.bool(), keep, turn)
        like0 = torch.where(value.bool(), turn, keep)
        return p * like1 / (p * like1 + (1 - p) * like0)
    var, s2 = base.scale**2, noise_scale**2
    return (base.loc * s2 + value * var) / (var + s2)


def roc_auc(normal_scores: torch.Tensor, anomalous_scores: torch.Tensor) -> float:
    """The area under the ROC curve of telling anomalies (higher score) from normal data: the
    probability that a random anomaly scores above a random normal point, ties counting half
    (the Mann-Whitney statistic)."""
    a = torch.as_tensor(normal_scores, dtype=torch.float64).flatten()
    b = torch.as_tensor(anomalous_scores, dtype=torch.float64).flatten()
    if not len(a) or not len(b):
        raise ValueError("roc_auc needs at least one normal and one anomalous score")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("roc_auc: the scores must be finite")
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    if len(values) < len(both):  # average the ranks of ties
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    u = ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


# ---------------------------------------------------------------------------------- machinery


class _Swap(Messenger):
    """Replaces the distribution of the observed ``site`` by ``transform(fn, rows)`` and keeps
    the original (its means are read afterwards)."""

    def __init__(self, site: str, transform):
        super().__init__()
        self.site, self.transform, self.start, self.seen = site, transform, 0, []

    def _pyro_sample(self, msg):
        if msg["name"] != self.site:
            return
        if not msg["is_observed"]:
            raise ValueError(
                f"site {self.site!r} is latent in the model: name the observed data site with site="
            )
        fn = msg["fn"]
        shape = _per_feature(fn, self.site).batch_shape
        rows = slice(self.start, self.start + (shape[-2] if len(shape) >= 2 else 1))
        self.seen.append(fn)
        msg["fn"] = self.transform(fn, rows)


def _proposal(model, guide, proposal: str, method: str):
    """The program the importance weights draw the latents from: the guide, or the model's
    prior (the model with its observed sites hidden: log q is then the log prior)."""
    if proposal == "guide":
        return guide
    if proposal != "prior":
        raise ValueError(f"proposal must be 'guide' or 'prior', not {proposal!r}")
    if method != "importance":
        raise ValueError("proposal='prior' is for importance sampling; the chain uses the guide")
    return poutine.block(model, hide_fn=lambda msg: msg["is_observed"])


def _posterior_average(
    model, guide, value, site, transform, predict, num_samples, batch_size, data_plate,
    condition=(),
):  # fmt: skip
    """sum_k w_k predict(fn_k) / sum_k w_k per data point, the draws (or enumerated values)
    weighted by p(seen, z_k) / q(z_k), with the seen data's likelihood ``transform``ed; the
    model called as ``model(value, *condition)``."""
    check_count("num_samples", num_samples)
    swap = _Swap(site, transform)

    def swapped(*args, **kwargs):
        with swap:
            return model(*args, **kwargs)

    rows = Rows((value, *condition)) if condition else Rows(value)
    example, whole = probe_rows(rows, batch_size)
    _check_site(model, example, site)
    exact = _enumerable(model, example)
    if exact:
        enum = Enumerated(swapped, None, example, data_plate)
        if not enum.single:
            raise ValueError(
                f"exact completion is for one discrete latent; the model has {enum.latents}:"
                " give a guide"
            )
    elif guide is None:
        raise ValueError(
            "the model has continuous latent variables: importance sampling needs a guide"
        )
    else:
        particles = Particles(swapped, guide, example, data_plate, whole=whole)
        check_full_terms(particles, "a posterior given part of the data")
        site_name = particles.point_mass
        if site_name is not None:
            raise ValueError(
                f"guide site {site_name!r} is a point mass (Delta): every draw is the same value,"
                " so importance weights cannot weigh one value against another, and the"
                " answer would be that one value's prediction, not the posterior's. Use a"
                " guide that spreads over the latent values (or an exact enumeration)"
            )
    means, evidence, sizes = [], [], []
    for i in range(0, len(value), batch_size):
        chunk = rows.slice(i, i + batch_size)
        values = value[i : i + batch_size]
        swap.start, swap.seen = i, []
        with validation_off():  # the filled entries need not lie in the support
            if exact:
                log_w, global_term = enum.log_joint(chunk)  # (N, K)
                log_w = log_w.T + global_term  # (K, N)
            else:
                log_w, _ = particles.log_weights(chunk, num_samples)
        k, n, d = log_w.shape[0], len(values), value.shape[1]
        if len(swap.seen) == 1:  # enumerated, or particles vectorized: one run holds all K
            predictions = predict(_broadcast(swap.seen[0], (k, n, d), site), None, values)
        else:  # one particle per run
            runs = [predict(_broadcast(f, (1, n, d), site), None, values) for f in swap.seen[-k:]]
            predictions = torch.cat([p.expand(1, n, d) for p in runs])
        predictions = predictions.expand(k, n, d)
        w = log_w.softmax(0)  # (K, N)
        means.append((w.unsqueeze(-1) * predictions).sum(0))
        evidence.append(log_w.logsumexp(0) - (0.0 if exact else math.log(k)))
        sizes.append(1 / w.pow(2).sum(0))
    return torch.cat(means), torch.cat(evidence), torch.cat(sizes), exact


class DegenerateWeights(UserWarning):
    """Importance weights concentrated on a few draws: the estimate rests on them."""


def _warn_if_degenerate(ess: torch.Tensor, num_samples: int) -> None:
    median = ess.median().item()
    if median < 0.05 * num_samples:
        warnings.warn(
            f"the importance weights are degenerate: median effective sample size {median:.1f}"
            f" of {num_samples} draws, so the prediction rests on a handful of them. More draws,"
            " more rounds, a closer fill, or method='chain' (exact in the limit) would help",
            DegenerateWeights,
            stacklevel=3,
        )


def _gibbs_chain(model, guide, x, observed, filled, site, num_steps, burn_in, condition=()):
    """Metropolis-within-Gibbs over (z, x_missing); the Rao-Blackwellized mean of the missing
    entries after ``burn_in`` steps, and each row's acceptance rate."""
    if guide is None:
        raise ValueError("the chain proposes z from the guide: give one")
    few = Rows((filled, *condition)).slice(0, 2)
    if _point_mass(guide, few) is not None:
        raise ValueError("the chain's proposals come from the guide, which is a point mass here")
    with validation_off(), same_random_state():  # a probe: the draws stay the caller's
        check_covers(*run_program(model, guide, few, validate=False))
    swap = _Swap(site, lambda fn, rows: fn)

    def run(value, fixed=None):
        """Per-row log p(value, z) - log q(z | value), z drawn (or ``fixed``), the values of
        z, the likelihood at the observed site."""
        g = guide if fixed is None else poutine.condition(guide, data=fixed)
        swap.start, swap.seen = 0, []
        with validation_off():
            guide_trace = poutine.trace(g).get_trace(value, *condition)
            # the state's values enter the model as they enter the guide: conditioned on
            if fixed is None:
                given = poutine.replay(model, trace=guide_trace)
            else:
                given = poutine.condition(model, data=fixed)
            with swap:
                model_trace = poutine.trace(given).get_trace(value, *condition)
        log_w = torch.zeros(len(value), dtype=value.dtype, device=value.device)
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for name, s in trace.nodes.items():
                if s["type"] == "sample" and not site_is_subsample(s):
                    log_w = log_w + sign * _per_row(s, name, len(value))
        latents = {
            n: s["value"]
            for n, s in guide_trace.nodes.items()
            if s["type"] == "sample"
            and not site_is_subsample(s)
            and (not s["is_observed"] or (fixed and n in fixed))
        }
        return log_w, latents, _per_feature(swap.seen[-1], site)

    current = filled.clone()
    log_w, z, fn = run(current)
    total = torch.zeros_like(x)
    accepted = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for step in range(num_steps):
        log_w_new, z_new, fn_new = run(current)  # a proposal from the guide on the completion
        log_w_old, _, fn_old = run(current, fixed=z)  # the state, under the same completion
        take = torch.rand(len(x), dtype=x.dtype, device=x.device).log() < log_w_new - log_w_old
        z = {n: _select_rows(take, z_new[n], z[n]) for n in z}
        draw = torch.where(take[:, None], fn_new.sample(), fn_old.sample())
        current = torch.where(observed, x, draw.reshape(x.shape))
        accepted += take.to(x.dtype)
        if step >= burn_in:
            total += torch.where(take[:, None], fn_new.mean, fn_old.mean).reshape(x.shape)
    return total / (num_steps - burn_in), accepted / num_steps


def _per_row(site, name, num_rows) -> torch.Tensor:
    """A site's log-probability summed to one number per row of the data plate, (N,)."""
    per_row = row_log_prob(site, site["value"], lambda frame: frame.size == num_rows)
    if per_row is None:
        raise ValueError(
            f"site {name!r} is outside the data plate: the chain needs every latent variable"
            " local to a row"
        )
    return per_row


def _select_rows(take, new, old) -> torch.Tensor:
    """``new`` where ``take`` (N,) else ``old``, the rows along the leading dim."""
    if new.dim() == 0 or new.shape[0] != len(take):
        raise ValueError(
            f"a latent value of shape {tuple(new.shape)}: the chain needs the rows of the data"
            " plate as the leading dim of every latent site"
        )
    return torch.where(take.reshape(-1, *([1] * (new.dim() - 1))), new, old)


def _point_mass(guide, example) -> Optional[str]:
    """The first latent site of the guide that is a Delta, or None."""
    with validation_off(), same_random_state():  # a probe: the draws stay the caller's
        trace = poutine.trace(guide).get_trace(
            *((example,) if torch.is_tensor(example) else example)
        )
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and is_delta(site["fn"]):
            return name
    return None


def _per_feature(fn, site):
    """The distribution of each feature: the base of an Independent (or of a distribution that
    says it is one: ``base_dist`` and ``reinterpreted_batch_ndims``), or ``fn`` itself."""
    if isinstance(fn, dist.Independent) or hasattr(fn, "reinterpreted_batch_ndims"):
        if fn.reinterpreted_batch_ndims != 1:
            raise ValueError(
                f"site {site!r}: an Independent over one feature dim is supported, not"
                f" {fn.reinterpreted_batch_ndims}"
            )
        return fn.base_dist
    if fn.event_shape == ():
        return fn
    raise ValueError(
        f"site {site!r} is a {type(fn).__name__} with event shape {tuple(fn.event_shape)}:"
        " completion and denoising need a distribution that factorizes over the features"
        " (Independent, .to_event(1))"
    )


def _event_dims(fn) -> int:
    return getattr(fn, "reinterpreted_batch_ndims", 0)


def _mean(fn, site) -> torch.Tensor:
    return _per_feature(fn, site).mean


def _broadcast(fn, shape, site):
    """``fn`` with the batch shape of (K draws, N rows, D features) that the caller reads."""
    base = _per_feature(fn, site)
    if base.batch_shape == shape:
        return base
    try:
        return base.expand(torch.broadcast_shapes(base.batch_shape, shape))
    except RuntimeError as error:
        raise ValueError(
            f"the observed site's distribution has batch shape {tuple(base.batch_shape)}, which"
            f" does not broadcast to (draws, rows, features) = {shape}"
        ) from error


def _check_site(model, example, site):
    args, kwargs = arguments(example)
    with validation_off(), same_random_state():  # a probe: the draws stay the caller's
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    if site not in trace.nodes:
        names = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]
        raise ValueError(f"the model has no site {site!r}; its observed sites: {names}")
    _per_feature(trace.nodes[site]["fn"], site)


def _check_condition(condition, num_rows) -> tuple:
    """``condition`` as a tuple, each tensor in it with the data's ``num_rows`` rows."""
    if isinstance(condition, torch.Tensor) or not isinstance(condition, (tuple, list)):
        raise TypeError(
            "condition is a tuple of the model's further arguments (condition=(y,)), not"
            f" {type(condition).__name__}"
        )
    for i, value in enumerate(condition):
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or len(value) != num_rows):
            raise ValueError(
                f"condition[{i}] has shape {tuple(value.shape)}: it needs the data's {num_rows}"
                " rows along dim 0"
            )
    return tuple(condition)


def _check_rows_2d(x, name):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of shape (N, D), got {type(x).__name__}"
        )
    if x.dim() != 2 or not len(x):
        raise ValueError(f"{name} must have shape (N, D) with N >= 1, got {tuple(x.shape)}")
    return x


def _check_completion(x, observed):
    x = _check_rows_2d(x, "x")
    if not isinstance(observed, torch.Tensor) or observed.dtype != torch.bool:
        raise TypeError(
            f"observed must be a boolean tensor (True where an entry is seen), got"
            f" {getattr(observed, 'dtype', type(observed).__name__)}"
        )
    if observed.shape not in (x.shape, x.shape[1:]):
        raise ValueError(
            f"observed must have shape {tuple(x.shape)} or ({x.shape[1]},), got"
            f" {tuple(observed.shape)}"
        )
    observed = observed.to(x.device).expand_as(x)
    empty = torch.nonzero(~observed.any(1)).flatten()
    if len(empty):
        raise ValueError(
            f"rows {empty[:5].tolist()} have no observed entry: there is nothing to complete from"
            " (draw from the model instead)"
        )
    bad = ~torch.isfinite(x) & observed
    if bad.any():
        raise ValueError(f"x has {int(bad.sum())} non-finite observed entries")
    return x, observed
