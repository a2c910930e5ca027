"""
How the drivers hand a user's data to a Pyro program, a minibatch at a time, and scale it.

The calling convention follows Pyro's: ``data`` is what the model and guide are called with::

    a tensor            -> model(x)
    a tuple or list     -> model(*data)             (None and other constants pass through)
    a mapping           -> model(**data)            (keyword arguments: tensors and constants)

Tensors are split into minibatches along their batch dimension, dim 0 unless ``batch_dims``
says otherwise (``batch_dims={"docs": 1}``, or ``None`` to hand a tensor whole to every call);
everything that is not a tensor (ints, floats, strings, None) is passed unchanged.

Minibatch scaling is found from the program, never assumed (``find_data_plates``): the model and
guide are run on minibatches of two different sizes, and the plates whose size follows the
number of rows are the data plates, whatever their names, sized or sizeless, subsampling or
not. ``ScaleRows`` then scales every site inside them by N / (rows in this call), on top of
any scale Pyro applies itself, so the objective is unbiased for the whole data set and global
sites are counted once. A plate of the data's full size whose subsample is the rows given
(``pyro.plate("data", N, len(batch))``) is scaled by Pyro itself and left alone.
A program that cannot be minibatched this way is refused with an error
that names the plate or site and says what to do; on the whole data at once (``batch_size=None``
or a batch at least N) nothing is scaled and the program runs exactly as in Pyro's own SVI loop.
"""

import contextlib
import functools
import inspect
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


def check_count(name: str, value) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


def arguments(value) -> Tuple[tuple, dict]:
    """The ``(args, kwargs)`` a model is called with for data (or a minibatch) ``value``."""
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    raise TypeError(
        f"data must be a tensor, a tuple of the model's arguments or a mapping of its keyword"
        f" arguments, not {type(value).__name__}"
    )


def call(fn: Callable, value):
    """``fn`` called with the data ``value`` (see ``arguments``)."""
    args, kwargs = arguments(value)
    return fn(*args, **kwargs)


class Rows:
    """Which entries of ``data`` are split into minibatches, along which dim, and how many rows.

    ``take(index)`` and ``slice(start, stop)`` return the same structure as ``data`` (a tensor,
    a tuple or a dict) holding only those rows; constants are passed along unchanged.
    """

    def __init__(self, data, batch_dims=None):
        arguments(data)  # the type check
        self.data = data
        if isinstance(data, torch.Tensor):
            self.kind, entries = "tensor", {None: data}
        elif isinstance(data, Mapping):
            self.kind, entries = "kwargs", dict(data)
        else:
            self.kind, entries = "args", dict(enumerate(data))
        self.dims = self._dims(entries, batch_dims)
        if not self.dims:
            raise ValueError(
                "data holds no tensor to split into minibatches: pass the data points as"
                " tensors (rows along dim 0, or say where with batch_dims=)"
            )
        lengths = {}
        for key, dim in self.dims.items():
            tensor = entries[key]
            if not -tensor.dim() <= dim < max(1, tensor.dim()) or tensor.dim() == 0:
                raise ValueError(
                    f"{self.label(key)} has shape {tuple(tensor.shape)}: it has no dim {dim} to"
                    " split into minibatches; pass batch_dims= with its batch dim, or None to"
                    " hand it whole to every call"
                )
            lengths[key] = tensor.shape[dim]
        first = next(iter(lengths))
        for key, length in lengths.items():
            if length != lengths[first]:
                raise ValueError(
                    f"{self.label(key)} has {length} rows along dim {self.dims[key]} but"
                    f" {self.label(first)} has {lengths[first]}: every argument split into"
                    " minibatches needs the same number of rows (pass batch_dims= to say"
                    " which dim holds them, or None to hand an argument whole to every call)"
                )
        self.num_data = lengths[first]
        if self.num_data == 0:
            raise ValueError(f"data is empty: {self.label(first)} has 0 rows")
        self._first = first
        for key in self.dims:
            tensor = entries[key]
            if tensor.is_floating_point() and tensor.layout == torch.strided:
                finite = torch.isfinite(tensor)
                if not finite.all():
                    count = int((~finite).sum())
                    raise ValueError(
                        f"{self.label(key)} contains {count} NaN or infinite values: remove or"
                        " impute them (a model with missing values can mask them with"
                        " poutine.mask or obs_mask, with the data filled in)"
                    )

    def _dims(self, entries, batch_dims) -> Dict[object, int]:
        tensors = [k for k, v in entries.items() if isinstance(v, torch.Tensor)]
        if batch_dims is None:
            return {k: 0 for k in tensors}
        if isinstance(batch_dims, int):
            return {k: batch_dims for k in tensors}
        if self.kind == "tensor":
            raise TypeError("for a single tensor, batch_dims is an int")
        if self.kind == "args":
            if isinstance(batch_dims, Mapping) or len(batch_dims) != len(entries):
                raise ValueError(
                    f"batch_dims for {len(entries)} positional arguments is an int or a sequence"
                    f" of {len(entries)} (int or None), not {batch_dims!r}"
                )
            given = dict(enumerate(batch_dims))
        else:
            if not isinstance(batch_dims, Mapping):
                raise TypeError("for keyword data, batch_dims is a mapping of names to dims")
            unknown = sorted(set(batch_dims) - set(entries))
            if unknown:
                raise ValueError(f"batch_dims names {unknown}, which the data does not hold")
            given = dict(batch_dims)
        dims = {}
        for key in entries:
            dim = given.get(key, 0)
            if dim is None or key not in tensors:
                if dim is not None and key in given:
                    raise ValueError(f"{self.label(key)} is not a tensor: it has no batch dim")
                continue
            dims[key] = int(dim)
        return dims

    def label(self, key) -> str:
        return "data" if self.kind == "tensor" else f"data[{key!r}]"

    @property
    def device(self) -> torch.device:
        return self._entry(self.data, self._first).device

    def _entry(self, value, key):
        return value if self.kind == "tensor" else value[key]

    def _rebuild(self, fn):
        if self.kind == "tensor":
            return fn(None, self.data)
        if self.kind == "args":
            out = [fn(k, v) if k in self.dims else v for k, v in enumerate(self.data)]
            return type(self.data)(out) if isinstance(self.data, tuple) else out
        return {k: fn(k, v) if k in self.dims else v for k, v in self.data.items()}

    def take(self, index: torch.Tensor):
        """The rows ``index`` (a 1-d LongTensor) of every split entry."""
        return self._rebuild(lambda k, t: t.index_select(self.dims[k], index.to(t.device)))

    def slice(self, start: int, stop: int):
        """Rows ``start:stop`` of every split entry."""
        stop = min(stop, self.num_data)
        return self._rebuild(lambda k, t: t.narrow(self.dims[k], start, stop - start))

    def count(self, args: tuple, kwargs: dict) -> int:
        """How many rows the call ``fn(*args, **kwargs)`` was given."""
        key = self._first
        tensor = args[0] if self.kind == "tensor" else (args if self.kind == "args" else kwargs)
        if self.kind != "tensor":
            tensor = tensor[key]
        return tensor.shape[self.dims[key]]


# ------------------------------------------------------------------------------ scaling


class ScaleRows(Messenger):
    """Multiply the scale of every sample site by ``factor`` once for each of ``plates`` it
    lies in: N / B for a minibatch of B of N rows. Pyro's own scale (a subsampling plate's
    size / subsample_size, a ``poutine.scale``) is kept and multiplied."""

    def __init__(self, plates: Sequence[str], factor: float):
        super().__init__()
        self.plates, self.factor = frozenset(plates), factor

    def _process_message(self, msg):
        if msg["type"] != "sample" or self.factor == 1:
            return
        count = sum(frame.name in self.plates for frame in msg["cond_indep_stack"])
        if count:
            msg["scale"] = self.factor**count * msg["scale"]


def scale_rows(fn: Callable, plates: Sequence[str], rows: Rows) -> Callable:
    """``fn`` (a model or guide) with the sites in ``plates`` scaled to ``rows.num_data`` rows,
    the factor read from each call's own arguments (so a smaller last batch is right, and a
    compiled objective, traced once per shape, too)."""
    if not plates:
        return fn

    @functools.wraps(fn)
    def scaled(*args, **kwargs):
        with ScaleRows(plates, rows.num_data / rows.count(args, kwargs)):
            return fn(*args, **kwargs)

    return scaled


class _PrivateDraws(Messenger):
    """Draw each sample statement's value from a copy of torch's random state: a set-up run of
    the program then moves the global state only by what it draws outside sample statements
    (a parameter's or an AutoGuide's initialization), as the first step of Pyro's loop does
    before it samples, so the driver's first step draws what Pyro's first step draws."""

    def _pyro_sample(self, msg):
        if msg["value"] is not None or msg["is_observed"] or msg["done"]:
            return
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])


@contextlib.contextmanager
def untouched_modules():
    """Every ``nn.Module`` called inside runs in evaluation mode, and on exit gets back its
    training flag and its buffers (values and objects): a set-up run then neither draws dropout
    masks from torch's global generator nor updates batch norm's running statistics, so the
    first step sees the modules as the first step of Pyro's own loop sees them.

    Done with a global forward pre-hook, which sees the modules a program calls however it
    reaches them (``pyro.module``, a ``PyroModule`` attribute, a closure). A module's
    ``training`` flag is set on the module called, not its children, which get their own call.
    """
    seen = {}

    def hook(module, args):
        if id(module) in seen:
            return
        buffers = {
            name: (value, value.detach().clone())
            for name, value in module._buffers.items()
            if isinstance(value, torch.Tensor)
        }
        seen[id(module)] = (module, module.training, buffers)
        module.training = False

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, training, buffers in seen.values():
                module.training = training
                for name, (tensor, value) in buffers.items():
                    tensor.copy_(value)  # the same object, as an optimizer or a view holds it
                    module._buffers[name] = tensor


@contextlib.contextmanager
def private_draws():
    """The context of a set-up run that creates parameters (see ``_PrivateDraws``), with
    gradients off and the modules untouched like every probe (``same_random_state``)."""
    with _PrivateDraws(), torch.no_grad(), untouched_modules():
        yield


@contextlib.contextmanager
def same_random_state():
    """Run a probe of the program without moving torch's random state, so that a fit draws
    the same numbers as Pyro's own loop started from the same seed. Gradients are off: a
    program that updates state of its own while training (a VQ-VAE's moving-average codebook,
    gated on ``torch.is_grad_enabled()``) is updated by the steps alone, as in Pyro's loop;
    modules run in evaluation mode and keep their buffers (``untouched_modules``)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with torch.no_grad(), untouched_modules():
            yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_program(model, guide, value, validate: bool = True):
    """The guide's trace and the model's trace replayed on it, for data ``value``; creates any
    parameter they read. No log-probability is computed."""
    args, kwargs = arguments(value)
    if isinstance(value, Mapping):
        for who, fn in (("guide", guide), ("model", model)):
            if fn is not None:
                check_keywords(who, fn, kwargs)
    with pyro.validation_enabled(validate):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs) if guide else None
        model_fn = poutine.replay(model, trace=guide_trace) if guide_trace else model
        model_trace = poutine.trace(model_fn).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def check_keywords(who: str, fn: Callable, kwargs: dict) -> None:
    """Raise a TypeError, before any work, when ``fn`` cannot be called with the entries of a
    mapping as keyword arguments: the data as a mapping are unpacked (``fn(**data)``), as
    Pyro's ``SVI.step(**data)`` unpacks them, which a program taking the mapping whole as one
    argument does not expect."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an object without one: nothing to check
        return
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise TypeError(
            f"the data are a mapping, so the driver calls the {who} with its entries as keyword"
            f" arguments, {name}(**data), as Pyro's SVI.step(**data) does; but {name}() cannot"
            f" take them ({error}; keys {sorted(kwargs)}). For a program that takes the"
            " mapping whole as one argument, fit lambda **data: model(data) and lambda **data:"
            " guide(data)"
        ) from None


def check_support(model, guide, value) -> None:
    """Raise a ValueError naming the observed site whose data lie outside its distribution's
    support (non-binary pixels under a Bernoulli, negative counts under a Poisson), with the
    count of bad values, instead of Pyro's constraint message at the first step.

    Where Pyro would check nothing, neither does this: with validation switched off
    (``pyro.enable_validation(False)``), and at a site whose distribution was built with
    ``validate_args=False``. The program runs with validation on, so that only such an
    explicit ``False`` reaches the site's distribution (``expand`` copies the default in)."""
    if not torch.distributions.Distribution._validate_args:
        return
    with same_random_state():
        model_trace, _ = run_program(model, guide, value, validate=True)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site_is_subsample(site):
            continue
        fn, data = site["fn"], site["value"]
        if not isinstance(data, torch.Tensor) or data.layout != torch.strided:
            continue
        if _asked_for_no_checks(fn):
            continue
        try:
            inside = fn.support.check(data)
        except (NotImplementedError, RuntimeError):  # a support that cannot check this value
            continue
        outside = ~inside
        for mask in (site["mask"], getattr(fn, "_mask", None)):  # masked-out values may be
            if isinstance(mask, torch.Tensor):  # placeholders (an unknown label, say)
                outside = outside & mask.bool()
            elif mask is False:
                outside = torch.zeros_like(outside)
        if bool(outside.any()):
            count = int(outside.sum())
            base = getattr(fn, "base_dist", fn)
            raise ValueError(
                f"observed site {name!r}: {count} of {outside.numel()} data points have values"
                f" outside the support of {type(base).__name__} ({fn.support}); e.g. binarize"
                " the data for a Bernoulli likelihood, or pick a likelihood whose support holds"
                " the data"
            )


def _asked_for_no_checks(fn) -> bool:
    """Whether ``fn`` (or a distribution it wraps) was built with ``validate_args=False``: the
    program asked for no support check there (Pyro's VAE examples put a Bernoulli likelihood
    on grey pixels, a cross-entropy), and Pyro's own loop does none."""
    while fn is not None:
        if fn.__dict__.get("_validate_args", None) is False:
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def probe_sizes(batch_size: int, num_data: int) -> Tuple[int, int]:
    """Two different minibatch sizes to run the program on, the first the real one."""
    second = batch_size - 1 if batch_size > 1 else 2
    return batch_size, min(second, num_data)


def _runs_on_sizes(model, guide, rows, sizes, whole, hint) -> list:
    """[(size, traces)] of the program run on the first ``size`` rows for each size; a failure
    on fewer rows than the whole data is said as what it is (a program that cannot be
    minibatched), with ``hint`` as the remedy."""
    runs = []
    for size in sizes:
        try:  # the first run creates the parameters, as the first step would
            with same_random_state() if runs else private_draws():
                traces = run_program(model, guide, rows.slice(0, size))
        except Exception as error:
            if runs and whole and size < runs[0][0]:
                break  # called on these rows only: the first run tells the plates
            if not runs and not runs_on(model, guide, rows.data):
                raise  # it fails on the whole data as well: the program's own error
            which = (
                f"fail on a minibatch of {size} rows"
                if not runs
                else f"run on {sizes[0]} rows but fail on a minibatch of {size}"
            )
            raise ValueError(
                f"the model and guide {which} ({type(error).__name__}: {error}). The driver"
                " calls them on minibatches of the data (split along the batch dims): a"
                " parameter or plate sized for other rows (a local, non-amortized parameter; a"
                " size fixed from outside the data) cannot be minibatched. Make the program"
                " follow the rows it is given" + hint
            ) from error
        runs.append((size, traces))
    return runs


def _self_subsampling(runs, found, tracking, num_data, per_point) -> list:
    """The plates of a fixed full size whose subsample is the rows they are given (Pyro's
    svi_torch example: pyro.plate("data", N, subsample_size=len(batch))): Pyro scales them by
    N / B itself, so they are data plates that need no further scaling; their N is checked."""
    subsamples = [_plate_sizes(traces, subsampled=True) for _, traces in runs]
    own = sorted(
        name
        for name in set.intersection(*(set(f) for f in subsamples)) - set(tracking)
        if len(runs) > 1 and all(f[name] == {size} for f, (size, _) in zip(subsamples, runs))
    )
    for name in own:
        full = found[0][name]
        if not per_point and full != {num_data}:
            raise ValueError(
                f"pyro.plate({name!r}) subsamples the rows it is given from a full size of"
                f" {sorted(full)[0]}, but the data have {num_data} rows: Pyro would scale"
                f" each minibatch to {sorted(full)[0]} data points. Give the plate the number"
                " of rows of the whole data as its size"
            )
    return own


def find_data_plates(
    model: Callable,
    guide: Optional[Callable],
    rows: Rows,
    sizes: Sequence[int],
    data_plate: Optional[str] = None,
    per_point: bool = False,
    whole: bool = False,
) -> Tuple[str, ...]:
    """The names of the plates that index the rows of ``rows``.

    The program is run on the first ``sizes[i]`` rows for each size (the first run creates the
    parameters, under ``private_draws``; the others leave the random state as it was); a plate
    is a data plate when its declared size (its full size, for a plate that subsamples) equals
    the number of rows in every run; the sites in these are scaled by N / B. A plate whose
    subsample is the rows it is given, from a fixed full size (the data's N: checked), is
    scaled by Pyro itself and needs nothing more: it is returned only with ``per_point``.
    ``data_plate`` names the one to use and is checked. Raises a ValueError naming the plates
    and sites when no plate follows the rows, or when a site outside them has a dimension
    that does. ``per_point``: the caller
    needs a term per data point (EM, scores), so "use the whole data" is no remedy.
    ``whole``: ``rows`` are all the rows the program will be called on (a score of data that
    fit in one chunk), so a program that fails on fewer (an argument with an entry per row
    that is not a tensor) is read off the run on all of them: its plates of that size.
    """
    hint = "" if per_point else ", or fit on the whole data at once (batch_size=None)"
    runs = _runs_on_sizes(model, guide, rows, sizes, whole, hint)
    found = [_plate_sizes(traces) for _, traces in runs]
    names = set.intersection(*(set(f) for f in found))
    tracking = sorted(
        name for name in names if all(f[name] == {size} for f, (size, _) in zip(found, runs))
    )
    own = _self_subsampling(runs, found, tracking, rows.num_data, per_point)
    described = {
        name: [sorted(f.get(name, {"absent"}), key=str) for f in found]
        for name in sorted(set().union(*found))
    }
    tried = " and ".join(str(size) for size, _ in runs) + " rows"
    if data_plate is not None:
        if data_plate not in described:
            raise ValueError(
                f"the model has no pyro.plate named {data_plate!r} (plates found:"
                f" {sorted(described) or 'none'})"
            )
        if data_plate in own:
            return (data_plate,) if per_point else ()
        if data_plate not in tracking:
            raise ValueError(
                f"pyro.plate({data_plate!r}) has sizes {described[data_plate]} when run on"
                f" {tried}: its size does not follow the number of rows; give it the batch's"
                " length (pyro.plate(name, len(x)))" + hint
            )
        tracking = [data_plate]
    if not tracking and own:  # scaled by Pyro itself
        _check_no_unplated_rows(runs, own, hint)
        return tuple(own) if per_point else ()
    if not tracking:
        raise ValueError(
            f"no pyro.plate's size follows the number of rows: run on {tried}, the plates had"
            f" sizes {described or 'none (the model has no plate)'}. Put the sites of each data"
            " point in pyro.plate('data', len(x)) (a plate that subsamples itself is fine), or"
            " say with batch_dims= where the rows are if not along dim 0" + hint
        )
    _check_no_unplated_rows(runs, [*tracking, *own], hint)
    return tuple(tracking)


def runs_on(model, guide, value) -> bool:
    """Whether the program runs on ``value`` (to tell a minibatch problem from another one)."""
    try:
        with same_random_state():
            run_program(model, guide, value)
    except Exception:
        return False
    return True


def data_plates(
    model, guide, example, data_plate=None, batch_dims=None, per_point=False, whole=False
) -> Tuple[str, ...]:
    """``find_data_plates`` on an example batch: on all its rows and on one row fewer (one
    row: the plates of size 1). ``whole``: the example is all the data (see there)."""
    rows = Rows(example, batch_dims)
    n = rows.num_data
    sizes = (n, n - 1) if n > 1 else (1,)
    return find_data_plates(model, guide, rows, sizes, data_plate, per_point, whole)


def _plate_sizes(traces, subsampled: bool = False) -> Dict[str, set]:
    """Plate name -> the sizes its frames declare in these traces: the full size of a plate
    that subsamples itself, or with ``subsampled`` the subsample's size of such a plate only.
    A sizeless plate's size is read off the site: its distribution's batch shape, or the
    observed value's where that is larger (``f ~ Beta`` outside the plate, ``x ~ Bernoulli(f)``
    inside it: the rows are only in the data)."""
    sizes: Dict[str, set] = {}
    sizeless: Dict[str, int] = {}
    for trace in traces:
        if trace is None:
            continue
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                full = frame.full_size
                if subsampled:
                    if full is not None and full != frame.size:
                        sizes.setdefault(frame.name, set()).add(int(frame.size))
                    continue
                size = full if full is not None else frame.size
                if size == -1 and frame.dim is not None:  # broadcast: sites of size 1 say nothing
                    size = max(_dim_size(site, frame.dim, value) for value in (False, True))
                    sizeless[frame.name] = max(sizeless.get(frame.name, 1), size)
                    continue
                sizes.setdefault(frame.name, set()).add(int(size))
    for name, size in sizeless.items():
        sizes.setdefault(name, set()).add(size)
    return sizes


def _dim_size(site, dim: int, value: bool) -> int:
    """The size of batch dim ``dim`` of a site's distribution or (``value``) of its value."""
    fn = site["fn"]
    shape = tuple(getattr(fn, "batch_shape", ()))
    if value:
        data = site["value"]
        if not isinstance(data, torch.Tensor):
            return 1
        event = len(getattr(fn, "event_shape", ()))
        shape = tuple(data.shape[: data.dim() - event])
    return int(shape[dim]) if len(shape) >= -dim else 1


def _check_no_unplated_rows(runs, plates, whole) -> None:
    """Refuse a site outside every data plate whose shape follows the number of rows: its
    log-probability covers the whole minibatch but would not be scaled."""
    (size_a, traces_a), (size_b, traces_b) = runs[0], runs[-1]
    if size_a == size_b:
        return
    for trace_a, trace_b in zip(traces_a, traces_b):
        if trace_a is None:
            continue
        for name, site in trace_a.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or name not in trace_b:
                continue
            if any(frame.name in plates for frame in site["cond_indep_stack"]):
                continue
            shape_a = _site_shape(site)
            shape_b = _site_shape(trace_b.nodes[name])
            if len(shape_a) == len(shape_b) and any(
                a == size_a and b == size_b for a, b in zip(shape_a, shape_b)
            ):
                raise ValueError(
                    f"site {name!r} has shape {tuple(shape_a)} on {size_a} rows and"
                    f" {tuple(shape_b)} on {size_b}: a dimension follows the number of rows but"
                    f" the site is in no plate over them ({', '.join(plates)}), so its terms"
                    " cannot be told apart by data point (nor a minibatch scaled). Put it inside"
                    " the data plate (the rows as a batch dimension, not an event dimension)"
                    + whole
                )


def _site_shape(site) -> torch.Size:
    fn = site["fn"]
    return torch.Size(getattr(fn, "batch_shape", ())) + torch.Size(getattr(fn, "event_shape", ()))
