"""
The exact E-step of any Pyro model whose latent variables are discrete, enumerable and local to
a data point: one per point (mixtures, the fast path below) or several (a Markov chain of states
under ``pyro.markov``, as in an HMM; see ``Enumerated``).

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
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from pyro.infer.enum import config_enumerate
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import site_is_subsample

from inference.batching import arguments, data_plates, same_random_state


class Enumerated:
    """The exact posterior of a model's discrete latents, by Pyro's parallel enumeration.

    One discrete latent per data point (mixtures): ``log_joint(x) -> (log p(x, z=k) (N, K),
    global log prior)``, the fast path. Several discrete latents per data point, such as a
    Markov chain of states under ``pyro.markov`` (an HMM): the log-factors of the enumerated
    trace are contracted by variable elimination (``pyro.ops.contract``, as TraceEnum_ELBO
    does; forward-backward for a chain) to log p(x[n]), and the posterior weight of every entry
    of every factor is the gradient of log p(x) with respect to it. Either way ``posterior(x)``
    gives log p(x[n]) and those weights, and ``expected(x, weights)`` the expected
    complete-data log-likelihood, differentiable in the parameters (EM's Q).
    """

    def __init__(self, model, guide=None, example=None, data_plate: Optional[str] = None):
        self.model = model
        dense = example.to_dense() if _is_sparse(example) else example
        with same_random_state():
            plates = data_plates(model, None, dense, data_plate, per_point=True)
        if len(plates) > 1:
            raise ValueError(
                f"plates {list(plates)} all follow the data points: EM needs one data plate;"
                " name it with data_plate="
            )
        self.data_plate = plates[0]
        self._inspect(guide, example)
        self._enum_model = poutine.enum(
            config_enumerate(model, default="parallel"),
            first_available_dim=-(self.max_plate_nesting + 1),
        )

    def _inspect(self, guide, example):
        with same_random_state():
            trace = poutine.trace(self.model).get_trace(*arguments(example)[0])
        latents, plates = [], {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    plates[frame.name] = frame.dim
                elif frame.name == self.data_plate:
                    raise ValueError(
                        f"pyro.plate({self.data_plate!r}) is sequential (a for loop over data"
                        " points): EM needs it vectorized, `with pyro.plate(...)`"
                    )
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
            if not in_plate(site, self.data_plate):
                raise ValueError(
                    f"latent site {name!r} must be inside the data plate"
                    f" {self.data_plate!r}: EM needs every discrete latent local to a data point"
                )
        if not latents:
            raise ValueError("the model has no latent variable: fit it by svi.fit (MAP) instead")
        if guide is not None:
            with same_random_state():
                guide_trace = poutine.trace(guide).get_trace(*arguments(example)[0])
            sampled = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
            if sampled:
                raise ValueError(
                    f"the guide samples {sampled}; EM computes the exact posterior of the discrete"
                    " latent itself, so the guide must be empty (parameters are point estimates)"
                )
        self.latents = latents
        self.single = len(latents) == 1
        self.latent = latents[0]
        site = trace.nodes[latents[0]]
        self.num_values = (
            int(site["fn"].enumerate_support(expand=False).shape[0]) if self.single else None
        )
        self.max_plate_nesting = max(-dim for dim in plates.values())
        self.data_dim = plates[self.data_plate]
        self.param_names = [n for n, s in trace.nodes.items() if s["type"] == "param"]

    def params(self, example) -> Dict[str, torch.Tensor]:
        """The unconstrained leaf tensor of every parameter the model reads, by name (and
        those of an ``nn.Module`` owning the model that no param site reports)."""
        from inference.loop import Parameters

        return Parameters(self.model, None, example).leaves

    # ---------------------------------------------------------------- both structures
    def posterior(self, x):
        """log p(x[n]) (n,), the posterior weights (an (n, K) tensor for one latent, a dict of
        per-factor weights otherwise) and the global log term (priors outside the data plate)."""
        if self.single:
            local, glob = self.log_joint(x)  # (n, K), ()
            log_px, resp = posterior_(local)
            return log_px, resp, glob
        factors, glob, sum_dims, target, symbol_to_dim = self._factors(x)
        with torch.enable_grad():
            leaves = OrderedDict()
            tree = OrderedDict()
            for ordinal, terms in factors.items():
                for name, log_prob in terms:
                    leaf = log_prob.detach().requires_grad_()
                    leaf._pyro_dims = log_prob._pyro_dims
                    leaves[name] = leaf
                    tree.setdefault(ordinal, []).append(leaf)
            log_px = contract_to_tensor(tree, sum_dims, target_ordinal=target)
            log_px = packed.unpack(log_px, symbol_to_dim)
            log_px = log_px.reshape(-1) if log_px.dim() else log_px.reshape(1)  # (n,)
            grads = torch.autograd.grad(log_px.sum(), list(leaves.values()))
        weights = {name: g.detach() for name, g in zip(leaves, grads)}
        return log_px.detach(), weights, glob

    def expected(self, x, weights):
        """sum_n E_posterior[log p(x[n], z[n])] under ``weights`` (from ``posterior``), and the
        global log term; both differentiable in the parameters."""
        if self.single:
            local, glob = self.log_joint(x)
            zero = torch.zeros_like(local)
            return torch.where(weights > 0, weights * local, zero).sum(), glob
        factors, glob, _, _, _ = self._factors(x)
        total = 0.0
        for terms in factors.values():
            for name, log_prob in terms:
                w = weights[name]
                total = total + torch.where(w > 0, w * log_prob, torch.zeros_like(w)).sum()
        return total, glob

    def log_px(self, x) -> torch.Tensor:
        """log p(x[n]) per data point, (n,)."""
        return self.posterior(x)[0]

    def _factors(self, x):
        """The packed log-factors of the enumerated trace inside the data plate, by ordinal;
        the global term; the enumerated symbols; the data plate's ordinal; symbol -> dim."""
        trace = poutine.trace(self._enum_model).get_trace(*arguments(x)[0])
        trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
        trace.pack_tensors()
        sum_dims, factors = set(), OrderedDict()
        global_term = torch.zeros(())
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None:
                sum_dims.add(site["infer"]["_enumerate_symbol"])
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            log_prob = site["packed"]["log_prob"]
            if not in_plate(site, self.data_plate):
                global_term = global_term + site["log_prob"].sum()
                continue
            ordinal = frozenset(
                trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            factors.setdefault(ordinal, []).append((name, log_prob))
        target = frozenset({trace.plate_to_symbol[self.data_plate]})
        return factors, global_term, sum_dims, target, trace.symbol_to_dim

    # ---------------------------------------------------------------- one latent
    def log_joint(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, K) log p(x[n], z[n] = k) from sites in the data plate, and the global log term.

        The (N, K) tensor is always newly allocated here (the latent site and the observed site
        are summed into it), so a caller under ``torch.no_grad`` may overwrite it in place.
        """
        if not self.single:
            raise ValueError(f"log_joint is for one discrete latent; the model has {self.latents}")
        args, kwargs = arguments(x)
        trace = poutine.trace(self._enum_model).get_trace(*args, **kwargs)
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


def _is_sparse(x) -> bool:
    return isinstance(x, torch.Tensor) and x.layout != torch.strided


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
