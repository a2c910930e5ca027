"""
Gaussian mixture model with full or diagonal covariances, point-estimated parameters.

    weights ~ Dirichlet(weight_concentration)      optional MAP prior, weights: (K,)
    z[n] ~ Categorical(weights)                    z: (N,)
    x[n] ~ Normal(locs[z[n]], covariances[z[n]])   locs: (K, D), covariances: (K, D, D); x: (N, D)

``covariance_type="diag"`` keeps only the diagonal of each covariance. Like scikit-learn's
``reg_covar``, the closed-form M-step adds a floor ``reg_covar`` to every variance so that no
component collapses onto a single point.

Reference: Bishop (2006), Pattern Recognition and Machine Learning, sec. 9.2.
"""

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from zoo.models._mixture import COMPARISON_METHODS, COMPARISON_SETTINGS, Mixture
from zoo.models._mixture import relabel as _relabel
from zoo.models.nets import check_number
from zoo.registry import register


@dataclass
class GMMConfig:
    num_components: int = field(
        default=2, metadata={"help": "mixture components K", "flags": ("--components", "-k")}
    )
    dim: int = field(default=2, metadata={"data": "dim"})
    covariance_type: str = field(
        default="full", metadata={"flags": ("--covariance",), "choices": ("full", "diag")}
    )
    # Dirichlet prior on the weights; 1 = maximum likelihood
    weight_concentration: float = field(
        default=1.0, metadata={"help": "Dirichlet prior on the weights (1 = none)"}
    )
    # added to every variance in the M-step
    reg_covar: float = field(default=1e-6, metadata={"help": "variance floor added in the M-step"})


class CholeskyNormal(dist.MultivariateNormal):
    """A multivariate normal whose ``log_prob`` is a batched matrix product.

    With z enumerated, loc is (K, 1, D) and scale_tril (K, 1, D, D) against data (N, D). Torch's
    version solves a triangular system per component; here the inverse factor L^-1 (K small
    D x D matrices) is formed once and applied to (x - loc) as one batched GEMM, about five
    times faster on CPU for the same result.
    """

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[0]
        eye = torch.eye(dim, dtype=self._unbroadcasted_scale_tril.dtype, device=value.device)
        inv_t = torch.linalg.solve_triangular(  # L^-T, (..., D, D)
            self._unbroadcasted_scale_tril, eye, upper=False
        ).transpose(-1, -2)
        diff = value - self.loc  # (..., N, D) broadcast, e.g. (K, N, D)
        # einsum turns the broadcast batch dims into one batched GEMM: (K, N, D) @ (K, D, D)
        y = torch.einsum("...d,...de->...e", diff, inv_t)  # (..., D): L^-1 (x - loc)
        half_log_det = self._unbroadcasted_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * (dim * math.log(2 * math.pi) + (y * y).sum(-1)) - half_log_det


@register(
    "gmm",
    description="Gaussian mixture (full or diagonal covariances)",
    drivers={"em": {}, "svi": {"loss": "TraceEnum_ELBO", "max_plate_nesting": 1}},
    default_data="faithful",
    config=GMMConfig,
    comparison={
        "data": ("faithful", "gmm-synthetic"),
        "options": {"faithful": {"num_components": 2}, "gmm-synthetic": {"num_components": 3}},
        "settings": COMPARISON_SETTINGS,
        "methods": {
            **COMPARISON_METHODS,
            "nuts": {"driver": "nuts", "description": "NUTS on the Bayesian GMM"},
            "sklearn": {
                "driver": "reference",
                "description": "scikit-learn GaussianMixture (reference)",
            },
        },
    },
)
class GaussianMixture(Mixture):
    """A Gaussian mixture; ``.model`` and ``.guide`` go into any driver (EM, SVI with TraceEnum)."""

    def __init__(self, config: GMMConfig = None, **kwargs):
        config = config or GMMConfig(**kwargs)
        if config.covariance_type not in ("full", "diag"):
            raise ValueError(
                f"covariance_type must be 'full' or 'diag', not {config.covariance_type!r}"
            )
        check_number(config, "reg_covar", 0.0)
        super().__init__(config)
        num_components, dim = config.num_components, config.dim
        self.locs = PyroParam(torch.randn(num_components, dim))  # (K, D)
        if config.covariance_type == "full":
            self.scale_tril = PyroParam(  # (K, D, D), Cholesky factor of each covariance
                torch.eye(dim).expand(num_components, dim, dim).clone(),
                constraint=constraints.lower_cholesky,
            )
        else:
            self.scale = PyroParam(torch.ones(num_components, dim), constraint=constraints.positive)

    def component(self, z):
        if self.config.covariance_type == "full":
            return CholeskyNormal(self.locs[z], scale_tril=self.scale_tril[z])
        return dist.Normal(self.locs[z], self.scale[z]).to_event(1)

    @property
    def covariances(self) -> torch.Tensor:
        """(K, D, D)"""
        if self.config.covariance_type == "full":
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        return torch.diag_embed(self.scale**2)

    def set_params(self, weights=None, locs=None, covariances=None) -> "GaussianMixture":
        """Set parameters from constrained values (covariances (K, D, D) or variances (K, D))."""
        like = self.locs_unconstrained  # convert first: dtype and device of the parameters
        if weights is not None:
            self.set_param("weights", torch.as_tensor(weights).to(like))
        if locs is not None:
            self.set_param("locs", torch.as_tensor(locs).to(like))
        if covariances is not None:
            cov = torch.as_tensor(covariances).to(like)
            if self.config.covariance_type == "full":
                self.set_param("scale_tril", _cholesky(cov))
            else:
                var = cov.diagonal(dim1=-2, dim2=-1) if cov.dim() == 3 else cov
                self.set_param("scale", var.sqrt())
        return self

    # ------------------------------------------------------------------------ closed-form EM

    def sufficient_statistics(self, x: torch.Tensor, resp: torch.Tensor) -> dict:
        """Responsibility-weighted sums over the rows of one chunk, in float64."""
        num_data, dim = x.shape
        counts = resp.sum(0)  # (K,)
        sum_x = resp.T @ x  # (K, D)
        if self.config.covariance_type == "full":
            weighted = (resp.unsqueeze(-1) * x.unsqueeze(1)).reshape(num_data, -1)  # (N, K*D)
            sum_xx = (weighted.T @ x).reshape(-1, dim, dim)  # (K, D, D)
        else:
            sum_xx = resp.T @ (x * x)  # (K, D)
        return {"counts": counts.double(), "sum_x": sum_x.double(), "sum_xx": sum_xx.double()}

    def m_step(self, stats: dict) -> None:
        """Maximize the expected complete-data log-likelihood (plus log prior) in closed form."""
        self._m_step_weights(stats["counts"])
        counts = stats["counts"] + 10 * torch.finfo(torch.float64).eps  # (K,)
        locs = stats["sum_x"] / counts.unsqueeze(-1)  # (K, D)
        self.set_param("locs", locs)
        reg = self.config.reg_covar
        if self.config.covariance_type == "full":
            cov = stats["sum_xx"] / counts[:, None, None] - locs.unsqueeze(-1) * locs.unsqueeze(-2)
            cov = cov + reg * torch.eye(locs.shape[-1], dtype=cov.dtype, device=cov.device)
            self.set_param("scale_tril", _cholesky(cov))
        else:
            var = stats["sum_xx"] / counts.unsqueeze(-1) - locs**2 + reg  # (K, D)
            self.set_param("scale", var.clamp(min=reg if reg > 0 else 1e-300).sqrt())

    def figures(self, splits, history=None, info=None) -> dict:
        """The fitted Gaussians' 1 and 2 sd ellipses over the training data (2-D data only)."""
        from zoo import plots  # matplotlib only when figures are drawn

        x = splits["train"][0]
        if x.shape[1] != 2:
            return {}
        columns = getattr(info, "columns", None) or ("x1", "x2")
        name = getattr(info, "name", "") or "the data"
        fig = plots.gaussian_ellipses(
            x,
            self.weights,
            self.locs,
            self.covariances,
            axis_names=columns,
            title=f"Gaussian mixture on {name}",
        )
        return {"mixture.png": fig}

    def sample_figure(self, x, z):
        """Samples coloured by their component, over the components' ellipses (2-D only)."""
        from zoo import plots

        if x.shape[1] != 2:
            return None
        return plots.gaussian_ellipses(
            x,
            self.weights,
            self.locs,
            self.covariances,
            labels=z,
            title=f"{len(x)} samples from the fitted mixture",
        )

    def bayesian(self, x: torch.Tensor) -> dict:
        """The Bayesian version of this mixture, for NUTS (``inference.mcmc.sample_posterior``):
        ``bayesian_model`` on standardized ``x`` (full covariances), draws mapped back, label
        switching undone by ``relabel``; ``predictive(draws, rows)`` is the posterior
        predictive log density per row."""
        mean, sd = x.mean(0), x.std(0)
        concentration = self.config.weight_concentration
        k = self.config.num_components
        return {
            "model": lambda data: bayesian_model(data, k, concentration),
            "data": (x - mean) / sd,
            "to_draws": lambda draws: unstandardize(draws, mean, sd),
            "relabel": relabel,
            "predictive": posterior_log_predictive,
            "summarize": ("weights", "locs", "scales"),
            "dims": {
                "weights": ["component"],
                "locs": ["component", "coordinate"],
                "scales": ["component", "coordinate"],
                "corr": ["component", "row", "column"],
            },
        }

    def reference(self, seed: int, tol: float, max_iter: int):
        """scikit-learn's GaussianMixture with this one's settings: the reference fit."""
        from sklearn.mixture import GaussianMixture as Reference

        return Reference(
            self.config.num_components,
            covariance_type=self.config.covariance_type,
            tol=tol,
            max_iter=max_iter,
            reg_covar=self.config.reg_covar,
            random_state=seed,
        )

    @property
    def num_parameters(self) -> int:
        """Free parameters, for BIC and AIC."""
        k, d = self.config.num_components, self.config.dim
        cov = k * d * (d + 1) // 2 if self.config.covariance_type == "full" else k * d
        return (k - 1) + k * d + cov


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if info.any():
        bad = info.nonzero()[:, 0].tolist() if info.dim() else []
        raise ValueError(
            f"covariance of component(s) {bad} is not positive definite; a component has collapsed"
            " onto too few points: increase reg_covar or use fewer components"
        )
    return chol


def bayesian_model(
    x: torch.Tensor,
    num_components: int,
    weight_concentration: float = 1.0,
    enumerate: bool = False,
):
    """The Bayesian Gaussian mixture (full covariances), for MCMC:

        weights ~ Dirichlet(weight_concentration)             (K,)
        locs[k] ~ Normal(mean(x), 2 sd(x))                    (K, D), weakly informative
        sd[k]   ~ HalfNormal(2 sd(x)),  corr[k] ~ LKJ(D, 2)    scale_tril[k] = diag(sd[k]) corr[k]
        z[n]    ~ Categorical(weights)                        summed out exactly
        x[n]    ~ MultivariateNormal(locs[z[n]], scale_tril[z[n]])

    The priors are scaled to the data (an empirical-Bayes choice), so the posterior is
    equivariant under affine rescaling of each coordinate: fitting standardized data and
    mapping the draws back with ``unstandardize`` gives the same posterior, and samplers adapt
    better on the standardized scale.

    The assignments z are summed out: with ``enumerate=True`` as an explicit ``z`` site that
    Pyro enumerates in parallel (NUTS with ``max_plate_nesting=1``), otherwise inside
    ``MixtureSameFamily``: the same sum (the tests check the two log densities agree), done in
    one logsumexp, which is faster under NUTS.
    """
    num_data, dim = x.shape
    mean, sd = x.mean(0), x.std(0)
    weights = pyro.sample(
        "weights",
        dist.Dirichlet(x.new_full((num_components,), float(weight_concentration))),
    )
    with pyro.plate("components", num_components):
        locs = pyro.sample("locs", dist.Normal(mean, 2 * sd).to_event(1))  # (K, D)
        scales = pyro.sample("scales", dist.HalfNormal(2 * sd).to_event(1))  # (K, D)
        corr = pyro.sample("corr", dist.LKJCholesky(dim, x.new_tensor(2.0)))  # (K, D, D)
    scale_tril = scales.unsqueeze(-1) * corr  # (K, D, D)
    with pyro.plate("data", num_data):
        if enumerate:
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=x)
        else:
            components = dist.MultivariateNormal(locs, scale_tril=scale_tril)
            pyro.sample("x", dist.MixtureSameFamily(dist.Categorical(weights), components), obs=x)


def unstandardize(draws: dict, mean: torch.Tensor, sd: torch.Tensor) -> dict:
    """Map draws of ``bayesian_model`` fitted to (x - mean) / sd back to the scale of x."""
    out = dict(draws)
    out["locs"] = mean + sd * draws["locs"]
    out["scales"] = sd * draws["scales"]
    return out


def posterior_log_predictive(draws: dict, x: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s p(x[n] | theta_s) for S posterior draws of ``bayesian_model``, (N,)."""
    weights, locs = draws["weights"], draws["locs"]  # (S, K), (S, K, D)
    scale_tril = draws["scales"].unsqueeze(-1) * draws["corr"]  # (S, K, D, D)
    component = dist.MultivariateNormal(locs, scale_tril=scale_tril)
    log_px = component.log_prob(x[:, None, None, :]) + weights.log()  # (N, S, K)
    return log_px.logsumexp(-1).logsumexp(-1) - math.log(len(weights))


COMPONENT_SITES = ("weights", "locs", "scales", "corr")


def relabel(draws: dict, num_iters: int = 5) -> tuple:
    """Undo label switching in draws of ``bayesian_model``, matching components by their
    locations (see ``zoo.models._mixture.relabel``)."""
    return _relabel(draws, "locs", COMPONENT_SITES, num_iters)
