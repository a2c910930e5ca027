"""
NUTS through Pyro's MCMC, and the arviz side of it: InferenceData, summaries (r_hat, bulk ESS),
trace and posterior plots. Knows no model: the caller hands in a Pyro model and, for mixtures,
how to undo label switching.

    posterior = mcmc.sample_posterior(model, data, chains=2, warmup=150, samples=150)
    lines = mcmc.write_posterior(posterior, "runs/compare", seed=0)   # files + Markdown lines

Chains run one after the other (a ``recorder`` from ``inference.compare`` stops before a new
chain once its budget is spent), each with its own seed, JIT-compiled (the model's shapes must
not change between steps).
"""

import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyro
import torch


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
) -> Dict:
    """NUTS on ``model(data)``, ``chains`` chains one after the other.

    to_draws: maps each chain's draws (a dict of tensors), e.g. back from standardized data.
    relabel: ``draws (chains, samples, ...) -> (relabelled draws, (chains, samples) bool
        permuted)``, undoing label switching before the summary; the raw draws are summarized
        too (r_hat before relabelling).
    summarize, dims: the variables arviz summarizes, and their dimension names.

    Returns the relabelled draws (arrays (chains, samples, ...)), the raw draws, an arviz
    InferenceData of the relabelled draws, its summary, r_hat and bulk ESS (worst over
    ``summarize``, before and after relabelling), the fraction of relabelled draws, the number
    of divergent transitions, and the wall-clock time at which each draw was made
    (``recorder``'s clock if given, else seconds from the start).
    """
    import arviz as az
    from pyro.infer import MCMC, NUTS

    if chains < 1 or warmup < 1 or samples < 2:
        raise ValueError("NUTS needs chains >= 1, warmup >= 1 and samples >= 2")
    clock = recorder.elapsed if recorder is not None else _stopwatch()
    times, divergent, raw = [], [], []
    for chain in range(chains):
        if chain > 0 and recorder is not None and recorder.out_of_time():
            break  # the budget is spent: keep the chains already run (r_hat splits each one)
        pyro.set_rng_seed(1000 * seed + chain)

        def hook(kernel, params, stage, i):
            if stage == "Sample":
                times.append(clock())

        # jit: about twice as fast on the zoo's mixtures; their shapes never change
        kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
        run = MCMC(
            kernel,
            num_samples=samples,
            warmup_steps=warmup,
            hook_fn=hook,
            disable_progbar=not progress,
        )
        run.run(data)
        draws = run.get_samples()
        if to_draws is not None:
            draws = to_draws(draws)
        raw.append({k: v.detach().numpy() for k, v in draws.items()})
        flags = np.zeros(samples, dtype=bool)
        flags[run.diagnostics()["divergences"]["chain 0"]] = True
        divergent.append(flags)
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
        "summary": summary,
        "summarized": names,
        "r_hat_max": float(summary["r_hat"].max()),
        "r_hat_max_raw": float(summary_raw["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "relabelled_fraction": float(np.mean(permuted)),
        "divergences": int(np.stack(divergent).sum()),
        "sample_times": times,
        "chains": len(divergent),
    }


def _stopwatch():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def write_posterior(
    posterior: Dict, out: Optional[Path], seed: int, relabel_doc: str = "the relabelling"
) -> List[str]:
    """The InferenceData file, the summary and the trace and posterior plots of one seed, in
    ``out/nuts-seed{seed}/``; returns the Markdown lines that describe them."""
    import arviz as az
    import matplotlib.pyplot as plt

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
    with warnings.catch_warnings():  # arviz 0.23 calls matplotlib APIs deprecated in 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = az.plot_trace(posterior["idata"], var_names=var_names, compact=True)
        axes.ravel()[0].figure.savefig(folder / "trace.png", dpi=90)
        axes = az.plot_posterior(posterior["idata"], var_names=[shape_var])
        np.ravel(axes)[0].figure.savefig(folder / "posterior.png", dpi=90)
    plt.close("all")
    lines.insert(
        -1,
        f"Files: `nuts-seed{seed}/posterior.nc` (arviz InferenceData), `summary.csv`,"
        " `trace.png`, `posterior.png`.\n",
    )
    return lines


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
