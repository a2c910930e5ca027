"""Comparing inference methods: the runner and report (inference.compare), the zoo's methods
(zoo.comparisons), the Bayesian GMM for NUTS with label switching, and gradient variance."""

import csv
import json
import math
import time
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from inference import compare, em, evaluate, mcmc, svi
from inference.loop import run as loop_run
from zoo import cli, comparisons, data, registry
from zoo import flags as zoo_flags

# ------------------------------------------------------------------------------- the runner
from zoo.models import bernoulli_mixture, gmm


def test_recorder_excludes_paused_time_and_keeps_the_budget():
    recorder = compare.Recorder(budget=0.05)
    with recorder.paused():
        time.sleep(0.2)
    assert recorder.elapsed() < 0.1  # the 0.2 s of "evaluation" is not fitting time
    assert not recorder.out_of_time()
    time.sleep(0.06)
    assert recorder.out_of_time()
    recorder.point(1.5)
    recorder.point(2.0, elapsed=7.0)
    assert recorder.points[-1] == (7.0, 2.0) and recorder.points[0][1] == 1.5


def _toy_method(name, offset):
    def run(seed, recorder):
        for step in range(1, 4):
            recorder.point(offset + seed + step, elapsed=0.1 * step)
        return {
            "objective": offset + seed,
            "heldout_log_likelihood": offset + 2 * seed,
            "heldout_method": "exact",
            "iterations": 3,
            "accuracy": 0.5,
        }

    return compare.Method(name, run, f"toy {name}")


def test_report_writes_table_csv_plot_and_command(tmp_path):
    rows = compare.run([_toy_method("a", 0.0), _toy_method("b", 10.0)], seeds=[0, 1, 2])
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for m in ("a", "b") for s in (0, 1, 2)
    ]
    table = compare.report(rows, tmp_path, command="zoo compare toy", title="toy")
    text = table.read_text()
    # mean and sample standard deviation over the seeds: heldout of b is 10 + 2 * (0, 1, 2)
    assert "| b | toy b | 3 | 11.0000 ± 1.0000 | 12.0000 ± 2.0000 |" in text
    assert "zoo compare toy" in text
    with open(tmp_path / "table.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 6 and float(lines[4]["heldout_log_likelihood"]) == 12.0
    assert (tmp_path / "command.txt").read_text().strip() == "zoo compare toy"
    assert (tmp_path / "log_likelihood_vs_time.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 6


def test_warm_up_runs_once_untimed_with_no_budget_and_leaves_no_row():
    calls = []

    def run(seed, recorder):
        calls.append((seed, recorder.budget))
        return {"objective": 0.0}

    rows = compare.run([compare.Method("m", run, warm_up=True)], seeds=[3, 4], budget=9.0)
    assert calls == [(0, 0.0), (3, 9.0), (4, 9.0)]
    assert [r["seed"] for r in rows] == [3, 4]


def test_run_rejects_no_methods():
    with pytest.raises(ValueError, match="no methods"):
        compare.run([])


# --------------------------------------------------------------- callbacks can stop drivers


def test_a_callback_returning_true_stops_em_and_the_loop():
    x, _ = data.load("faithful")
    model = gmm.GaussianMixture(num_components=2)
    seen = []
    with pytest.warns(em.ConvergenceWarning):
        result = em.fit(
            model.model,
            model.guide,
            x,
            tol=1e-12,
            callback=lambda r: seen.append(r) or r["iteration"] == 2,
        )
    assert result.num_steps == 2 and "stopped by the callback" in result.stop_reason
    assert len(seen) == 2 and not result.converged

    result = loop_run(
        lambda batch: 1.0,
        torch.zeros(10, 1),
        state={},
        batch_size=5,
        num_epochs=50,
        callback=lambda r: r["epoch"] >= 3,
    )
    assert result.num_steps == 3 and "stopped by the callback after epoch 3" in result.stop_reason


# ----------------------------------------------------------------------- the Bayesian GMM


def test_bayesian_gmm_enumerated_and_marginalized_densities_agree():
    """The explicit z site summed out by Pyro's enumeration and MixtureSameFamily's logsumexp
    give the same log joint density of the continuous parameters (to float32 rounding)."""
    from pyro.infer.mcmc.util import initialize_model

    x, _ = data.load("faithful")
    x = (x - x.mean(0)) / x.std(0)
    potentials = {}
    for enumerate_z in (False, True):
        pyro.set_rng_seed(0)
        model = partial(gmm.bayesian_model, num_components=3, enumerate=enumerate_z)
        params, potential, _, _ = initialize_model(model, (x,), max_plate_nesting=1)
        potentials[enumerate_z] = potential
    pyro.set_rng_seed(1)
    for _ in range(3):
        point = {k: v + 0.3 * torch.randn_like(v) for k, v in params.items()}
        a, b = potentials[False](point), potentials[True](point)
        assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-5)


def test_the_fused_potential_is_pyros_potential_and_gradient_on_the_bayesian_gmm():
    """What NUTS runs (inference.mcmc.fuse_potential) against Pyro's own potential and
    autograd, at random points of the unconstrained space."""
    from pyro.infer.mcmc.util import initialize_model
    from pyro.ops.integrator import potential_grad

    x, _ = data.load("faithful")
    x = (x - x.mean(0)) / x.std(0)
    pyro.set_rng_seed(0)
    model = partial(gmm.bayesian_model, num_components=2)
    init, potential, _, _ = initialize_model(model, (x,))
    fused, how = mcmc.fuse_potential(potential, init)
    assert how == mcmc.FUSED
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        point = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in init.items()}
        grads, value = potential_grad(fused, {k: v.clone() for k, v in point.items()})
        expected_grads, expected = potential_grad(
            potential, {k: v.clone() for k, v in point.items()}
        )
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        for name in point:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-4)


def test_posterior_log_predictive_matches_scipy():
    torch.manual_seed(0)
    draws = {
        "weights": torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=torch.float64),
        "locs": torch.randn(2, 2, 2, dtype=torch.float64),
        "scales": torch.rand(2, 2, 2, dtype=torch.float64) + 0.5,
        "corr": dist.LKJCholesky(2, 1.0).sample((2, 2)).double(),
    }
    x = torch.randn(5, 2, dtype=torch.float64)
    got = gmm.posterior_log_predictive(draws, x)
    density = np.zeros(5)
    for s in range(2):
        for k in range(2):
            tril = (draws["scales"][s, k].unsqueeze(-1) * draws["corr"][s, k]).numpy()
            cov = tril @ tril.T
            mvn = multivariate_normal(draws["locs"][s, k].numpy(), cov)
            density += 0.5 * draws["weights"][s, k].item() * mvn.pdf(x.numpy())
    np.testing.assert_allclose(got.numpy(), np.log(density), rtol=1e-10)


def test_relabel_undoes_a_switch_between_chains_and_within_one():
    rng = np.random.default_rng(0)
    locs = np.array([[0.0, 0.0], [3.0, 3.0], [-3.0, 4.0]]) + 0.1 * rng.normal(size=(2, 40, 3, 2))
    weights = np.tile([0.2, 0.3, 0.5], (2, 40, 1))
    scales = np.tile([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], (2, 40, 1, 1))
    switched = np.zeros((2, 40), dtype=bool)
    perm = [2, 0, 1]
    for c, s in [(1, slice(None)), (0, slice(30, 40))]:  # chain 1 entirely, chain 0's last ten
        locs[c, s] = locs[c, s][:, perm]
        weights[c, s] = weights[c, s][:, perm]
        scales[c, s] = scales[c, s][:, perm]
        switched[c, s] = True
    draws, permuted = gmm.relabel({"locs": locs, "weights": weights, "scales": scales})
    np.testing.assert_array_equal(permuted, switched)
    np.testing.assert_allclose(draws["weights"], np.tile([0.2, 0.3, 0.5], (2, 40, 1)))
    np.testing.assert_allclose(draws["scales"][..., 0], np.tile([1.0, 2.0, 3.0], (2, 40, 1)))
    # the Hungarian matching has no limit on K: seven components, every draw permuted
    locs7 = np.arange(7.0)[:, None] * np.ones(2) + 0.01 * rng.normal(size=(1, 30, 7, 2))
    shuffled = np.stack([locs7[0, i][rng.permutation(7)] for i in range(30)])[None]
    shuffled[0, 0] = locs7[0, 0]  # the pivot keeps its labels
    draws7, _ = gmm.relabel({"locs": shuffled})
    np.testing.assert_allclose(draws7["locs"][..., 0].round(), np.tile(np.arange(7.0), (1, 30, 1)))


def test_bayesian_bmm_predictive_with_one_draw_is_the_mixture_likelihood():
    torch.manual_seed(0)
    model = bernoulli_mixture.BernoulliMixture(num_components=3, dim=5)
    weights, probs = torch.tensor([0.2, 0.5, 0.3]), torch.rand(3, 5) * 0.8 + 0.1
    model.set_param("weights", weights)
    model.set_param("logits", torch.logit(probs))
    x = torch.bernoulli(torch.full((20, 5), 0.5))
    draws = {"weights": weights[None], "probs": probs[None]}
    got = bernoulli_mixture.posterior_log_predictive(draws, x)
    torch.testing.assert_close(got, model.log_likelihood(x), rtol=1e-5, atol=1e-5)
    # two identical draws average to the same
    twice = {k: v.expand(2, *v.shape[1:]) for k, v in draws.items()}
    torch.testing.assert_close(bernoulli_mixture.posterior_log_predictive(twice, x), got)


def test_nuts_on_the_bayesian_bmm_finds_at_least_the_em_fit(tmp_path):
    """bmm-synthetic (4 components, 16 pixels), 300 rows: the posterior predictive of a short
    NUTS run scores the held-out rows no worse than EM's plug-in estimate (within 0.05 nats)."""
    comparisons.compare(
        "bmm",
        seeds=(0,),
        out=tmp_path,
        progress=False,
        max_data=300,
        nuts_warmup=60,
        nuts_samples=60,
        epochs=50,
    )
    rows = {r["method"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"em", "svi", "nuts"}
    assert rows["nuts"]["heldout_log_likelihood"] > rows["em"]["heldout_log_likelihood"] - 0.05
    assert math.isfinite(rows["nuts"]["r_hat_max"])
    assert (tmp_path / "nuts-seed0" / "posterior.nc").exists()
    with pytest.raises(ValueError, match="continuous unknowns"):
        comparisons.sample_posterior("bmm", torch.zeros(10, 784), 10)


def test_em_svi_nuts_and_sklearn_agree_on_old_faithful(tmp_path):
    """Every method row, and the fitted locations: EM and scikit-learn to 1e-3 data standard
    deviations, SVI (TraceEnum MAP) to 0.02, the NUTS posterior mean to 0.1 (its posterior
    standard deviation is about 0.03-0.05 data sd; 2 chains x 100 draws)."""
    table = comparisons.compare(
        "gmm",
        "faithful",
        seeds=(0,),
        out=tmp_path,
        progress=False,
        nuts_warmup=100,
        nuts_samples=100,
        epochs=600,
    )
    rows = {r["method"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"em", "svi", "nuts", "sklearn"}
    text = table.read_text()
    for name in rows:
        assert f"| {name} |" in text
    x, _ = data.load("faithful")
    sd = x.std(0).numpy()
    reference = np.array(rows["em"]["locs"]) / sd
    reference = reference[np.argsort(reference[:, 0])]
    for name, tol in (("sklearn", 1e-3), ("svi", 0.02), ("nuts", 0.1)):
        locs = np.array(rows[name]["locs"]) / sd
        locs = locs[np.argsort(locs[:, 0])]  # eruptions separate the two components
        assert np.abs(locs - reference).max() < tol, name
    # the held-out figures agree too (all within 0.01 nats per point of EM's exact one)
    for name in rows:
        assert (
            abs(rows[name]["heldout_log_likelihood"] - rows["em"]["heldout_log_likelihood"]) < 0.01
        )
    nuts = rows["nuts"]
    assert nuts["r_hat_max"] < 1.1 and nuts["ess_bulk_min"] > 50
    # relabelling can only bring the chains' labels together: r_hat no worse after it
    assert nuts["r_hat_max"] <= nuts["r_hat_max_before_relabelling"] + 1e-9
    assert "r_hat" in text and "ess_bulk" in text
    import arviz as az

    idata = az.from_netcdf(str(tmp_path / "nuts-seed0" / "posterior.nc"))
    assert idata.posterior["locs"].shape == (2, 100, 2, 2)
    for name in ("trace.png", "posterior.png"):
        assert (tmp_path / "nuts-seed0" / name).exists(), name
    before = (tmp_path / "nuts-seed0" / "trace_before_relabelling.png").exists()
    assert before == (nuts["relabelled_fraction"] > 0)  # drawn where label switching shows
    assert len(nuts["trajectory"]) > 5  # the posterior predictive as the draws accrue


# ---------------------------------------------------------------------- gradient variance


def test_gradient_variance_matches_the_closed_form_of_a_reparameterized_gradient():
    """z ~ N(0, 1), x | z ~ N(z, 1), q(z) = N(m, s): the reparameterized single-sample gradient
    of -ELBO in m is -(x - 2z) with z = m + s eps, whose variance is 4 s^2 (= 1 for s = 0.5).
    1000 draws: the sample variance has relative sd sqrt(2 / 999) = 4.5%; tolerance 15%."""

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.3))
        pyro.sample("z", dist.Normal(m, 0.5))

    x = torch.tensor(1.0)
    elbo = pyro.infer.Trace_ELBO()
    variance, signal = evaluate.gradient_variance(
        lambda: evaluate.elbo_gradient(elbo, model, guide, x), 1000
    )
    assert variance == pytest.approx(1.0, rel=0.15)
    assert signal == pytest.approx((1.0 - 2 * 0.3) ** 2, abs=0.1)  # E[grad] = -(x - 2m) = -0.4
    score, _ = evaluate.gradient_variance(
        lambda: evaluate.elbo_gradient(
            pyro.infer.TraceGraph_ELBO(), model, svi.score_function(guide), x
        ),
        500,
    )
    assert score > 1.5 * variance
    with pytest.raises(ValueError, match="at least 2 draws"):
        evaluate.gradient_variance(lambda: [torch.zeros(1)], 1)


def test_score_function_switches_off_reparameterization():
    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    trace = pyro.poutine.trace(svi.score_function(guide)).get_trace()
    assert not trace.nodes["z"]["fn"].has_rsample
    assert pyro.poutine.trace(guide).get_trace().nodes["z"]["fn"].has_rsample


def test_vae_comparison_rows_and_score_function_variance(tmp_path):
    """Every VAE estimator gives a row; at the same parameters the score-function gradient
    (TraceGraph without reparameterization) is far noisier than every reparameterized one, and
    the analytic KL is less noisy than the Monte Carlo KL."""
    comparisons.compare(
        "vae",
        "digits",
        seeds=(0,),
        out=tmp_path,
        progress=False,
        epochs=1,
        max_data=400,
        heldout=100,
        num_samples=10,
        gradient_draws=30,
        hidden=(64,),
        z_dim=8,
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["method"] for r in rows] == list(comparisons.method_names(registry.get("vae")))
    assert all(math.isfinite(r["heldout_log_likelihood"]) for r in rows)
    assert all(r["heldout_method"] == "importance sampling, K=10" for r in rows)
    variance = {
        k: v["variance"]
        for k, v in json.loads((tmp_path / "gradient_variance.json").read_text()).items()
    }
    for name in ("trace", "meanfield", "iwae5", "iwae50"):
        assert variance["tracegraph"] > 10 * variance[name], name
    assert variance["meanfield"] < variance["trace"]
    assert "Gradient variance at fixed parameters" in (tmp_path / "table.md").read_text()
    # the recorded command is one the CLI accepts, tuples included
    command = (tmp_path / "command.txt").read_text().split()
    assert "--hidden" in command and command[command.index("--hidden") + 1] == "64"
    args = zoo_flags.compare_parser(registry.get("vae")).parse_args(command[3:])
    assert args.hidden == [64] and args.z_dim == 8 and args.gradient_draws == 30


def test_ssvae_comparison_gives_the_three_rows_with_accuracy(tmp_path):
    comparisons.compare(
        "ssvae",
        "digits",
        seeds=(0,),
        out=tmp_path,
        progress=False,
        epochs=8,
        lr=3e-3,
        labels=50,
        heldout=100,
        num_samples=5,
        hidden=(64,),
        z_dim=8,
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["method"] for r in rows] == ["sampled", "enumerated", "classifier"]
    # with 50 labels the classification term is what makes q(y | x) classify: measured 0.58
    # against 0.12 and 0.05 for the rows without it (alpha = 0; chance is 0.1)
    accuracy = {r["method"]: r["accuracy"] for r in rows}
    assert accuracy["classifier"] > 0.4
    assert accuracy["classifier"] > max(accuracy["sampled"], accuracy["enumerated"]) + 0.2


def test_a_budget_stops_deep_methods_after_the_first_epoch(tmp_path):
    comparisons.compare(
        "vae",
        "digits",
        methods=["meanfield"],
        budget=1e-9,
        out=tmp_path,
        progress=False,
        epochs=50,
        max_data=200,
        heldout=50,
        num_samples=2,
        gradient_draws=2,
        hidden=(16,),
        z_dim=2,
    )
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["iterations"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "nosuchmodel"}, "unknown model"),
        ({"model": "gmm", "data": "mnist"}, "compared on faithful"),
        ({"model": "gmm", "methods": ["em", "hmc"]}, "unknown method"),
        ({"model": "gmm", "methods": ["em", "em"]}, "named twice"),
    ],
)
def test_compare_rejects_bad_requests(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        comparisons.compare(out=tmp_path, progress=False, **kwargs)


def test_compare_rejects_unknown_options(tmp_path):
    with pytest.raises(TypeError, match="unknown option"):
        comparisons.compare("gmm", out=tmp_path, progress=False, epochz=3)


def test_cli_compare_writes_the_report_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["compare", "bmm", "--data", "bmm-synthetic", "--inference", "em,svi", "--seeds", "2"]
    argv += ["--epochs", "30", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| em |" in printed and "| svi |" in printed and "| nuts |" not in printed
    assert "accuracy" in printed
    assert (out / "command.txt").read_text().startswith("zoo compare bmm --data bmm-synthetic")
    with pytest.raises(SystemExit, match="already holds a comparison"):
        cli.main(argv)
    assert (
        cli.main(["compare", "gmm", "--inference", "em,gibbs", "--out", str(tmp_path / "x")]) == 2
    )
    assert "unknown method(s) gibbs" in capsys.readouterr().err


def test_the_progress_bar_names_the_method_and_seed_that_run(capsys):
    seen = []

    def fit(seed, recorder):
        seen.append(capsys.readouterr().err)  # what the bar shows while this job runs
        return {"objective": 0.0}

    compare.run([compare.Method("first", fit), compare.Method("second", fit)], seeds=(0, 7))
    assert "compare: first, seed 0" in seen[0] and "compare: second, seed 7" in seen[3]
