"""The EM driver on models that are not in the zoo, written here as plain Pyro programs."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

from inference import em, evaluate


def poisson_mixture(x):
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)  # (2,)
    rates = pyro.param("rates", torch.tensor([1.0, 3.0]), constraint=constraints.positive)  # (2,)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights))  # (N,) or (2, 1) when enumerated
        pyro.sample("x", dist.Poisson(rates[z]), obs=x)


def empty_guide(x):
    pass


def poisson_data(num=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(torch.tensor([0.3, 0.7]), num, replacement=True, generator=g)
    return torch.poisson(torch.tensor([2.0, 15.0])[z], generator=g), z


def closed_form_poisson_em(x, weights, rates, num_iters):
    """The textbook updates, for reference: weights = mean resp, rates = resp-weighted means."""
    for _ in range(num_iters):
        log_joint = weights.log() + dist.Poisson(rates).log_prob(x.unsqueeze(-1))  # (N, 2)
        resp = log_joint.softmax(-1)
        weights = resp.mean(0)
        rates = (resp * x.unsqueeze(-1)).sum(0) / resp.sum(0)
    return weights, rates


def test_user_poisson_mixture_recovers_truth_and_matches_closed_form():
    x, z = poisson_data()
    result = em.fit(poisson_mixture, empty_guide, x, tol=1e-9)
    assert result.converged
    weights, rates = result.params["weights"], result.params["rates"]
    order = rates.argsort()
    assert torch.allclose(rates[order], torch.tensor([2.0, 15.0]), atol=0.3)
    assert torch.allclose(weights[order], torch.tensor([0.3, 0.7]), atol=0.03)
    # the same maximum as 500 textbook EM iterations from a neutral start
    ref_w, ref_r = closed_form_poisson_em(
        x.double(),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([1.0, 20.0], dtype=torch.float64),
        500,
    )
    # (float32 fit against a float64 reference: the likelihood is flat to ~1e-4 in the weights)
    torch.testing.assert_close(rates[order].double(), ref_r, atol=2e-3, rtol=0)
    torch.testing.assert_close(weights[order].double(), ref_w, atol=1e-3, rtol=0)
    # the history never decreases and the exact log-likelihood agrees with the result
    curve = result.curve()
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    log_px = evaluate.log_likelihood(poisson_mixture, empty_guide, x)
    assert log_px.mean().item() == pytest.approx(result.objective, abs=1e-5)


def test_nested_plates_and_a_factor_prior():
    """A mixture of products over a features plate (dim=-1) inside the data plate (dim=-2)."""

    def model(x):
        weights = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.randn(3, 4))
        pyro.factor("ridge", -0.5 * (locs**2).sum())  # a Normal(0, 1) prior on the locations
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Categorical(weights))  # (N, 1) or (3, 1, 1) enumerated
            with pyro.plate("features", x.shape[1], dim=-1):
                # Vindex broadcasts z (N, 1) or (3, 1, 1) against the feature index (4,)
                loc = Vindex(locs)[z, torch.arange(x.shape[1])]  # (N, 4) or (3, 1, 4)
                pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[-4.0] * 4, [0.0] * 4, [4.0] * 4])
    z = torch.randint(3, (600,), generator=g)
    x = centers[z] + torch.randn(600, 4, generator=g)
    result = em.fit(model, None, x, tol=1e-8)
    locs = result.params["locs"]
    order = locs[:, 0].argsort()
    torch.testing.assert_close(locs[order], centers, atol=0.2, rtol=0)
    assert evaluate.ari(z, _predict(model, x, result)) > 0.95
    # MAP under the ridge prior: each mean is sum_n r[n,k] x[n] / (n_k + 1), by the closed form
    resp = _predict(model, x, result, hard=False)
    expected = (resp.T @ x) / (resp.sum(0).unsqueeze(-1) + 1.0)
    torch.testing.assert_close(locs, expected, atol=1e-3, rtol=0)


def _predict(model, x, result, hard=True):
    from inference.enumeration import Enumerated

    with torch.no_grad():
        local, _ = Enumerated(model, None, x[:4]).log_joint(x)
    return local.argmax(-1) if hard else local.softmax(-1)


def test_errors_name_the_problem():
    x, _ = poisson_data(100)

    def continuous(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match="'loc'.*not discrete"):
        em.fit(continuous, None, x)

    def no_plate(x):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
        pyro.sample(
            "x", dist.Poisson(torch.tensor([1.0, 5.0])[z]).expand([len(x)]).to_event(1), obs=x
        )

    with pytest.raises(ValueError, match="no pyro.plate's size follows the number of rows"):
        em.fit(no_plate, None, x)

    def sampling_guide(x):
        pyro.sample("z", dist.Categorical(torch.ones(2) / 2).expand([len(x)]).to_event(1))

    with pytest.raises(ValueError, match="guide samples"):
        em.fit(poisson_mixture, sampling_guide, x)

    def two_latents(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", dist.Categorical(torch.ones(2) / 2))
            b = pyro.sample("b", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Poisson(1.0 + a + b), obs=x)

    with pytest.raises(ValueError, match="several discrete latents per data point.*init='params'"):
        em.fit(two_latents, None, x)

    with pytest.raises(ValueError, match="m_step='closed'"):
        em.fit(poisson_mixture, empty_guide, x, m_step="closed")
    with pytest.raises(ValueError, match=r"shape \(100, 2\)"):
        em.fit(poisson_mixture, empty_guide, x, init=torch.ones(10, 2))


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.randint(4, (400,), generator=g)
    x = centers[truth] + 0.5 * torch.randn(400, 2, generator=g)
    labels = em.kmeans(x, 4, generator=torch.Generator().manual_seed(3))
    assert evaluate.ari(truth, labels) == pytest.approx(1.0)


def test_callback_sees_every_iteration():
    x, _ = poisson_data(300)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        result = em.fit(poisson_mixture, empty_guide, x, max_iter=4, callback=seen.append)
    assert [r["iteration"] for r in seen] == [1, 2, 3, 4]
    assert [r["iteration"] for r in result.history] == [1, 2, 3, 4]
    assert all(r["time"] >= 0 for r in seen)


def test_posterior_matches_softmax_and_keeps_impossible_rows():
    from inference.enumeration import posterior_

    g = torch.Generator().manual_seed(0)
    log_joint = torch.randn(50, 7, generator=g) * 200 - 300  # rows spanning hundreds of nats
    log_joint[3] = -float("inf")  # a point no component can produce
    log_joint[4, :3] = -float("inf")  # impossible components
    expected_lp = log_joint.logsumexp(-1)
    expected_post = log_joint.softmax(-1)
    log_px, post = posterior_(log_joint.clone())
    assert log_px[3] == -float("inf")
    keep = torch.arange(50) != 3
    torch.testing.assert_close(log_px[keep], expected_lp[keep], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(post[keep], expected_post[keep], atol=1e-30, rtol=1e-5)


def test_default_chunk_size_follows_what_the_model_says_it_materializes():
    """The Bernoulli mixture's E-step is a matrix product: K values per row (plus K
    responsibilities), not K x D, so it is given far larger chunks than a model that says
    nothing, which is assumed to make 4 K D values per row (the earlier fixed rule)."""
    from zoo.models.bernoulli_mixture import BernoulliMixture, BMMConfig
    from zoo.models.gmm import GaussianMixture

    bmm = BernoulliMixture(BMMConfig(num_components=10, dim=784))
    assert em._default_chunk_size(bmm.model, 10, 784) == 2**22 // 20
    gmm = GaussianMixture(num_components=10, dim=10)
    assert em._default_chunk_size(gmm.model, 10, 10) == 2**20 // 100
    assert em._default_chunk_size(gmm.model, 500, 784) == 4096  # the floor
