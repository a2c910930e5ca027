import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SklearnGMM

from inference import em, evaluate
from zoo import data
from zoo.models.gmm import GaussianMixture, GMMConfig


def make_data(num=200, seed=0):
    x, z = data.make_gaussian_mixture(num, seed=seed)
    return x.double(), z


def start_params(x, num_components=3):
    """Deliberately rough starting values, the same for both implementations."""
    weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
    locs = x[:num_components].clone()
    covariances = torch.eye(x.shape[1], dtype=torch.float64).expand(num_components, 2, 2) * 2.0
    return weights, locs, covariances


def sklearn_fit(x, covariance_type, weights, locs, covariances):
    """scikit-learn's GaussianMixture, fitted from the same starting parameters as ours."""
    precisions = (
        torch.linalg.inv(covariances) if covariance_type == "full" else 0.5 * torch.ones(3, 2)
    )
    return SklearnGMM(
        3,
        covariance_type=covariance_type,
        tol=1e-8,
        max_iter=1000,
        reg_covar=1e-6,
        weights_init=weights.numpy(),
        means_init=locs.numpy(),
        precisions_init=precisions.numpy(),
    ).fit(x.numpy())


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_em_matches_sklearn(covariance_type, device):
    x, _ = make_data()
    weights, locs, covariances = start_params(x)
    expected = sklearn_fit(x, covariance_type, weights, locs, covariances)
    gmm = GaussianMixture(GMMConfig(3, 2, covariance_type=covariance_type)).double().to(device)
    gmm.set_params(weights.to(device), locs.to(device), covariances.to(device))
    on_device = x.to(device)
    result = em.fit(gmm.model, gmm.guide, on_device, init="params", tol=1e-8, max_iter=1000)
    assert result.converged and expected.converged_
    assert result.num_steps == expected.n_iter_
    assert gmm.locs.device.type == device.type
    np.testing.assert_allclose(gmm.weights.detach().cpu().numpy(), expected.weights_, atol=1e-5)
    np.testing.assert_allclose(gmm.locs.detach().cpu().numpy(), expected.means_, atol=1e-5)
    cov = gmm.covariances.detach().cpu().numpy()
    expected_cov = (
        expected.covariances_
        if covariance_type == "full"
        else np.stack([np.diag(v) for v in expected.covariances_])
    )
    np.testing.assert_allclose(cov, expected_cov, atol=1e-5)
    # sklearn's lower bound is the mean log-likelihood before its last M-step
    assert result.history[-1]["log_likelihood"] == pytest.approx(expected.lower_bound_, abs=1e-5)
    assert result.objective == pytest.approx(expected.score(x.numpy()), abs=1e-5)
    # exact per-point log-likelihood, responsibilities, BIC and AIC agree as well
    log_px = evaluate.log_likelihood(gmm.model, gmm.guide, on_device).cpu()
    np.testing.assert_allclose(log_px.numpy(), expected.score_samples(x.numpy()), atol=1e-5)
    np.testing.assert_allclose(
        gmm.responsibilities(on_device).cpu().numpy(), expected.predict_proba(x.numpy()), atol=1e-5
    )
    total = log_px.sum().item()
    assert evaluate.bic(total, gmm.num_parameters, len(x)) == pytest.approx(
        expected.bic(x.numpy()), abs=1e-3
    )
    assert evaluate.aic(total, gmm.num_parameters) == pytest.approx(
        expected.aic(x.numpy()), abs=1e-3
    )


def test_log_likelihood_matches_scipy():
    x, _ = make_data(50)
    gmm = GaussianMixture(num_components=3, dim=2).double()
    spec = data.default_gaussian_mixture()
    spec.weights, spec.locs, spec.covariances = (
        spec.weights.double() / spec.weights.double().sum(),  # sums to 1 in float64 too
        spec.locs.double(),
        spec.covariances.double(),
    )
    gmm.set_params(spec.weights, spec.locs, spec.covariances)
    dens = sum(
        spec.weights[k].item()
        * multivariate_normal(spec.locs[k].numpy(), spec.covariances[k].numpy()).pdf(x.numpy())
        for k in range(3)
    )
    np.testing.assert_allclose(gmm.log_likelihood(x).numpy(), np.log(dens), rtol=1e-10)


def test_trace_enum_elbo_equals_exact_log_likelihood():
    """With an empty guide, -TraceEnum_ELBO is the exact log joint: ties the Pyro model to EM."""
    x, _ = make_data(100)
    gmm = GaussianMixture(num_components=3, dim=2, weight_concentration=2.0).double()
    em.fit(gmm.model, gmm.guide, x, max_iter=5, tol=1e-3)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(gmm.model, gmm.guide, x)
    exact = gmm.log_likelihood(x).sum() + gmm.log_prior()
    assert -loss == pytest.approx(exact.item(), rel=1e-10)


def test_one_svi_step_is_adams_first_step_on_the_exact_gradient():
    """One SVI step with TraceEnum_ELBO (exact: the component is summed out) and Adam: Adam's
    first step moves each parameter by lr * g / (|g| + eps) against its gradient g, here
    computed by autograd from the closed-form log joint (log-likelihood plus log prior)."""
    x, _ = make_data(64)
    gmm = GaussianMixture(num_components=3, dim=2).double()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    svi = SVI(gmm.model, gmm.guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    locs = gmm.locs_unconstrained  # the locations are unconstrained: the parameter itself
    # component_log_prob is the closed form log w_k + log N(x | mu_k, Sigma_k) (checked against
    # scipy above); the prior is on the weights only
    joint = gmm.component_log_prob(x).logsumexp(-1).sum() + gmm.log_prior()
    (grad,) = torch.autograd.grad(-joint, locs)
    before = locs.detach().clone()
    loss = svi.step(x)
    assert loss == pytest.approx(-joint.item(), rel=1e-10)
    expected = before - 0.01 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(gmm.locs.detach(), expected, rtol=0, atol=1e-9)


def test_em_recovers_the_truth_and_clusters():
    spec = data.default_gaussian_mixture()
    x, z = data.make_gaussian_mixture(3000, spec, seed=2)
    gmm = GaussianMixture(num_components=3, dim=2)
    result = em.fit(gmm.model, gmm.guide, x, n_init=2)
    assert result.converged
    order = [int(torch.cdist(spec.locs[k : k + 1], gmm.locs.detach()).argmin()) for k in range(3)]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(gmm.locs.detach()[order], spec.locs, atol=0.15)
    assert torch.allclose(gmm.weights.detach()[order], spec.weights, atol=0.03)
    assert torch.allclose(gmm.covariances.detach()[order], spec.covariances, atol=0.15)
    assert evaluate.clustering_accuracy(z, gmm.predict(x)) > 0.97


def test_log_likelihood_never_decreases():
    x, _ = data.make_gaussian_mixture(400, seed=4)
    gmm = GaussianMixture(num_components=5, dim=2, covariance_type="diag")
    result = em.fit(gmm.model, gmm.guide, x, init="random", tol=1e-8, max_iter=5000)
    # the driver stops (and rolls back) at the first M-step that lowers the objective by more
    # than rounding, unconverged, so the recorded curve cannot fall: what EM's monotonicity
    # promises is that the fit ends converged (test_decreasing_m_step_is_undone: the rollback)
    assert result.converged, result.stop_reason
    assert len(result.history) > 10


def test_decreasing_m_step_is_undone(monkeypatch):
    """A faulty M-step that lowers the objective is reverted and the fit stops."""
    x, _ = make_data(200)
    gmm = GaussianMixture(num_components=3, dim=2).double()
    honest = GaussianMixture.m_step
    calls = []

    def sabotage(self, stats):
        honest(self, stats)
        calls.append(1)
        if len(calls) == 4:  # the fourth M-step scrambles the means
            self.set_param("locs", self.locs.detach() + 3.0)

    monkeypatch.setattr(GaussianMixture, "m_step", sabotage)
    with pytest.warns(em.ConvergenceWarning, match="objective fell"):
        result = em.fit(gmm.model, gmm.guide, x, tol=1e-12, max_iter=50)
    curve = result.curve()
    assert np.all(np.diff(curve) >= 0)
    assert "fell" in result.stop_reason
    assert result.objective == pytest.approx(curve[-1])
    assert gmm.log_likelihood(x).mean().item() == pytest.approx(curve[-1], abs=1e-12)


def test_convergence_warning():
    x, _ = make_data()
    gmm = GaussianMixture(num_components=3, dim=2)
    with pytest.warns(em.ConvergenceWarning, match="reached max_iter=2"):
        result = em.fit(gmm.model, gmm.guide, x.float(), max_iter=2)
    assert not result.converged and result.num_steps == 2


def test_restarts_keep_the_best():
    x, _ = data.make_gaussian_mixture(300, seed=5)
    single = []
    for seed in range(3):
        gmm = GaussianMixture(num_components=3, dim=2)
        single.append(em.fit(gmm.model, gmm.guide, x, init="random", seed=seed).objective)
    gmm = GaussianMixture(num_components=3, dim=2)
    best = em.fit(gmm.model, gmm.guide, x, init="random", n_init=3, seed=0)
    assert best.objective == pytest.approx(max(single), abs=1e-9)
    assert gmm.log_likelihood(x).mean().item() == pytest.approx(best.objective, abs=1e-5)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gradient_m_step_reaches_the_closed_form(covariance_type, device):
    x, _ = make_data(150)
    resp = torch.softmax(
        torch.randn(150, 3, generator=torch.Generator().manual_seed(0), dtype=x.dtype), -1
    )
    x, resp = x.to(device), resp.to(device)
    fits = {}
    for how in ("closed", "gradient"):
        pyro.clear_param_store()
        gmm = (
            GaussianMixture(
                GMMConfig(
                    3, 2, covariance_type=covariance_type, reg_covar=0.0, weight_concentration=3.0
                )
            )
            .double()
            .to(device)
        )
        with pytest.warns(em.ConvergenceWarning, match="max_iter=3"):
            result = em.fit(gmm.model, gmm.guide, x, init=resp, m_step=how, max_iter=3, tol=1e-12)
        fits[how] = (result, gmm)
    (closed, a), (grad, b) = fits["closed"], fits["gradient"]
    assert closed.curve() == pytest.approx(grad.curve(), abs=1e-6)
    torch.testing.assert_close(a.weights, b.weights, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.locs, b.locs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.covariances, b.covariances, atol=1e-4, rtol=0)


def test_samples_follow_the_parameters():
    spec = data.default_gaussian_mixture()
    gmm = GaussianMixture(num_components=3, dim=2).set_params(
        spec.weights, spec.locs, spec.covariances
    )
    x, z = gmm.sample(20000)
    assert x.shape == (20000, 2) and z.shape == (20000,)
    freq = torch.bincount(z, minlength=3).float() / len(z)
    assert torch.allclose(freq, spec.weights, atol=0.015)
    assert torch.allclose(x[z == 1].mean(0), spec.locs[1], atol=0.05)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.zeros(10, 3), ValueError, r"shape \(N, 2\)"),
        (torch.zeros(10), ValueError, r"shape \(N, 2\)"),
        (torch.tensor([[0.0, float("nan")]] * 10), ValueError, "NaN"),
        (torch.zeros(10, 2, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(0, 2), ValueError, "empty"),
        (np.zeros((10, 2)), TypeError, "torch.Tensor"),
        (torch.randn(2, 2), ValueError, "K larger than N"),
    ],
)
def test_bad_input_is_a_clear_error(bad, error, message):
    gmm = GaussianMixture(num_components=3, dim=2)
    with pytest.raises(error, match=message):
        em.fit(gmm.model, gmm.guide, bad)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(covariance_type="spherical")
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixture(num_components=0)
    x, _ = make_data()
    gmm = GaussianMixture(num_components=3, dim=2)
    with pytest.raises(ValueError, match="init must be"):
        em.fit(gmm.model, gmm.guide, x, init="kmeans")


def test_ellipse_plot_colours_points_as_their_component_and_names_the_ellipses():
    """Component k's points take the colour of k's ellipses (labels 3 and 7 only: a colormap
    stretched over the labels would colour them as components 0 and 9); the legend names
    the standard deviations drawn."""
    import matplotlib.pyplot as plt

    from zoo import plots

    x = torch.randn(20, 2)
    labels = torch.tensor([3] * 10 + [7] * 10)
    locs, covs = torch.zeros(8, 2), torch.eye(2).expand(8, 2, 2)
    fig = plots.gaussian_ellipses(
        x, torch.full((8,), 1 / 8), locs, covs, labels=labels, n_stds=(1, 2, 3)
    )
    ax = fig.axes[0]
    points = ax.collections[0].get_facecolors()[:, :3]
    tab10 = plt.get_cmap("tab10")
    assert torch.allclose(torch.tensor(points[0]), torch.tensor(tab10(3)[:3]).double())
    assert torch.allclose(torch.tensor(points[-1]), torch.tensor(tab10(7)[:3]).double())
    edges = {tuple(round(c, 6) for c in p.get_edgecolor()[:3]) for p in ax.patches[9:12]}
    assert edges == {tuple(round(c, 6) for c in tab10(3)[:3])}  # component 3's three ellipses
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1 sd", "2 sd", "3 sd"]
    plt.close(fig)
