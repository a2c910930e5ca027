"""
Categorical -> Bernoulli mixture (a mixture of products of Bernoullis), point-estimated parameters.

    weights ~ Dirichlet(weight_concentration)      optional MAP prior, weights: (K,)
    probs[k, d] ~ Beta(a, b)                       optional MAP prior, probs: (K, D)
    z[n] ~ Categorical(weights)                    z: (N,)
    x[n, d] ~ Bernoulli(probs[z[n], d])            x: (N, D) in {0, 1}

The Beta prior keeps a pixel that a component never saw lit from having probability exactly
zero, which would make held-out log-likelihoods -inf. Keep it weak: Beta(2, 2) pulls the pixels of
a small component towards 0.5, which makes it lose its few images and die (20 of 500 components
ended empty on MNIST); the default Beta(1.1, 1.1) left none empty and scored better on held-out
digits (benchmarks/results/em.md; Uria et al. 2014 report -137.64 nats for K = 500).

Reference: Bishop (2006), Pattern Recognition and Machine Learning, sec. 9.3.3.
"""

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.util import broadcast_shape, is_validation_enabled
from pyro.nn import PyroParam

from inference import sparse
from zoo.models._mixture import COMPARISON_METHODS, COMPARISON_SETTINGS, Mixture
from zoo.models._mixture import relabel as _relabel
from zoo.models.nets import check_number
from zoo.registry import register


@dataclass
class BMMConfig:
    num_components: int = field(
        default=10, metadata={"help": "mixture components K", "flags": ("--components", "-k")}
    )
    dim: int = field(default=784, metadata={"data": "dim"})
    # Dirichlet prior on the weights; 1 = maximum likelihood
    weight_concentration: float = field(
        default=1.0, metadata={"help": "Dirichlet prior on the weights (1 = none)"}
    )
    # Beta(a, b) prior on every pixel probability; (1, 1) = maximum likelihood
    beta_a: float = field(default=1.1, metadata={"help": "Beta(a, b) prior on pixel means"})
    beta_b: float = field(default=1.1, metadata={"help": "Beta(a, b) prior on pixel means"})


class ProductBernoulli(dist.TorchDistribution):
    """Independent Bernoullis over the last dimension, by logits; event_shape (D,).

    ``log_prob`` is one matrix product, x @ logits^T - sum softplus(logits), instead of the
    (K, N, D) tensor that ``Bernoulli(logits).to_event(1)`` builds when z is enumerated. In that
    enumerated case x may be a sparse CSR tensor (a block of ``inference.sparse.SparseRows``).
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, logits: torch.Tensor, batch_shape=None, validate_args=None):
        # Plates expand a distribution to their full batch shape (K, N) when z is enumerated;
        # keep the logits unexpanded (K, 1, D) so no (K, N, D) tensor is ever materialized.
        self.logits = logits  # (..., D)
        batch_shape = logits.shape[:-1] if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape, logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        broadcast_shape(self.logits.shape[:-1], batch_shape)  # raises if incompatible
        return ProductBernoulli(self.logits, batch_shape, validate_args=False)

    def sample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits).expand(shape))

    def log_prob(self, value):
        enumerated = value.dim() == 2 and self.logits.dim() == 3 and self.logits.shape[1] == 1
        if value.layout != torch.strided and not enumerated:
            raise ValueError(
                "ProductBernoulli takes sparse data only against (K, 1, D) logits, as when z is"
                f" enumerated; got logits of shape {tuple(self.logits.shape)}"
            )
        if self._validate_args:
            self._validate(value)
        bias = -F.softplus(self.logits).sum(-1)  # (..., 1) when enumerated
        if enumerated:
            # (N, D) data against (K, 1, D) logits: one GEMM (sparse x dense for CSR data) with
            # the bias added as it is written, then viewed as (K, N)
            log_prob = torch.addmm(bias.T, value, self.logits.squeeze(1).T).T  # (K, N)
        else:  # einsum over broadcast batch dims is dispatched to a matrix product as well
            log_prob = torch.einsum("...d,...d->...", value, self.logits) + bias
        return log_prob.expand(broadcast_shape(log_prob.shape, self.batch_shape))

    # what it is, for code that works per feature (inference.uses masks features out of it):
    # ``Bernoulli(logits).to_event(1)``, materialized only when asked for
    reinterpreted_batch_ndims = 1

    @property
    def base_dist(self) -> dist.Bernoulli:
        return dist.Bernoulli(logits=self.logits).expand(self.batch_shape + self.event_shape)

    def _validate(self, value):
        if value.layout == torch.strided:
            return self._validate_sample(value)
        if value.shape[-1:] != self.event_shape:
            shape = tuple(value.shape)
            raise ValueError(f"value of shape {shape} for event shape {tuple(self.event_shape)}")
        if not torch.all((value.values() == 0) | (value.values() == 1)):
            raise ValueError("ProductBernoulli values must be 0 or 1")


@register(
    "bmm",
    description="categorical -> Bernoulli mixture for binary images",
    drivers={"em": {}, "svi": {"loss": "TraceEnum_ELBO", "max_plate_nesting": 1}},
    default_data="mnist",
    default_binarize="static",
    config=BMMConfig,
    comparison={
        "data": ("bmm-synthetic", "digits", "mnist"),
        "options": {"bmm-synthetic": {"num_components": 4}},
        "settings": COMPARISON_SETTINGS,
        "methods": {
            **COMPARISON_METHODS,
            "nuts": {"driver": "nuts", "description": "NUTS on the Bayesian Bernoulli mixture"},
        },
    },
)
class BernoulliMixture(Mixture):
    """A mixture of Bernoulli products; ``.model`` and ``.guide`` go into any driver."""

    takes_sparse_data = True  # x @ logits^T and the statistics work on CSR chunks of SparseRows

    def __init__(self, config: BMMConfig = None, **kwargs):
        config = config or BMMConfig(**kwargs)
        check_number(config, "beta_a")
        check_number(config, "beta_b")
        if config.beta_a < 1 or config.beta_b < 1:
            raise ValueError("Beta prior parameters below 1 have no MAP estimate; use >= 1")
        super().__init__(config)
        # small random logits break the symmetry between components for gradient-based fits
        self.logits = PyroParam(0.1 * torch.randn(config.num_components, config.dim))  # (K, D)

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)  # (K, D)

    def component(self, z):
        return ProductBernoulli(self.logits[z])

    def check_data(self, x) -> int:
        num_data = super().check_data(x)
        values = sparse.values(x)
        if is_validation_enabled() and not torch.all((values == 0) | (values == 1)):
            raise ValueError(
                "a Bernoulli mixture needs binary data (0/1); got values in "
                f"[{values.min().item():.3g}, {values.max().item():.3g}]: binarize it first, e.g. "
                "data.load(name, binarize='static') or data.binarize(x, 'threshold')"
            )
        return num_data

    def log_prior(self) -> torch.Tensor:
        log_prior = super().log_prior()
        a, b = self.config.beta_a, self.config.beta_b
        if (a, b) != (1, 1):  # Beta(a, b) density of probs, up to a constant, written by logits
            log_prior = log_prior - ((a - 1) * F.softplus(-self.logits)).sum()
            log_prior = log_prior - ((b - 1) * F.softplus(self.logits)).sum()
        return log_prior

    @staticmethod
    def e_step_values_per_row(num_components: int) -> int:
        """What one data row costs the E-step in memory: its K log-probabilities (one matrix
        product, no (K, D) temporaries) and K responsibilities. ``em.fit`` sizes chunks by it."""
        return 2 * num_components

    def sufficient_statistics(self, x: torch.Tensor, resp: torch.Tensor) -> dict:
        # resp^T @ x, or for CSR x (a block of SparseRows) (x^T @ resp)^T with x^T stored
        sum_x = resp.T @ x if x.layout == torch.strided else sparse.t_matmul(x, resp).T
        return {"counts": resp.sum(0).double(), "sum_x": sum_x.double()}  # (K,), (K, D)

    def m_step(self, stats: dict) -> None:
        """Closed-form MAP update of the weights and the pixel probabilities."""
        self._m_step_weights(stats["counts"])
        a, b = self.config.beta_a, self.config.beta_b
        counts = stats["counts"].unsqueeze(-1) + 10 * torch.finfo(torch.float64).eps  # (K, 1)
        probs = (stats["sum_x"] + a - 1) / (counts + a + b - 2)  # (K, D)
        eps = 1e-12  # only reached without a prior: a pixel never (or always) on in a component
        probs = probs.clamp(eps, 1 - eps)
        self.set_param("logits", torch.logit(probs))

    def figures(self, splits, history=None, info=None) -> dict:
        """The components' pixel means as images (square images only), weight above each."""
        from zoo import plots  # matplotlib only when figures are drawn

        side = int(round(self.config.dim**0.5))
        if side * side != self.config.dim:
            return {}
        weights = self.weights.detach()
        order = weights.argsort(descending=True)[:100]
        fig = plots.image_grid(
            self.probs[order],
            titles=[f"{w:.3f}" for w in weights[order]],
            title="component means (weight above each)",
        )
        return {"components.png": fig}

    def bayesian(self, x: torch.Tensor) -> dict:
        """The Bayesian version of this mixture, for NUTS: ``bayesian_model`` (its priors:
        this one's Dirichlet and Beta), label switching undone by ``relabel``. Every parameter
        is a continuous unknown, K (D + 1) of them: refused beyond what NUTS explores on a CPU
        in minutes."""
        k, d = self.config.num_components, x.shape[1]
        if k * (d + 1) > _NUTS_MAX_DIM:
            raise ValueError(
                f"NUTS on this mixture explores K (D + 1) = {k * (d + 1)} continuous unknowns,"
                f" more than {_NUTS_MAX_DIM} is impractical here: use fewer components or"
                " smaller data (bmm-synthetic, digits)"
            )
        prior = (self.config.weight_concentration, (self.config.beta_a, self.config.beta_b))
        return {
            "model": lambda data: bayesian_model(data, k, prior[0], prior[1]),
            "data": x,
            "relabel": relabel,
            "predictive": posterior_log_predictive,
            "summarize": ("weights", "probs"),
            "dims": {"weights": ["component"], "probs": ["component", "pixel"]},
        }

    @property
    def num_parameters(self) -> int:
        k, d = self.config.num_components, self.config.dim
        return (k - 1) + k * d


def bayesian_model(
    x: torch.Tensor,
    num_components: int,
    weight_concentration: float = 1.0,
    beta: tuple = (1.0, 1.0),
):
    """The Bayesian Bernoulli mixture, for MCMC:

        weights ~ Dirichlet(weight_concentration)       (K,)
        probs[k, d] ~ Beta(a, b)                        (K, D), uniform by default
        x[n] ~ sum_k weights[k] prod_d Bernoulli(x[n, d] | probs[k, d])

    The assignments are summed out inside ``MixtureSameFamily``. For NUTS every parameter is a
    continuous unknown: K (D + 1) of them, so keep D and K small (bmm-synthetic, digits).
    """
    num_data, dim = x.shape
    weights = pyro.sample(
        "weights",
        dist.Dirichlet(x.new_full((num_components,), float(weight_concentration))),
    )
    with pyro.plate("components", num_components):
        probs = pyro.sample(
            "probs", dist.Beta(x.new_full((dim,), beta[0]), x.new_full((dim,), beta[1])).to_event(1)
        )  # (K, D)
    components = dist.Bernoulli(probs=probs).to_event(1)
    with pyro.plate("data", num_data):
        pyro.sample("x", dist.MixtureSameFamily(dist.Categorical(weights), components), obs=x)


def posterior_log_predictive(draws: dict, x: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s p(x[n] | theta_s) for S posterior draws of ``bayesian_model``, (N,)."""
    weights, probs = draws["weights"], draws["probs"].clamp(1e-12, 1 - 1e-12)  # (S, K), (S, K, D)
    log_px = x @ probs.log().transpose(-1, -2) + (1 - x) @ (-probs).log1p().transpose(-1, -2)
    log_px = log_px + weights.log().unsqueeze(-2)  # (S, N, K)
    return log_px.logsumexp(-1).logsumexp(0) - math.log(len(weights))


COMPONENT_SITES = ("weights", "probs")
_NUTS_MAX_DIM = 5000  # continuous unknowns NUTS is asked to explore on a CPU in minutes


def relabel(draws: dict, num_iters: int = 5) -> tuple:
    """Undo label switching in draws of ``bayesian_model``, matching components by their pixel
    probabilities (see ``zoo.models._mixture.relabel``)."""
    return _relabel(draws, "probs", COMPONENT_SITES, num_iters)
