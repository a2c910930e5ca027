"""
The training loop the SVI and reparameterized-ELBO drivers share; drivers only define a step::

    result = loop.run(step, data, state={"model": net, "optim": opt}, batch_size=128,
                      num_epochs=10, validate=lambda: elbo_on_valid(), checkpoint="run/ckpt.pt")

It owns:

- minibatches: a fresh permutation per epoch from its own seeded generator, taken along each
  argument's batch dim (``inference.batching.Rows``: a tensor, a tuple of arguments or a mapping
  of keyword arguments); under torch.distributed each rank takes its slice of every global batch;
- a per-batch ``transform`` hook (dynamic binarization resamples pixels here, per epoch);
- validation after each epoch and early stopping (``patience`` epochs without improvement):
  the best epoch's state (the ``state`` objects and Pyro's param store) is put back at the end,
  and the result's ``objective`` is that epoch's training objective, its validation score
  ``valid_objective``;
- a checkpoint written atomically after every epoch: the ``state`` objects' state dicts, all
  random number generator states, the position in the epoch and the history; ``resume=True``
  continues from it exactly (bit for bit on CPU, see ``threads`` below for the one caveat),
  and it loads with ``weights_only=True``;
- SIGINT/SIGTERM: the loop finishes the current step, saves a checkpoint at that position, and
  raises KeyboardInterrupt (SIGINT) or SystemExit (SIGTERM);
- a NaN guard: a non-finite loss, parameters that are no longer finite, or Pyro's value checks
  failing on NaN values made from them stop the run with a FloatingPointError naming the epoch
  and step, before anything is saved, so the last good checkpoint stays intact; an objective
  that runs away by orders of magnitude is warned about (``DivergenceWarning``);
- torch's CPU thread count (``threads``): by default chosen by timing the steps on all of
  torch's threads and on one, so that a fit on a machine shared with other work does not
  collapse (``inference.threads``); a full reduction can differ in its last bit between
  counts, so pin it (``threads=2``) where bits must match across runs;
- a progress bar (``progress=True``), a ``callback(record)`` after every epoch (returning True
  stops the run there, e.g. when a time budget is spent) and a
  ``schedule(epoch)`` before every epoch, also the first one after a resume (for annealing such
  as a KL warm-up, whose value must follow the epoch, not the number of calls).

Learning-rate schedules are functions of the epoch too (``exponential_lr``), applied by
``with_lr_schedule`` through that hook, so a resumed run follows the same schedule exactly.
"""

import math
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import pyro
import torch
import torch.distributed as tdist
from pyro import poutine
from pyro.distributions import constraints
from torch.distributions import transform_to
from tqdm.auto import tqdm

from inference.batching import (
    Rows,
    check_count,
    check_support,
    find_data_plates,
    private_draws,
    probe_sizes,
    run_program,
    same_random_state,
)
from inference.io import load_tensors, save_torch
from inference.result import FitResult
from inference.threads import Threads

Batch = Union[torch.Tensor, Sequence[torch.Tensor], Dict[str, object]]


def run(
    step: Callable[[Batch], float],
    data: Batch,
    *,
    state: Dict[str, object],
    batch_size: Optional[int] = 128,
    batch_dims=None,
    num_epochs: int = 10,
    seed: int = 0,
    validate: Optional[Callable[[], float]] = None,
    patience: Optional[int] = None,
    transform: Optional[Callable[[Batch, torch.Generator], Batch]] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    schedule: Optional[Callable[[int], None]] = None,
    progress: bool = False,
    max_steps: Optional[int] = None,
    threads: Union[str, int, None] = None,
    description: str = "train",
) -> FitResult:
    """Run ``step(batch) -> loss per data point`` over minibatches of ``data`` for some epochs.

    Args:
        data: a tensor, a tuple of the model's arguments or a mapping of keyword arguments; each
            batch has the same structure (``inference.batching``). batch_size None: all rows.
        state: objects with ``state_dict()``/``load_state_dict()`` (modules, torch or Pyro
            optimizers) to checkpoint and restore. Pyro's param store is always included: create the
            parameters (``parameters(model, guide, x)``) before resuming.
        validate: returns the objective on held-out data (higher is better) after each epoch.
        schedule: called with the 0-based epoch before it runs (and when a resume re-enters it).
        max_steps: stop after this many steps in total (for tests and smoke runs).
        threads: torch's CPU thread count while the steps run: "auto" (timed, see
            ``inference.threads``), a count, or "torch" (left alone); None reads ``ZOO_THREADS``.
        description: what the progress bar says is running.
    """
    rows = data if isinstance(data, Rows) else Rows(data, batch_dims)
    batch_size = rows.num_data if batch_size is None else batch_size
    ranks = (tdist.get_rank(), tdist.get_world_size()) if _distributed() else (0, 1)
    _check_run(batch_size, num_epochs, patience, validate, max_steps, ranks[1])
    loop = _Loop(rows, state, batch_size, num_epochs, seed, checkpoint, ranks)
    if resume:
        loop.resume()
    loop.options = dict(validate=validate, patience=patience, transform=transform,
                        callback=callback, schedule=schedule, max_steps=max_steps)  # fmt: skip
    tuner, interrupted = Threads(threads), _SignalCatcher()
    bar = tqdm(
        total=num_epochs * loop.steps_per_epoch,
        initial=loop.done_steps,
        disable=not progress or loop.rank != 0,
        desc=description,
        leave=False,
    )
    with interrupted, bar, tuner:
        loop.train(step, bar, tuner, interrupted)
    return loop.result()


def run_driver(step, rows, state, params, plates, **options) -> FitResult:
    """``run`` for a driver's ``step``: the result carries the parameters' values (``params``,
    the ``Parameters`` of ``prepare``) and the data plates found."""
    result = run(step, rows, state=state, **options)
    result.params = params.values()
    result.extra["data_plates"] = list(plates)
    return result


def _check_run(batch_size, num_epochs, patience, validate, max_steps, world) -> None:
    check_count("batch_size", batch_size)
    check_count("num_epochs", num_epochs)
    if patience is not None:
        check_count("patience", patience)
        if validate is None:
            raise ValueError(
                "patience= stops on the validation score, but there is none: pass valid_data="
                " or validate= as well, or leave patience out"
            )
    if max_steps is not None:
        check_count("max_steps", max_steps)
    if batch_size < world:  # some rank's share of a batch would be empty
        raise ValueError(
            f"batch_size {batch_size} under torch.distributed with {world} processes: each"
            f" process takes a share of every batch, so it needs at least {world} rows"
        )


class _Loop:
    """The state of one ``run``: where it stands (epoch, step, the epoch's permutation), the
    history, the best validated epoch, the batch generator and the checkpoint."""

    def __init__(self, rows, state, batch_size, num_epochs, seed, checkpoint, ranks):
        self.rows, self.state = rows, state
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.rank, self.world = ranks  # (this process's rank, the number of ranks)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = math.ceil(rows.num_data / batch_size)
        self.position = {"epoch": 0, "step": 0, "perm": None, "batch_size": batch_size}
        self.history, self.best = [], {"objective": -math.inf, "state": None, "epoch": 0}
        self.path = Path(checkpoint) if checkpoint is not None else None
        self.stop_reason, self.converged = f"finished {num_epochs} epochs", True

    @property
    def done_steps(self) -> int:
        return self.position["epoch"] * self.steps_per_epoch + self.position["step"]

    def resume(self) -> None:
        """Restore the checkpoint: parameters, optimizer, random states, position, history."""
        path = self.path
        if path is None or not path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
        saved = load_tensors(path, "checkpoint")
        was = saved["position"].get("batch_size", self.batch_size)
        if was != self.batch_size:  # the epoch's remaining steps would be someone else's batches
            raise ValueError(
                f"the checkpoint {path} was written with batch_size={was}; resume it with the"
                f" same batch size, not {self.batch_size}"
            )
        ranks = saved.get("rank_rng") or [saved["rng"]]
        if len(ranks) != self.world:
            raise ValueError(
                f"the checkpoint {path} was written by {len(ranks)} process(es) and this fit runs"
                f" on {self.world}: resume it on as many (each rank's random state is kept)"
            )
        try:
            _restore(saved, self.state, self.generator, self.rank, self.world)
        except (KeyError, ValueError, RuntimeError) as error:  # torch's words name no file
            reason = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ValueError(
                f"the checkpoint {path} was written by another model or optimizer than this"
                f" fit's ({str(reason).splitlines()[0]}): resume a run with the model and"
                " settings that wrote it"
            ) from None
        self.position, self.history = saved["position"], saved["history"]
        self.best.update(
            objective=saved["best_objective"],
            epoch=saved["best_epoch"],
            state=saved.get("best_state"),  # absent from checkpoints written before it was kept
        )

    def save(self) -> None:
        if self.path is None:
            return
        # every rank's random state (a collective: all ranks save at the same step), so that
        # a resumed torchrun fit draws on each rank what the uninterrupted one would have
        ranks = _gathered(_rng_state(self.generator)) if self.world > 1 else None
        if self.rank == 0:
            snapshot = _snapshot(
                self.state, self.generator, self.position, self.history, self.best, ranks
            )
            save_torch(self.path, snapshot)

    def train(self, step, bar, tuner, interrupted) -> None:
        """Epochs until the last, a stop by the callback, max_steps or early stopping."""
        self.start = time.perf_counter() - (self.history[-1]["time"] if self.history else 0.0)
        while self.position["epoch"] < self.num_epochs:
            losses = self.epoch(step, bar, tuner, interrupted)
            if self.end_epoch(losses):
                break

    def epoch(self, step, bar, tuner, interrupted) -> list:
        """The epoch's remaining steps (all of them, unless max_steps comes first): its losses."""
        position, options = self.position, self.options
        if position["perm"] is None:  # the whole data each step: rows in their order, as a
            # model with a parameter per row (a local, non-amortized guide) needs
            num_data = self.rows.num_data
            whole = self.batch_size >= num_data
            position["perm"] = (
                torch.arange(num_data)
                if whole
                else torch.randperm(num_data, generator=self.generator)
            )
        if options["schedule"] is not None:
            options["schedule"](position["epoch"])  # 0-based epoch about to run (or continue)
        losses, running = [], 0.0
        tuner.restart_clock()
        while position["step"] < self.steps_per_epoch:
            losses.append(self.one_step(step))
            running += losses[-1]
            tuner.tick()
            position["step"] += 1
            bar.update(1)
            # the epoch's objective so far, as the summary and the history report it (higher
            # is better: minus the mean loss of the epoch's steps); shown when the bar next
            # redraws (tqdm's interval): a redraw at every step costs about 0.1 ms
            bar.set_postfix(
                epoch=position["epoch"] + 1,
                objective=f"{-running / len(losses):.4g}",
                refresh=False,
            )
            if _stop_everywhere(interrupted, self.world):
                self.save()
                interrupted.reraise()
            if options["max_steps"] is not None and self.done_steps >= options["max_steps"]:
                break
        return losses

    def one_step(self, step) -> float:
        """One step on the next batch (this rank's share of it): its loss per data point."""
        position = self.position
        i = position["step"] * self.batch_size
        idx = position["perm"][i : i + self.batch_size]
        idx = idx.tensor_split(self.world)[self.rank] if self.world > 1 else idx
        batch = self.rows.take(idx)
        if self.options["transform"] is not None:
            batch = self.options["transform"](batch, self.generator)
        try:
            loss = float(step(batch))
        except ValueError as error:  # Pyro's checks on values made from NaN parameters
            bad = _nonfinite_parameters(self.state)
            text = str(error)
            if bad:
                what = f"parameters {bad[:3]} are no longer finite"
            elif "found invalid values" in text and "nan" in text:
                what = "the parameters grew so large that the model computes NaN"
            else:
                raise
            raise FloatingPointError(
                f"{what} at {self.where()}, so the model failed"
                f" ({text.splitlines()[0][:160]}){_kept(self.path)}"
            ) from error
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at {self.where()}{_kept(self.path)}")
        return loss

    def where(self) -> str:
        return f"epoch {self.position['epoch'] + 1}, step {self.position['step'] + 1}"

    def end_epoch(self, losses) -> bool:
        """The epoch's record, checks, validation and checkpoint; True where the fit stops."""
        position, options, history = self.position, self.options, self.history
        record = {
            "epoch": position["epoch"] + 1,
            "loss": sum(losses) / max(1, len(losses)),
            "time": time.perf_counter() - self.start,
        }
        record["objective"] = -record["loss"]
        if not history and losses:
            record["first_loss"] = losses[0]  # the reference for the divergence warning
        bad = _nonfinite_parameters(self.state)
        if bad:  # a step with a finite loss can still leave NaN behind (a NaN gradient)
            raise FloatingPointError(
                f"parameters {bad[:3]} are no longer finite after epoch {record['epoch']}"
                f"{_kept(self.path)}"
            )
        _warn_if_diverging(history, record)
        validate = options["validate"]
        if validate is not None:
            record["valid_objective"] = float(validate())
        history.append(record)
        position.update(epoch=position["epoch"] + 1, step=0, perm=None, batch_size=self.batch_size)
        if validate is not None and record["valid_objective"] > self.best["objective"]:
            self.best.update(
                objective=record["valid_objective"],
                epoch=record["epoch"],
                state=_copy_state(self.state),
            )
        self.save()
        return self.stops(record)

    def stops(self, record) -> bool:
        options, epoch = self.options, record["epoch"]
        if options["callback"] is not None and options["callback"](dict(record)) is True:
            self.stop_reason = f"stopped by the callback after epoch {epoch}"
            self.converged = False
            return True
        if options["max_steps"] is not None and self.done_steps >= options["max_steps"]:
            self.stop_reason, self.converged = f"reached max_steps={options['max_steps']}", False
            return True
        patience = options["patience"]
        if patience is not None and epoch - self.best["epoch"] >= patience:
            self.stop_reason = f"early stopping: no better validation for {patience} epochs"
            return True
        return False

    def result(self) -> FitResult:
        """The result, on the best validated parameters where there was validation."""
        history, best = self.history, self.best
        kept = history[-1]
        if best["state"] is not None and best["epoch"] != history[-1]["epoch"]:
            _load_state(self.state, best["state"])  # end on the best validated parameters
            self.stop_reason += f"; kept epoch {best['epoch']}"
            kept = history[best["epoch"] - 1]
        return FitResult(
            objective=kept["objective"],  # of the parameters returned, not of the last epoch
            params={},
            history=history,
            converged=self.converged,
            stop_reason=self.stop_reason,
            valid_objective=kept.get("valid_objective"),
            best_epoch=kept["epoch"],
        )


class DivergenceWarning(UserWarning):
    """The training objective ran away by orders of magnitude: the learning rate is too high."""


def first_objective(history) -> Optional[float]:
    """The objective of the fit's first step, per data point (higher is better), where its
    history records one (the first epoch's mean where it predates ``first_loss``)."""
    if not history or "loss" not in history[0]:
        return None
    return -history[0].get("first_loss", history[0]["loss"])


def diverged(history, now: float) -> bool:
    """Whether the objective ``now`` (per data point, higher is better: an epoch's, or a
    held-out ELBO after the fit) is worse than the first training step's by more than a
    hundred times the larger of 1 and its size."""
    first = first_objective(history)
    return first is not None and now < first and abs(now - first) > 100 * max(1.0, abs(first))


def _warn_if_diverging(history, record) -> None:
    """Warn once when an epoch's objective is a hundred times worse than the first step's."""
    if any(r.get("diverging") for r in history):
        return
    start, now = history[:1] or [record], record["objective"]
    if diverged(start, now):
        first = first_objective(start)
        record["diverging"] = True
        warnings.warn(
            f"the training objective fell from {first:.4g} (the first step) to {now:.4g} (epoch"
            f" {record['epoch']}): the fit is diverging; lower the learning rate",
            DivergenceWarning,
            stacklevel=3,
        )


def _nonfinite_parameters(state) -> List[str]:
    """Names of Pyro's and the state's ``Parameters`` whose values are not all finite."""
    tensors = dict(pyro.get_param_store()._params)
    for obj in state.values():
        if isinstance(obj, Parameters):
            tensors.update(obj.leaves)
    with torch.no_grad():
        return [name for name, t in tensors.items() if not torch.isfinite(t).all()]


def _kept(path) -> str:
    if path is not None and Path(path).exists():
        return f"; the last good checkpoint {path} is intact"
    return ""


# ------------------------------------------------------------------------------------ state


def _rng_state(generator) -> dict:
    """This process's random states: torch's (and CUDA's), the batches', Python's, numpy's."""
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "batches": generator.get_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _gathered(value) -> list:
    """``value`` (nested dicts, lists and tuples of tensors and plain values) of every
    torch.distributed rank, in rank order (a collective). Tensors travel as numpy arrays:
    all_gather_object's own tensor pickling fails on the byte tensors of random states."""
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, _map_tensors(value, lambda t: t.cpu().numpy()))
    return [_map_tensors(v, torch.from_numpy, np.ndarray) for v in out]


def _map_tensors(tree, fn, kind=torch.Tensor):
    if isinstance(tree, kind):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn, kind) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(v, fn, kind) for v in tree)
    return tree


def _stop_everywhere(interrupted, world: int) -> bool:
    """Whether to save and stop after this step: a signal here, or under torch.distributed on
    any rank (agreed by one small all-reduce a step, so that every rank stops at the same step
    and the checkpoint's collectives line up)."""
    if world == 1:
        return interrupted.signum is not None
    flag = torch.tensor([0.0 if interrupted.signum is None else float(interrupted.signum)])
    if tdist.get_backend() == "nccl":
        flag = flag.cuda()
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    if flag.item() and interrupted.signum is None:
        interrupted.signum = int(flag.item())  # stop as the signalled rank does
    return bool(flag.item())


def _snapshot(state, generator, position, history, best, ranks=None):
    rng = _rng_state(generator)
    store = pyro.get_param_store()
    return {
        "state": {name: obj.state_dict() for name, obj in state.items()},
        "pyro_params": {name: store._params[name].detach().clone() for name in _own(state)},
        "rng": rng,
        "position": dict(position),
        "history": list(history),
        "best_objective": best["objective"],
        "best_epoch": best["epoch"],
        # the best validated parameters (and optimizer state), so that a resumed run still ends
        # on them; None without validation
        "best_state": best["state"],
        # under torch.distributed: every rank's random states, in rank order
        "rank_rng": ranks,
    }


def _restore(saved, state, generator, rank=0, world=1):
    missing = set(state) - set(saved["state"]) - {"parameters"}
    if missing:
        raise KeyError(f"the checkpoint has no state for {sorted(missing)}")
    _load_state(state, saved["state"])
    store = pyro.get_param_store()
    unknown = sorted(set(saved["pyro_params"]) - set(store._params))
    if unknown:
        raise KeyError(
            f"the checkpoint holds parameters {unknown[:5]} that this model does not have: "
            "resume with the same model (and the same Pyro names) that wrote it"
        )
    with torch.no_grad():
        for name, value in saved["pyro_params"].items():
            store._params[name].copy_(value)
    rng = saved["rng"]
    if world > 1:
        rng = saved["rank_rng"][rank]  # its length checked by run
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["batches"])
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _copy_state(state):
    """A copy of the ``state`` objects and of every parameter in Pyro's param store."""
    copied = {name: _clone(obj.state_dict()) for name, obj in state.items()}
    store = pyro.get_param_store()
    copied[_STORE] = {name: store._params[name].detach().clone() for name in _own(state)}
    return copied


_STORE = "_pyro_param_store"  # the key of the param store's values in a copied state


def _own(state) -> List[str]:
    """The names of the param store's parameters this fit optimizes: those its ``Parameters``
    found in the program (another program's, such as an earlier stage's encoder, are not this
    fit's to save or put back), or every one where the state holds no ``Parameters``."""
    store = pyro.get_param_store()
    found = [obj for obj in state.values() if isinstance(obj, Parameters)]
    if not found:
        return list(store._params)
    ids = {id(leaf) for obj in found for leaf in obj.leaves.values()}
    return [name for name, p in store._params.items() if id(p) in ids]


def _clone(tree):
    return _map_tensors(tree, lambda t: t.detach().clone())


def _load_state(state, saved):
    for name, obj in state.items():
        if name in saved:  # a checkpoint from before parameters were kept here restores
            obj.load_state_dict(saved[name])  # them from its param store copy below
    if _STORE in saved:  # the param store (best states since it was kept there)
        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in saved[_STORE].items():
                if name in store._params:
                    store._params[name].copy_(value)


# ------------------------------------------------------------------------- learning rate


def adam(params, lr: float = 1e-3) -> torch.optim.Adam:
    """The drivers' default optimizer: torch's Adam, fused into one kernel per step where the
    parameters allow it (floating point, all on one CPU or CUDA device), else its default form.
    The update rule is the same; fusing saves the temporaries of the per-tensor form, about a
    tenth of a small VAE's epoch on a CPU (benchmarks/vae_speed.py uses it in the plain loop
    too). A checkpoint's own setting wins on resume, so older checkpoints resume unfused."""
    params = list(params)
    devices = {p.device.type for p in params}
    fusable = bool(params) and devices <= {"cpu", "cuda"} and len(devices) == 1
    fusable = fusable and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, **({"fused": True} if fusable else {}))


def exponential_lr(final: float, num_epochs: int) -> Callable[[int], float]:
    """Learning-rate factor for each 0-based epoch, falling geometrically from 1 in the first
    epoch to ``final`` in the last (a smooth form of Burda et al.'s stepped schedule, which
    ends at 0.1). ``final=1`` is a constant rate."""
    if not (0 < final <= 1) or not math.isfinite(final):
        raise ValueError(f"the final learning-rate factor must be in (0, 1], got {final}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")

    def factor(epoch: int) -> float:
        return final ** (min(epoch, num_epochs - 1) / max(1, num_epochs - 1))

    return factor


def with_lr_schedule(
    optimizer: torch.optim.Optimizer,
    factor: Optional[Callable[[int], float]],
    schedule: Optional[Callable[[int], None]] = None,
) -> Optional[Callable[[int], None]]:
    """A ``schedule`` hook for ``run`` that sets every parameter group's learning rate to its
    current value times ``factor(epoch)`` before each epoch, then calls ``schedule``.

    Call it before ``run`` restores a checkpoint: the base rates are read here, so a resumed
    run gets the same rate for the same epoch (a function of the epoch, no scheduler state).
    """
    if factor is None:
        return schedule
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "a learning-rate schedule needs a torch optimizer; for a Pyro optimizer use one of"
            " pyro.optim's schedulers (e.g. pyro.optim.ExponentialLR) instead"
        )
    base = [group["lr"] for group in optimizer.param_groups]

    def set_rate(epoch: int) -> None:
        value = float(factor(epoch))
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"the learning-rate factor for epoch {epoch} is {value}")
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * value
        if schedule is not None:
            schedule(epoch)

    return set_rate


# ------------------------------------------------------------------------------------ helpers


_BUFFER = "buffer:"  # the prefix of a module buffer's entry in ``Parameters.state_dict``


class Parameters:
    """The leaf tensors a model and guide optimize, by name, with their constraints.

    Found by running both once on ``value`` (their ``pyro.param``, ``pyro.module`` and
    ``PyroParam`` sites, in Pyro's param store or module-local with
    ``pyro.settings.set(module_local_params=True)``), plus the parameters of an ``nn.Module``
    that owns the model or guide and that no param site reports (a ``PyroModule`` method called
    outside Pyro's module context reads its ``PyroParam``s directly). Also the ``state`` object
    the loop checkpoints and restores (early stopping), so module-local parameters travel too,
    and with them the buffers of an owning module (a step counter, running statistics).
    """

    def __init__(self, model, guide, value):
        self.leaves: Dict[str, torch.Tensor] = {}
        self.constraints: Dict[str, object] = {}
        with poutine.trace(param_only=True) as capture:
            run_program(model, guide, value, validate=False)
        store = pyro.get_param_store()
        seen = set()
        for name, site in capture.trace.nodes.items():
            leaf = site["value"].unconstrained()
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            self.leaves[name] = leaf
            # the store's constraint when it holds the parameter (pyro.param's own keyword
            # defaults to real when a PyroModule re-reads a parameter by name)
            self.constraints[name] = store._constraints.get(name) or site["kwargs"].get(
                "constraint", constraints.real
            )
        self.buffers: Dict[str, torch.Tensor] = {}
        for fn in (model, guide):
            owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
            if not isinstance(owner, torch.nn.Module):
                continue
            for name, buffer in owner.named_buffers():  # a step counter, running statistics
                self.buffers.setdefault(f"{type(owner).__name__}.{name}", buffer)
            for name, leaf in owner.named_parameters():
                if id(leaf) not in seen and leaf.requires_grad:
                    seen.add(id(leaf))
                    attr, constraint = name, constraints.real
                    if name.endswith("_unconstrained"):  # a PyroParam: read it constrained
                        path, _, attr = name.rpartition(".")
                        module = owner.get_submodule(path) if path else owner
                        attr = attr[: -len("_unconstrained")]
                        constraint = getattr(module, "_pyro_params", {}).get(attr, (None,))[0]
                        attr = f"{path}.{attr}" if path else attr
                    self.leaves[f"{type(owner).__name__}.{attr}"] = leaf
                    self.constraints[f"{type(owner).__name__}.{attr}"] = (
                        constraint or constraints.real
                    )

    def __len__(self) -> int:
        return len(self.leaves)

    def tensors(self) -> List[torch.Tensor]:
        return list(self.leaves.values())

    def values(self) -> Dict[str, torch.Tensor]:
        """Constrained values by name, detached copies (what ``FitResult.params`` holds)."""
        with torch.no_grad():
            return {
                name: transform_to(self.constraints[name])(leaf).detach().clone()
                for name, leaf in self.leaves.items()
            }

    def _own(self) -> Dict[str, torch.Tensor]:
        """The leaves Pyro's param store does not hold (module-local ones, an owning module's):
        the loop saves and restores the store's own with the store, so each is kept once."""
        held = {id(p) for p in pyro.get_param_store()._params.values()}
        return {name: leaf for name, leaf in self.leaves.items() if id(leaf) not in held}

    def state_dict(self):
        # detached: Pyro hangs a weakref on some leaves, which a checkpoint cannot pickle
        state = {name: leaf.detach() for name, leaf in self._own().items()}
        # the owning modules' buffers travel too (a counter of training steps, say)
        state.update({_BUFFER + name: b.detach().clone() for name, b in self.buffers.items()})
        return state

    def load_state_dict(self, saved):
        with torch.no_grad():
            for name, leaf in self._own().items():
                leaf.copy_(saved[name])
            for name, buffer in self.buffers.items():
                if _BUFFER + name in saved:  # checkpoints from before buffers were kept: none
                    buffer.copy_(saved[_BUFFER + name])


def prepare(
    model,
    guide,
    rows: Rows,
    batch_size: Optional[int],
    data_plate=None,
    transform=None,
    check: Optional[Callable] = None,
):
    """What a driver runs before its first step: the data plates to scale (none when each step
    sees every row) and the parameters, created on a batch of the size the first step uses
    (the whole data, or ``batch_size`` rows). Torch's random state moves only by what the
    parameters' initialization draws (``batching.private_draws``), so that the first step draws
    the numbers the first step of Pyro's own loop draws, from the same seed.

    Returns ``(plates, parameters)``; raises a ValueError naming the plate, site or argument
    when the program cannot be minibatched (``inference.batching.find_data_plates``), or when
    observed data lie outside their distribution's support (``batching.check_support``).
    ``check(first)``, a driver's own refusal, runs on the first step's rows once the
    parameters exist, before anything else is refused.
    """
    if batch_size is not None:
        check_count("batch_size", batch_size)
    if batch_size is None or batch_size >= rows.num_data:
        plates, first = (), rows.data
        with private_draws():  # creates the parameters
            Parameters(model, guide, first)
    else:
        sizes = probe_sizes(batch_size, rows.num_data)
        plates = find_data_plates(model, guide, rows, sizes, data_plate)
        first = rows.slice(0, batch_size)
    with same_random_state():
        params = Parameters(model, guide, first)
        if check is not None:
            check(first)
        _check_latent_sizes(model, guide, first)
    try:
        check_support(model, guide, first)
    except ValueError:
        if transform is None:
            raise
        # the values as the steps see them, after a per-batch transform such as dynamic
        # binarization (drawn here from a generator of its own, so the loop's stays untouched)
        check_support(model, guide, transform(first, torch.Generator().manual_seed(0)))
    if not len(params):
        raise ValueError(
            "the model and guide read no parameters to fit (pyro.param, pyro.module, PyroParam);"
            " a PyroModule's methods other than forward need @pyro.nn.pyro_method for Pyro to"
            " see its parameters"
        )
    return plates, params


def _check_latent_sizes(model, guide, value) -> None:
    """Refuse a latent site with no entries (a size option of 0: z of shape (N, 0)): its
    terms are empty sums, and the fit would look fine while fitting nothing."""
    model_trace, guide_trace = run_program(model, guide, value, validate=False)
    for trace in (guide_trace, model_trace):
        for name, site in (trace.nodes if trace is not None else {}).items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            value = site["value"]
            if isinstance(value, torch.Tensor) and value.numel() == 0:
                raise ValueError(
                    f"latent site {name!r} has no entries (shape {tuple(value.shape)}): a size"
                    " of 0 (a latent dimension, a number of components) leaves nothing to fit"
                )


def parameters(model, guide, *args, **kwargs) -> List[torch.Tensor]:
    """Create every parameter the model and guide read (by running them once) and return
    their unconstrained leaf tensors, in a fixed order."""
    return Parameters(model, guide, _value(args, kwargs)).tensors()


def parameter_names(model, guide, *args, **kwargs):
    """The names of the Pyro parameters the model and guide read, creating any that are new
    (a run of both that computes no log-probability, so raw data do not trip validation)."""
    with poutine.trace(param_only=True) as capture:
        run_program(model, guide, _value(args, kwargs), validate=False)
    return list(capture.trace.nodes)


def _value(args, kwargs):
    if kwargs:
        if args:
            raise TypeError("pass the data as positional or as keyword arguments, not both")
        return kwargs
    return args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def average_gradients(params, weight: float) -> None:
    """Average gradients over torch.distributed ranks, each weighted by its share of the batch.

    With ``weight`` the number of data points a rank saw, the result equals the gradient of
    the mean loss over the whole global batch, even when the shards differ in size (what
    DistributedDataParallel does for equal shards). No-op without torch.distributed.
    """
    if not _distributed():
        return
    params = [p for p in params if p.grad is not None]
    # NCCL reduces CUDA tensors only: the count lives where the gradients do
    total = torch.tensor(float(weight), device=params[0].grad.device if params else "cpu")
    tdist.all_reduce(total, op=tdist.ReduceOp.SUM)
    for p in params:
        p.grad.mul_(weight)
        tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)
        p.grad.div_(total)


class _SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False

    def reraise(self):
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt("interrupted; a checkpoint was saved")
        raise SystemExit(128 + self.signum)
