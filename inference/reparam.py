"""
The reparameterized-ELBO driver: a plain torch training loop for fully reparameterizable guides.

    result = reparam.fit(model, guide, x, num_particles=1, lr=1e-3, batch_size=128)

Every latent site of the guide must have ``rsample``, and every ``pyro.factor`` in the guide
must be declared ``has_rsample=True`` (checked up front; the error names the site), so
gradients flow through z = loc + scale * eps. With ``num_particles=1`` the objective
is Pyro's ``TraceMeanField_ELBO`` (the KL term in closed form where one exists; set
``analytic_kl=False`` for the Monte Carlo estimate); with K > 1 particles it is the
importance-weighted bound of Burda et al. (2016), log (1/K) sum_k p(x, z_k) / q(z_k | x),
vectorized over particles, whose gradient is taken through the log-sum-exp of the weights.

Parameters are collected from the model's and guide's ``pyro.param``/``pyro.module`` sites
and optimized with ``torch.optim``, on the gradient of the whole data set's bound (not per data
point), as Pyro's loop takes it: Adam's ``eps`` then weighs what it weighs there.
Under torch.distributed (``torchrun``), every rank runs on
its slice of each global batch and the gradients are averaged before each step, which gives
the single-process result for the same global batch. The shared loop (``inference.loop``)
supplies the rest.
"""

import functools
from typing import Callable, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from inference import loop
from inference.batching import (
    Rows,
    arguments,
    check_count,
    data_plates,
    same_random_state,
    scale_rows,
)
from inference.compiled import Compiled, CompiledStep, refuse_schedule
from inference.particles import Particles, check_full_terms, iwae_bound
from inference.result import FitResult
from inference.svi import make_loss


def check_reparameterizable(guide, example, model=None) -> None:
    """Raise a ValueError naming the first guide site that cannot be reparameterized, or (given
    the model) the first latent site of the model that the guide does not sample: Pyro would
    draw it from the prior, silently optimizing another objective."""
    args, kwargs = arguments(example)
    trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_sites = ()
    if model is not None:
        model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(*args, **kwargs)
        model_sites = model_trace.nodes
        for name, site in model_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not site_is_subsample(site)
                and name not in trace.nodes
            ):
                raise ValueError(
                    f"model site {name!r} is latent but the guide does not sample it; the"
                    " reparameterized driver needs a guide for every latent variable (a discrete"
                    " one summed out by enumeration calls for em.fit or svi.fit with"
                    " TraceEnum_ELBO)"
                )
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"] and name not in model_sites:
            # a pyro.factor in the guide: Pyro's ELBOs count it in log q and differentiate it
            # as it stands only when it is declared reparameterized
            if not getattr(site["fn"], "has_rsample", False):
                raise ValueError(
                    f"guide factor {name!r} is not declared reparameterized, so the"
                    " reparameterized driver cannot differentiate it; write"
                    f" pyro.factor({name!r}, ..., has_rsample=True) when it comes from"
                    " reparameterized draws, or use svi.fit with TraceGraph_ELBO"
                )
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            if not getattr(site["fn"], "has_rsample", False):
                raise ValueError(
                    f"guide site {name!r} ({type(site['fn']).__name__}) has no rsample, so the"
                    " reparameterized driver cannot differentiate through it; use svi.fit with"
                    " TraceGraph_ELBO or enumerate it with TraceEnum_ELBO"
                )


class Objective:
    """Minus the ELBO (K = 1) or the importance-weighted bound (K > 1) of the whole data set of
    ``num_data`` points, estimated from a minibatch: ``total(*args)``, what the driver
    differentiates (Pyro's ELBOs are on this scale, and Adam's ``eps`` is not scale-free, so
    the steps are Pyro's); ``loss`` and ``__call__``: the same per data point.

    example: a batch of the model's arguments (a tensor, a tuple or a mapping), on which the
        data plates are found unless ``plates`` names them (``()``: the objective is only ever
        called on all ``num_data`` rows, nothing is scaled).
    """

    def __init__(
        self,
        model,
        guide,
        example,
        num_data,
        num_particles=1,
        analytic_kl=True,
        data_plate=None,
        jit=False,
        plates=None,
        batch_dims=None,
        vectorize_particles=None,
    ):
        rows = Rows(example, batch_dims)
        self.num_particles = num_particles
        self.point_mass = None  # a guide site held at a point (K > 1: its particles agree)
        if num_particles == 1:
            if plates is None:
                plates = data_plates(model, guide, example, data_plate, batch_dims)
            elbo = make_loss("TraceMeanField_ELBO" if analytic_kl else "Trace_ELBO")
            # made once, so that a compiled objective traces them once per shape
            scale = _Scale(rows, num_data)
            scaled_model = scale_rows(model, plates, scale)
            scaled_guide = scale_rows(guide, plates, scale)

            def total(*args, **kwargs):
                # what Pyro's Jit ELBOs compile: the surrogate loss, which equals the ELBO in
                # value as well as gradient when every site is reparameterized (checked up
                # front). Pyro's public differentiable_loss adds surrogate - surrogate.item(),
                # which a trace would freeze into a constant: a wrong value, right gradient.
                value = 0.0
                for traces in elbo._get_traces(scaled_model, scaled_guide, args, kwargs):
                    value = value + elbo._differentiable_loss_particle(*traces)[1]
                return value

        else:
            particles = Particles(
                model, guide, example, data_plate, batch_dims, vectorize=vectorize_particles
            )
            check_full_terms(particles, f"the IWAE bound (num_particles={num_particles})")
            self.point_mass = particles.point_mass

            def total(*args, **kwargs):
                value = kwargs if kwargs else args
                log_w, global_term = particles.log_weights(value, num_particles, scaled=True)
                return -(iwae_bound(log_w).mean() * num_data + global_term.mean())

        if jit:
            total = _compiled(total, model, guide, rows, example, jit)
        self.total, self.num_data = total, num_data

    def loss(self, *args, **kwargs) -> torch.Tensor:
        """``total`` per data point of the whole data set."""
        return self.total(*args, **kwargs) / self.num_data

    def __call__(self, x) -> torch.Tensor:
        """x: the model's arguments for a minibatch, a tensor, a tuple or a mapping."""
        args, kwargs = arguments(x)
        return self.loss(*args, **kwargs)


def _compiled(total, model, guide, rows, example, jit):
    """``total`` compiled (torch.jit or a backend of ``inference.compiled``), for a program of
    tensor arguments whose parameters Pyro's param store holds."""
    if rows.kind == "kwargs" or len(rows.dims) != len(arguments(example)[0]):
        raise ValueError(
            "jit compiles a program of tensor arguments: pass the data as a tensor or a"
            " tuple of tensors (no keyword arguments or constants), or leave jit off"
        )
    names = loop.parameter_names(model, guide, *arguments(example)[0])
    store = pyro.get_param_store()
    missing = [name for name in names if name not in store._params]
    if missing:
        raise ValueError(
            f"jit reads parameters from Pyro's param store, which does not hold"
            f" {missing[:3]} (module-local parameters); leave jit off"
        )
    return Compiled(total, names, backend="jit" if jit is True else jit)


class _Scale:
    """``Rows``'s row count for ``scale_rows``, for an objective of ``num_data`` rows."""

    def __init__(self, rows: Rows, num_data: int):
        self.rows, self.num_data = rows, num_data

    def count(self, args, kwargs) -> int:
        return self.rows.count(args, kwargs)


def fit(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_particles: int = 1,
    vectorize_particles: Optional[bool] = None,
    analytic_kl: bool = True,
    jit: Union[bool, str] = False,
    lr: float = 1e-3,
    optimizer: Optional[Callable] = None,
    lr_schedule: Optional[Callable[[int], float]] = None,
    batch_size: Optional[int] = 128,
    batch_dims=None,
    num_epochs: int = 10,
    valid_data=None,
    validate: Optional[Callable[[], float]] = None,
    data_plate: Optional[str] = None,
    **loop_options,
) -> FitResult:
    """Fit by maximizing the reparameterized ELBO or IWAE bound with a torch optimizer.

    Args:
        data, batch_size, batch_dims, data_plate: as in ``svi.fit`` (a tensor, a tuple or a mapping
            of the model's arguments; minibatch scaling found from the program's plates, or refused
            with a reason; None for the whole data every step).
        num_particles: K > 1 gives the IWAE bound, vectorized over a particle plate where the
            program broadcasts (``vectorize_particles=None`` tries it and falls back to one particle
            at a time).
        optimizer: a callable ``params -> torch.optim.Optimizer`` (default ``loop.adam`` with
            ``lr``: torch's Adam, fused where it can be).
        lr_schedule: epoch (0-based) -> factor on the learning rate, e.g. ``loop.exponential_lr(0.1,
            num_epochs)``; exact on resume.
        jit: compile the objective (ELBO or IWAE bound): True or "jit" with torch.jit; "inductor"
            with TorchInductor, which fuses its elementwise operations and, with the default
            optimizer (torch's Adam), records the whole step, the bound, its gradient and the
            update, as one graph (``inference.compiled``: ``Compiled``, ``CompiledStep``; static
            models only: no data-dependent control flow).
        validate: a held-out score to early-stop on instead of the bound on ``valid_data``.

    loop_options go to ``inference.loop.run`` (seed, patience, transform, checkpoint, resume,
    callback, schedule, progress, max_steps).
    """
    check_count("num_particles", num_particles)
    if jit:
        refuse_schedule(loop_options.get("schedule"))
    rows = Rows(data, batch_dims)
    num_data = rows.num_data
    transform = loop_options.get("transform")
    # checked on the first step's rows: a program with a size fixed from outside the data
    # (eight schools' J, a parameter per row) runs on the whole data, not on a few rows
    check = functools.partial(check_reparameterizable, guide, model=model)
    plates, params = loop.prepare(model, guide, rows, batch_size, data_plate, transform, check)
    example = rows.slice(0, batch_size or num_data)
    opt = optimizer(params.tensors()) if optimizer is not None else loop.adam(params.tensors(), lr)
    with same_random_state():
        objective = Objective(
            model, guide, example, num_data, num_particles, analytic_kl, data_plate, jit,
            plates=plates, batch_dims=batch_dims, vectorize_particles=vectorize_particles,
        )  # fmt: skip
    step = _step(objective, opt, params, rows, jit)
    if validate is None and valid_data is not None:
        validate = _validator(
            model, guide, Rows(valid_data, batch_dims), num_particles, analytic_kl, data_plate,
            batch_dims, vectorize_particles,
        )  # fmt: skip

    loop_options["schedule"] = loop.with_lr_schedule(opt, lr_schedule, loop_options.get("schedule"))
    state = {"optimizer": opt, "parameters": params}
    return loop.run_driver(
        step, rows, state, params, plates, batch_size=batch_size, num_epochs=num_epochs,
        validate=validate, **loop_options,
    )  # fmt: skip


def _step(objective, opt, params, rows, jit):
    """One optimizer step on a batch: the compiled whole step where jit="inductor" can record
    it, else the bound's backward, the gradients averaged over torch.distributed ranks, Adam.
    A point-mass guide site with K > 1 particles is refused (K copies of one value)."""
    if objective.point_mass is not None:  # set with K > 1 particles only
        raise ValueError(
            f"num_particles={objective.num_particles}: guide site {objective.point_mass!r} is a"
            " point mass (Delta), so the particles are copies of one value and the"
            " importance-weighted bound is the ELBO at K times the cost; fit with num_particles=1"
        )
    whole = None
    if jit == "inductor" and CompiledStep.refusal(objective.total, opt) is None:
        whole = CompiledStep(objective.total, opt)
    num_data = rows.num_data

    def step(batch):  # -ELBO of the whole data set (as Pyro's loop differentiates it), per point
        if whole is not None:
            return whole(*arguments(batch)[0]).item() / num_data
        opt.zero_grad()
        args, kwargs = arguments(batch)
        loss = objective.total(*args, **kwargs)
        loss.backward()
        loop.average_gradients(params.tensors(), weight=_count(rows, batch))
        opt.step()
        return loss.item() / num_data

    return step


def _validator(model, guide, valid, num_particles, analytic_kl, data_plate, batch_dims, vectorize):
    """The bound per data point on the validation rows, in chunks of 1024 (for early stopping
    and the learning curve)."""
    with same_random_state():
        evaluator = Objective(
            model,
            guide,
            valid.slice(0, 2),
            valid.num_data,
            num_particles,
            analytic_kl,
            data_plate,
            plates=None if valid.num_data > 1024 else (),
            batch_dims=batch_dims,
            vectorize_particles=vectorize,
        )

    @torch.no_grad()
    def validate():
        total = 0.0
        for i in range(0, valid.num_data, 1024):
            chunk = valid.slice(i, i + 1024)
            total -= evaluator(chunk).item() * _count(valid, chunk)
        return total / valid.num_data

    return validate


def _count(rows: Rows, value) -> int:
    args, kwargs = arguments(value)
    return rows.count(args, kwargs)
