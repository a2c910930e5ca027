"""
The exact E-step of any Pyro model with one enumerable discrete latent per data point.

Given a model such as::

    def model(x):
        weights = pyro.param("weights", ...)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Poisson(rates[z]), obs=x)

the model is run once under Pyro's parallel enumeration, so ``z`` takes all its K values at once
in a dimension left of the plates. Every site inside the data plate then has a log-probability
that broadcasts to (K, N); their sum is log p(x[n], z[n] = k). Sites outside the data plate
(priors written as ``pyro.factor``) form a global term counted once. Nothing here knows which
model it runs.
"""

import math
from typing import Dict, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from pyro.infer.enum import config_enumerate
from pyro.poutine.util import site_is_subsample


class Enumerated:
    """Wraps ``model`` to give ``log_joint(x) -> (log p(x, z=k) (N, K), global log prior)``."""

    def __init__(self, model, guide=None, example=None, data_plate: str = "data"):
        self.model = model
        self.data_plate = data_plate
        self._inspect(guide, example)
        self._enum_model = poutine.enum(
            config_enumerate(model, default="parallel"),
            first_available_dim=-(self.max_plate_nesting + 1),
        )

    def _inspect(self, guide, example):
        trace = poutine.trace(self.model).get_trace(example)
        latents, plates = [], {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    plates[frame.name] = frame.dim
            if site["is_observed"]:
                continue
            latents.append(name)
            fn = site["fn"]
            if not getattr(fn, "has_enumerate_support", False):
                raise ValueError(
                    f"latent site {name!r} ({type(fn).__name__}) is not discrete and enumerable:"
                    " EM needs every latent variable to be enumerable; make continuous unknowns"
                    " pyro.param point estimates, or fit the model with svi.fit"
                )
        if self.data_plate not in plates:
            raise ValueError(
                f"the model has no pyro.plate named {self.data_plate!r} over the data points "
                f"(plates found: {sorted(plates) or 'none'}); name it so, or pass data_plate="
            )
        if len(latents) != 1:
            raise ValueError(
                "EM enumerates exactly one discrete latent per data point; the model has "
                f"{len(latents)}: {latents}"
            )
        site = trace.nodes[latents[0]]
        if not in_plate(site, self.data_plate):
            raise ValueError(f"latent site {latents[0]!r} must be inside the data plate")
        if guide is not None:
            guide_trace = poutine.trace(guide).get_trace(example)
            sampled = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
            if sampled:
                raise ValueError(
                    f"the guide samples {sampled}; EM computes the exact posterior of the discrete"
                    " latent itself, so the guide must be empty (parameters are point estimates)"
                )
        self.latent = latents[0]
        self.num_values = int(site["fn"].enumerate_support(expand=False).shape[0])
        self.max_plate_nesting = max(-dim for dim in plates.values())
        self.data_dim = plates[self.data_plate]
        self.param_names = [n for n, s in trace.nodes.items() if s["type"] == "param"]

    def params(self, example) -> Dict[str, torch.Tensor]:
        """The unconstrained leaf tensor of every parameter the model reads, by name."""
        trace = poutine.trace(self.model, param_only=True).get_trace(example)
        return {n: s["value"].unconstrained() for n, s in trace.nodes.items()}

    def log_joint(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, K) log p(x[n], z[n] = k) from sites in the data plate, and the global log term.

        The (N, K) tensor is always newly allocated here (the latent site and the observed site
        are summed into it), so a caller under ``torch.no_grad`` may overwrite it in place.
        """
        trace = poutine.trace(self._enum_model).get_trace(x)
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        ndim = self.max_plate_nesting + 1  # enumeration dim, then the plates
        data_axis = ndim + self.data_dim
        local, owned = None, False
        global_term = torch.zeros(())
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not in_plate(site, self.data_plate):
                global_term = global_term + site["log_prob"].sum()
                continue
            log_prob = local_log_prob(site, ndim, data_axis)
            if local is None:
                local, owned = log_prob, False
            elif (
                owned
                and not torch.is_grad_enabled()
                and local.shape == broadcast_shape(local.shape, log_prob.shape)
            ):
                local.add_(log_prob)  # our own tensor: no new allocation in the hot loop
            else:
                local, owned = local + log_prob, True
        shape = (self.num_values, local.shape[-1])  # (K, N)
        if not owned or local.shape != shape:
            local = local.expand(shape).clone(memory_format=torch.contiguous_format)
        return local.T, global_term


def in_plate(site, plate: str) -> bool:
    return any(frame.name == plate for frame in site["cond_indep_stack"])


def local_log_prob(site, ndim: int, data_axis: int) -> torch.Tensor:
    """A site's log-probability summed over every dim but the leading one and the data dim.

    ``ndim`` counts the leading dim (enumeration or particles) and the plates; the result has
    shape (L, N) with L the leading size (or 1) and N the data size (or 1).
    """
    log_prob = site["log_prob"]
    if log_prob.dim() > ndim:
        raise ValueError(f"site {site['name']!r} has more batch dims than plates")
    log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    other = [a for a in range(1, ndim) if a != data_axis]
    if other:
        log_prob = log_prob.sum(other, keepdim=True)
    return log_prob.reshape(log_prob.shape[0], log_prob.shape[data_axis])


def posterior_(log_joint: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(x[n]) (N,) and p(z[n] = k | x[n]) (N, K) from log p(x[n], z[n] = k), in place.

    Overwrites ``log_joint`` (call under ``torch.no_grad``, on a tensor you own). One exp per
    entry, as the E-step's hot loop needs. Entries more than ~86 nats below their row's maximum
    are clamped first: exp of them would be subnormal, which is many times slower on x86 CPUs,
    and their posterior (< 1e-37) is zero to float32 precision anyway.
    """
    peak = log_joint.max(-1, keepdim=True).values  # (N, 1)
    shift = peak.nan_to_num(0.0, 0.0, 0.0)  # a row of -inf stays -inf below, not NaN
    floor = math.log(torch.finfo(log_joint.dtype).tiny) + 1.0  # exp(floor) = e * tiny: normal
    post = log_joint.sub_(shift).clamp_(min=floor).exp_()  # (N, K), unnormalized
    norm = post.sum(-1, keepdim=True)  # (N, 1)
    log_px = torch.where(peak == -math.inf, peak, norm.log() + shift).squeeze(-1)  # (N,)
    return log_px, post.div_(norm)


def validation_off():
    """Skip Pyro's argument and support checks in hot loops after a first validated pass."""
    return pyro.validation_enabled(False)
