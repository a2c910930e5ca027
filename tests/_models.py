"""Small Pyro programs with closed-form answers, shared by the driver tests."""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class PPCA(nn.Module):
    """Probabilistic PCA: z ~ N(0, I_q), x ~ N(W z + mu, sigma^2 I_d); p(x) is Gaussian.

    The guide is the exact posterior, optionally spoiled (``inflate`` its scale, ``shift`` its
    mean) to make importance sampling work for its answer.
    """

    def __init__(self, d=5, q=2, sigma=0.5, inflate=1.0, shift=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # buffers, so that ``.to(device)`` moves them (tests that take the ``device`` fixture)
        self.register_buffer("w", torch.randn(d, q, generator=g, dtype=torch.float64))  # (D, Q)
        self.register_buffer("mu", torch.randn(d, generator=g, dtype=torch.float64))  # (D,)
        self.sigma, self.inflate, self.shift = sigma, inflate, shift

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.w.shape[1]), 1.0).to_event(1))
            loc = z @ self.w.T + self.mu  # (..., N, D)
            pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def posterior(self, x):
        q = self.w.shape[1]
        eye = torch.eye(q, dtype=x.dtype, device=x.device)
        m = self.w.T @ self.w + self.sigma**2 * eye  # (Q, Q)
        m_inv = torch.linalg.inv(m)
        loc = (x - self.mu) @ self.w @ m_inv.T  # (N, Q)
        cov = self.sigma**2 * m_inv  # (Q, Q)
        return loc, cov

    def guide(self, x):
        loc, cov = self.posterior(x)
        with pyro.plate("data", len(x)):
            pyro.sample(
                "z",
                dist.MultivariateNormal(loc + self.shift, self.inflate**2 * cov),
            )

    def exact_log_likelihood(self, x):
        eye = torch.eye(len(self.mu), dtype=x.dtype, device=x.device)
        cov = self.w @ self.w.T + self.sigma**2 * eye
        return dist.MultivariateNormal(self.mu, cov).log_prob(x)  # (N,)

    def sample(self, num, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, self.w.shape[1], generator=g, dtype=torch.float64)
        noise = torch.randn(num, len(self.mu), generator=g, dtype=torch.float64)
        w, mu = self.w.cpu(), self.mu.cpu()
        return (z @ w.T + mu + self.sigma * noise).to(self.w.device)


def gaussian_with_global_mean(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))  # global: outside the data plate
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def delta_guide_for_mean(x):
    loc = pyro.param("mu_loc", torch.tensor(0.3))
    pyro.sample("mu", dist.Delta(loc))


LOG_2PI = math.log(2 * math.pi)
