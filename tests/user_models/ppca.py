"""A user's own model, written outside ``zoo/``: what ``zoo fit tests/user_models/ppca.py:PPCA``
fits (the test of the model surface reads it as a file, and as a module through an entry point).

    z[n] ~ N(0, I_q)                          z: (N, Q)
    x[n] ~ N(W z[n] + mu, sigma^2 I_d)        x: (N, D)
    q(z[n] | x[n]) = N(A x[n] + c, diag(s^2)) an amortized linear encoder
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints


class PPCA:
    """Probabilistic PCA with a linear encoder (no nn.Module: plain pyro.params)."""

    drivers = {"svi": {"loss": "TraceMeanField_ELBO"}, "reparam": {}}
    default_data = "faithful"

    def __init__(self, x_dim: int = 2, z_dim: int = 1, init_scale: float = 0.1):
        self.x_dim, self.z_dim, self.init_scale = x_dim, z_dim, init_scale

    def model(self, x):
        g = torch.Generator().manual_seed(0)
        w = pyro.param("W", self.init_scale * torch.randn(self.x_dim, self.z_dim, generator=g))
        mu = pyro.param("mu", torch.zeros(self.x_dim))
        sigma = pyro.param("sigma", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + mu, sigma).to_event(1), obs=x)  # (N, D)

    def guide(self, x):
        a = pyro.param("A", torch.zeros(self.z_dim, self.x_dim))
        c = pyro.param("c", torch.zeros(self.z_dim))
        s = pyro.param("s", torch.ones(self.z_dim), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x @ a.T + c, s).to_event(1))  # (N, Q)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        w, mu, sigma = pyro.param("W"), pyro.param("mu"), pyro.param("sigma")
        z = torch.randn(num_samples, self.z_dim)
        return z @ w.T + mu + sigma * torch.randn(num_samples, self.x_dim)  # (N, D)

    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x | mu, W W^T + sigma^2 I) per row, for the test to check the run against."""
        w, mu, sigma = pyro.param("W"), pyro.param("mu"), pyro.param("sigma")
        cov = w @ w.T + sigma**2 * torch.eye(self.x_dim)
        return dist.MultivariateNormal(mu, cov).log_prob(x).detach()
