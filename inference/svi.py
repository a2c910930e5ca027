"""
Stochastic variational inference for any Pyro model/guide pair, with Pyro's ELBO family.

    result = svi.fit(model, guide, x, loss="TraceMeanField_ELBO", lr=1e-3, batch_size=128,
                     num_epochs=10, valid_data=x_valid)

The data are what the model is called with (a tensor, a tuple of arguments or a mapping of
keyword arguments). Minibatches are scaled by N / batch_size inside the plates whose size
follows the rows, found from the program itself (``inference.batching``), so the objective is
unbiased for the whole data set and global latent variables are counted once; a program that
cannot be minibatched is refused with an error naming the plate or site. The shared loop
(``inference.loop``) supplies epochs, validation, early stopping, checkpoints and resume,
signal handling and the NaN guard; this file only defines one SVI step.

``loss`` names one of Trace_ELBO, TraceMeanField_ELBO, TraceEnum_ELBO, TraceGraph_ELBO and
their Jit forms (or is an ELBO object, or a loss function as Pyro's ``SVI`` takes one);
``JitTraceMeanField_ELBO`` is used with a fix: pyro-ppl 1.9.2 looks for its
compiled function under the wrong attribute name and traces the model again on every step.
"""

import functools
import math
from typing import Callable, Optional, Union

import pyro
import pyro.infer
import pyro.optim
import torch
from pyro.infer import SVI
from pyro.poutine.messenger import Messenger

from inference import compiled, loop
from inference.batching import (
    Rows,
    arguments,
    call,
    check_count,
    find_data_plates,
    probe_sizes,
    same_random_state,
    scale_rows,
)
from inference.result import FitResult


class _JitTraceMeanField_ELBO(pyro.infer.JitTraceMeanField_ELBO):
    """Compile once: upstream checks ``_loss_and_surrogate_loss`` but stores
    ``_differentiable_loss``, so it re-traces every step (4.6x slower than needed)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if getattr(self, "_differentiable_loss", None) is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        kwargs["_pyro_model_id"], kwargs["_pyro_guide_id"] = id(model), id(guide)
        return self._differentiable_loss(*args, **kwargs)


LOSSES = {
    "Trace_ELBO": pyro.infer.Trace_ELBO,
    "TraceMeanField_ELBO": pyro.infer.TraceMeanField_ELBO,
    "TraceEnum_ELBO": pyro.infer.TraceEnum_ELBO,
    "TraceGraph_ELBO": pyro.infer.TraceGraph_ELBO,
    "JitTrace_ELBO": pyro.infer.JitTrace_ELBO,
    "JitTraceMeanField_ELBO": _JitTraceMeanField_ELBO,
    "JitTraceEnum_ELBO": pyro.infer.JitTraceEnum_ELBO,
    "JitTraceGraph_ELBO": pyro.infer.JitTraceGraph_ELBO,
}


class _OptimState:
    """Gives a Pyro optimizer the state_dict interface the loop checkpoints."""

    def __init__(self, optim: pyro.optim.PyroOptim):
        self.optim = optim

    def state_dict(self):
        return self.optim.get_state()

    def load_state_dict(self, state):
        self.optim.set_state(state)


def make_loss(
    loss: Union[str, pyro.infer.ELBO],
    num_particles: int = 1,
    max_plate_nesting: Optional[int] = None,
    vectorize_particles: Optional[bool] = None,
) -> pyro.infer.ELBO:
    """Pyro's ELBO named ``loss``; particles vectorized by default when there are several.

    An ELBO object or a loss function (``loss(model, guide, *args, **kwargs) -> tensor``, as
    Pyro's ``SVI`` takes one) is returned as it is; the options then belong to it, and setting
    them here is refused rather than ignored."""
    if not isinstance(loss, str):
        given = {
            "num_particles": num_particles if num_particles != 1 else None,
            "max_plate_nesting": max_plate_nesting,
            "vectorize_particles": vectorize_particles,
        }
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise ValueError(
                f"{', '.join(named)} go with a loss named by a string; the loss given,"
                f" {getattr(loss, '__name__', type(loss).__name__)}, carries its own (e.g."
                " pyro.infer.Trace_ELBO(num_particles=...)): set them there"
            )
        if not callable(loss):
            raise TypeError(
                f"loss must name one of {', '.join(LOSSES)}, or be a Pyro ELBO or a function"
                f" loss(model, guide, *args, **kwargs), not {type(loss).__name__}"
            )
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    check_count("num_particles", num_particles)
    vectorize = num_particles > 1 if vectorize_particles is None else bool(vectorize_particles)
    options = {"num_particles": num_particles, "vectorize_particles": vectorize}
    if max_plate_nesting is not None:
        options["max_plate_nesting"] = max_plate_nesting
    if loss.startswith("Jit"):
        options["ignore_jit_warnings"] = True
    return LOSSES[loss](**options)


def fit(
    model: Callable,
    guide: Callable,
    data,
    *,
    loss: Union[str, pyro.infer.ELBO] = "Trace_ELBO",
    optim: Optional[pyro.optim.PyroOptim] = None,
    lr: float = 1e-3,
    lr_schedule: Optional[Callable[[int], float]] = None,
    num_particles: int = 1,
    vectorize_particles: Optional[bool] = None,
    max_plate_nesting: Optional[int] = None,
    batch_size: Optional[int] = 128,
    batch_dims=None,
    num_epochs: int = 10,
    valid_data=None,
    validate: Optional[Callable[[], float]] = None,
    data_plate: Optional[str] = None,
    jit: Union[bool, str] = False,
    **loop_options,
) -> FitResult:
    """Fit by SVI; the same steps as Pyro's own ``SVI.step`` loop on the same batches.

    Args:
        loss: one of ``LOSSES`` by name, a Pyro ELBO object (which carries its own particles and
            plate nesting), or a function ``loss(model, guide, *args, **kwargs) -> tensor``,
            fitted as Pyro's ``SVI`` fits one (its value, backpropagated).
        data: what the model and guide are called with: a tensor, a tuple of positional arguments or
            a mapping of keyword arguments (tensors split into minibatches along ``batch_dims``, dim
            0 by default; other values passed whole; see ``inference.batching``).
        batch_size: rows per step; None (or at least N) runs every step on the whole data, exactly
            as Pyro's loop does (no scaling). With minibatches, the plates whose size follows the
            rows are found by running the program on two batch sizes (``data_plate`` names one to
            check instead), and their sites are scaled by N / B; a program that cannot be
            minibatched is refused with an error that says why.
        optim: a Pyro optimizer (e.g. ``pyro.optim.ClippedAdam({...})``, one per parameter, the
            parameters collected every step); by default a single torch Adam (``loop.adam``, fused
            where it can be) over the parameters the model and guide create on the set-up run.
        lr_schedule: epoch (0-based) -> factor on that Adam's learning rate, e.g.
            ``loop.exponential_lr(0.1, num_epochs)``; exact on resume. A Pyro ``optim`` brings its
            own schedule (``pyro.optim.ExponentialLR``) instead.
        num_particles, vectorize_particles: several particles are vectorized (a plate left of the
            model's) where the program broadcasts over them; None tries that on the first batch and
            falls back to Pyro's sequential particles when it fails (``result.extra``).
        validate: a held-out score to early-stop on instead of the ELBO on ``valid_data`` (higher is
            better), e.g. a classifier's validation accuracy.
        jit: "inductor" records each step whole, the ELBO, its gradient and the default Adam's
            update, as one graph compiled by TorchInductor (``inference.compiled.CompiledStep``;
            the same steps to float rounding, from the same draws). For a fully reparameterized
            guide with ``loss`` "Trace_ELBO" or "TraceMeanField_ELBO", one particle, tensor
            data and the default optimizer; anything else is refused with the reason. Pyro's
            ``Jit*`` losses compile the ELBO alone with torch.jit.

    loop_options go to ``inference.loop.run``: seed, patience, transform, checkpoint, resume,
    callback, schedule, progress, max_steps. The objective and history are ELBO per data point.

    Before the first step the model and guide run on a batch of the first step's size (and, to
    find the data plates, on one row fewer): the runs create the parameters and move torch's
    random state only by what their initialization draws (``loop.prepare``), so from the same
    seed the first step draws what the first step of Pyro's own loop draws.
    """
    _refuse_early(loss, jit, loop_options, num_particles, max_plate_nesting, vectorize_particles)
    rows = Rows(data, batch_dims)
    num_data = rows.num_data
    transform = loop_options.get("transform")
    plates, params = loop.prepare(model, guide, rows, batch_size, data_plate, transform)
    first = rows.slice(0, batch_size or num_data)
    scaled_model, scaled_guide = scale_rows(model, plates, rows), scale_rows(guide, plates, rows)
    if num_particles > 1 and vectorize_particles is None and isinstance(loss, str):
        vectorize_particles = _vectorizes(
            loss, num_particles, max_plate_nesting, model, guide, first
        )
    elbo = make_loss(loss, num_particles, max_plate_nesting, vectorize_particles)
    elbo_vectorized = getattr(elbo, "vectorize_particles", None)
    if optim is None:
        optimizer = loop.adam(params.tensors(), lr=lr)
        step = (
            _compiled_step(model, guide, rows, first, batch_dims, loss, num_particles, optimizer,
                           plates, jit)
            if jit
            else _adam_step(scaled_model, scaled_guide, elbo, optimizer, num_data)
        )  # fmt: skip
        state = {"optimizer": optimizer, "parameters": params}
        loop_options["schedule"] = loop.with_lr_schedule(
            optimizer, lr_schedule, loop_options.get("schedule")
        )
    else:
        step = _pyro_optim_step(scaled_model, scaled_guide, optim, elbo, num_data, jit, lr_schedule)
        state = {"optim": _OptimState(optim), "parameters": params}
    if validate is None and valid_data is not None:
        losses = (loss, elbo, num_particles, max_plate_nesting, elbo_vectorized)
        validate = _validator(model, guide, valid_data, batch_dims, *losses)
    result = loop.run_driver(
        step, rows, state, params, plates, batch_size=batch_size, num_epochs=num_epochs,
        validate=validate, **loop_options,
    )  # fmt: skip
    result.extra["vectorize_particles"] = elbo_vectorized
    return result


def _validator(model, guide, valid_data, batch_dims, loss, elbo, particles, nesting, vectorized):
    """The ELBO per data point on the validation data (a Jit loss's uncompiled form)."""
    evaluator = (
        make_loss(loss.replace("Jit", ""), particles, nesting, vectorized)
        if isinstance(loss, str)
        else elbo
    )
    return functools.partial(
        elbo_per_datum, model, guide, valid_data, evaluator, batch_size=1024, batch_dims=batch_dims
    )


def _refuse_early(loss, jit, loop_options, num_particles, max_plate_nesting, vectorize) -> None:
    """Refuse, before any work, options that do not apply: a schedule the compiled step
    cannot follow; an ELBO object or function with particle or plate options of its own."""
    if jit:
        compiled.refuse_schedule(loop_options.get("schedule"))
    if not isinstance(loss, str):
        make_loss(loss, num_particles, max_plate_nesting, vectorize)


def _adam_step(scaled_model, scaled_guide, elbo, optimizer, num_data):
    """The step with the default optimizer: one torch Adam over every parameter (Pyro's own
    keeps one Adam per parameter and re-collects them by tracing every step, which costs this
    loop about 0.1x of a small VAE's epoch: benchmarks/vae_speed.py)."""
    num_params = len(pyro.get_param_store())
    loss_and_grads = _loss_and_grads(elbo)

    def step(batch):
        optimizer.zero_grad()
        args, kwargs = arguments(batch)
        value = loss_and_grads(scaled_model, scaled_guide, *args, **kwargs)
        if len(pyro.get_param_store()) != num_params:
            raise RuntimeError(
                "the model or guide created parameters after the first step, which the"
                " default optimizer does not see; pass optim=pyro.optim.Adam(...) instead"
            )
        optimizer.step()
        return value / num_data  # -ELBO of the whole data set, per data point

    return step


def _pyro_optim_step(scaled_model, scaled_guide, optim, elbo, num_data, jit, lr_schedule):
    """The step with a Pyro optimizer: Pyro's own ``SVI.step``."""
    if jit:
        raise ValueError(
            "jit compiles the default optimizer's step; leave optim unset (use lr and"
            " lr_schedule) or leave jit off"
        )
    if lr_schedule is not None:
        raise ValueError(
            "lr_schedule applies to the default optimizer; a Pyro optim brings its own"
            " schedule (pyro.optim.ExponentialLR and friends)"
        )
    svi = SVI(scaled_model, scaled_guide, optim, elbo)

    def step(batch):  # -ELBO of the whole data set, per data point
        args, kwargs = arguments(batch)
        return svi.step(*args, **kwargs) / num_data

    return step


def _compiled_step(
    model, guide, rows, example, batch_dims, loss, num_particles, optimizer, plates, jit
):
    """The step of ``fit(jit="inductor")``: the reparameterized driver's compiled step, whose
    objective is this loss's surrogate with the same minibatch scaling."""
    from inference import reparam  # reparam builds on this module

    if jit != "inductor":
        raise ValueError(
            f'jit={jit!r}: svi.fit compiles with jit="inductor"; for torch.jit use Pyro\'s'
            ' "JitTrace_ELBO" or "JitTraceMeanField_ELBO" as the loss'
        )
    if loss not in ("Trace_ELBO", "TraceMeanField_ELBO") or num_particles != 1:
        raise ValueError(
            f'jit="inductor" compiles loss="Trace_ELBO" or "TraceMeanField_ELBO" with one'
            f" particle, not loss={loss!r} with num_particles={num_particles}; leave jit off"
        )
    with same_random_state():  # on the first step's rows, the example
        reparam.check_reparameterizable(guide, example, model)
        objective = reparam.Objective(
            model,
            guide,
            example,
            rows.num_data,
            analytic_kl=loss == "TraceMeanField_ELBO",
            jit=jit,
            plates=plates,
            batch_dims=batch_dims,
        )
    reason = compiled.CompiledStep.refusal(objective.total, optimizer)
    if reason is not None:
        raise ValueError(f'jit="inductor" cannot compile this step: {reason}')
    whole = compiled.CompiledStep(objective.total, optimizer)

    def step(batch):  # -ELBO of the whole data set, per data point
        return whole(*arguments(batch)[0]).item() / rows.num_data

    return step


def _loss_and_grads(loss) -> Callable:
    """``loss_and_grads(model, guide, *args, **kwargs) -> float``: the ELBO's own, or for a
    loss function what Pyro's ``SVI`` does with one: its value, backpropagated when it has a
    gradient."""
    if isinstance(loss, pyro.infer.ELBO):
        return loss.loss_and_grads

    def loss_and_grads(model, guide, *args, **kwargs):
        value = loss(model, guide, *args, **kwargs)
        if getattr(value, "requires_grad", False):
            value.backward()
            value = value.detach()
        return float(value)

    return loss_and_grads


def _loss_value(loss, model, guide, *args, **kwargs) -> float:
    """The value of an ELBO's or a loss function's loss (no gradient)."""
    if isinstance(loss, pyro.infer.ELBO):
        return loss.loss(model, guide, *args, **kwargs)
    return float(loss(model, guide, *args, **kwargs))


def _vectorizes(loss, num_particles, max_plate_nesting, model, guide, value) -> bool:
    """Whether the program runs with particles vectorized (Pyro's ``vectorize_particles``)."""
    elbo = make_loss(loss.replace("Jit", ""), num_particles, max_plate_nesting, True)
    args, kwargs = arguments(value)
    try:
        with same_random_state(), torch.no_grad():
            elbo.loss(model, guide, *args, **kwargs)
    except Exception:  # a model that does not broadcast over a particle dim: Pyro's sequential
        return False  # particles give the same estimator, one particle at a time
    return True


class _NoReparam(Messenger):
    def _pyro_sample(self, msg):
        if not msg["is_observed"] and getattr(msg["fn"], "has_rsample", False):
            _no_rsample(msg["fn"])  # in place: the guide built it for this call only


def _no_rsample(fn) -> None:
    try:
        fn.has_rsample_(False)
    except AttributeError:  # a wrapper (Independent, masked, ...) that asks its base
        _no_rsample(fn.base_dist)
    if fn.has_rsample:
        raise TypeError(f"cannot switch off reparameterized sampling of {type(fn).__name__}")


def score_function(guide: Callable) -> Callable:
    """``guide`` with every latent site marked non-reparameterizable: Pyro's ELBOs then
    estimate its gradient by the score function (REINFORCE; with TraceGraph_ELBO, plus its
    Rao-Blackwellization and baselines) instead of differentiating through the sample. The
    high-variance contrast to the reparameterization trick; the objective is unchanged."""

    def guide_without_reparam(*args, **kwargs):
        with _NoReparam():
            return guide(*args, **kwargs)

    return guide_without_reparam


@torch.no_grad()
def elbo_per_datum(
    model, guide, data, elbo: pyro.infer.ELBO, batch_size: int = 1024, batch_dims=None
) -> float:
    """The ELBO of ``data`` per data point (higher is better), in chunks of ``batch_size``
    rows when there are more: each chunk scaled to the whole data (its data plates found as
    the drivers find them), so global sites are counted once, as in the whole-data ELBO."""
    rows = Rows(data, batch_dims)
    num = rows.num_data
    if num <= batch_size:
        total = -call(lambda *a, **k: _loss_value(elbo, model, guide, *a, **k), rows.data)
    else:
        plates = find_data_plates(model, guide, rows, probe_sizes(batch_size, num))
        scaled_model, scaled_guide = (
            scale_rows(model, plates, rows),
            scale_rows(guide, plates, rows),
        )
        total = 0.0
        for i in range(0, num, batch_size):
            chunk = rows.slice(i, i + batch_size)
            args, kwargs = arguments(chunk)
            weight = rows.count(args, kwargs) / num
            total -= weight * _loss_value(elbo, scaled_model, scaled_guide, *args, **kwargs)
    if not math.isfinite(total):
        raise FloatingPointError("the validation ELBO is not finite")
    return total / num
