"""
Importance weights log p(x[n], z) - log q(z | x[n]) for every data point and K particles at once.

The guide is run inside a ``pyro.plate`` of K particles left of the model's plates, the model is
replayed against its samples, and every site's log-probability is reduced to (K, N) as in
``inference.enumeration``. This is what the importance-weighted bound (IWAE) and the
importance-sampled log-likelihood need; neither knows which model it runs.
"""

import math
from typing import Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from inference.enumeration import in_plate, local_log_prob


class Particles:
    """Per-data-point log importance weights of ``guide`` as a proposal for ``model``."""

    def __init__(self, model, guide, example, data_plate: str = "data"):
        """example: the model's arguments for a few data points (a tensor or a tuple)."""
        self.model, self.guide, self.data_plate = model, guide, data_plate
        example = as_args(example)
        guide_trace = poutine.trace(guide).get_trace(*example)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*example)
        dims = []
        for trace in (guide_trace, model_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    dims += [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
        self.max_plate_nesting = max(dims, default=0)
        plates = {
            f.name: f.dim
            for site in model_trace.nodes.values()
            if site["type"] == "sample"
            for f in site["cond_indep_stack"]
        }
        if data_plate not in plates:
            raise ValueError(f"the model has no pyro.plate named {data_plate!r} over the data")
        self.data_dim = plates[data_plate]
        self.latents = []
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
                continue
            if not in_plate(site, data_plate):
                raise ValueError(
                    f"guide site {name!r} is outside the data plate: per-data-point importance"
                    " weights need every latent variable to be local to a data point"
                )
            self.latents.append(name)

    def log_weights(
        self, x, num_particles: int, scaled: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, N) log weights and the (K,) global model terms (priors outside the data plate).

        scaled: keep Pyro's ``poutine.scale`` factors (a beta on the KL); False gives the
        weights of the unscaled model, as a log-likelihood estimate needs.
        """
        dim = -(self.max_plate_nesting + 1)

        def vectorized(fn):
            def run(*args, **kwargs):
                with pyro.plate("_particles", num_particles, dim=dim):
                    return fn(*args, **kwargs)

            return run

        args = as_args(x)
        guide_trace = poutine.trace(vectorized(self.guide)).get_trace(*args)
        model_trace = poutine.trace(
            poutine.replay(vectorized(self.model), trace=guide_trace)
        ).get_trace(*args)
        ndim = self.max_plate_nesting + 1
        data_axis = ndim + self.data_dim
        local, global_term = 0.0, torch.zeros(num_particles, device=args[0].device)
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if sign < 0 and site["is_observed"]:
                    continue
                site = dict(site, log_prob=_log_prob(site, scaled))
                if in_plate(site, self.data_plate):
                    local = local + sign * local_log_prob(site, ndim, data_axis)
                else:
                    lp = site["log_prob"]
                    lp = lp.reshape((1,) * (ndim - lp.dim()) + tuple(lp.shape))
                    global_term = global_term + sign * lp.reshape(lp.shape[0], -1).sum(-1)
        return local.expand(num_particles, -1), global_term  # (K, N), (K,)


def _log_prob(site, scaled: bool) -> torch.Tensor:
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value)
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    if scaled and site["scale"] is not None:
        log_prob = log_prob * site["scale"]
    return log_prob


def as_args(data) -> tuple:
    """A model's positional arguments: a tensor stands for (tensor,)."""
    return (data,) if isinstance(data, torch.Tensor) else tuple(data)


def rows(data, start: int, stop: int):
    """The same rows of a tensor or of every tensor in a tuple (None stays None)."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    return tuple(None if t is None else t[start:stop] for t in data)


def num_rows(data) -> int:
    return len(as_args(data)[0])


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w[k, n] per data point, (K, N) -> (N,)."""
    return log_weights.logsumexp(0) - math.log(log_weights.shape[0])
