"""
NUTS through Pyro's MCMC, and the arviz side of it: InferenceData, summaries (r_hat, bulk ESS),
trace and posterior plots. Knows no model: the caller hands in a Pyro model and, for mixtures,
how to undo label switching.

    posterior = mcmc.sample_posterior(model, data, chains=2, warmup=150, samples=150)
    lines = mcmc.write_posterior(posterior, "runs/compare", seed=0)   # files + Markdown lines

Chains run at once in forked worker processes, as many as there are cores (``workers=1``: one
after the other, here), each from its own seed, so the draws do not depend on how they ran; on
one thread each. A ``recorder`` from ``inference.compare`` stops before a new group of chains
once its budget is spent.

Each chain runs Pyro's NUTS on a *fused* potential (``fuse_potential``): the potential energy of
the model (Pyro's own, from ``initialize_model``) and its gradient recorded once as one graph
of tensor operations (``make_fx``), run by TorchScript with the data's constants folded, behind
an autograd function that hands back the recorded gradient. On the Bayesian GMM of Old Faithful
the potential and its gradient take half the time they take under Pyro's ``jit_compile=True``
(which differentiates a traced potential through TorchScript's autograd at every step), and a
chain about 0.8x the time (``benchmarks/nuts_speed.py``). Recording refuses Python
control flow on tensor values, so a model whose potential branches on them runs on Pyro's eager
potential instead (slower, never wrong; the posterior's ``potential`` entry says which ran and
why), and the fused graph is checked against the eager potential, value and gradient, at two
points before the chain starts. The model's shapes must not change between steps.
"""

import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyro
import torch

from inference.compare import resident_bytes
from inference.threads import Threads
from inference.threads import resolve as resolve_threads


def sample_posterior(
    model: Callable,
    data: torch.Tensor,
    *,
    chains: int = 2,
    warmup: int = 150,
    samples: int = 150,
    seed: int = 0,
    recorder=None,
    progress: bool = False,
    to_draws: Optional[Callable[[Dict], Dict]] = None,
    relabel: Optional[Callable] = None,
    summarize: Sequence[str] = (),
    dims: Optional[Mapping[str, List[str]]] = None,
    observed: Optional[Dict[str, np.ndarray]] = None,
    threads=None,
    workers: Optional[int] = None,
) -> Dict:
    """NUTS on ``model(data)``, ``chains`` chains, each from its own seed.

    Args:
        to_draws: maps each chain's draws (a dict of tensors), e.g. back from standardized data.
        relabel: ``draws (chains, samples, ...) -> (relabelled draws, (chains, samples) bool
            permuted)``, undoing label switching before the summary; the raw draws are summarized
            too (r_hat before relabelling).
        summarize, dims: the variables arviz summarizes, and their dimension names.
        threads: torch's CPU thread count while the chains run: a count, "torch" (left alone), or
            "auto", which for NUTS means one thread: its steps differ in length by their tree depth
            (1 to 1023 gradients), so timing them compares nothing, and on Old Faithful one thread
            is as fast as two idle and far faster on a busy machine (``benchmarks/load.py``); None
            reads ``ZOO_THREADS`` (see ``inference.threads``).
        workers: chains run at once, each in a forked process (None: as many as there are cores and
            chains, where the platform forks and the data is on the CPU; 1: one after the other, in
            this process). Each chain seeds itself, so the draws are the same either way. A
            ``recorder``'s budget is checked before each group of chains.

    Returns the relabelled draws (arrays (chains, samples, ...)), the raw draws, an arviz
    InferenceData of the relabelled draws, its summary, r_hat and bulk ESS (worst over
    ``summarize``, before and after relabelling), the fraction of relabelled draws, the number
    of divergent transitions, the wall-clock time at which each draw was made
    (``recorder``'s clock if given, else seconds from the start), the number of workers, the
    largest growth of a worker's resident memory (MiB; 0 when the chains ran here) and how the
    potential ran (``fuse_potential``'s ``how``: fused, or eager and why).
    """
    import arviz  # noqa: F401  (imported before any fork, not in each worker)

    if chains < 1 or warmup < 1 or samples < 2:
        raise ValueError("NUTS needs chains >= 1, warmup >= 1 and samples >= 2")
    clock = recorder.elapsed if recorder is not None else _stopwatch()
    workers = _workers(workers, chains, data)
    with Threads(1 if resolve_threads(threads) == "auto" else threads):
        potential, how = _model_potential(model, data)  # once, here, not in each worker
        if how.startswith("eager"):
            reason = how.split(": ", 1)[1]
            warnings.warn(
                f"NUTS runs on Pyro's eager potential, several times slower: {reason}", stacklevel=2
            )
        run = (model, data, potential, warmup, samples, seed, clock, progress, to_draws)
        raw, divergent, times, worker_mib = _run_chains(run, chains, workers, recorder)
    times.sort()  # chains that ran at once drew at interleaved moments
    return {
        **_summarized(raw, divergent, samples, relabel, summarize, dims, observed),
        "sample_times": times,
        "chains": len(divergent),
        "workers": workers,
        "worker_peak_memory_mib": worker_mib,
        "potential": how,
    }


def _summarized(raw, divergent, samples, relabel, summarize, dims, observed) -> dict:
    """The chains' draws stacked, relabelled where ``relabel`` is given, and summarized by
    arviz before and after relabelling (r_hat, bulk ESS), with the divergences."""
    import arviz as az

    raw = {k: np.stack([r[k] for r in raw]) for k in raw[0]}  # (chains, samples, ...)
    if relabel is not None:
        draws, permuted = relabel(raw)
    else:
        draws, permuted = raw, np.zeros((len(divergent), samples), dtype=bool)
    names = list(summarize) or list(draws)
    dims = dict(dims or {})
    idata = az.from_dict(
        posterior=draws,
        sample_stats={"diverging": np.stack(divergent)},
        observed_data=observed or {},
        dims=dims,
    )
    idata_raw = az.from_dict(posterior={k: raw[k] for k in names}, dims=dims)
    summary = az.summary(idata, var_names=names)
    summary_raw = az.summary(idata_raw, var_names=names)
    return {
        "draws": draws,
        "raw": raw,
        "idata": idata,
        "idata_raw": idata_raw,  # before relabelling: where label switching shows
        "summary": summary,
        "summarized": names,
        "r_hat_max": float(summary["r_hat"].max()),
        "r_hat_max_raw": float(summary_raw["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "relabelled_fraction": float(np.mean(permuted)),
        "divergences": int(np.stack(divergent).sum()),
    }


def _run_chains(run, chains, workers, recorder):
    """The chains, ``workers`` at a time (forked where more than one), until all have run or
    the recorder's budget is spent: (raw draws per chain, divergence flags per chain, the
    draws' times, the largest growth of a worker's memory in MiB)."""
    times, divergent, raw, worker_mib = [], [], [], 0.0
    for first in range(0, chains, workers):
        if first > 0 and recorder is not None and recorder.out_of_time():
            break  # the budget is spent: keep the chains already run (r_hat splits each one)
        group = range(first, min(first + workers, chains))
        if workers == 1:
            results = [(*_chain(*run, chain), 0.0) for chain in group]  # no worker grew
        else:
            results = _forked(run, group)
        for chain_raw, flags, chain_times, grew in results:
            raw.append(chain_raw)
            divergent.append(flags)
            times.extend(chain_times)
            worker_mib = max(worker_mib, grew)
    return raw, divergent, times, worker_mib


def _chain(model, data, potential, warmup, samples, seed, clock, progress, to_draws, chain):
    """One chain: (raw draws as arrays, divergent flags, the clock at each draw)."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_median
    from pyro.infer.mcmc.util import initialize_model

    pyro.set_rng_seed(1000 * seed + chain)
    times = []

    def hook(kernel, params, stage, i):
        if stage == "Sample":
            times.append(clock())

    # The median of prior draws starts every chain in a typical region: from init_to_uniform's
    # start, one chain in eight of the Bayesian GMM on Old Faithful spent five times the
    # gradients of the others in warm-up (and took three times as long in all)
    init, _, transforms, _ = initialize_model(model, (data,), init_strategy=init_to_median())
    run = MCMC(
        NUTS(potential_fn=potential),
        num_samples=samples,
        warmup_steps=warmup,
        initial_params=init,
        transforms=transforms,
        hook_fn=hook,
        disable_progbar=not progress,
    )
    run.run(data)
    draws = run.get_samples()
    if to_draws is not None:
        draws = to_draws(draws)
    flags = np.zeros(samples, dtype=bool)
    flags[run.diagnostics()["divergences"]["chain 0"]] = True
    return {k: v.detach().numpy() for k, v in draws.items()}, flags, times


def _model_potential(model, data):
    """``fuse_potential`` of ``model(data)``'s potential, recorded at the point where every
    unknown is zero on the unconstrained scale (no random draws: the caller's random state is
    left as it was)."""
    from pyro.infer.autoguide import init_to_feasible
    from pyro.infer.mcmc.util import initialize_model
    from pyro.util import get_rng_state, set_rng_state

    state = get_rng_state()
    try:
        init, potential, _, _ = initialize_model(model, (data,), init_strategy=init_to_feasible)
    finally:
        set_rng_state(state)
    return fuse_potential(potential, init)


FUSED = "fused: its value and gradient as one recorded graph (TorchScript)"


def fuse_potential(potential: Callable, init: Dict[str, torch.Tensor]):
    """``(potential_fn, how)``: Pyro's ``potential`` (a function of a dict of unconstrained
    tensors, as ``initialize_model`` returns it) with its value and gradient recorded as one
    graph, for ``NUTS(potential_fn=...)``; or, where the potential cannot be recorded faithfully,
    ``potential`` itself. ``how`` says which, and why.

    ``make_fx`` records the tensor operations of one evaluation and its backward pass, and
    refuses Python control flow on tensor values (a branch taken at recording time would be
    taken forever after); Pyro's argument checks, which are such branches, are off while it
    records. A potential that updates a tensor in place other than its unknowns (a module's
    buffer) is refused as ``inference.compiled`` refuses it (``hidden_update``). The recorded
    graph is checked against ``potential`` at ``init`` and at a second point nearby, value and
    gradient; any refusal or difference keeps the eager potential.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from inference.compiled import hidden_update

    names = list(init)
    if not names:
        return potential, "nothing to record: the model has no continuous unknowns"

    def value_and_grad(*values):
        values = [v.detach().requires_grad_() for v in values]
        with torch.enable_grad():
            value = potential(dict(zip(names, values)))
            grads = torch.autograd.grad(value, values, allow_unused=True)
        zeros = (torch.zeros_like(v) for v in values)  # an unknown the potential ignores
        return (value.detach(), *(g if g is not None else z for g, z in zip(grads, zeros)))

    start = [init[k].detach() for k in names]
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript (Pyro's jit too)
            warnings.simplefilter("ignore")
            with pyro.validation_enabled(False):
                graph = make_fx(value_and_grad)(*start)
            update = hidden_update(graph)
            if update is not None:  # the eager potential updates it on every call
                return potential, (
                    f"eager: the potential updates a tensor in place ({update}) that is not one"
                    " of its unknowns, a module's buffer: a recorded graph would not keep the"
                    " update"
                )
            graph.graph.eliminate_dead_code()
            graph.recompile()
            with torch.no_grad():  # TorchScript, with the data and what follows from it folded
                traced = torch.jit.trace(graph, start, check_trace=False)
                compiled = torch.jit.freeze(traced.eval())
    except Exception as error:  # noqa: BLE001  (any refusal: the eager potential is right)
        text = str(error).strip()
        if "_local_scalar_dense" in text or "data-dependent" in text:
            reason = "it reads a tensor's value in Python: an if on a tensor, float() or .item()"
        else:
            reason = text.splitlines()[0][:160] if text else type(error).__name__
        return potential, f"eager: the potential could not be recorded ({reason})"
    differs = _recording_differs(compiled, value_and_grad, start, names)
    if differs is not None:
        return potential, differs
    return lambda z: _RecordedPotential.apply(compiled, *(z[k] for k in names)), FUSED


class _RecordedPotential(torch.autograd.Function):
    """The value of a recorded value-and-gradient graph, whose backward pass hands back the
    recorded gradient (what ``pyro.ops.integrator.potential_grad`` asks autograd for)."""

    @staticmethod
    def forward(ctx, compiled, *values):
        value, *grads = compiled(*values)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        return (None, *(grad_output * g for g in ctx.saved_tensors))


def _recording_differs(compiled, value_and_grad, start, names):
    """Why the recorded graph is not the potential (value or gradient) at ``start`` or at a
    point nearby, else None."""
    generator = torch.Generator(device="cpu").manual_seed(0)  # leaves the chain's seed alone
    nearby = [
        v + 0.1 * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        for v in start
    ]
    for point in (start, nearby):
        expected = value_and_grad(*point)
        if not torch.isfinite(expected[0]):  # nothing to compare the recording with
            return "eager: the potential is not finite where it was recorded"
        got = compiled(*point)
        for name, e, g in zip(("value", *names), expected, got):
            tolerance = 1e-5 * (1 + float(expected[0].abs()))
            if not torch.allclose(g, e, rtol=1e-4, atol=tolerance, equal_nan=True):
                return (
                    f"eager: the recorded graph's {name} differs from the potential's by up to"
                    f" {float((g - e).abs().max()):.3g}: the model computes part of it outside"
                    " torch (numpy, Python numbers) or keeps state between calls"
                )
    return None


def _workers(workers: Optional[int], chains: int, data) -> int:
    import multiprocessing

    on_gpu = isinstance(data, torch.Tensor) and data.device.type != "cpu"
    if workers is None:  # a forked child cannot use CUDA: chains of GPU data run here
        forks = "fork" in multiprocessing.get_all_start_methods() and not on_gpu
        return max(1, min(chains, os.cpu_count() or 1)) if forks else 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a count >= 1 or None, not {workers!r}")
    if on_gpu and workers > 1:
        raise ValueError(
            f"workers={workers} forks processes, which cannot use the data's {data.device}"
            " device (CUDA does not survive a fork): use workers=1 (or None), or move the data"
            " to the CPU"
        )
    return min(workers, chains)


def _forked(run, group) -> list:
    """The chains of ``group`` at once, each in a forked process (the model, a closure, is
    inherited rather than pickled); results come back through pipes, errors with their
    traceback."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    jobs = []
    for chain in group:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(run, chain, send), daemon=True)
        with warnings.catch_warnings():
            # Python 3.12 warns that forking a process with threads (a memory sampler, torch's
            # pool) may deadlock the child; the child here only runs one-threaded NUTS and
            # never takes the locks those threads hold
            warnings.filterwarnings("ignore", "This process .* multi-threaded", DeprecationWarning)
            process.start()
        send.close()
        jobs.append((chain, process, receive))
    results = []
    try:
        for chain, process, receive in jobs:
            try:
                status, value = receive.recv()
            except EOFError:
                status, value = "error", f"the worker died (exit code {process.exitcode})"
            process.join()
            if status == "error":
                raise RuntimeError(f"NUTS chain {chain} failed in its worker process:\n{value}")
            results.append(value)
    finally:
        for _, process, receive in jobs:
            receive.close()
            if process.is_alive():
                process.kill()
                process.join()
    return results


def _worker(run, chain, send) -> None:
    import resource
    import traceback

    try:
        start = resident_bytes() / 2**20
        result = _chain(*run, chain)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        send.send(("ok", (*result, max(0.0, peak - start))))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises it)
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()
        os._exit(0)  # no atexit handlers or buffers of the parent's run twice


def _stopwatch():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def write_posterior(
    posterior: Dict, out: Optional[Path], seed: int, relabel_doc: str = "the relabelling"
) -> List[str]:
    """The InferenceData file, the summary and the trace and posterior plots of one seed, in
    ``out/nuts-seed{seed}/``; returns the Markdown lines that describe them."""

    summary = posterior["summary"]
    shown = summary
    if len(summary) > 12:  # the worst-mixing rows; all of them go to summary.csv
        shown = summary.sort_values("r_hat", ascending=False).head(12)
    lines = [
        f"### NUTS, seed {seed}",
        "",
        f"Worst r_hat {posterior['r_hat_max']:.3f} after relabelling"
        f" ({posterior['r_hat_max_raw']:.3f} before); smallest bulk ESS"
        f" {posterior['ess_bulk_min']:.0f}; {posterior['divergences']} divergent transitions.",
        label_switching_sentence(posterior["relabelled_fraction"], relabel_doc),
        ""
        if shown is summary
        else f"The {len(shown)} of {len(summary)} rows with the largest r_hat:",
        *markdown_table(shown),
        "",
    ]
    if out is None:
        return lines
    folder = Path(out) / f"nuts-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    posterior["idata"].to_netcdf(str(folder / "posterior.nc"))
    summary.to_csv(folder / "summary.csv")
    var_names = posterior["summarized"]
    shape_var = "locs" if "locs" in var_names else var_names[0]
    relabelled = _plot_posterior(posterior, folder, seed, var_names, shape_var)
    before = (
        f" (after relabelling), `trace_before_relabelling.png` ({shape_var} as drawn: where"
        " label switching shows)"
        if relabelled
        else ""
    )
    lines.insert(
        -1,
        f"Files: `nuts-seed{seed}/posterior.nc` (arviz InferenceData), `summary.csv`,"
        f" `trace.png`{before}, `posterior.png`.\n",
    )
    return lines


def _plot_posterior(posterior, folder: Path, seed: int, var_names, shape_var) -> bool:
    """trace.png (and trace_before_relabelling.png where a draw was relabelled) and
    posterior.png into ``folder``; whether the before-relabelling figure was drawn."""
    import arviz as az
    import matplotlib.pyplot as plt

    # one axis per scalar component where there are few (an eruption time and a waiting time
    # differ in scale by 20x), the components of a variable together where there are many
    scalars = sum(int(np.prod(posterior["draws"][v].shape[2:])) for v in var_names)
    compact = scalars > 16
    # before relabelling only where a draw was relabelled (otherwise the same figure twice), and
    # only the variable that shows the switch best (the locations, where there are any)
    relabelled = posterior["relabelled_fraction"] > 0 and "idata_raw" in posterior
    if relabelled:
        as_drawn = f"the draws of {shape_var} as drawn, before relabelling"
        traces = [
            ("trace.png", "idata", var_names, "the draws after relabelling"),
            ("trace_before_relabelling.png", "idata_raw", [shape_var], as_drawn),
        ]
    else:
        traces = [("trace.png", "idata", var_names, "the draws (none needed relabelling)")]
    with warnings.catch_warnings():  # arviz 0.23 calls matplotlib APIs deprecated in 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, data, shown_vars, title in traces:
            axes = az.plot_trace(posterior[data], var_names=shown_vars, compact=compact)
            figure = axes.ravel()[0].figure
            _trace_margins(figure, rows=axes.shape[0])
            figure.suptitle(f"NUTS, seed {seed}: {title}")
            figure.savefig(folder / name, dpi=90)
        axes = az.plot_posterior(posterior["idata"], var_names=[shape_var])
        np.ravel(axes)[0].figure.savefig(folder / "posterior.png", dpi=90)
    plt.close("all")
    return relabelled


def _trace_margins(figure, rows: int, gap: float = 0.85) -> None:
    """Fixed margins for arviz's trace plot: ``gap`` inches between rows for a two-line title
    and tick labels. Matplotlib's constrained layout did the same in about twice the time (1 s
    more for a figure of ten rows)."""
    width, height = figure.get_size_inches()
    top, bottom = 0.9, 0.35  # inches: the suptitle; the last row's tick labels
    row = (height - top - bottom - (rows - 1) * gap) / rows
    figure.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.25 / width,
        top=1 - top / height,
        bottom=bottom / height,
        hspace=gap / max(row, 0.1),
        wspace=0.15,
    )


def label_switching_sentence(fraction: float, relabel_doc: str = "the relabelling") -> str:
    if fraction == 0:
        return "No label switching: every draw kept its labels."
    return (
        f"Label switching detected: {100 * fraction:.1f}% of the draws were relabelled to the"
        f" pivot's labelling before the summary (see `{relabel_doc}`)."
    )


def markdown_table(frame) -> List[str]:
    """A pandas frame (arviz's summary) as Markdown rows, without the optional ``tabulate``."""
    lines = ["| | " + " | ".join(frame.columns) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    return lines
