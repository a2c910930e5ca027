"""The diffusion model (zoo/models/diffusion.py) against closed forms and its own chain: the forward
marginals and posteriors, the per-level KL, the sampled-level estimator's expectation, the
ELBO below log p(x) where log p(x) can be computed, training, the command line."""

import dataclasses
import json
import math

import pyro
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from inference import evaluate, reparam
from zoo import cli, data, runs
from zoo.models.diffusion import Diffusion, DiffusionConfig, fixed_gamma


def _model(schedule="cosine", steps=20, x_dim=64, timesteps=1, hidden=(32,), seed=0):
    torch.manual_seed(seed)
    model = Diffusion(
        DiffusionConfig(
            x_dim=x_dim, steps=steps, schedule=schedule, timesteps=timesteps, hidden=hidden
        )
    )
    for p in model.network.parameters():  # a random denoiser, not the zero one it starts as
        torch.nn.init.normal_(p, std=0.3)
    if schedule == "learned":
        with torch.no_grad():
            model.gamma_steps.normal_()
    return model.double()


@pytest.mark.parametrize("schedule", ["cosine", "linear", "learned"])
def test_forward_marginals_and_posteriors_are_those_of_the_one_step_chain(schedule):
    """q(z_t | x) in closed form equals T one-step transitions z_t = sqrt(1 - beta_t) z_{t-1} +
    sqrt(beta_t) noise composed from q(z_0 | x); q(z_{t-1} | z_t, x) equals Gaussian
    conditioning of that chain's joint of (z_{t-1}, z_t)."""
    model = _model(schedule, steps=30)
    gamma = model.gamma().detach()
    assert (gamma[1:] > gamma[:-1]).all()  # noise grows with t
    alpha2 = torch.sigmoid(-gamma)
    beta = 1 - alpha2[1:] / alpha2[:-1]  # (T,)
    x = (torch.rand(5, 64) < 0.5).double()
    signed = 2 * x - 1
    mean, var = alpha2[0].sqrt() * signed, torch.sigmoid(gamma[0])  # q(z_0 | x)
    z_t = torch.randn(5, 64, dtype=torch.double)
    for t in range(1, 31):
        prev_mean, prev_var = mean, var
        mean = (1 - beta[t - 1]).sqrt() * mean
        var = (1 - beta[t - 1]) * var + beta[t - 1]
        loc, scale = model.marginal(x, torch.tensor(t))
        torch.testing.assert_close(loc, mean)
        torch.testing.assert_close(scale, var.sqrt().expand_as(scale))
        # (z_{t-1}, z_t) jointly Gaussian: Cov = sqrt(1 - beta_t) Var(z_{t-1})
        cov = (1 - beta[t - 1]).sqrt() * prev_var
        want_loc = prev_mean + cov / var * (z_t - mean)
        want_var = prev_var - cov**2 / var
        loc, scale = model.posterior(z_t, signed, torch.tensor(t))
        torch.testing.assert_close(loc, want_loc)
        torch.testing.assert_close(scale**2, want_var.expand_as(scale))


def test_the_per_level_kl_is_the_weighted_denoising_error_and_a_monte_carlo_estimate():
    model = _model(steps=20)
    x = (torch.rand(3, 64) < 0.5).double()
    signed = 2 * x - 1
    gamma = model.gamma().detach()
    t = torch.tensor(7)
    loc, scale = model.marginal(x, t)
    z_t = loc + scale * torch.randn_like(loc)
    with torch.no_grad():
        q = Normal(*model.posterior(z_t, signed, t))
        x_hat = model.denoise(z_t, t.expand(3))
        p = Normal(*model.posterior(z_t, x_hat, t))
        analytic = kl_divergence(q, p).sum(-1)  # (3,)
        snr = torch.exp(-gamma[6]) - torch.exp(-gamma[7])
        torch.testing.assert_close(analytic, 0.5 * snr * (signed - x_hat).pow(2).sum(-1))
        draws = q.sample((20000,))
        ratio = (q.log_prob(draws) - p.log_prob(draws)).sum(-1)  # (S, 3)
    se = ratio.std(0) / math.sqrt(len(ratio))
    assert ((ratio.mean(0) - analytic).abs() < 4 * se).all(), (ratio.mean(0), analytic, se)


def test_the_sampled_level_estimator_has_the_chains_expectation():
    """Pyro's Trace_ELBO of the sampled-level program (one level of T per step, scaled T / 1)
    averages to the Trace_ELBO of the whole chain, and both to the analytic sum of the terms
    (``elbo``): three estimators of one ELBO (T = 20, 8 images, fixed random denoiser)."""
    model = _model(steps=20)
    x = (torch.rand(8, 64) < 0.5).double()
    elbo = pyro.infer.Trace_ELBO()
    torch.manual_seed(1)
    with torch.no_grad():
        pairs = torch.tensor([-elbo.loss(model.model, model.guide, x) for _ in range(2000)])
        model.config.timesteps = None  # the same network, as the chain program
        chain = torch.tensor([-elbo.loss(model.model, model.guide, x) for _ in range(200)])
        exact = torch.stack([model.elbo(x).sum() for _ in range(200)])
    model.config.timesteps = 1
    mean = exact.mean()
    for name, draws in (("pairs", pairs), ("chain", chain)):
        se = (draws.var() / len(draws) + exact.var() / len(exact)).sqrt()
        assert abs(draws.mean() - mean) < 4 * se, (name, draws.mean(), mean, se)
    # the analytic sum is the low-variance one: that is why the held-out score uses it
    assert exact.std() < chain.std() < pairs.std()


def test_the_elbo_is_below_log_p_and_log_p_sums_to_one_over_every_image():
    """Two pixels, T = 50 (linear schedule): log p(x) of the chain program by importance
    sampling (K = 20000) for the four images; exp sums to 1 (it is a distribution over them;
    measured 0.998) and the ELBO lies below each. The sampled-level program is refused by
    importance sampling and by the IWAE bound, by name."""
    torch.manual_seed(0)
    model = _model("linear", steps=50, x_dim=2, timesteps=None, hidden=(16,))
    images = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.double)
    log_px = evaluate.log_likelihood(model.model, model.guide, images, num_samples=20000)
    assert torch.logsumexp(log_px, 0).exp().item() == pytest.approx(1.0, abs=0.02)
    with torch.no_grad():
        bound = torch.stack([model.elbo(images) for _ in range(200)]).mean(0)
    assert (bound <= log_px + 0.01).all(), (bound, log_px)
    model.config.timesteps = 1
    with pytest.raises(ValueError, match="plate\\(s\\) time \\(1 of 50\\)"):
        evaluate.log_likelihood(model.model, model.guide, images, num_samples=10)
    with pytest.raises(ValueError, match="IWAE bound"):
        reparam.fit(model.model, model.guide, images, num_particles=5, num_epochs=1)


def test_an_untrained_denoiser_is_the_uniform_model_and_training_lowers_the_test_bound():
    """The network's correction starts at zero, so the model starts near independent uniform
    pixels: its bound within 0.5 nats of -64 log 2 (measured -44.22 against -44.36; the
    Gaussian reverse steps are not exactly that model). Fifteen epochs on the 8x8
    digits raise the test ELBO by more than 15 nats (measured about -22 after 15 epochs)."""
    x, _ = data.load("digits", "train", "threshold")
    x_test, _ = data.load("digits", "test", "threshold")
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = Diffusion(DiffusionConfig(x_dim=64, steps=1000, hidden=(128, 128)))
    before = model.elbo(x_test, 50).mean().item()
    assert abs(before + 64 * math.log(2)) < 0.5
    reparam.fit(model.model, model.guide, x, batch_size=64, num_epochs=15, lr=1e-3, progress=False)
    after = model.elbo(x_test, 100)
    assert after.mean().item() > before + 15
    probs, chain = model.sample(6, steps=50, chain=True)
    assert probs.shape == (6, 64) and chain.shape == (50, 6, 64)
    assert ((probs >= 0) & (probs <= 1)).all() and probs.std() > 0.1  # not a flat grey


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(schedule="quadratic"), "schedule must be one of"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(timesteps=5, steps=3), "timesteps \\(5\\) cannot exceed steps \\(3\\)"),
        (dict(x_dim=60, network="unet"), "square images of side divisible by 4"),
        (dict(network="resnet"), "network must be"),
    ],
)
def test_bad_configurations_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        Diffusion(DiffusionConfig(**config))


def test_bad_input_is_refused(capsys, tmp_path):
    model = Diffusion(DiffusionConfig(x_dim=64, steps=10, hidden=(8,)))
    with pytest.raises(ValueError, match="shape \\(N, 64\\)"):
        model.guide(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="steps must be 1 to 10"):
        model.sample(2, steps=11)
    argv = ["fit", "diffusion", "--data", "faithful", "--out", str(tmp_path / "run")]
    assert cli.main([*argv, "--binarize", "none"]) == 2
    assert "binarize the data (--binarize), or model grey levels" in capsys.readouterr().err
    assert cli.main(argv) == 2  # dynamic binarization of eruption times: refused up front
    assert "intensities in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a fit that cannot start
    assert fixed_gamma("linear", 4)[[0, -1]].tolist() == pytest.approx([-13.3, 5.0])


def assert_pyros_elbo_agrees(run, metrics, binarize):
    """The model's own ELBO estimator (every level, stratified: what test_elbo reports) against
    Pyro's Trace_ELBO of the same model and guide with every level in its time plate (one draw
    of each z_t per image), on the same test images: within 4 standard errors of the
    difference (the images' ELBOs are independent draws in both). A term lost or scaled wrong
    in either moves them apart by nats."""
    model, _ = runs.restore(run)
    model.eval()
    model.config = dataclasses.replace(model.config, timesteps=model.config.steps)
    rows = max(20, 20_000 // model.config.steps)  # 20,000 levels each way: seconds
    x = runs.split("digits", "test", binarize)[0][:rows]
    pyro.set_rng_seed(0)
    ours, pyros = model.elbo(x, model.config.steps), evaluate.elbo(model.model, model.guide, x)
    se = math.sqrt((ours.var() + pyros.var()).item() / rows)
    assert abs(ours.mean().item() - pyros.mean().item()) < 4 * se, (ours.mean(), pyros.mean(), se)
    # and the run's figure is that estimator's (on all 360 test images: a few SE away)
    assert ours.mean().item() == pytest.approx(metrics["test_elbo"], abs=4 * se + 1.0)


def test_zoo_fit_diffusion_on_digits_then_evaluate_sample_and_compare(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fit", "diffusion", "--data", "digits", "--binarize", "threshold", "--epochs", "2"]
    argv += ["--steps", "100", "--hidden", "64", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert -64 * math.log(2) - 1 < metrics["test_elbo"]  # two epochs: about the uniform
    assert_pyros_elbo_agrees(out, metrics, "threshold")
    assert metrics["test_bits_per_dim"] == pytest.approx(-metrics["test_elbo"] / (64 * math.log(2)))
    for name in ("reverse_chain.png", "samples.png", "elbo_terms.png", "learning_curve.png"):
        assert (out / name).exists(), name
    assert cli.main(["evaluate", str(out), "--num-samples", "10", "--quiet"]) == 0
    assert "test_log_likelihood" not in json.loads((out / "metrics.json").read_text())
    assert cli.main(["sample", str(out), "--num-samples", "5"]) == 0
    report = tmp_path / "cmp"
    compare = ["compare", "diffusion", "--data", "digits", "--seeds", "1", "--epochs", "1"]
    compare += ["--steps", "20", "--hidden", "32", "--max-data", "300", "--heldout", "100"]
    compare += ["--gradient-draws", "30"]
    assert cli.main([*compare, "--num-samples", "20", "--out", str(report), "--quiet"]) == 0
    rows = json.loads((report / "rows.json").read_text())
    assert [r["method"] for r in rows] == ["sampled", "all-levels"]
    assert all(r["heldout_method"] == "the model's ELBO (K=20)" for r in rows)
    # at the same parameters, one sampled level per step is the noisier gradient estimator
    variance = json.loads((report / "gradient_variance.json").read_text())
    assert variance["sampled"]["variance"] > 2 * variance["all-levels"]["variance"], variance


def test_grey_levels_are_a_distribution_and_two_levels_are_the_binary_model():
    """likelihood="grey": on two pixels of three levels, log p(x) by importance sampling (chain
    program, K = 20000) sums to 1 over the nine images (measured 0.98 with a random network,
    std 0.3) and lies above the ELBO; with L = 2 levels the denoiser and p(x | z_0) are the
    Bernoulli model's. Off-grid pixels are refused by name."""
    torch.manual_seed(0)
    model = Diffusion(
        DiffusionConfig(
            x_dim=2,
            steps=50,
            schedule="linear",
            timesteps=None,
            hidden=(16,),
            likelihood="grey",
            levels=3,
        )
    ).double()
    for p in model.network.parameters():
        torch.nn.init.normal_(p, std=0.1)
    values = torch.tensor([0.0, 0.5, 1.0], dtype=torch.double)
    images = torch.cartesian_prod(values, values)
    log_px = evaluate.log_likelihood(model.model, model.guide, images, num_samples=20000)
    assert torch.logsumexp(log_px, 0).exp().item() == pytest.approx(1.0, abs=0.02)
    with torch.no_grad():
        bound = torch.stack([model.elbo(images) for _ in range(100)]).mean(0)
    assert (bound <= log_px + 0.01).all()
    with pytest.raises(ValueError, match="multiples of 1/2"):
        model.elbo(torch.full((1, 2), 0.3, dtype=torch.double))
    binary = _model(steps=10, x_dim=4, hidden=(8,))
    grey = Diffusion(DiffusionConfig(x_dim=4, steps=10, hidden=(8,), likelihood="grey", levels=2))
    grey.double().load_state_dict(binary.state_dict())
    z, t = torch.randn(3, 4, dtype=torch.double), torch.tensor([1, 5, 9])
    x = (torch.rand(3, 4) < 0.5).double()
    with torch.no_grad():
        torch.testing.assert_close(grey.denoise(z, t), binary.denoise(z, t))
        torch.testing.assert_close(
            grey.likelihood(z).log_prob(grey.observed(x)), binary.likelihood(z).log_prob(x)
        )


def test_grey_digits_train_from_the_uniform_model(tmp_path):
    """The 8x8 digits on their 17 grey levels: the untrained model is near independent uniform
    levels (64 log 17 = 181.3 nats), fifteen epochs take more than 40 nats off (measured 184.5
    -> 110.6); and the same from the command line, with --binarize none."""
    x, _ = data.load("digits", "train", None)
    x_test, _ = data.load("digits", "test", None)
    pyro.clear_param_store()
    torch.manual_seed(0)
    config = DiffusionConfig(x_dim=64, steps=1000, hidden=(256, 256), likelihood="grey", levels=17)
    model = Diffusion(config)
    before = model.elbo(x_test, 50).mean().item()
    assert abs(before + 64 * math.log(17)) < 5
    reparam.fit(model.model, model.guide, x, batch_size=64, num_epochs=15, lr=1e-3, progress=False)
    assert model.elbo(x_test, 100).mean().item() > before + 40
    argv = ["fit", "diffusion", "--data", "digits", "--binarize", "none", "--likelihood", "grey"]
    argv += ["--levels", "17", "--epochs", "1", "--hidden", "32", "--quiet"]
    assert cli.main([*argv, "--out", str(tmp_path / "grey")]) == 0
    metrics = json.loads((tmp_path / "grey" / "metrics.json").read_text())
    assert -64 * math.log(17) - 10 < metrics["test_elbo"]
    assert_pyros_elbo_agrees(tmp_path / "grey", metrics, None)
