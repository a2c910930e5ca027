"""Scores, completion and denoising for any model/guide pair (``inference.uses``), against
Bayes' rule by hand, brute-force enumeration, Gaussian conditionals in closed form and
scikit-learn's ROC AUC."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import uses
from tests._models import PPCA

WEIGHTS = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
PROBS = torch.tensor(
    [
        [0.9, 0.8, 0.1, 0.2, 0.7, 0.5],
        [0.1, 0.2, 0.9, 0.8, 0.3, 0.6],
        [0.5, 0.9, 0.5, 0.1, 0.1, 0.9],
    ],
    dtype=torch.float64,
)


def mixture(x):
    """A user's Bernoulli mixture: z ~ Categorical(w), x | z ~ Bernoulli(probs[z]) per pixel."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(WEIGHTS))
        pyro.sample("x", dist.Bernoulli(PROBS[z]).to_event(1), obs=x)


def binary_rows(num=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num, 6, generator=g, dtype=torch.float64) < 0.5).double()


def log_lik(x, probs, mask):
    """log p(x[mask] | k) for every row and component, (N, K)."""
    per = x[:, None] * probs.log() + (1 - x[:, None]) * (1 - probs).log()  # (N, K, D)
    return (per * mask[:, None]).sum(-1)


def test_mixture_completion_is_the_exact_conditional_by_hand():
    x = binary_rows()
    g = torch.Generator().manual_seed(1)
    observed = torch.rand(7, 6, generator=g) < 0.5
    observed[:, 0] = True  # every row sees something
    result = uses.complete(mixture, None, x, observed)
    joint = WEIGHTS.log() + log_lik(x, PROBS, observed.double())  # (N, K)
    post = joint.softmax(-1)
    by_hand = torch.where(observed, x, post @ PROBS)
    assert result.exact
    torch.testing.assert_close(result.mean, by_hand, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.log_evidence, joint.logsumexp(-1), rtol=0, atol=1e-10)
    # NaN at the hidden entries: never read
    holes = torch.where(observed, x, torch.full_like(x, math.nan))
    torch.testing.assert_close(uses.complete(mixture, None, holes, observed).mean, by_hand)


def test_completion_with_nothing_missing_returns_the_data_and_its_likelihood():
    x = binary_rows()
    result = uses.complete(mixture, None, x, torch.ones(6, dtype=torch.bool))
    assert torch.equal(result.mean, x)
    scores = uses.scores(mixture, None, x)
    assert scores.exact and torch.equal(scores.std_error, torch.zeros(7))
    torch.testing.assert_close(result.log_evidence, scores.log_prob)


def test_flip_noise_posterior_is_bayes_rule_over_every_clean_image():
    """E[clean | noisy] by brute force: all 2^6 clean images weighted by p(clean) p(noisy |
    clean), with p(clean) the mixture's and bit flips at rate 0.15."""
    rate = 0.15
    noisy = binary_rows(5, seed=2)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)), dtype=torch.float64)
    log_prior = (WEIGHTS.log() + log_lik(images, PROBS, torch.ones(64, 6))).logsumexp(-1)  # (64,)
    flips = (images[None] != noisy[:, None]).double()  # (N, 64, D)
    log_noise = (flips * math.log(rate) + (1 - flips) * math.log(1 - rate)).sum(-1)
    post = (log_prior + log_noise).softmax(-1)  # (N, 64)
    result = uses.denoise(mixture, None, noisy, flip=rate)
    torch.testing.assert_close(result.mean, post @ images, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.log_evidence, (log_prior + log_noise).logsumexp(-1))


def gaussian_conditional(ppca, x, observed, sd=False):
    """E[x_missing | x_observed] of the Gaussian N(mu, W W^T + sigma^2 I), row by row (and
    with ``sd`` the conditional standard deviations, 0 where observed)."""
    cov = ppca.w @ ppca.w.T + ppca.sigma**2 * torch.eye(len(ppca.mu), dtype=torch.float64)
    out, sds = x.clone(), torch.zeros_like(x)
    for n in range(len(x)):
        o, m = observed[n], ~observed[n]
        gain = cov[m][:, o] @ torch.linalg.inv(cov[o][:, o])
        out[n, m] = ppca.mu[m] + gain @ (x[n, o] - ppca.mu[o])
        sds[n, m] = (cov[m][:, m] - gain @ cov[o][:, m]).diagonal().sqrt()
    return (out, sds) if sd else out


def observed_posterior_guide(ppca, observed):
    """A user's proposal: the exact posterior of z given each row's *observed* entries (the
    mask held by the guide), so that every importance weight is the same."""

    def guide(x):
        mask = observed[: len(x)]
        locs, tril = [], []
        for n in range(len(x)):
            w_o, o = ppca.w[mask[n]], mask[n]
            precision = torch.eye(2, dtype=x.dtype) + w_o.T @ w_o / ppca.sigma**2
            cov = torch.linalg.inv(precision)
            locs.append(cov @ w_o.T @ (x[n, o] - ppca.mu[o]) / ppca.sigma**2)
            tril.append(torch.linalg.cholesky(cov))
        with pyro.plate("data", len(x)):
            pyro.sample(
                "z", dist.MultivariateNormal(torch.stack(locs), scale_tril=torch.stack(tril))
            )

    return guide


def completion_case(seed=0):
    torch.manual_seed(seed)
    ppca = PPCA(d=5, q=2, sigma=0.5)
    x = ppca.sample(20)
    observed = torch.rand(20, 5, generator=torch.Generator().manual_seed(3)) < 0.6
    observed[:, 0] = True
    return ppca, x, observed


def test_importance_sampled_completion_is_the_gaussian_conditional():
    """PPCA with the exact posterior given the observed entries as proposal: the weights are
    equal (ESS = K), and with 4000 draws every entry of E[x_missing | x_observed] is within 4
    Monte Carlo standard errors (at most sd(x_missing | x_observed) / sqrt(K)) of its closed
    form."""
    ppca, x, observed = completion_case()
    guide = observed_posterior_guide(ppca, observed)
    result = uses.complete(ppca.model, guide, x, observed, num_samples=4000)
    assert not result.exact and result.num_samples == 4000
    torch.testing.assert_close(result.ess, torch.full((20,), 4000.0, dtype=torch.float64))
    expected, sd = gaussian_conditional(ppca, x, observed, sd=True)
    assert ((result.mean - expected).abs() <= 4 * sd / math.sqrt(4000)).all()
    assert torch.equal(result.mean[observed], x[observed])
    # the evidence is log p(x_observed), the Gaussian marginal of the observed entries
    cov = ppca.w @ ppca.w.T + ppca.sigma**2 * torch.eye(5, dtype=torch.float64)
    for n in range(3):
        o = observed[n]
        marginal = dist.MultivariateNormal(ppca.mu[o], cov[o][:, o]).log_prob(x[n, o])
        assert result.log_evidence[n].item() == pytest.approx(marginal.item(), abs=1e-6)


def test_the_amortized_guide_as_proposal_gets_close_with_enough_draws():
    """The model's own guide reads the rows with their gaps filled by column means, a worse
    proposal: the effective sample size says so, and where it is above 100 the completion is
    within 5 standard errors, sd / sqrt(ESS), of the closed form."""
    ppca, x, observed = completion_case()
    ppca.inflate = 3.0  # a wider proposal, as one would choose for this use
    result = uses.complete(ppca.model, ppca.guide, x, observed, num_samples=4000)
    expected, sd = gaussian_conditional(ppca, x, observed, sd=True)
    good = result.ess > 100
    assert good.sum() >= 15
    bound = 5 * sd[good] / result.ess[good, None].sqrt()
    assert ((result.mean[good] - expected[good]).abs() <= bound).all()


def test_gaussian_denoising_is_the_closed_form_posterior_mean():
    """x + N(0, s^2) noise on PPCA data: E[x | noisy] = mu + C (C + s^2 I)^-1 (noisy - mu)."""
    torch.manual_seed(1)
    ppca = PPCA(d=5, q=2, sigma=0.5)
    clean = ppca.sample(20, seed=4)
    s = 0.7
    noisy = clean + s * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    # the proposal: the exact posterior of z given the noisy rows (PPCA with the noise added)
    proposal = PPCA(d=5, q=2, sigma=math.sqrt(0.5**2 + s**2))
    result = uses.denoise(ppca.model, proposal.guide, noisy, noise_scale=s, num_samples=4000)
    torch.testing.assert_close(result.ess, torch.full((20,), 4000.0, dtype=torch.float64))
    eye = torch.eye(5, dtype=torch.float64)
    cov = ppca.w @ ppca.w.T + ppca.sigma**2 * eye
    expected = ppca.mu + (noisy - ppca.mu) @ torch.linalg.solve(cov + s**2 * eye, cov)
    # within 4 Monte Carlo standard errors, at most the posterior sd / sqrt(K)
    posterior_sd = (cov - cov @ torch.linalg.solve(cov + s**2 * eye, cov)).diagonal().sqrt()
    assert ((result.mean - expected).abs() <= 4 * posterior_sd / math.sqrt(4000)).all()


def test_importance_sampled_scores_and_their_standard_errors():
    """Against PPCA's exact log p(x), with a spoiled proposal: the estimates lie within four
    standard errors (plus the estimator's O(1/K) downward bias) of the truth, and the errors
    shrink as 1/sqrt(K)."""
    torch.manual_seed(2)
    ppca = PPCA(d=5, q=2, sigma=0.5, inflate=1.5, shift=0.3)
    x = ppca.sample(30, seed=6)
    small = uses.scores(ppca.model, ppca.guide, x, num_samples=200)
    large = uses.scores(ppca.model, ppca.guide, x, num_samples=3200)
    truth = ppca.exact_log_likelihood(x)
    assert not large.exact
    assert ((large.log_prob - truth).abs() < 4 * large.std_error + 1e-3).all()
    ratio = (small.std_error / large.std_error).median().item()
    assert 3.0 < ratio < 5.5  # sqrt(3200 / 200) = 4


def test_roc_auc_equals_scikit_learns():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    normal = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    anomalous = torch.randint(2, 9, (25,), generator=g).double()
    labels = [0] * 40 + [1] * 25
    expected = metrics.roc_auc_score(labels, torch.cat([normal, anomalous]).numpy())
    assert uses.roc_auc(normal, anomalous) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="at least one normal and one anomalous"):
        uses.roc_auc(normal, anomalous[:0])


def test_bad_masks_noise_models_and_sites_are_named():
    x = binary_rows()
    with pytest.raises(TypeError, match="observed must be a boolean tensor"):
        uses.complete(mixture, None, x, torch.ones(7, 6))
    with pytest.raises(ValueError, match=r"observed must have shape \(7, 6\) or \(6,\)"):
        uses.complete(mixture, None, x, torch.ones(7, 5, dtype=torch.bool))
    nothing = torch.ones(7, 6, dtype=torch.bool)
    nothing[3] = False
    with pytest.raises(ValueError, match=r"rows \[3\] have no observed entry"):
        uses.complete(mixture, None, x, nothing)
    with pytest.raises(
        ValueError, match="the model has no site 'pixels'; its observed sites: \\['x'\\]"
    ):
        uses.complete(mixture, None, x, torch.ones(6, dtype=torch.bool), site="pixels")
    with pytest.raises(ValueError, match="give one noise model"):
        uses.denoise(mixture, None, x)
    with pytest.raises(ValueError, match="flip must be a probability in"):
        uses.denoise(mixture, None, x, flip=0.7)
    with pytest.raises(ValueError, match="noise_scale= is a noise model of continuous data"):
        uses.denoise(mixture, None, x, noise_scale=0.3)
    ppca = PPCA()
    with pytest.raises(ValueError, match="importance sampling needs a guide"):
        uses.complete(ppca.model, None, ppca.sample(4), torch.ones(5, dtype=torch.bool))


def test_the_zoo_bernoulli_mixture_completes_exactly():
    """Its fast ProductBernoulli likelihood says it is Bernoulli(logits).to_event(1), so the
    masking applies; the answer is Bayes' rule with the mixture's own weights and probabilities."""
    from inference import em
    from zoo import BernoulliMixture, data

    x, _ = data.load("digits", "train", "threshold")
    bmm = BernoulliMixture(dim=64, num_components=5)
    with pytest.warns(em.ConvergenceWarning):
        em.fit(bmm.model, bmm.guide, x, max_iter=3, progress=False)
    target = x[:20].double()
    observed = torch.rand(20, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    result = uses.complete(bmm.model, bmm.guide, x[:20], observed)
    probs, weights = bmm.probs.detach().double(), bmm.weights.detach().double()
    post = (weights.log() + log_lik(target, probs, observed.double())).softmax(-1)
    by_hand = torch.where(observed, target, post @ probs)
    assert result.exact
    torch.testing.assert_close(result.mean.double(), by_hand, rtol=0, atol=1e-5)


def test_a_point_mass_guide_is_refused_for_completion_and_flagged_for_scores():
    ppca = PPCA()
    x = ppca.sample(6)

    def delta_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Delta(torch.zeros(len(x), 2, dtype=x.dtype)).to_event(1))

    observed = torch.ones(5, dtype=torch.bool)
    observed[3] = False
    with pytest.raises(ValueError, match="guide site 'z' is a point mass"):
        uses.complete(ppca.model, delta_guide, x, observed)
    with pytest.raises(ValueError, match="guide site 'z' is a point mass"):
        uses.denoise(ppca.model, delta_guide, x, noise_scale=0.1)
    result = uses.scores(ppca.model, delta_guide, x, num_samples=3)
    assert result.point_mass == "z"
    # not an estimate of log p(x) but log p(x, z = 0), the joint at the guide's point
    at_zero = dist.Normal(0.0, 1.0).log_prob(torch.zeros(2)).sum() + dist.Normal(
        ppca.mu, ppca.sigma
    ).log_prob(x).sum(-1)
    torch.testing.assert_close(result.log_prob, at_zero.double())
    assert (result.log_prob > ppca.exact_log_likelihood(x)).any()  # not even a bound here


def test_the_gibbs_chain_converges_to_the_gaussian_conditional():
    """Metropolis-within-Gibbs with a spoiled proposal (the amortized guide's mean shifted by
    0.15 and its scale inflated 1.2x): the Metropolis-Hastings step corrects it. After 3000
    steps the Rao-Blackwellized mean's error is 0.015-0.023 on average over the entries and
    0.09-0.12 at the 95th percentile (seeds 0-2; the entries' scale is about 1.5; a slowly
    mixing row can be 0.7 off), asserted below 0.05 and 0.25; accepting every proposal
    instead gives 0.36 and 2.0."""
    ppca, x, observed = completion_case()
    ppca.inflate, ppca.shift = 1.2, 0.15
    torch.manual_seed(0)
    result = uses.complete(ppca.model, ppca.guide, x, observed, method="chain", num_steps=3000)
    expected = gaussian_conditional(ppca, x, observed)
    error = (result.mean - expected).abs().flatten()
    assert error.mean() < 0.05 and error.quantile(0.95) < 0.25
    assert torch.equal(result.mean[observed], x[observed])
    assert (result.ess > 0.2).all() and (result.ess < 0.8).all()  # acceptance rates
    with pytest.raises(ValueError, match="method must be 'importance' or 'chain'"):
        uses.complete(ppca.model, ppca.guide, x, observed, method="gibbs")


def test_a_guide_that_leaves_a_latent_to_the_prior_is_refused_by_name():
    """Replayed, Pyro would draw z from the prior and the weight would count p(z) once too
    often: a wrong score, silently; it is refused instead."""
    ppca, x, observed = completion_case()

    def partial_guide(x):
        pass

    for call in (
        lambda: uses.scores(ppca.model, partial_guide, x, num_samples=3),
        lambda: uses.complete(ppca.model, partial_guide, x, observed, num_samples=3),
        lambda: uses.complete(ppca.model, partial_guide, x, observed, method="chain"),
    ):
        with pytest.raises(ValueError, match="model site 'z' is latent but the guide does not"):
            call()


def test_rounds_move_the_proposal_and_degenerate_weights_are_warned_about():
    """The guide reads the gaps filled by the previous round's completion: on PPCA with the
    amortized guide the smallest effective sample size of 20 rows rises from 1.7 to 30 of 1000
    draws (seed 0) with three rounds. A proposal far too narrow leaves the weights on a handful
    of draws, and that is said."""
    ppca, x, observed = completion_case()
    ess = {}
    for rounds in (1, 3):
        torch.manual_seed(0)
        result = uses.complete(ppca.model, ppca.guide, x, observed, num_samples=1000, rounds=rounds)
        ess[rounds] = result.ess
    assert ess[3].min() > 10 * ess[1].min() and ess[3].median() > 1.5 * ess[1].median()
    ppca.shift = 2.0  # a proposal several posterior widths off
    with pytest.warns(uses.DegenerateWeights, match="median effective sample size"):
        uses.complete(ppca.model, ppca.guide, x, observed, num_samples=200, rounds=1)
    with pytest.warns(uses.DegenerateWeights):
        uses.denoise(ppca.model, ppca.guide, x, noise_scale=0.5, num_samples=200)


def test_a_conditional_models_condition_is_held_fixed_row_by_row():
    """model(x, y): PPCA whose mean moves with a per-row condition y, x ~ N(W z + mu + B y,
    sigma^2). Given y, the completion is the Gaussian conditional with the row's own mean
    (the offsets are large, so ignoring y would be far off); the exact guide gives equal
    weights, and the mixture's exact path takes a condition too (its weights move with y)."""
    ppca, x, observed = completion_case()
    g = torch.Generator().manual_seed(7)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    offset = y @ b.T  # (N, D)
    x = x + offset

    def model(x, y, rows=None):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            loc = z @ ppca.w.T + ppca.mu + y @ b.T
            pyro.sample("x", dist.Normal(loc, ppca.sigma).to_event(1), obs=x)

    def guide(x, y, rows=None):  # rows: which data rows these are (the mask the guide reads)
        chosen = observed if rows is None else observed[rows]
        observed_posterior_guide(ppca, chosen)(x - y @ b.T)

    rows = torch.arange(20)
    result = uses.complete(  # batches of 7 rows: both parts of the condition sliced with them
        model, guide, x, observed, num_samples=4000, batch_size=7, condition=(y, rows)
    )
    torch.testing.assert_close(result.ess, torch.full((20,), 4000.0, dtype=torch.float64))
    expected, sd = gaussian_conditional(ppca, x - offset, observed, sd=True)
    expected = expected + offset  # the observed entries come back as they are
    assert ((result.mean - expected).abs() <= 4 * sd / math.sqrt(4000)).all()
    ignored, _ = gaussian_conditional(ppca, x, observed, sd=True)
    assert (result.mean - ignored).abs().max() > 1.0  # the condition matters here
    # the chain, with the condition too: the same answer within its Monte Carlo error
    torch.manual_seed(0)
    chain = uses.complete(model, guide, x, observed, method="chain", num_steps=1000,
                          condition=(y,))  # fmt: skip
    assert (chain.mean - expected).abs().mean() < 0.05
    with pytest.raises(ValueError, match=r"condition\[0\] has shape \(19, 3\).*20 rows"):
        uses.complete(model, guide, x, observed, condition=(y[:19],))
    with pytest.raises(TypeError, match="condition is a tuple"):
        uses.denoise(model, guide, x, noise_scale=0.3, condition=y)

    a = torch.randn(3, 3, generator=g, dtype=torch.float64)  # (Y, K)

    def conditional_mixture(x, y):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logits=y @ a))
            pyro.sample("x", dist.Bernoulli(PROBS[z]).to_event(1), obs=x)

    bits = binary_rows(20)
    seen = torch.rand(20, 6, generator=g) < 0.5
    seen[:, 0] = True
    result = uses.complete(conditional_mixture, None, bits, seen, condition=(y,))
    joint = (y @ a).log_softmax(-1) + log_lik(bits, PROBS, seen.double())
    assert result.exact
    by_hand = torch.where(seen, bits, joint.softmax(-1) @ PROBS)
    torch.testing.assert_close(result.mean, by_hand, rtol=0, atol=1e-10)


def test_the_prior_as_proposal_weighs_draws_by_the_seen_entries_alone():
    """proposal="prior": z from PPCA's prior, each draw weighted by p(x_seen | z). With one or
    two entries seen the effective sample size is above a hundred of 20000 draws for most rows,
    and there the completion is within 5 standard errors, sd / sqrt(ESS), of the Gaussian
    conditional; the chain refuses it."""
    ppca, x, _ = completion_case()
    observed = torch.zeros(20, 5, dtype=torch.bool)
    observed[:, 0] = True
    observed[::2, 3] = True
    torch.manual_seed(0)
    result = uses.complete(ppca.model, None, x, observed, num_samples=20000, proposal="prior")
    expected, sd = gaussian_conditional(ppca, x, observed, sd=True)
    good = result.ess > 100  # measured 10-8200: a row whose seen entries lie in the tails
    assert good.sum() >= 16 and (result.ess < 20000).all()  # is what the prior rarely draws
    bound = 5 * sd[good] / result.ess[good, None].sqrt()
    assert ((result.mean[good] - expected[good]).abs() <= bound + 1e-9).all()
    with pytest.raises(ValueError, match="proposal='prior' is for importance sampling"):
        uses.complete(ppca.model, None, x, observed, method="chain", proposal="prior")
    with pytest.raises(ValueError, match="proposal must be 'guide' or 'prior'"):
        uses.complete(ppca.model, ppca.guide, x, observed, proposal="posterior")
