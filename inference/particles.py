"""
Importance weights log p(x[n], z) - log q(z | x[n]) for every data point and K particles at once.

The guide is run inside a ``pyro.plate`` of K particles left of the model's plates (or K times,
one particle at a time, for a program that does not broadcast over them), the model is
replayed against its samples, and every site's log-probability is reduced to (K, N) as in
``inference.enumeration``; a ``pyro.factor`` in the guide counts in log q, as Pyro's ELBOs
count it. This is what the importance-weighted bound (IWAE) and the
importance-sampled log-likelihood need; neither knows which model it runs.
"""

import math
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from inference.batching import arguments, data_plates, run_program, same_random_state
from inference.enumeration import in_plate, local_log_prob


class GlobalLatents(ValueError):
    """The guide samples a latent variable outside the data plate: no per-point weights."""

    def __init__(self, message: str, site: str, plate: str):
        super().__init__(message)
        self.site, self.plate = site, plate


class Uncovered(ValueError):
    """A latent site of the model that the guide does not sample (``enumerated``: marked for
    parallel enumeration, as TraceEnum_ELBO sums it out)."""

    def __init__(self, message: str, site: str, enumerated: bool):
        super().__init__(message)
        self.site, self.enumerated = site, enumerated


def _local_latents(guide_trace, data_plate) -> list:
    """The guide's latent sites, each inside the data plate (a global one is refused)."""
    latents = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
            continue
        if not in_plate(site, data_plate):
            raise GlobalLatents(
                f"guide site {name!r} is outside the data plate {data_plate!r}: per-data-point"
                " importance weights need every latent variable to be local to a data point."
                " A model with global latent variables (a Bayesian model under an"
                " AutoGuide) is scored by its whole-data ELBO (svi.elbo_per_datum) and the"
                " posterior of its globals (evaluate.posterior_summary); a per-point"
                " log-likelihood needs a guide whose latent variables are local",
                name,
                data_plate,
            )
        latents.append(name)
    return latents


class Particles:
    """Per-data-point log importance weights of ``guide`` as a proposal for ``model``.

    The K particles are vectorized (a plate left of the model's) where the program broadcasts
    over them, and drawn one at a time otherwise: ``vectorize=None`` tries the first on the
    example and falls back (``self.vectorized`` says which; ``self.why_sequential`` why).
    """

    def __init__(
        self,
        model,
        guide,
        example,
        data_plate=None,
        batch_dims=None,
        vectorize=None,
        whole=False,
    ):
        """example: the model's arguments for a few data points (a tensor, tuple or mapping);
        ``whole``: all the data points it will be called on (``batching.find_data_plates``)."""
        self.model, self.guide = model, guide
        with same_random_state():
            plates = data_plates(
                model, guide, example, data_plate, batch_dims, per_point=True, whole=whole
            )
            model_trace, guide_trace = run_program(model, guide, example)
        check_covers(model_trace, guide_trace)
        if len(plates) > 1:
            raise ValueError(
                f"plates {list(plates)} all follow the rows: per-data-point weights need one"
                " data plate; name it with data_plate="
            )
        self.data_plate = data_plate = plates[0]
        dims = []
        for trace in (guide_trace, model_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    dims += [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
        self.max_plate_nesting = max(dims, default=0)
        self._read_frames(model_trace, data_plate)
        self.latents = _local_latents(guide_trace, data_plate)
        # the first latent site the guide holds at a point (a Delta): every draw the same value
        self.point_mass = next(
            (n for n in self.latents if is_delta(guide_trace.nodes[n]["fn"])), None
        )
        self._try_vectorized(example, vectorize)

    def _read_frames(self, model_trace, data_plate) -> None:
        """The data plate's dimension, and the other plates that subsample their own terms."""
        frames = {
            f.name: f
            for site in model_trace.nodes.values()
            if site["type"] == "sample"
            for f in site["cond_indep_stack"]
        }
        frame = frames[data_plate]
        if frame.dim is None:
            raise ValueError(
                f"pyro.plate({data_plate!r}) is sequential (a for loop): per-data-point weights"
                " need it vectorized (with pyro.plate(...) as a context)"
            )
        if frame.full_size is not None and frame.full_size != frame.size:
            raise ValueError(
                f"pyro.plate({data_plate!r}) subsamples {frame.size} of its {frame.full_size}"
                " rows itself: per-data-point weights need every row; pass the rows to score"
                " and drop subsample_size"
            )
        self.data_dim = frame.dim
        # plates other than the data plate that draw a subsample of their terms themselves (a
        # diffusion model's levels): their sites keep the full_size / size factor, unbiased
        # for the ELBO; an importance-sampled log p(x) cannot use them (see ``check_full_terms``)
        self.subsampled = sorted(
            {
                f"{f.name} ({f.size} of {f.full_size})"
                for f in frames.values()
                if f.name != data_plate and f.full_size is not None and f.full_size != f.size
            }
        )

    def _try_vectorized(self, example, vectorize) -> None:
        """Whether the K particles run as a plate (``vectorized``), and why not where not."""
        self.vectorized, self.why_sequential = True, None
        if vectorize is False:
            self.vectorized, self.why_sequential = False, "vectorize=False"
        elif vectorize is None:
            try:
                with same_random_state(), torch.no_grad():
                    log_w, global_term = self._weights(example, 2, False)
                if log_w.shape[0] != 2 or global_term.shape != (2,):
                    raise ValueError(f"weights of shape {tuple(log_w.shape)} for 2 particles")
            except Exception as error:  # the program does not broadcast over particles
                self.vectorized = False
                self.why_sequential = f"{type(error).__name__}: {error}"

    def log_weights(
        self, x, num_particles: int, scaled: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, N) log weights and the (K,) global model terms (priors outside the data plate).

        scaled: keep Pyro's ``poutine.scale`` factors (a beta on the KL); False gives the
        weights of the unscaled model, as a log-likelihood estimate needs. The factor of a plate
        that subsamples its own terms is kept either way: it is part of the estimator.
        """
        if self.vectorized:
            return self._weights(x, num_particles, scaled)
        draws = [self._weights(x, None, scaled) for _ in range(num_particles)]
        return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])

    def _weights(self, x, num_particles: Optional[int], scaled: bool):
        """One run of guide and model, with ``num_particles`` in a plate (None: one draw)."""
        dim = -(self.max_plate_nesting + 1)

        def vectorized(fn):
            if num_particles is None:
                return fn

            def run(*args, **kwargs):
                with pyro.plate("_particles", num_particles, dim=dim):
                    return fn(*args, **kwargs)

            return run

        args, kwargs = arguments(x)
        guide_trace = poutine.trace(vectorized(self.guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(vectorized(self.model), trace=guide_trace)
        ).get_trace(*args, **kwargs)
        ndim = self.max_plate_nesting + 1
        data_axis = ndim + self.data_dim
        device = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)).device
        k = 1 if num_particles is None else num_particles
        local, global_term = 0.0, torch.zeros(k, device=device)
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
            for site in trace.nodes.values():
                # every sample site of both traces, the guide's observed ones too: a
                # pyro.factor in the guide is part of log q, as in Pyro's ELBOs
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                site = dict(site, log_prob=_log_prob(site, scaled))
                if in_plate(site, self.data_plate):
                    local = local + sign * local_log_prob(site, ndim, data_axis)
                else:
                    lp = site["log_prob"]
                    lp = lp.reshape((1,) * (ndim - lp.dim()) + tuple(lp.shape))
                    global_term = global_term + sign * lp.reshape(lp.shape[0], -1).sum(-1)
        return local.expand(k, -1), global_term  # (K, N), (K,)


def is_delta(fn) -> bool:
    """Whether ``fn`` is a point mass (a Delta, possibly made Independent or masked)."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def check_covers(model_trace, guide_trace) -> None:
    """Raise a ValueError naming the first latent site of the model that the guide does not
    sample: replayed, Pyro would draw it from the prior, and the weights (and the ELBO, as Pyro's
    Trace_ELBO would compute it) would count its prior density once too often."""
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if name not in guide_trace.nodes:
            enumerated = site["infer"].get("enumerate") == "parallel"
            raise Uncovered(
                f"model site {name!r} is latent but the guide does not sample it: importance"
                " weights, the ELBO and the chain's proposals need a guide for every latent"
                " variable"
                + (
                    f"; {name!r} is marked for enumeration: its exact log p(x) (and the"
                    " enumerated ELBO) are computed where every latent variable is discrete and"
                    " the guide samples none, and svi.elbo_per_datum with TraceEnum_ELBO gives"
                    " the ELBO otherwise"
                    if enumerated
                    else " (a mixture's discrete latent is summed out exactly when it is the only"
                    " one)"
                ),
                name,
                enumerated,
            )


def _log_prob(site, scaled: bool) -> torch.Tensor:
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value)
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    if scaled and site["scale"] is not None:
        log_prob = log_prob * site["scale"]
    elif not scaled:  # only the factors of plates that subsample their own terms
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                log_prob = log_prob * (frame.full_size / frame.size)
    return log_prob


def check_full_terms(particles: "Particles", what: str) -> None:
    """Refuse an estimate that needs every term of the joint density (an importance-sampled
    log p(x), an IWAE bound) on a program whose plates subsample their terms."""
    if particles.subsampled:
        raise ValueError(
            f"{what} needs every term of log p(x, z), and plate(s)"
            f" {', '.join(particles.subsampled)} draw a subsample of theirs: the exponent of"
            " an unbiased estimate is not unbiased."
            " Score such a model by its ELBO (inference.evaluate.elbo, or the model's own"
            " bound), or give the plate no subsample_size"
        )


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w[k, n] per data point, (K, N) -> (N,)."""
    return log_weights.logsumexp(0) - math.log(log_weights.shape[0])
