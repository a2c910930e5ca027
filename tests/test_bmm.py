import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from inference import em, evaluate
from tests.conftest import requires_mnist
from zoo import data
from zoo.models.bernoulli_mixture import BernoulliMixture, BMMConfig, ProductBernoulli


def test_product_bernoulli_equals_pyro_bernoulli_when_enumerated():
    logits = torch.randn(5, 1, 12)  # (K, 1, D), as when z is enumerated
    x = torch.bernoulli(torch.full((30, 12), 0.4))  # (N, D)
    expected = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)  # (K, N)
    actual = ProductBernoulli(logits).log_prob(x)
    assert actual.shape == (5, 30)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-6)


def test_em_recovers_a_synthetic_mixture(device):
    spec = data.default_bernoulli_mixture()
    x, z = data.make_bernoulli_mixture(4000, spec, seed=0)
    bmm = BernoulliMixture(num_components=4, dim=16).to(device)
    result = em.fit(bmm.model, bmm.guide, x.to(device), n_init=2)
    assert result.converged
    curve = result.curve()
    assert all(b >= a - 1e-6 for a, b in zip(curve, curve[1:]))
    probs, weights = bmm.probs.detach().cpu(), bmm.weights.detach().cpu()
    match = [int((probs - spec.probs[k]).abs().sum(-1).argmin()) for k in range(4)]
    assert sorted(match) == [0, 1, 2, 3]
    assert torch.allclose(probs[match], spec.probs, atol=0.04)
    assert torch.allclose(weights[match], spec.weights, atol=0.03)
    assert evaluate.clustering_accuracy(z, bmm.predict(x.to(device)).cpu()) > 0.9


def test_closed_form_m_step_is_the_map_formula():
    x, _ = data.make_bernoulli_mixture(300, seed=2)
    resp = torch.softmax(torch.randn(300, 3, generator=torch.Generator().manual_seed(1)), -1)
    bmm = BernoulliMixture(BMMConfig(3, 16, weight_concentration=2.0, beta_a=3.0, beta_b=1.5))
    bmm.m_step(bmm.sufficient_statistics(x, resp))
    counts = resp.sum(0).double()
    expected_w = (counts + 1.0) / (300 + 3 * 1.0)  # Dirichlet(2) MAP
    expected_p = ((resp.T @ x).double() + 2.0) / (counts[:, None] + 3.0 + 1.5 - 2)  # Beta(3, 1.5)
    torch.testing.assert_close(bmm.weights.detach().double(), expected_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(bmm.probs.detach().double(), expected_p, atol=1e-6, rtol=0)


def test_gradient_m_step_reaches_the_map_closed_form():
    """The priors written as pyro.factor are what the closed form maximizes."""
    x, _ = data.make_bernoulli_mixture(200, seed=3)
    x = x.double()
    resp = torch.softmax(
        torch.randn(200, 4, dtype=x.dtype, generator=torch.Generator().manual_seed(2)), -1
    )
    fitted = {}
    for how in ("closed", "gradient"):
        bmm = BernoulliMixture(BMMConfig(4, 16, weight_concentration=2.0, beta_a=2.0, beta_b=3.0))
        bmm = bmm.double()
        with pytest.warns(em.ConvergenceWarning):
            result = em.fit(bmm.model, bmm.guide, x, init=resp, m_step=how, max_iter=2, tol=1e-12)
        fitted[how] = (result.curve(), bmm.probs.detach(), bmm.weights.detach())
    assert fitted["closed"][0] == pytest.approx(fitted["gradient"][0], abs=1e-7)
    torch.testing.assert_close(fitted["closed"][1], fitted["gradient"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted["closed"][2], fitted["gradient"][2], atol=1e-4, rtol=0)


def test_exact_log_likelihood_by_hand(device):
    x, _ = data.make_bernoulli_mixture(50, seed=4)
    bmm = BernoulliMixture(num_components=3, dim=16)
    p, w = bmm.probs.detach(), bmm.weights.detach()
    by_hand = torch.logsumexp(
        w.log() + (x[:, None, :] * p.log() + (1 - x[:, None, :]) * (1 - p).log()).sum(-1), -1
    )
    bmm, x = bmm.to(device), x.to(device)
    got = evaluate.log_likelihood(bmm.model, bmm.guide, x)
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), by_hand)
    torch.testing.assert_close(bmm.log_likelihood(x).cpu(), by_hand)


def test_samples_are_binary_with_the_right_means():
    spec = data.default_bernoulli_mixture()
    bmm = BernoulliMixture(num_components=4, dim=16)
    bmm.set_param("weights", spec.weights)
    bmm.set_param("logits", torch.logit(spec.probs))
    x, z = bmm.sample(20000)
    assert x.shape == (20000, 16) and set(x.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(x.mean(0), spec.weights @ spec.probs, atol=0.02, rtol=0)


def test_non_binary_data_is_a_clear_error():
    bmm = BernoulliMixture(num_components=2, dim=4)
    with pytest.raises(ValueError, match="binary data"):
        em.fit(bmm.model, bmm.guide, torch.rand(20, 4))
    with pytest.raises(ValueError, match="Beta prior"):
        BernoulliMixture(beta_a=0.5)


@requires_mnist
def test_mnist_mixture_beats_one_component():
    """On 3000 MNIST digits, 20 components beat 1 on held-out digits, and none is empty."""
    x, y = data.load("mnist", split="train", binarize="static")
    x_test, y_test = data.load("mnist", split="test", binarize="static")
    x, y, x_test, y_test = x[:3000], y[:3000], x_test[:1000], y_test[:1000]
    scores = {}
    for k in (1, 20):
        bmm = BernoulliMixture(num_components=k, dim=784)
        with warnings.catch_warnings():  # 30 iterations are enough for this comparison
            warnings.simplefilter("ignore", em.ConvergenceWarning)
            em.fit(bmm.model, bmm.guide, x, max_iter=30, tol=1e-4)
        scores[k] = bmm.log_likelihood(x_test).mean().item()
        if k == 20:
            assert int((bmm.responsibilities(x).sum(0) < 1).sum()) == 0
            assert evaluate.clustering_accuracy(y_test, bmm.predict(x_test)) > 0.4
    assert scores[20] > scores[1] + 40  # nats per image; measured -160.3 vs -201.4


def test_fit_on_digits_is_an_em_fixed_point_with_the_objective_it_reports():
    """On the 8x8 digits: EM's objective never falls from one iteration to the next; the
    reported objective is the mean log-likelihood plus log prior / N recomputed from the fitted
    model (``FitResult``'s definition); and one more EM iteration from the fitted parameters
    moves them by less than the tolerance's worth (a fixed point, not just a finite number)."""
    x, _ = data.load("digits", split="train", binarize="threshold")
    x = x.double()
    bmm = BernoulliMixture(num_components=10, dim=64).double()
    result = em.fit(bmm.model, bmm.guide, x, tol=1e-8, max_iter=2000)
    assert result.converged
    curve = np.array(result.curve())
    assert (np.diff(curve) >= -1e-9 * np.abs(curve[1:])).all()
    recomputed = bmm.log_likelihood(x).mean() + bmm.log_prior() / len(x)
    assert result.objective == pytest.approx(recomputed.item(), rel=1e-9)
    probs = bmm.probs.detach().clone()
    with pytest.warns(em.ConvergenceWarning):  # one iteration, as asked
        em.fit(bmm.model, bmm.guide, x, init="params", max_iter=1, tol=1e-8)
    assert (bmm.probs.detach() - probs).abs().max().item() < 1e-4  # measured 2.2e-5
