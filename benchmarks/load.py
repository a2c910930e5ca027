"""
The main job's steps on an idle machine and on one shared with CPU-bound work: how much slower
each gets under load, all measured in one run; prints a table, saves JSON and Markdown.

    python benchmarks/load.py            # about 30 minutes on 2 cores (measured 2026-12-07)
    python benchmarks/load.py --quick    # seconds: check that the script works
    python benchmarks/load.py --steps nuts --name load-nuts   # one step, in its own file

Steps (each timed in a fresh process, so that no thread pool or cache is shared between cases):
- EM: a fit of the Bernoulli mixture, K = 100, on the 50,000 MNIST training images (sparse
  rows, as ``zoo fit bmm --data mnist --components 100`` runs it): the k-means++ start and 20
  iterations;
- NUTS: one chain of the Bayesian GMM on Old Faithful (``inference.mcmc.sample_posterior``),
  100 warm-up steps and 100 draws;
- VAE: one epoch of the reparameterized driver on 20,000 MNIST images (784-400-20, batch 128),
  after a first epoch that is not timed.

Load: four processes that each keep one core busy (a Python loop), started before the step and
stopped after it. A fair scheduler gives each of the five runnable processes 2/5 of the two
cores, so a step that uses one thread fairly takes 2.5x its one-thread idle time; a step that
used both cores idle can take up to 5x its idle time. Goal (issue 19): at most 4x the idle time.

Each step runs under the drivers' defaults (``threads="auto"``: the thread count chosen by timing
the steps, see ``inference.threads``; torch's workers wait passively where the machine is busy
when the process starts, see ``inference.omp_wait``), under the same defaults with the workers
made to spin (``GOMP_SPINCOUNT=300000``, libgomp's default, as the drivers ran before
``omp_wait``), pinned to one thread (``ZOO_THREADS=1``) and pinned to every core (``ZOO_THREADS``
set to the core count), to show what each default buys, idle and under load. The JSON records
what ``omp_wait`` decided in each case.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPETITOR = "while True: pass"


def step_em(quick: bool) -> float:
    from inference import em
    from inference.sparse import SparseRows
    from zoo import data
    from zoo.models.bernoulli_mixture import BernoulliMixture, BMMConfig

    x, _ = data.load("mnist", split="train", binarize="static")
    x = x[:6000] if quick else x
    mixture = BernoulliMixture(BMMConfig(num_components=100, dim=784))
    rows = SparseRows(x)
    start = time.perf_counter()
    with warnings.catch_warnings():  # 20 iterations do not converge, and are not meant to
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        em.fit(mixture.model, None, rows, max_iter=5 if quick else 20, tol=1e-12)
    return time.perf_counter() - start


def step_nuts(quick: bool) -> float:
    from inference import mcmc
    from zoo import data
    from zoo.models.gmm import GaussianMixture

    x, _ = data.load("faithful")
    built = GaussianMixture(num_components=2, dim=2).bayesian(x)
    steps = 20 if quick else 100
    start = time.perf_counter()
    mcmc.sample_posterior(
        built["model"], built["data"], chains=1, warmup=steps, samples=steps, seed=0
    )
    return time.perf_counter() - start


def step_vae(quick: bool) -> float:
    import pyro

    from inference import reparam
    from zoo import data
    from zoo.models.vae import VAE, VAEConfig

    x, _ = data.load("mnist", split="train", binarize="static")
    x = x[: 2048 if quick else 20000]
    pyro.clear_param_store()
    vae = VAE(VAEConfig(x_dim=784, z_dim=20, hidden=(400,)))
    ends = []
    reparam.fit(
        vae.model,
        vae.guide,
        x,
        batch_size=128,
        num_epochs=2,
        callback=lambda record: ends.append(record["time"]),
    )
    return ends[1] - ends[0]  # the second epoch


STEPS = {"em": step_em, "nuts": step_nuts, "vae": step_vae}
DESCRIPTIONS = {
    "em": "EM fit, Bernoulli mixture K=100, 50,000 MNIST images: k-means++ and 20 iterations",
    "nuts": "NUTS chain, Bayesian GMM on Old Faithful (100 warm-up + 100 draws)",
    "vae": "VAE epoch, reparameterized driver, 20,000 MNIST images",
}


SPIN = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default: workers spin, whatever the load


def measure(step: str, quick: bool, load: int, threads: str):
    """Seconds of one step in a fresh process, with ``load`` competing busy processes, and what
    ``inference.omp_wait`` chose there. ``threads``: "auto", a count, or "spin" (auto, with the
    workers made to spin as libgomp does by default, i.e. as the drivers did before
    ``inference.omp_wait``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if threads in ("auto", "spin"):
        env.pop("ZOO_THREADS", None)
        env.update(SPIN if threads == "spin" else {})
    else:
        env["ZOO_THREADS"] = threads
    competitors = [subprocess.Popen([sys.executable, "-c", COMPETITOR]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)
        command = [sys.executable, __file__, "--step", step] + (["--quick"] if quick else [])
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    if out.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{out.stderr[-3000:]}")
    *_, decision, seconds = out.stdout.strip().splitlines()
    return float(seconds), decision


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--load", type=int, default=4, help="competing busy processes")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each case")
    parser.add_argument("--steps", default=",".join(STEPS), help="which: em,nuts,vae")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--name", default=None, help="file name (default: load, or load-quick with --quick)"
    )
    args = parser.parse_args(argv)
    if args.step:  # the child: time one step, print the wait policy's decision and the seconds
        from inference import omp_wait  # before torch (the step imports it)

        seconds = STEPS[args.step](args.quick)
        print(omp_wait.decision)
        print(seconds)
        return
    cores = os.cpu_count()
    repeats = args.repeats or (1 if args.quick else 2)
    table = {}
    chosen = args.steps.split(",")
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}: choose from {','.join(STEPS)}")
    counts = ["auto", "spin", "1", str(cores)] if cores > 1 else ["auto", "1"]
    for step in chosen:
        row, decisions = {}, {}
        for threads in counts:
            for load in (0, args.load):
                runs = [measure(step, args.quick, load, threads) for _ in range(repeats)]
                times = [seconds for seconds, _ in runs]
                row[f"{threads}/{load}"] = min(times)
                decisions[f"{threads}/{load}"] = sorted({decision for _, decision in runs})
                print(f"  {step}, threads {threads}, load {load}: {times} {runs[0][1]}", flush=True)
        idle = row["auto/0"]
        row["ratio_auto"] = row[f"auto/{args.load}"] / idle
        row["ratio_one"] = row[f"1/{args.load}"] / row["1/0"]
        row["ratio_pinned"] = row[f"{counts[-1]}/{args.load}"] / row[f"{counts[-1]}/0"]
        if "spin" in counts:
            row["ratio_spin"] = row[f"spin/{args.load}"] / row["spin/0"]
        row["wait_policy"] = decisions
        table[step] = row
        print(
            f"{step}: "
            + "; ".join(
                f"threads {t}: idle {row[f'{t}/0']:.3f} s, under load {row[f'{t}/{args.load}']:.3f}"
                f" s ({row[f'{t}/{args.load}'] / row[f'{t}/0']:.2f}x)"
                for t in counts
            ),
            flush=True,
        )
    import torch

    report = {
        "cores": cores,
        "load": args.load,
        "repeats": repeats,
        "quick": args.quick,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "steps": table,
        "command": "python benchmarks/load.py"
        + (" --quick" if args.quick else "")
        + (f" --load {args.load}" if args.load != 4 else "")
        + (f" --steps {args.steps}" if chosen != list(STEPS) else "")
        + (f" --name {args.name}" if args.name else ""),
    }
    load = args.load
    name_of = {
        "auto": "auto",
        "spin": "auto, spinning",
        "1": "1 thread",
        str(cores): f"{cores} threads",
    }
    lines = [
        f"# The main job's steps under load\n\n`{report['command']}` on {cores} cores, torch"
        f" {torch.__version__}. Load: {load} processes each keeping a core busy. Each case is"
        f" the best of {repeats} runs, each in a fresh process. `auto` is the drivers' default"
        " (the thread count chosen by timing the steps, `inference.threads`, and torch's workers"
        " waiting passively where the machine is busy at the start, `inference.omp_wait`);"
        " `auto, spinning` is the same with the workers made to spin as libgomp does by default"
        " (`GOMP_SPINCOUNT=300000`, the drivers before `omp_wait`); the pinned"
        f" columns fix one thread, or {cores}. Each ratio is the"
        " time under load over the same column's idle time; the last column compares the"
        " default under load with the best idle time of any column. Goal: under load at most"
        " 4x the idle time.\n",
        "| step | "
        + " | ".join(
            f"idle, {name_of[t]} (s) | load {load}, {name_of[t]} (s) | ratio" for t in counts
        )
        + " | auto under load / best idle |",
        "|---|" + "---|---|---|" * len(counts) + "---|",
    ]
    for step, row in table.items():
        cells = []
        for t in counts:
            idle, loaded = row[f"{t}/0"], row[f"{t}/{load}"]
            cells.append(f"{idle:.3f} | {loaded:.3f} | {loaded / idle:.2f}x")
        best_idle = min(row[f"{t}/0"] for t in counts)
        lines.append(
            f"| {DESCRIPTIONS[step]} | "
            + " | ".join(cells)
            + f" | {row[f'auto/{load}'] / best_idle:.2f}x |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or "load" + ("-quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


if __name__ == "__main__":
    main()
