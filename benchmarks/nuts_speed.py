"""
NUTS on the Bayesian GMM of Old Faithful (``zoo.models.gmm.bayesian_model``, K = 2, 11 unknowns, the
standardized 218 training rows): the zoo's driver against the samplers a user would pick instead,
all measured in one run on this machine; prints a table, saves JSON and Markdown.

    python benchmarks/nuts_speed.py            # about 5 minutes on 2 cores
    python benchmarks/nuts_speed.py --quick    # seconds: check that the script works

1. One chain, 150 warm-up steps and 150 draws, on one thread, in this process, three seeds with
   the samplers interleaved (seed 0 of each, then seed 1, ...):
   - zoo: ``inference.mcmc.sample_posterior`` (one chain, no worker), which runs Pyro's NUTS on
     the model's potential and its gradient recorded as one graph (``inference.mcmc``), the
     recording included in its time;
   - Pyro jit: ``NUTS(model, jit_compile=True)``, Pyro's own fast path (what the zoo ran before);
   - NumPyro (``[peers]`` extra): the same model written in NumPyro, NUTS under ``jax.jit``; its
     first chain includes the compilation, the later ones reuse it (one MCMC object, new keys).
   Reported: seconds per chain, gradient evaluations (leapfrog steps, warm-up included), ms per
   gradient, and the posterior means of the locations (components ordered by eruption time),
   which should agree between samplers to within a few Monte Carlo errors (the posterior sd of a
   location is about 0.03 on this scale; 150 draws).
2. The comparison as the main job runs it: ``zoo compare gmm --data faithful --inference nuts``
   (three seeds, two chains each, two at a time in worker processes), in a fresh process: the
   whole command's wall time, and the NUTS fits' own (the table's wall-time column, summed over
   the seeds). Goal (issue 19): under 30 s on an idle machine.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# one thread for every sampler, NumPyro's XLA included (read when jax is imported)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
from _rates import cpu_ticks, load_average, numpyro_available, steal_fraction  # noqa: E402

from inference import mcmc  # noqa: E402
from zoo import data  # noqa: E402
from zoo.models.gmm import bayesian_model  # noqa: E402

K = 2


class GradientCounter:
    """Counts Pyro's potential-and-gradient evaluations (its leapfrog steps)."""

    def __init__(self):
        import pyro.ops.integrator as integrator

        self.original, self.count = integrator.potential_grad, 0

        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        integrator.potential_grad = counted

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def ordered_locs(locs: np.ndarray) -> np.ndarray:
    """Posterior mean of the locations (K, D), components ordered by the first coordinate."""
    mean = locs.reshape(-1, K, 2).mean(0)
    return mean[np.argsort(mean[:, 0])]


def run_zoo(x, steps, seed, counter):
    start = time.perf_counter()
    with warnings.catch_warnings():  # arviz's r_hat of one chain divides by zero
        warnings.simplefilter("ignore", RuntimeWarning)
        posterior = mcmc.sample_posterior(
            lambda d: bayesian_model(d, K),
            x,
            chains=1,
            warmup=steps,
            samples=steps,
            seed=seed,
            workers=1,
        )
    seconds = time.perf_counter() - start
    return seconds, counter.take(), ordered_locs(posterior["raw"]["locs"]), posterior["potential"]


def run_pyro_jit(x, steps, seed, counter):
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_median

    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    kernel = NUTS(
        lambda d: bayesian_model(d, K),
        jit_compile=True,
        ignore_jit_warnings=True,
        init_strategy=init_to_median(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates the TorchScript Pyro traces with
        run = MCMC(kernel, num_samples=steps, warmup_steps=steps, disable_progbar=True)
        run.run(x)
    seconds = time.perf_counter() - start
    return seconds, counter.take(), ordered_locs(run.get_samples()["locs"].numpy()), "jit"


class NumPyroNUTS:
    """The same model in NumPyro; one MCMC object, so later chains reuse the compiled sampler."""

    def __init__(self, x, steps):
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as nd
        from numpyro.infer import MCMC, NUTS, init_to_median

        def model(x):
            num_data, dim = x.shape
            mean, sd = x.mean(0), x.std(0, ddof=1)  # torch's std is the unbiased one
            weights = numpyro.sample("weights", nd.Dirichlet(jnp.ones(K)))
            with numpyro.plate("components", K):
                locs = numpyro.sample("locs", nd.Normal(mean, 2 * sd).to_event(1))
                scales = numpyro.sample("scales", nd.HalfNormal(2 * sd).to_event(1))
                corr = numpyro.sample("corr", nd.LKJCholesky(dim, 2.0))
            scale_tril = scales[..., None] * corr
            with numpyro.plate("data", num_data):
                components = nd.MultivariateNormal(locs, scale_tril=scale_tril)
                numpyro.sample(
                    "x", nd.MixtureSameFamily(nd.Categorical(weights), components), obs=x
                )

        self.jax, self.x = jax, jnp.asarray(x.numpy())
        kernel = NUTS(model, init_strategy=init_to_median())
        self.mcmc = MCMC(kernel, num_warmup=steps, num_samples=steps, progress_bar=False)
        self.runs = 0

    def __call__(self, seed):
        key = self.jax.random.PRNGKey(seed)
        start = time.perf_counter()
        self.mcmc.warmup(key, self.x, extra_fields=("num_steps",), collect_warmup=True)
        warm = int(np.asarray(self.mcmc.get_extra_fields()["num_steps"]).sum())
        self.mcmc.run(self.mcmc.post_warmup_state.rng_key, self.x, extra_fields=("num_steps",))
        locs = np.asarray(self.mcmc.get_samples()["locs"])  # blocks until the draws exist
        seconds = time.perf_counter() - start
        steps = warm + int(np.asarray(self.mcmc.get_extra_fields()["num_steps"]).sum())
        self.runs += 1
        return seconds, steps, ordered_locs(locs), "compile + run" if self.runs == 1 else "run"


def chains(x, steps, seeds):
    counter = GradientCounter()
    samplers = {"zoo": run_zoo, "Pyro jit": run_pyro_jit}
    if numpyro_available():
        numpyro_nuts = NumPyroNUTS(x, steps)
        samplers["NumPyro"] = lambda x, steps, seed, counter: numpyro_nuts(seed)
    rows = {name: [] for name in samplers}
    for seed in seeds:
        for name, sampler in samplers.items():
            seconds, grads, locs, how = sampler(x, steps, seed, counter)
            rows[name].append(
                {"seed": seed, "seconds": seconds, "gradients": grads, "locs": locs, "how": how}
            )
            print(f"  {name}, seed {seed}: {seconds:.2f} s, {grads} gradients", flush=True)
    return rows


def comparison(quick: bool) -> dict:
    """``zoo compare gmm --data faithful --inference nuts`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "zoo.cli", "compare", "gmm", "--data", "faithful"]
        command += ["--inference", "nuts", "--out", tmp, "--overwrite", "--quiet"]
        if quick:
            command += ["--seeds", "1", "--nuts-warmup", "20", "--nuts-samples", "20"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        rows = json.loads((Path(tmp) / "rows.json").read_text())
    fits = [r["wall_seconds"] for r in rows]
    shown = "zoo compare gmm --data faithful --inference nuts"
    return {
        "command": shown + (" --seeds 1 --nuts-warmup 20 --nuts-samples 20" if quick else ""),
        "seconds": seconds,
        "fit_seconds": fits,
        "fits_total": sum(fits),
        "potential": rows[0]["potential"],
        "r_hat_max": max(r["r_hat_max"] for r in rows),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("arviz").setLevel(logging.ERROR)  # r_hat of one chain: a warning each
    steps, seeds = (20, (0,)) if args.quick else (150, (0, 1, 2))
    x, _ = data.load("faithful")
    load_before, ticks = load_average(), cpu_ticks()  # the machine's state
    x = (x - x.mean(0)) / x.std(0)

    print(f"one chain of {steps} + {steps}, one thread, seeds {list(seeds)}:", flush=True)
    rows = chains(x, steps, seeds)
    load_after = load_average()
    print("the comparison (a fresh process):", flush=True)
    compare = comparison(args.quick)
    steal = steal_fraction(ticks, cpu_ticks())

    summary = {}
    reference = np.mean([r["locs"] for r in rows["Pyro jit"]], axis=0)
    for name, runs in rows.items():
        later = runs[1:] if name == "NumPyro" and len(runs) > 1 else runs  # compiled already
        seconds = statistics.median(r["seconds"] for r in later)
        grads = statistics.median(r["gradients"] for r in later)
        locs = np.mean([r["locs"] for r in runs], axis=0)
        summary[name] = {
            "seconds_median": seconds,
            "first_chain_seconds": runs[0]["seconds"],
            "gradients_median": grads,
            "ms_per_gradient": 1000
            * statistics.median(r["seconds"] / r["gradients"] for r in later),
            "locs_mean": locs.tolist(),
            "locs_max_diff_vs_pyro_jit": float(np.abs(locs - reference).max()),
            "runs": [{k: (v.tolist() if k == "locs" else v) for k, v in r.items()} for r in runs],
        }
    base = summary["Pyro jit"]["seconds_median"]
    for row in summary.values():
        row["ratio_vs_pyro_jit"] = row["seconds_median"] / base

    name = "nuts_speed-quick" if args.quick else "nuts_speed"
    date = time.strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/nuts_speed.py" + (" --quick" if args.quick else "")
    lines = [
        "# NUTS on the Bayesian GMM of Old Faithful",
        "",
        f"`{command}`, {date}, {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro.__version__};"
        f" load average (1 min) {load_before:.2f} before the chains, {load_after:.2f} after"
        " them (the chains alone keep one task runnable); the hypervisor took"
        f" {100 * steal:.1f}% of the CPUs' time during the run (steal: other machines on the same"
        " host).",
        "",
        f"One chain of {steps} warm-up steps + {steps} draws, one thread, in one process, seeds"
        f" {', '.join(map(str, seeds))} with the samplers interleaved; median over seeds"
        " (NumPyro: over the chains after its first, which compiles).",
        "",
        "| sampler | s per chain | vs Pyro jit | gradients | ms per gradient | first chain (s)"
        " | locations (posterior mean, max diff vs Pyro jit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for sampler, row in summary.items():
        lines.append(
            f"| {sampler} | {row['seconds_median']:.2f} | {row['ratio_vs_pyro_jit']:.2f}x"
            f" | {row['gradients_median']:.0f} | {row['ms_per_gradient']:.2f}"
            f" | {row['first_chain_seconds']:.2f} | {row['locs_max_diff_vs_pyro_jit']:.4f} |"
        )
    if "NumPyro" not in summary:
        lines += ["", "NumPyro not installed (`pip install .[peers]`): its row is left out."]
    fits = ", ".join(f"{s:.2f}" for s in compare["fit_seconds"])
    lines += [
        "",
        f"The comparison, `{compare['command']}` in a fresh process: **{compare['seconds']:.1f} s**"
        f" in all; the NUTS fits {fits} s (**{compare['fits_total']:.1f} s** together; goal:"
        f" under 30 s idle); worst r_hat {compare['r_hat_max']:.3f}; the potential ran"
        f" {compare['potential']}.",
    ]
    report = {
        "command": command,
        "date": date,
        "cores": os.cpu_count(),
        "load_average_1min": [load_before, load_after],
        "steal_fraction": steal,
        "steps": steps,
        "seeds": list(seeds),
        "samplers": summary,
        "comparison": compare,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
