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

from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.util import is_validation_enabled
from pyro.nn import PyroParam

from zoo._mixture import Mixture


@dataclass
class BMMConfig:
    num_components: int = 10
    dim: int = 784
    weight_concentration: float = 1.0  # Dirichlet prior on the weights; 1 = maximum likelihood
    beta_a: float = 1.1  # Beta(a, b) prior on every pixel probability; (1, 1) = maximum likelihood
    beta_b: float = 1.1


class ProductBernoulli(dist.TorchDistribution):
    """Independent Bernoullis over the last dimension, by logits; event_shape (D,).

    ``log_prob`` is one matrix product, x @ logits^T - sum softplus(logits), instead of the
    (K, N, D) tensor that ``Bernoulli(logits).to_event(1)`` builds when z is enumerated.
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
        torch.broadcast_shapes(self.logits.shape[:-1], batch_shape)  # raises if incompatible
        return ProductBernoulli(self.logits, batch_shape, validate_args=False)

    def sample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits).expand(shape))

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        bias = -F.softplus(self.logits).sum(-1)  # (..., 1) when enumerated
        if value.dim() == 2 and self.logits.dim() == 3 and self.logits.shape[1] == 1:
            # the enumerated case, (N, D) data against (K, 1, D) logits: one GEMM with the bias
            # added as it is written, then viewed as (K, N)
            log_prob = torch.addmm(bias.T, value, self.logits.squeeze(1).T).T  # (K, N)
        else:  # einsum over broadcast batch dims is dispatched to a matrix product as well
            log_prob = torch.einsum("...d,...d->...", value, self.logits) + bias
        return log_prob.expand(torch.broadcast_shapes(log_prob.shape, self.batch_shape))


class BernoulliMixture(Mixture):
    """A mixture of Bernoulli products; ``.model`` and ``.guide`` go into any driver."""

    def __init__(self, config: BMMConfig = None, **kwargs):
        config = config or BMMConfig(**kwargs)
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
        if is_validation_enabled() and not torch.all((x == 0) | (x == 1)):
            raise ValueError(
                "a Bernoulli mixture needs binary data (0/1); got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]: binarize it first, e.g. "
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

    def sufficient_statistics(self, x: torch.Tensor, resp: torch.Tensor) -> dict:
        return {"counts": resp.sum(0).double(), "sum_x": (resp.T @ x).double()}  # (K,), (K, D)

    def m_step(self, stats: dict) -> None:
        """Closed-form MAP update of the weights and the pixel probabilities."""
        self._m_step_weights(stats["counts"])
        a, b = self.config.beta_a, self.config.beta_b
        counts = stats["counts"].unsqueeze(-1) + 10 * torch.finfo(torch.float64).eps  # (K, 1)
        probs = (stats["sum_x"] + a - 1) / (counts + a + b - 2)  # (K, D)
        eps = 1e-12  # only reached without a prior: a pixel never (or always) on in a component
        probs = probs.clamp(eps, 1 - eps)
        self.set_param("logits", torch.logit(probs))

    @property
    def num_parameters(self) -> int:
        k, d = self.config.num_components, self.config.dim
        return (k - 1) + k * d
