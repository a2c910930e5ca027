"""inference.mcmc knows no model: NUTS on a conjugate model matches the closed-form posterior."""

import os

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import mcmc


def normal_mean(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_nuts_on_a_normal_mean_matches_the_closed_form(tmp_path):
    """mu ~ N(0, 2^2), x[n] ~ N(mu, 1): the posterior is N(sum x / (N + 1/4), 1 / (N + 1/4))."""
    x = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 1.5
    precision = len(x) + 0.25
    mean, sd = (x.sum() / precision).item(), precision**-0.5
    posterior = mcmc.sample_posterior(normal_mean, x, chains=2, warmup=200, samples=400, seed=0)
    draws = posterior["draws"]["mu"]  # (chains, samples)
    assert draws.shape == (2, 400)
    # Monte Carlo error of the mean with ESS >= 200: sd / sqrt(200) = 0.016
    assert draws.mean() == pytest.approx(mean, abs=0.05)
    assert draws.std() == pytest.approx(sd, rel=0.15)
    assert posterior["r_hat_max"] < 1.05 and posterior["relabelled_fraction"] == 0
    assert posterior["potential"] == mcmc.FUSED
    lines = mcmc.write_posterior(posterior, tmp_path, seed=0)
    assert "No label switching" in "\n".join(lines)
    for name in ("posterior.nc", "summary.csv", "trace.png", "posterior.png"):
        assert (tmp_path / "nuts-seed0" / name).exists(), name
    # nothing was relabelled: no second trace plot of the same draws
    assert not (tmp_path / "nuts-seed0" / "trace_before_relabelling.png").exists()
    with pytest.raises(ValueError, match="chains >= 1"):
        mcmc.sample_posterior(normal_mean, x, chains=0)


def test_chains_in_worker_processes_draw_what_they_draw_one_after_the_other():
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    here = mcmc.sample_posterior(normal_mean, x, chains=2, warmup=20, samples=20, workers=1)
    forked = mcmc.sample_posterior(normal_mean, x, chains=2, warmup=20, samples=20, workers=2)
    assert here["workers"] == 1 and forked["workers"] == 2
    # a worker's growth in MiB for a one-parameter model: small (a reading in bytes or KiB, or
    # of the whole resident set instead of its growth, would be far above this)
    assert here["worker_peak_memory_mib"] == 0 and 0 <= forked["worker_peak_memory_mib"] < 500
    assert np.array_equal(here["raw"]["mu"], forked["raw"]["mu"])  # each chain seeds itself
    assert len(forked["sample_times"]) == 40 and forked["sample_times"] == sorted(
        forked["sample_times"]
    )


def branching_normal_mean(x):
    """normal_mean, with a Python branch on the unknown's value (never taken)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    if mu.abs() > 1e6:
        raise ValueError("mu is far out")
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def numpy_scale(x):
    """A scale computed by numpy from the unknown: a recording would keep it fixed."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    scale = float(np.exp(0.1 * mu.detach().numpy()))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, scale), obs=x)


CALLS = torch.zeros(())


def counting_normal_mean(x):
    """normal_mean, counting its runs in a tensor it updates in place (a module's buffer)."""
    CALLS.add_(1)
    normal_mean(x)


def test_a_potential_that_cannot_be_recorded_faithfully_runs_eager_and_stays_right():
    """Pyro's jit_compile=True would bake in the branch taken and the scale seen at tracing
    time; the recorder refuses the first and its check catches the second."""
    from pyro.infer.mcmc.util import initialize_model

    x = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 1.5
    for model, reason in (
        (branching_normal_mean, "reads a tensor's value in Python"),
        (numpy_scale, "recorded graph's value differs"),
        (counting_normal_mean, "updates a tensor in place (aten.add_.Tensor)"),
    ):
        pyro.set_rng_seed(0)
        init, potential, _, _ = initialize_model(model, (x,))
        fused, how = mcmc.fuse_potential(potential, init)
        assert fused is potential and how.startswith("eager") and reason in how, how
    # an infinite potential where it is recorded leaves nothing to check the recording against
    infinite = lambda z: (z["a"] ** 2).sum() + float("inf")  # noqa: E731
    fused, how = mcmc.fuse_potential(infinite, {"a": torch.zeros(2)})
    assert fused is infinite and how == "eager: the potential is not finite where it was recorded"
    with pytest.warns(UserWarning, match="eager potential, several times slower"):
        posterior = mcmc.sample_posterior(
            branching_normal_mean, x, chains=1, warmup=100, samples=300, workers=1
        )
    assert posterior["potential"].startswith("eager")
    precision = len(x) + 0.25  # the closed form of normal_mean's posterior, as above
    assert posterior["draws"]["mu"].mean() == pytest.approx(x.sum().item() / precision, abs=0.07)


def failing(x):
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    raise RuntimeError("this model always fails")


PARENT = os.getpid()


def failing_in_workers(x):
    """Runs in this process (where the potential is recorded) and fails in a forked worker."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    if os.getpid() != PARENT:
        raise RuntimeError("this model fails in a worker")
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_a_chain_that_fails_in_its_worker_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError, match="chain 0 failed in its worker(?s:.*)fails in a worker"):
        mcmc.sample_posterior(
            failing_in_workers, torch.zeros(3), chains=2, warmup=2, samples=2, workers=2
        )
    # a model that fails wherever it runs fails here, before any worker starts
    with pytest.raises(RuntimeError, match="always fails"):
        mcmc.sample_posterior(failing, torch.zeros(3), chains=2, warmup=2, samples=2, workers=2)
    with pytest.raises(ValueError, match="workers must be"):
        mcmc.sample_posterior(normal_mean, torch.zeros(3), workers=0)
    # data off the CPU (a GPU's; here the meta device) cannot go to forked workers
    with pytest.raises(ValueError, match="cannot use the data's meta device"):
        mcmc.sample_posterior(normal_mean, torch.zeros(3, device="meta"), workers=2)
