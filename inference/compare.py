"""
Compare inference methods on one model and one data set: every method with every seed, the same
split, one table and one plot.

    methods = [Method("em", run_em), Method("svi", run_svi)]
    rows = compare.run(methods, seeds=[0, 1, 2], budget=60)
    compare.report(rows, "runs/compare-gmm", command="zoo compare gmm ...", title="GMM")

A method is a name and a function ``run(seed, recorder) -> dict`` that fits from scratch and
returns its final figures: ``objective``, ``heldout_log_likelihood`` (nats per held-out point),
``heldout_method`` (how it was computed: "exact", "importance sampling, K=1000", ...),
``iterations`` and any task metric (``accuracy``, ...). While it fits it calls
``recorder.point(value)`` with the held-out log-likelihood now and then, computing it inside
``with recorder.paused():`` so that evaluation does not count as fitting time; the points become
the log-likelihood-against-wall-clock curves. ``recorder.out_of_time()`` tells it the budget is
spent. Wall time and peak memory (resident set growth sampled every 5 ms, and CUDA's peak
allocation where a GPU is used) are measured here, the same way for every method.

Nothing here knows a model: ``zoo/comparisons.py`` builds the methods for the zoo's models.
"""

import csv
import math
import statistics
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from inference.io import atomic_write, atomic_write_bytes, save_json


@dataclass
class Method:
    """warm_up: run once, untimed and with no budget left, before the timed runs, so that
    one-time costs (first traces, lazy imports, kernel caches) do not land on the first seed.
    Worth it for methods whose first step is cheap; leave it off where one step is a whole
    fit (MCMC chains)."""

    name: str
    run: Callable[[int, "Recorder"], Dict]
    description: str = ""
    warm_up: bool = False


class Recorder:
    """Wall clock with pauses for evaluation, a budget, and the (time, value) trajectory."""

    def __init__(self, budget: Optional[float] = None):
        self.budget = budget
        self.points: List[tuple] = []
        self._start = time.perf_counter()
        self._paused = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self._start - self._paused

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - began

    def point(self, value: float, elapsed: Optional[float] = None) -> None:
        self.points.append((self.elapsed() if elapsed is None else elapsed, float(value)))

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget


def resident_bytes() -> int:
    """This process's resident set in bytes (Linux), 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux: no sampling, growth stays 0
        return 0


class PeakMemory:
    """Peak growth of the resident set (sampled by a thread) and CUDA's peak allocation, MiB."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_rss, self.peak_cuda = interval, 0, None
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, resident_bytes() - self._base)

    def __enter__(self):
        self._base = resident_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, resident_bytes() - self._base)
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated() / 2**20
        return False


def run(
    methods: Sequence[Method],
    seeds: Sequence[int] = (0,),
    budget: Optional[float] = None,
    progress: bool = True,
) -> List[Dict]:
    """Fit every method with every seed; one row per (method, seed). Methods marked
    ``warm_up`` first run once untimed (their result is discarded)."""
    if not methods:
        raise ValueError("no methods to compare")
    rows = []
    jobs = [(m, s) for m in methods for s in seeds]
    for method in methods:
        if method.warm_up:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            method.run(0, Recorder(budget=0.0))  # stops at its first check of the budget
    bar = tqdm(jobs, desc="compare", disable=not progress, leave=False)
    for method, seed in bar:
        bar.set_description(f"compare: {method.name}, seed {seed}")  # what is running now
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        recorder = Recorder(budget)
        with PeakMemory() as memory:
            figures = method.run(seed, recorder)
        wall = recorder.elapsed()
        row = {"method": method.name, "description": method.description, "seed": seed, **figures}
        row.update(
            wall_seconds=wall,
            peak_memory_mib=memory.peak_rss / 2**20,
            peak_cuda_mib=memory.peak_cuda,
            trajectory=recorder.points,
        )
        rows.append(row)
    return rows


COLUMNS = (
    ("objective", "final objective", "{:.4f}"),
    ("heldout_log_likelihood", "held-out log-lik. (nats/point)", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("iterations", "iterations", "{:.0f}"),
    ("wall_seconds", "wall time (s)", "{:.2f}"),
    ("peak_memory_mib", "peak memory (MiB)", "{:.1f}"),
)


def summarize(rows: Sequence[Dict]) -> List[Dict]:
    """Mean and standard deviation over seeds of every numeric column, per method."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        summary = {"method": name, "seeds": len(mine)}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            values = [v for v in values if math.isfinite(v)]
            if values:
                summary[key] = statistics.mean(values)
                summary[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary["description"] = mine[0].get("description", "")
        summary["heldout_method"] = mine[0].get("heldout_method", "")
        summary["notes"] = mine[0].get("notes", "")
        out.append(summary)
    return out


def report(
    rows: Sequence[Dict],
    out,
    command: str,
    title: str,
    extra_markdown: Sequence[str] = (),
) -> Path:
    """Write table.md, table.csv, rows.json, log_likelihood_vs_time.png and command.txt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    shown = [c for c in COLUMNS if any(c[0] in s for s in summary)]
    lines = [f"# {title}\n", f"Reproduce: `{command}`\n"]
    header = ["method", "what", "seeds", *(c[1] for c in shown), "held-out by"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    for s in summary:
        cells = []
        for key, _, fmt in shown:
            if key not in s:
                cells.append("-")
                continue
            cell = fmt.format(s[key])
            if s["seeds"] > 1 and key != "iterations":
                cell += " ± " + fmt.format(s[key + "_sd"])
            cells.append(cell)
        lines.append(
            f"| {s['method']} | {s['description']} | {s['seeds']} | "
            + " | ".join(cells)
            + f" | {s['heldout_method']} |"
        )
    notes = [f"- **{s['method']}**: {s['notes']}" for s in summary if s["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", *extra_markdown]
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    fields = ["method", "seed", *(c[0] for c in COLUMNS), "heldout_method", "peak_cuda_mib"]
    fields += sorted({k for r in rows for k in r if _scalar(r[k])} - set(fields) - {"description"})
    with atomic_csv(out / "table.csv") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    save_json(out / "rows.json", list(rows))
    atomic_write_bytes(out / "command.txt", (command + "\n").encode())
    fig = plot_curves(rows, title)
    png = out / "log_likelihood_vs_time.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out / "table.md"


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


@contextmanager
def atomic_csv(path: Path):
    import io

    buffer = io.StringIO()
    yield buffer
    atomic_write_bytes(path, buffer.getvalue().encode())


def plot_curves(rows: Sequence[Dict], title: str):
    """Held-out log-likelihood against wall-clock time: the median over seeds per method, and
    the range over seeds shaded; a method with one final figure per seed is a point with the
    range over seeds as error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["method"] for r in rows)):
        curves = [np.array(r["trajectory"]) for r in rows if r["method"] == name]
        curves = [c for c in curves if len(c)]
        if not curves:
            continue
        color = f"C{i}"
        if all(len(c) == 1 for c in curves):  # one final figure per seed: a point
            pts = np.stack([c[0] for c in curves])
            ax.errorbar(
                np.median(pts[:, 0]),
                np.median(pts[:, 1]),
                xerr=[
                    [np.median(pts[:, 0]) - pts[:, 0].min()],
                    [pts[:, 0].max() - np.median(pts[:, 0])],
                ],
                yerr=[
                    [np.median(pts[:, 1]) - pts[:, 1].min()],
                    [pts[:, 1].max() - np.median(pts[:, 1])],
                ],
                fmt="o",
                color=color,
                label=name,
            )
            continue
        start = min(c[0, 0] for c in curves)
        stop = max(c[-1, 0] for c in curves)
        grid = np.geomspace(max(start, 1e-4), max(stop, start * 1.001, 1e-3), 200)
        # each seed's curve read on a common time grid: missing before its first point, held
        # constant after its last (the fit has ended with that value)
        values = np.stack(
            [np.where(grid < c[0, 0], np.nan, np.interp(grid, c[:, 0], c[:, 1])) for c in curves]
        )
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before any start
            ax.plot(grid, np.nanmedian(values, 0), color=color, label=name)
            if len(curves) > 1:
                low, high = np.nanmin(values, 0), np.nanmax(values, 0)
                ax.fill_between(grid, low, high, color=color, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("wall-clock time (s, evaluation excluded)")
    ax.set_ylabel("held-out log-likelihood (nats per point)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
