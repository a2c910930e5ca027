"""
Expectation-maximization for any Pyro model whose latent variables are discrete, enumerable and
local to a data point (one per point, as in a mixture, or a Markov chain of them under
``pyro.markov``, as in an HMM) and whose parameters are point estimates (``pyro.param``,
``pyro.module`` or ``PyroParam``).

    result = em.fit(model, guide, x, tol=1e-6, max_iter=500, n_init=1, init="kmeans++")

E-step: the posterior over the discrete latents, computed from the model itself by parallel
enumeration (``inference.enumeration``: for a chain, variable elimination along it, the
forward-backward algorithm); no hand-written E-step or recursion. M-step: if the object that owns
``model`` offers ``sufficient_statistics(x, resp) -> dict`` and ``m_step(stats)`` (the zoo's
mixtures do), the closed form; otherwise gradient-based maximization (L-BFGS) of the expected
complete-data log-likelihood plus any log prior the model adds with ``pyro.factor``.

Each iteration makes one pass over the data in chunks of rows: it evaluates the objective (mean
log-likelihood + log prior / N) of the current parameters and accumulates the sufficient
statistics in float64. The objective never decreases: if an M-step lowered it (possible only by
rounding, or by a covariance floor), the driver restores the previous parameters and stops.
Initialization follows scikit-learn: hard responsibilities from k-means++ seeding and a few Lloyd
iterations, then one M-step. Drivers do not print; pass ``progress=True`` for a progress bar, or
a ``callback(record)`` that is called after every iteration (returning True stops the fit there,
unconverged, with the parameters of that iteration).
"""

import math
import time
import warnings
from typing import Callable, Optional, Union

import pyro
import torch
from torch.distributions import transform_to
from tqdm.auto import tqdm

from inference.batching import check_count
from inference.enumeration import Enumerated, validation_off
from inference.result import FitResult
from inference.sparse import SparseRows
from inference.threads import Threads


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the objective changed by less than ``tol``."""


INITS = ("kmeans++", "random", "params")


def fit(
    model: Callable,
    guide: Optional[Callable],
    data: Union[torch.Tensor, SparseRows],
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
    n_init: int = 1,
    init: Union[str, torch.Tensor] = "kmeans++",
    kmeans_iters: int = 10,
    seed: int = 0,
    m_step: str = "auto",
    m_step_iters: int = 100,
    chunk_size: Optional[int] = None,
    data_plate: Optional[str] = None,
    callback: Optional[Callable[[dict], None]] = None,
    progress: bool = False,
    threads: Union[str, int, None] = None,
) -> FitResult:
    """Fit ``model`` to ``data`` by EM, keeping the best of ``n_init`` restarts.

    Args:
        data: an (N, ...) tensor, or ``SparseRows`` of mostly-zero (N, D) data (binarized images),
            whose chunks the model then receives as CSR tensors; see ``inference.sparse``.
        tol: stop when the mean objective (nats per data point) changes by less; scikit-learn's
            mixtures use 1e-3.
        init: "kmeans++" (default), "random" (random hard assignments), "params" (start from the
            parameters as they are, as scikit-learn's ``*_init`` arguments do), or an (N, K) tensor
            of initial responsibilities.
        m_step: "auto" (closed form if the model's owner has one, else gradient), "closed",
            "gradient".
        chunk_size: rows per chunk of the E-step pass; by default as many as keep the E-step's
            temporaries near 2**22 values (at least 4096 rows). A model whose owner has
            ``e_step_values_per_row(K)`` says how many values it makes per row; otherwise 4 K D is
            assumed (a full-covariance Gaussian's solves). Fewer chunks mean fewer runs of the model
            under enumeration, whose fixed cost dominates when K is small; chunks much larger than
            the cache cost time again (measured for the Bernoulli mixture at K = 500). For
            ``SparseRows`` the size is rounded to a whole number of their tiles.
        threads: torch's CPU thread count during the iterations: "auto" (timed, see
            ``inference.threads``), a count, or "torch" (left alone); None reads ``ZOO_THREADS``.
    """
    data = _check_data(data)
    _check_counts(tol, max_iter, n_init, m_step_iters, chunk_size, init)
    example = data.rows(0, 4) if isinstance(data, SparseRows) else data[:4]
    enum = Enumerated(model, guide, example, data_plate)
    m_step, num_values = _m_step_for(enum, data, init, m_step)
    closed = _closed_form(model, m_step)
    if init == "params" and n_init > 1:
        raise ValueError("init='params' starts from the current parameters; use n_init=1")
    if chunk_size is None:
        row_size = data.shape[1] if isinstance(data, SparseRows) else data[0].numel()
        chunk_size = _default_chunk_size(model, num_values, max(1, row_size))
    state = _State(enum, closed, data, chunk_size, m_step_iters, example)
    _check_parameters(state, data)
    best = None
    with Threads(threads) as tuner:
        for restart in range(n_init):
            generator = torch.Generator(device=data.device).manual_seed(seed + restart)
            if not (isinstance(init, str) and init == "params"):
                state.initialize(init, kmeans_iters, generator, tuner.tick)
            tuner.new_phase()
            result = _run(state, tol, max_iter, callback, progress, restart, n_init, tuner)
            result.extra["restart"] = restart
            if best is None or result.objective > best.objective:
                best, best_params = result, state.snapshot()
    state.restore(best_params)
    best.params = state.constrained()
    best.extra["num_components"] = enum.num_values
    best.extra["latents"] = list(enum.latents)
    if not best.converged:
        warnings.warn(
            f"EM did not converge: {best.stop_reason} (last change "
            f"{best.extra.get('last_change', float('nan')):.3g}, tol {tol:g})",
            ConvergenceWarning,
            stacklevel=2,
        )
    return best


def _check_counts(tol, max_iter, n_init, m_step_iters, chunk_size, init) -> None:
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    for name, value in (("max_iter", max_iter), ("n_init", n_init), ("m_step_iters", m_step_iters)):
        check_count(name, value)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size)
    if isinstance(init, str) and init not in INITS:
        raise ValueError(f"init must be one of {INITS} or an (N, K) tensor, not {init!r}")


def _m_step_for(enum, data, init, m_step):
    """(the M-step, the values per chunk row) for the program's latents: several discrete
    latents per point take the gradient M-step from the parameters' own starting values."""
    if enum.single:
        if enum.num_values > len(data):
            raise ValueError(
                f"cannot fit {enum.num_values} components to {len(data)} data points (K larger"
                " than N)"
            )
        return m_step, enum.num_values
    if not (isinstance(init, str) and init == "params"):
        raise ValueError(
            f"the model has several discrete latents per data point ({enum.latents[:3]}"
            f"{', ...' if len(enum.latents) > 3 else ''}): initialization by k-means or by"
            " random assignments is for one latent; give the parameters their starting"
            " values in the model (pyro.param's init) and pass init='params'"
        )
    if m_step == "closed":
        raise ValueError("m_step='closed' is for one discrete latent per data point")
    return "gradient", 1  # one value per row for the chunk size


def _check_parameters(state, data) -> None:
    dtypes = {p.dtype for p in state.params.values()}
    if data.dtype.is_floating_point and dtypes and data.dtype not in dtypes:
        raise TypeError(
            f"data is {data.dtype} but the model's parameters are {sorted(map(str, dtypes))}:"
            f" convert one to the other (x.to({next(iter(dtypes))}), or the model with .to())"
        )
    if not state.params:
        raise ValueError(
            "the model reads no parameters to fit (pyro.param, pyro.module or PyroParam): EM"
            " has nothing to maximize"
        )


def initialize(model, guide, data, seed: int = 0, init: str = "kmeans++", data_plate=None):
    """Set a one-latent model's parameters to EM's start, without iterating: ``init``'s hard
    assignments (k-means++, seeded as ``fit``'s first restart, or random) and one M-step. What
    another optimizer starts from when it is compared with EM from the same point."""
    data = _check_data(data)
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', not {init!r}")
    example = data.rows(0, 4) if isinstance(data, SparseRows) else data[:4]
    enum = Enumerated(model, guide, example, data_plate)
    if not enum.single:
        raise ValueError("EM's start is for models with one discrete latent per data point")
    row_size = data.shape[1] if isinstance(data, SparseRows) else data[0].numel()
    chunk_size = _default_chunk_size(model, enum.num_values, max(1, row_size))
    state = _State(enum, _closed_form(model, "auto"), data, chunk_size, 100, example)
    generator = torch.Generator(device=data.device).manual_seed(seed)
    state.initialize(init, 10, generator)


def _run(state, tol, max_iter, callback, progress, restart, n_init, tuner) -> FitResult:
    history, start = [], time.perf_counter()
    converged, stop_reason, previous = False, f"reached max_iter={max_iter}", None
    bar = tqdm(
        total=max_iter,
        disable=not progress,
        desc="EM" if n_init == 1 else f"EM {restart + 1}/{n_init}",
        leave=False,
    )
    with bar:
        for step in range(1, max_iter + 1):
            objective, log_likelihood, stats = state.e_pass(keep_stats=True, validate=step == 1)
            tuner.tick()  # one E-step and the M-step before it
            if previous is not None and objective < history[-1]["objective"]:
                # Rounding or a covariance floor made the last M-step lower the objective: keep
                # the parameters that were better, so the recorded objective never decreases.
                state.restore(previous)
                drop = history[-1]["objective"] - objective
                # a fall within the rounding error of the objective means there is nothing left
                converged = drop < max(tol, state.rounding(objective))
                stop_reason = (
                    f"objective fell by {drop:.3g} at iteration {step}"
                    + (" (rounding): converged" if converged else "")
                    + "; kept the previous parameters"
                )
                break
            record = {
                "iteration": step,
                "objective": objective,
                "log_likelihood": log_likelihood,
                "time": time.perf_counter() - start,
            }
            history.append(record)
            if callback is not None and callback(dict(record, restart=restart)) is True:
                stop_reason = f"stopped by the callback at iteration {step}"
                break
            bar.update(1)
            bar.set_postfix(objective=f"{objective:.6g}")
            change = math.inf if len(history) < 2 else objective - history[-2]["objective"]
            previous = state.snapshot()
            state.m_step(stats)
            if abs(change) < tol:
                converged, stop_reason = True, f"objective changed by {change:.3g} < tol {tol:g}"
                break
    # The parameters after the final M-step: check them too, and report their objective.
    objective, log_likelihood, _ = state.e_pass(keep_stats=False)
    if history and objective < history[-1]["objective"] and previous is not None:
        state.restore(previous)
        objective, log_likelihood = history[-1]["objective"], history[-1]["log_likelihood"]
    last_change = (
        abs(history[-1]["objective"] - history[-2]["objective"]) if len(history) > 1 else 0
    )
    return FitResult(
        objective=objective,
        params={},
        history=history,
        converged=converged,
        stop_reason=stop_reason,
        extra={"log_likelihood": log_likelihood, "last_change": last_change},
    )


class _State:
    """The data, the enumerated model and its parameters, and the E and M steps over them."""

    def __init__(self, enum, closed, data, chunk_size, m_step_iters, example):
        self.enum, self.closed, self.data = enum, closed, data
        self.chunk_size, self.m_step_iters = chunk_size, m_step_iters
        self.params = enum.params(example)  # name -> unconstrained leaf tensor
        self.num_data = len(data)

    def rounding(self, objective: float) -> float:
        """How far the objective can move by rounding alone in the data's precision."""
        dtype = self.data.dtype
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1.2e-7
        return 4 * eps * max(1.0, abs(objective))

    def chunks(self, first_rows: bool = False):
        """The data in chunks of rows (each ``(first row, chunk)`` if ``first_rows``)."""
        if isinstance(self.data, SparseRows):
            pairs = self.data.chunks(self.chunk_size)
        else:
            pairs = (
                (i, self.data[i : i + self.chunk_size])
                for i in range(0, self.num_data, self.chunk_size)
            )
        for i, x in pairs:
            yield (i, x) if first_rows else x

    # ------------------------------------------------------------------------ E-step
    @torch.no_grad()
    def e_pass(self, keep_stats: bool, validate: bool = False):
        """Objective and mean log-likelihood of the current parameters, and M-step input.

        ``validate``: run Pyro's (and the model's own) data checks on this pass; the driver
        validates the first pass over the data and skips the checks after that.
        """
        total, global_term, stats, resps = 0.0, None, None, []
        with pyro.validation_enabled(validate):
            for x in self.chunks():
                log_px, resp, glob = self.enum.posterior(x)  # (n,), (n, K) or per factor, ()
                total += log_px.double().sum().item()
                if global_term is None:
                    global_term = glob.double().item()
                if not keep_stats:
                    continue
                if self.closed is not None:
                    stats = _add(stats, self.closed.sufficient_statistics(x, resp))
                else:
                    resps.append(resp)
        if not math.isfinite(total):
            raise FloatingPointError(
                "the log-likelihood is not finite: a data point has zero probability under every"
                " component (e.g. a pixel that no component can produce); add a prior"
            )
        log_likelihood = total / self.num_data
        objective = (total + global_term) / self.num_data
        return objective, log_likelihood, (stats if self.closed is not None else resps)

    # ------------------------------------------------------------------------ M-step
    def m_step(self, stats):
        if self.closed is not None:
            self.closed.m_step(stats)
        else:
            self._gradient_m_step(stats)

    def _expected_log_joint(self, resps, backward: bool) -> float:
        """Q(params) / N = (sum_n sum_k r[n, k] log p(x[n], z[n] = k) + log prior) / N."""
        total = 0.0
        for i, (x, resp) in enumerate(zip(self.chunks(), resps)):
            q, glob = self.enum.expected(x, resp)
            if i == 0:
                q = q + glob
            q = q / self.num_data
            if backward:
                (-q).backward()
            total += q.item()
        return total

    def _gradient_m_step(self, resps):
        leaves = list(self.params.values())
        before = self.snapshot()
        with torch.no_grad(), validation_off():
            q_before = self._expected_log_joint(resps, backward=False)
        optimizer = torch.optim.LBFGS(
            leaves,
            lr=1.0,
            max_iter=self.m_step_iters,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            with validation_off():
                return torch.tensor(
                    -self._expected_log_joint(resps, backward=True), dtype=torch.float64
                )

        optimizer.step(closure)
        with torch.no_grad(), validation_off():
            q_after = self._expected_log_joint(resps, backward=False)
        if not q_after >= q_before:  # generalized EM: any increase of Q raises the likelihood
            self.restore(before)
        for leaf in leaves:
            leaf.grad = None

    # ------------------------------------------------------------------------ initialization
    def initialize(self, init, kmeans_iters, generator, tick=None):
        num_values = self.enum.num_values
        if isinstance(init, torch.Tensor):
            resp = init.to(self.data)
            if resp.shape != (self.num_data, num_values):
                raise ValueError(
                    f"initial responsibilities must have shape {(self.num_data, num_values)},"
                    f" got {tuple(resp.shape)}"
                )
        else:
            if init == "kmeans++":
                dense = self.data.to_dense() if isinstance(self.data, SparseRows) else self.data
                labels = kmeans(dense, num_values, kmeans_iters, generator, tick)
                del dense
            else:
                labels = torch.randint(
                    num_values, (self.num_data,), generator=generator, device=self.data.device
                )
            resp = torch.nn.functional.one_hot(labels, num_values).to(self.data.dtype)  # (N, K)
        if self.closed is not None:
            stats = None
            for i, x in self.chunks(first_rows=True):
                stats = _add(stats, self.closed.sufficient_statistics(x, resp[i : i + x.shape[0]]))
            self.closed.m_step(stats)
        else:
            chunks = self.chunks(first_rows=True)
            self._gradient_m_step([resp[i : i + x.shape[0]] for i, x in chunks])

    # ------------------------------------------------------------------------ parameter state
    def snapshot(self):
        return {name: p.detach().clone() for name, p in self.params.items()}

    def restore(self, snapshot):
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(snapshot[name])

    def constrained(self):
        store = pyro.get_param_store()
        out = {}
        for name, p in self.params.items():
            constraint = store._constraints.get(name)
            value = transform_to(constraint)(p) if constraint is not None else p
            out[name] = value.detach().clone()
        return out


def kmeans(
    x: torch.Tensor, num_clusters: int, num_iters: int = 10, generator=None, tick=None
) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007), then ``num_iters`` Lloyd steps.

    tick: called after every seeding round and Lloyd step (``inference.threads.Threads.tick``).
    Returns the cluster label of every row, shape (N,).
    """
    tick = tick or (lambda: None)
    x = x.reshape(len(x), -1)
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    num_data = len(x)
    sq_norms = (x * x).sum(-1)  # (N,)
    first = torch.randint(num_data, (1,), generator=generator, device=x.device)
    centers = [x[first[0]]]
    closest = _sq_dist(x, sq_norms, centers[0].unsqueeze(0)).squeeze(-1)  # (N,)
    for _ in range(1, num_clusters):
        weights = closest.clamp(min=0)
        if weights.sum() <= 0:  # fewer distinct points than clusters: pick any point
            weights = torch.ones_like(weights)
        idx = torch.multinomial(weights, 1, generator=generator)[0]
        centers.append(x[idx])
        closest = torch.minimum(closest, _sq_dist(x, sq_norms, x[idx].unsqueeze(0)).squeeze(-1))
        tick()
    centers = torch.stack(centers)  # (K, D)
    labels = _assign(x, sq_norms, centers)
    for _ in range(num_iters):
        counts = torch.bincount(labels, minlength=num_clusters).to(x.dtype)  # (K,)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)  # (K, D)
        moved = counts > 0  # an empty cluster keeps its old center
        centers[moved] = sums[moved] / counts[moved].unsqueeze(-1)
        new_labels = _assign(x, sq_norms, centers)
        tick()
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def _sq_dist(x, sq_norms, centers):
    # 2 * (x @ c^T), not (2 * x) @ c^T: the same numbers (scaling by 2 is exact), without
    # scaling all of x: k-means++ seeding on MNIST took 5x longer that way
    return sq_norms.unsqueeze(-1) - 2 * (x @ centers.T) + (centers * centers).sum(-1)  # (N, K)


def _assign(x, sq_norms, centers, chunk=8192):
    return torch.cat(
        [
            _sq_dist(x[i : i + chunk], sq_norms[i : i + chunk], centers).argmin(-1)
            for i in range(0, len(x), chunk)
        ]
    )


def _add(total, stats):
    if total is None:
        return {k: v.clone() for k, v in stats.items()}
    for k, v in stats.items():
        total[k] += v
    return total


def _closed_form(model, m_step):
    if m_step not in ("auto", "closed", "gradient"):
        raise ValueError(f"m_step must be 'auto', 'closed' or 'gradient', not {m_step!r}")
    owner = getattr(model, "__self__", None)
    has = owner is not None and all(
        callable(getattr(owner, a, None)) for a in ("sufficient_statistics", "m_step")
    )
    if m_step == "closed" and not has:
        raise ValueError(
            "m_step='closed' needs a model method whose object has sufficient_statistics(x, resp)"
            " and m_step(stats)"
        )
    return owner if has and m_step != "gradient" else None


_CHUNK_VALUES = 1 << 22


def _default_chunk_size(model, num_values: int, row_size: int) -> int:
    owner = getattr(model, "__self__", None)
    declared = getattr(owner, "e_step_values_per_row", None)
    per_row = declared(num_values) if callable(declared) else 4 * num_values * row_size
    return max(4096, _CHUNK_VALUES // max(1, int(per_row)))


def _check_data(data) -> Union[torch.Tensor, SparseRows]:
    if isinstance(data, SparseRows):  # checked for shape and finite values when it was made
        return data
    if not isinstance(data, torch.Tensor):
        raise TypeError(
            f"em.fit takes the data as one torch.Tensor (or SparseRows), not"
            f" {type(data).__name__}; for a model of several arguments, fit it by svi.fit with"
            " TraceEnum_ELBO and an empty guide (MAP), which takes tuples and keyword data"
        )
    if data.layout != torch.strided:
        raise TypeError(
            f"data has layout {data.layout}: pass sparse data as inference.sparse.SparseRows(x)"
        )
    if data.dim() == 0 or len(data) == 0:
        raise ValueError(f"data is empty (shape {tuple(data.shape)})")
    if data.is_floating_point() and not torch.isfinite(data).all():
        raise ValueError("data contains NaN or infinite values")
    return data
