"""The drivers and models on every device torch sees: the CPU always, CUDA where there is one.

CI has no GPU, so there each test runs once, on the CPU. On a machine with CUDA each runs on
both, against the same closed forms and reference answers (scikit-learn, the PPCA marginal,
the explicit M2 sum), and the resume test checks bit-for-bit continuation with CUDA's RNG.
"""

import json

import numpy as np
import pyro
import pytest
import torch

from inference import em, evaluate, reparam, svi
from tests._models import PPCA
from tests.test_gmm import make_data, sklearn_fit, start_params
from tests.test_loop_and_drivers import binary_batch, params_of, small_vae
from tests.test_ssvae import enumerated_loss_and_draws, explicit_loss, small_model
from zoo import cli, data
from zoo.bernoulli_mixture import BernoulliMixture
from zoo.gmm import GaussianMixture, GMMConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_on_the_device_matches_sklearn(device, covariance_type):
    x, _ = make_data()
    weights, locs, covariances = start_params(x)
    expected = sklearn_fit(x, covariance_type, weights, locs, covariances)
    gmm = GaussianMixture(GMMConfig(3, 2, covariance_type=covariance_type)).double().to(device)
    gmm.set_params(weights.to(device), locs.to(device), covariances.to(device))
    result = em.fit(gmm.model, gmm.guide, x.to(device), init="params", tol=1e-8, max_iter=1000)
    assert gmm.locs.device.type == device.type
    assert result.num_steps == expected.n_iter_
    np.testing.assert_allclose(gmm.locs.detach().cpu().numpy(), expected.means_, atol=1e-5)
    np.testing.assert_allclose(gmm.weights.detach().cpu().numpy(), expected.weights_, atol=1e-5)
    assert result.objective == pytest.approx(expected.score(x.numpy()), abs=1e-5)


def test_gradient_m_step_on_the_device_reaches_the_closed_form(device):
    x, _ = make_data(150)
    x = x.to(device)
    resp = torch.softmax(torch.randn(150, 3, generator=torch.Generator().manual_seed(0)), -1)
    fits = {}
    for how in ("closed", "gradient"):
        pyro.clear_param_store()
        config = GMMConfig(3, 2, reg_covar=0.0, weight_concentration=3.0)
        gmm = GaussianMixture(config).double().to(device)
        with pytest.warns(em.ConvergenceWarning):
            result = em.fit(
                gmm.model, gmm.guide, x, init=resp.double().to(device), m_step=how, max_iter=3
            )
        fits[how] = (result.curve(), gmm.locs.detach().cpu())
    assert fits["closed"][0] == pytest.approx(fits["gradient"][0], abs=1e-6)
    torch.testing.assert_close(fits["closed"][1], fits["gradient"][1], atol=1e-4, rtol=0)


def test_bernoulli_mixture_em_on_the_device(device):
    """EM never lowers the log-likelihood, and the model's log-likelihood on the device is the
    mixture formula computed by hand on the CPU."""
    x, _ = data.make_bernoulli_mixture(400, seed=4)
    bmm = BernoulliMixture(num_components=3, dim=16).to(device)
    result = em.fit(bmm.model, bmm.guide, x.to(device), tol=1e-6, max_iter=200)
    curve = result.curve()
    assert all(b >= a - 1e-6 for a, b in zip(curve, curve[1:]))
    p, w = bmm.probs.detach().cpu(), bmm.weights.detach().cpu()
    by_hand = torch.logsumexp(
        w.log() + (x[:, None, :] * p.log() + (1 - x[:, None, :]) * (1 - p).log()).sum(-1), -1
    )
    got = bmm.log_likelihood(x.to(device))
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), by_hand, atol=1e-4, rtol=1e-5)


def test_importance_sampling_and_iwae_match_the_ppca_marginal(device):
    ppca = PPCA().to(device)
    x = ppca.sample(40)
    exact = ppca.exact_log_likelihood(x)
    estimate = evaluate.log_likelihood(ppca.model, ppca.guide, x, num_samples=3)
    assert estimate.device.type == device.type
    torch.testing.assert_close(estimate, exact, atol=1e-8, rtol=0)
    objective = reparam.Objective(ppca.model, ppca.guide, x[:2], num_data=40, num_particles=5)
    torch.testing.assert_close(-objective(x), exact.mean(), atol=1e-8, rtol=0)


def test_reparam_fit_resumes_bit_for_bit(device, tmp_path):
    """Three epochs straight, against one epoch, an interruption and a resume: the same
    parameters to the last bit (the checkpoint carries the device's RNG state)."""
    x = binary_batch().to(device)

    def fit(vae, **options):
        return reparam.fit(
            vae.model, vae.guide, x, batch_size=16, num_epochs=3, lr=1e-2, seed=7, **options
        )

    straight = small_vae().to(device)
    fit(straight)
    expected = params_of(straight)

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    with pytest.raises(KeyboardInterrupt):
        fit(small_vae().to(device), checkpoint=ckpt, callback=stop_after_first_epoch)
    pyro.clear_param_store()
    resumed = small_vae(seed=123).to(device)
    result = fit(resumed, checkpoint=ckpt, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    for name, value in params_of(resumed).items():
        assert value.device.type == device.type
        assert torch.equal(value, expected[name]), name


def test_enumerated_m2_loss_equals_the_explicit_sum(device):
    """TraceEnum_ELBO on the device against the M2 objective written out by hand on the CPU,
    at the z the guide drew on the device."""
    model = small_model().to(device)
    x = torch.bernoulli(torch.rand(5, 12, generator=torch.Generator().manual_seed(1)))
    y = torch.tensor([2, -1, 0, -1, 9])
    with torch.no_grad():
        loss, z = enumerated_loss_and_draws(model, x.to(device), y.to(device))
        assert z.device.type == device.type
        expected = explicit_loss(model.cpu(), x, y, z.cpu()).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_svi_enumerated_fit_runs_on_the_device(device):
    model = small_model().to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(64, 12, generator=g)).to(device)
    y = torch.where(torch.rand(64, generator=g) < 0.25, torch.randint(10, (64,), generator=g), -1)
    result = svi.fit(
        model.model,
        model.guide,
        (x, y.to(device)),
        loss="TraceEnum_ELBO",
        max_plate_nesting=1,
        batch_size=32,
        num_epochs=30,
        lr=1e-2,
    )
    losses = [r["loss"] for r in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1.0
    assert model.classify(x).device.type == device.type


@pytest.mark.parametrize(
    "argv",
    [
        ["vae", "--inference", "reparam", "--iwae", "3", "--binarize", "dynamic"],
        ["hvae", "--layers", "2", "--binarize", "threshold"],
    ],
    ids=["vae-iwae", "hvae"],
)
def test_cli_fit_evaluate_and_sample_on_the_device(device, tmp_path, argv):
    out = tmp_path / "run"
    flags = ["--data", "digits", "--epochs", "2", "--hidden", "16", "--z-dim", "2"]
    flags += ["--eval-samples", "10", "--quiet", "--device", device.type, "--out", str(out)]
    assert cli.main(["fit", *argv, *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["options"]["device"] == device.type
    assert np.isfinite(metrics["test_log_likelihood"])
    assert metrics["test_log_likelihood"] > metrics["test_elbo"] - 0.5
    assert cli.main(["evaluate", str(out), "--num-samples", "10"]) == 0
    assert cli.main(["sample", str(out), "--num-samples", "8"]) == 0
