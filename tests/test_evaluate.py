import numpy as np
import pytest
import torch
from sklearn import metrics

from inference import evaluate


def random_labels(seed, num=300, classes=5, clusters=6):
    rng = np.random.default_rng(seed)
    truth = rng.integers(classes, size=num)
    pred = np.where(rng.random(num) < 0.7, (truth + 2) % clusters, rng.integers(clusters, size=num))
    return truth, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_and_ari_match_sklearn(seed):
    truth, pred = random_labels(seed)
    assert evaluate.nmi(truth, pred) == pytest.approx(
        metrics.normalized_mutual_info_score(truth, pred), abs=1e-12
    )
    assert evaluate.ari(truth, pred) == pytest.approx(
        metrics.adjusted_rand_score(truth, pred), abs=1e-12
    )


def test_clustering_accuracy_against_brute_force():
    import itertools

    truth, pred = random_labels(3, num=200, classes=4, clusters=4)
    best = max(np.mean(np.array(perm)[pred] == truth) for perm in itertools.permutations(range(4)))
    assert evaluate.clustering_accuracy(truth, pred) == pytest.approx(best)
    # relabelling the clusters changes nothing; perfect clustering scores 1 everywhere
    assert evaluate.clustering_accuracy(truth, (pred + 1) % 4) == pytest.approx(best)
    t = torch.tensor([0, 0, 1, 1, 2])
    assert evaluate.clustering_accuracy(t, t + 7) == 1.0
    assert evaluate.nmi(t, t + 7) == pytest.approx(1.0) and evaluate.ari(t, t + 7) == pytest.approx(
        1.0
    )


def test_label_errors():
    with pytest.raises(ValueError, match="differ in length"):
        evaluate.nmi([0, 1], [0])
    with pytest.raises(ValueError, match="no labels"):
        evaluate.ari([], [])


def test_information_criteria():
    assert evaluate.bic(-100.0, 5, 50) == pytest.approx(200 + 5 * np.log(50))
    assert evaluate.aic(-100.0, 5) == pytest.approx(210.0)


def test_majority_mapping_for_more_clusters_than_labels():
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([5, 5, 6, 7, 7, 6, 8, 9])  # 6 clusters for 3 labels
    # cluster 5 -> 0 (2 right), 6 -> 0 or 1 (1), 7 -> 1 (2), 8 -> 2 (1), 9 -> 2 (1): 7 of 8
    assert evaluate.clustering_accuracy(truth, pred, "majority") == pytest.approx(7 / 8)
    # one-to-one can use only three of the six clusters
    assert evaluate.clustering_accuracy(truth, pred) == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="mapping"):
        evaluate.clustering_accuracy(truth, pred, "greedy")


def test_a_plate_that_subsamples_its_own_terms_keeps_its_factor_in_the_elbo():
    """A program whose plate over each point's J = 6 observations draws 2 of them per run (the
    pattern of a diffusion model's levels): evaluate.elbo averages to the closed-form ELBO of
    all J terms (Pyro's J / 2 factor kept; dropping it gave a third of the likelihood term),
    and an importance-sampled log p(x) is refused, naming the plate."""
    import pyro
    import pyro.distributions as dist

    torch.manual_seed(0)
    num, terms = 5, 6
    y = torch.randn(num, terms) + 1.0
    loc, scale = torch.linspace(-1, 1, num), torch.full((num,), 0.7)

    def model(y):
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("terms", terms, subsample_size=2, dim=-2) as j:
                pyro.sample("y", dist.Normal(z, 1.0), obs=y[:, j].T)

    def guide(y):
        with pyro.plate("data", len(y)):
            pyro.sample("z", dist.Normal(loc[: len(y)], scale[: len(y)]))

    # E_q log N(y_j | z, 1) = log N(y_j | m, 1) - s^2 / 2; E_q log p(z) - log q(z) = -KL
    q, prior = torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    expected_lik = (
        torch.distributions.Normal(loc.unsqueeze(-1), 1.0).log_prob(y)
        - scale.pow(2).unsqueeze(-1) / 2
    )
    exact = expected_lik.sum(-1) - torch.distributions.kl_divergence(q, prior)
    draws = torch.stack([evaluate.elbo(model, guide, y, num_samples=50) for _ in range(400)])
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - exact).abs() < 4 * se + 1e-3).all(), (draws.mean(0), exact)
    with pytest.raises(ValueError, match="plate\\(s\\) terms \\(2 of 6\\)"):
        evaluate.log_likelihood(model, guide, y, num_samples=10)


def test_latent_usage_in_closed_form():
    """PPCA whose second latent unit the decoder ignores (its column of W is zero), with the
    exact posterior as guide: unit 2's posterior is its prior (inactive, no KL), unit 1's mean
    varies; the mean KL is the Gaussian closed form, 0.5 (tr S + m'm - q - log det S) averaged
    over the rows, within 4 standard errors of its one-draw estimate; the reconstructions'
    spread is diag(W W') over diag(W W' + sigma^2 I), averaged over features, within 4 %
    (4000 rows)."""
    from tests._models import PPCA

    torch.manual_seed(0)
    ppca = PPCA(d=5, q=2, sigma=0.5)
    ppca.w[:, 1] = 0.0
    x = ppca.sample(4000, seed=3)
    usage = evaluate.latent_usage(ppca.model, ppca.guide, x)
    site = usage["sites"]["z"]
    assert site["units"] == 2 and site["active"] == 1
    loc, cov = ppca.posterior(x)  # (N, Q), (Q, Q)
    kl = 0.5 * (cov.trace() + (loc**2).sum(-1) - 2 - torch.logdet(cov))  # (N,)
    # the one-draw estimate's spread: log q - log p at z ~ q varies around the KL row by row
    torch.manual_seed(1)
    draws = [evaluate.latent_usage(ppca.model, ppca.guide, x[:500])["sites"]["z"]["kl"]
             for _ in range(20)]  # fmt: skip
    error = torch.tensor(draws).std().item() * (500 / 4000) ** 0.5
    assert abs(site["kl"] - kl.mean().item()) < 4 * error + 1e-3
    ww = (ppca.w @ ppca.w.T).diagonal()
    expected = (ww.mean() / (ww + ppca.sigma**2).mean()).item()
    assert usage["reconstruction_spread"] == pytest.approx(expected, rel=0.04)
