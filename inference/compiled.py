"""
Compiled objectives and compiled training steps, for the drivers' ``jit`` option::

    objective = Compiled(loss, names, backend="inductor")   # loss(*batch) -> a tensor
    value = objective(batch)                                  # one graph per batch shape
    step = CompiledStep(objective, torch_adam)                # the objective, its gradient
    value = step(batch)                                       # and Adam's update, one graph

``Compiled`` compiles any function of the Pyro parameters and tensor arguments (the drivers
give it their ELBO or IWAE bound). ``CompiledStep`` records a whole training step, forward,
backward and torch Adam's update, as one graph: what ``reparam.fit(jit="inductor")`` and
``svi.fit(jit="inductor")`` run with their default optimizer. Both read the parameters from
Pyro's param store, so every parameter must exist before the first call, and both compile
static programs only: no data-dependent control flow, no Python numbers that change between
steps (``refuse_schedule``), no in-place updates of a module's buffers (refused when recorded).
"""

import contextlib
import math
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.util import ignore_jit_warnings

from inference.loop import _distributed

BACKENDS = ("jit", "inductor")
# generated C++ kernels ask OpenMP for the thread count when they run instead of keeping the
# count at compile time: the drivers' thread choice (inference.threads) changes it during a fit
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True}


class Compiled:
    """``fn(*args)`` (tensors in, a tensor or a tuple of tensors out) compiled as a function of
    the Pyro parameters' unconstrained tensors and ``args``, once per shape of ``args`` (so a
    smaller last batch gets its own graph).

    backend "jit": ``torch.jit.trace``. It does what ``pyro.ops.jit.trace`` does, less its
        per-call cost: Pyro's wrapper looks every parameter up through the effect handlers and
        records a parameter trace on each call; this one reads the tensors from the param store.
    backend "inductor": the same function recorded op by op (``make_fx``, which runs it once
        and keeps the tensor operations, Pyro's bookkeeping gone) and compiled by
        ``torch.compile``: elementwise operations are fused into generated C++ (a C++ compiler
        must be installed) or Triton kernels. Compiling takes seconds per shape, once.

    Either way every parameter must exist before the first call: ``names`` lists them
    (``loop.parameter_names``).
    """

    def __init__(self, fn: Callable, names, backend: str = "jit"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.fn, self.names, self.backend, self.traces = fn, list(names), backend, {}

    def __call__(self, *args):
        store = pyro.get_param_store()
        leaves = [store._params[name] for name in self.names]
        key = tuple((a.shape, a.dtype, a.device) for a in args)
        if key not in self.traces:  # compiling runs fn once: from the same random state
            with pyro.validation_enabled(False), _same_draws():
                if self.backend == "jit":
                    self.traces[key] = torch.jit.trace(
                        self._replayed(store), (*leaves, *args), check_trace=False
                    )
                else:
                    graph = self.record(store, [*leaves, *args])
                    self.traces[key] = torch.compile(graph, dynamic=False, options=INDUCTOR_OPTIONS)
        return self.traces[key](*leaves, *args)

    def _replayed(self, store):
        num = len(self.names)

        def replayed(*leaves_and_args):  # the leaves are the store's own tensors
            params = {name: store[name] for name in self.names}  # constrained from them
            with ignore_jit_warnings():  # a no-op unless tracing: enter it here
                return poutine.replay(self.fn, params=params)(*leaves_and_args[num:])

        return replayed

    def record(self, store, inputs, around: Optional[Callable] = None) -> torch.fx.GraphModule:
        """The function recorded by ``make_fx`` (which runs it once) as a graph of tensor
        operations on ``inputs``: the parameters, then ``args``. With ``around``, the graph of
        ``around(pure, *inputs)`` instead, where ``pure(*leaves, *args)`` is the function on
        tensors standing for the parameters (``CompiledStep`` differentiates it)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        replayed, num = self._replayed(store), len(self.names)

        def pure(*leaves_and_args):
            # make_fx hands in stand-ins for the leaves: put them in the store while recording
            saved = [store._params[name] for name in self.names]
            try:
                for name, leaf in zip(self.names, leaves_and_args[:num]):
                    store._params[name] = leaf
                return replayed(*leaves_and_args)
            finally:
                for name, leaf in zip(self.names, saved):
                    store._params[name] = leaf

        # Pyro's ELBOs read the loss as a Python float for logging (torch_item), which would be
        # a data-dependent read of a recorded tensor; the surrogate, which is returned, is not
        try:
            with _no_float_reads():
                if around is None:
                    graph = make_fx(pure)(*inputs)
                else:
                    graph = make_fx(lambda *values: around(pure, *values))(*inputs)
        except RuntimeError as error:
            if "_local_scalar_dense" not in str(error):
                raise
            raise ValueError(
                "the program reads a tensor's value as a Python number (.item(), int(), a"
                " branch on a tensor) while it is recorded, which a compiled program cannot"
                " replay: leave jit off"
            ) from error
        _refuse_hidden_updates(graph)
        return graph


def refuse_schedule(schedule: Optional[Callable]) -> None:
    """A compiled program keeps the Python numbers it read when it was recorded: refuse a
    ``schedule`` hook, which exists to change such numbers between epochs."""
    if schedule is not None:
        raise ValueError(
            "jit records the program once, with the Python numbers it reads then; a schedule"
            " changes such numbers between epochs (a KL warm-up's weight), and the compiled"
            " program would keep their first values: leave jit off, or pass no schedule (a"
            " learning-rate schedule, lr_schedule, works with jit)"
        )


def _refuse_hidden_updates(graph: torch.fx.GraphModule) -> None:
    """Raise a ValueError when the recorded program updates in place a tensor it does not
    take as an input (see ``hidden_update``)."""
    update = hidden_update(graph)
    if update is not None:
        raise ValueError(
            f"the program updates a tensor in place ({update}) that is neither a"
            " parameter nor an argument, a module's buffer such as a moving average;"
            " a compiled program would not keep the update: leave jit off (or fit"
            " with the module in eval mode, if that turns the update off)"
        )


def hidden_update(graph: torch.fx.GraphModule) -> Optional[str]:
    """The first operation of a recorded graph that updates in place a tensor the graph does
    not take as an input (a module's buffer, such as a VQ-VAE's moving averages), else None:
    the graph holds such a tensor as a constant, so the update would not carry over from one
    call to the next."""
    for node in graph.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for value, argument in zip(node.args, schema.arguments):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.fx.Node) and _base(value).op == "get_attr":
                return str(node.target)
    return None


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose tensor ``node`` views (through views of views), else ``node``."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        schema = getattr(node.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            break
        node = node.args[0]
    return node


class CompiledStep:
    """A whole training step, the objective, its gradient and torch Adam's update of every
    parameter, recorded as one graph (``make_fx``) and compiled by TorchInductor, once per
    batch shape: what ``reparam.fit`` and ``svi.fit`` run with ``jit="inductor"`` and their
    default optimizer. Against the compiled objective followed by ``optimizer.step()`` it saves
    the optimizer's per-step Python (state lookups, checks, its kernel launch) and a pass over
    the gradients, whose update is fused into the backward pass; ``benchmarks/vae_speed.py``
    measures it.

    The optimizer keeps the state: its ``exp_avg``, ``exp_avg_sq`` and ``step`` are updated in
    place, so checkpoints, resumes and learning-rate schedules (the group's ``lr``, read every
    step) work as with ``optimizer.step()``. The update is torch's Adam (no amsgrad, weight
    decay or maximize) up to float rounding; a test compares a fit's parameters with the
    uncompiled driver's. The parameters are not given a ``.grad``.

    ``CompiledStep.refusal(objective, optimizer)`` says why a pair cannot be run this way
    (None when it can); the driver then compiles the objective alone.
    """

    def __init__(self, objective: Compiled, optimizer: torch.optim.Adam):
        self.objective, self.optimizer, self.graphs = objective, optimizer, {}
        self._count, self._counted = 0, None  # a Python copy of Adam's step: no device read

    @staticmethod
    def refusal(objective, optimizer) -> Optional[str]:
        """Why ``objective`` and ``optimizer`` cannot be run as one compiled step, or None."""
        if not isinstance(objective, Compiled) or objective.backend != "inductor":
            return "the objective is not compiled by TorchInductor"
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
            return "the optimizer is not torch's Adam with one parameter group"
        group = optimizer.param_groups[0]
        for option in ("amsgrad", "maximize", "differentiable", "capturable"):
            if group.get(option):
                return f"Adam's {option} is on"
        if group.get("weight_decay"):
            return "Adam has weight decay"
        if any(torch.is_tensor(group[key]) for key in ("lr", "eps")):
            return "Adam's learning rate or eps is a tensor"
        store = pyro.get_param_store()
        if {id(store._params[name]) for name in objective.names} != {
            id(p) for p in group["params"]
        }:
            return "the optimizer's parameters are not the objective's"
        if _distributed():
            return "gradients are averaged over torch.distributed ranks before the update"
        return None

    def __call__(self, *args) -> torch.Tensor:
        """One step on a batch (the objective's arguments); returns the objective's value."""
        store = pyro.get_param_store()
        leaves = [store._params[name] for name in self.objective.names]
        group = self.optimizer.param_groups[0]
        states = [self._state(p, group) for p in leaves]
        avgs = [state["exp_avg"] for state in states]
        squares = [state["exp_avg_sq"] for state in states]
        steps = [state["step"] for state in states]
        inputs = [*leaves, *avgs, *squares, *args]
        betas, eps = tuple(group["betas"]), group["eps"]
        inside = all(s.device == p.device for s, p in zip(steps, leaves))
        key = (tuple((a.shape, a.stride(), a.dtype, a.device) for a in inputs), betas, eps, inside)
        if key not in self.graphs:  # recording runs the step once: from the same random state
            with pyro.validation_enabled(False), _same_draws(), torch.no_grad():
                self.graphs[key] = self._compile(store, leaves, args, betas, eps, inside)
        graph, used = self.graphs[key]
        first = steps[used[0]]
        if self._counted is not first:  # a new or a loaded state: read its count once
            self._count, self._counted = int(first), first
        self._count += 1
        scalars = torch.tensor(
            [
                group["lr"] / (1 - betas[0] ** self._count),  # step size
                math.sqrt(1 - betas[1] ** self._count),  # bias correction of the squares
            ],
            dtype=leaves[0].dtype,
        ).to(leaves[0].device, non_blocking=True)
        if not inside:
            torch._foreach_add_([steps[i] for i in used], 1.0)
        with torch.no_grad():
            return graph(*inputs[: 3 * len(leaves)], *(steps if inside else ()), scalars, *args)

    def _state(self, param, group):
        state = self.optimizer.state[param]
        if not state:  # what torch's Adam creates at its first step
            fused = group.get("fused") or group.get("capturable")
            state["step"] = torch.zeros(
                (), dtype=torch.float32, device=param.device if fused else "cpu"
            )
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _compile(self, store, leaves, args, betas, eps, inside):
        num, (beta1, beta2), used = len(leaves), betas, []

        def step(pure, *inputs):
            params, avgs, squares = inputs[:num], inputs[num : 2 * num], inputs[2 * num : 3 * num]
            offset = 4 * num if inside else 3 * num
            steps = inputs[3 * num : offset] if inside else [None] * num
            (step_size, correction), args = inputs[offset], inputs[offset + 1 :]
            with torch.enable_grad():
                loss = pure(*params, *args)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for i, (param, grad, avg, square, count) in enumerate(
                    zip(params, grads, avgs, squares, steps)
                ):
                    if grad is None:  # torch's Adam leaves a parameter without a gradient be
                        continue
                    used.append(i)
                    if count is not None:
                        count.add_(1)
                    avg.lerp_(grad, 1 - beta1)
                    square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    param.sub_(avg / (square.sqrt() / correction + eps) * step_size)
            return loss.detach()

        # make_fx runs the step once, on the parameters themselves (a module reads its own) and
        # on stand-ins for Adam's state; the parameters' values are put back afterwards
        saved = [leaf.detach().clone() for leaf in leaves]
        stand_ins = [torch.zeros_like(p) for p in leaves] + [torch.ones_like(p) for p in leaves]
        if inside:
            stand_ins += [torch.zeros((), dtype=torch.float32, device=p.device) for p in leaves]
        scalars = torch.ones(2, dtype=leaves[0].dtype, device=leaves[0].device)
        inputs = [*leaves, *stand_ins, scalars, *args]
        try:
            graph = self.objective.record(store, inputs, around=step)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(leaves, saved)
        if not used:
            raise ValueError("no parameter of the model or guide gets a gradient")
        # TorchInductor on the graph directly: the key above stands for torch.compile's guards,
        # whose checks of every input cost about a twentieth of a small VAE's step. Under
        # no_grad (the caller's): the graph holds its own backward pass, nothing to differentiate
        return torch._inductor.compile(graph, inputs, options=INDUCTOR_OPTIONS), used


def _same_draws():
    """Compiling runs the function once; the first step then draws what it would uncompiled."""
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def _no_float_reads():
    """Let Pyro's ELBO modules keep their float-valued loss a tensor while a graph is recorded."""
    import pyro.infer.trace_elbo as trace_elbo
    import pyro.infer.trace_mean_field_elbo as mean_field

    modules = (trace_elbo, mean_field)
    saved = [module.torch_item for module in modules]
    try:
        for module in modules:
            module.torch_item = lambda x: x
        yield
    finally:
        for module, item in zip(modules, saved):
            module.torch_item = item
