"""inference.mcmc knows no model: NUTS on a conjugate model matches the closed-form posterior."""

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
    lines = mcmc.write_posterior(posterior, tmp_path, seed=0)
    assert "No label switching" in "\n".join(lines)
    for name in (
        "posterior.nc",
        "summary.csv",
        "trace.png",
        "trace_before_relabelling.png",
        "posterior.png",
    ):
        assert (tmp_path / "nuts-seed0" / name).exists(), name
    with pytest.raises(ValueError, match="chains >= 1"):
        mcmc.sample_posterior(normal_mean, x, chains=0)


def test_chains_in_worker_processes_draw_what_they_draw_one_after_the_other():
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    here = mcmc.sample_posterior(normal_mean, x, chains=2, warmup=20, samples=20, workers=1)
    forked = mcmc.sample_posterior(normal_mean, x, chains=2, warmup=20, samples=20, workers=2)
    assert here["workers"] == 1 and forked["workers"] == 2
    assert here["worker_peak_memory_mib"] == 0 and forked["worker_peak_memory_mib"] >= 0
    assert np.array_equal(here["raw"]["mu"], forked["raw"]["mu"])  # each chain seeds itself
    assert len(forked["sample_times"]) == 40 and forked["sample_times"] == sorted(
        forked["sample_times"]
    )


def failing(x):
    pyro.sample("mu", dist.Normal(0.0, 1.0))
    raise RuntimeError("this model always fails")


def test_a_chain_that_fails_in_its_worker_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError, match="chain 0 failed in its worker(?s:.*)always fails"):
        mcmc.sample_posterior(failing, torch.zeros(3), chains=2, warmup=2, samples=2, workers=2)
    with pytest.raises(ValueError, match="workers must be"):
        mcmc.sample_posterior(normal_mean, torch.zeros(3), workers=0)
    # data off the CPU (a GPU's; here the meta device) cannot go to forked workers
    with pytest.raises(ValueError, match="cannot use the data's meta device"):
        mcmc.sample_posterior(normal_mean, torch.zeros(3, device="meta"), workers=2)
