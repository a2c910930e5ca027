"""
Variational autoencoder with a beta knob on the KL term::

    z[n] ~ Normal(0, I)                                z: (N, Z)
    x[n] ~ Bernoulli(logits=decoder(z[n]))             x: (N, X), binary data
      or ~ Normal(decoder(z[n]), exp(log_scale))       continuous data
    q(z[n] | x[n]) = Normal(encoder(x[n]))             the guide, amortized

    ELBO = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))

The beta scale sits on the z site of both the model and the guide, so every Pyro ELBO (and the
analytic KL of TraceMeanField_ELBO) sees the beta-weighted objective. beta = 1 is the VAE.

References: Kingma and Welling (2014), Auto-Encoding Variational Bayes; Higgins et al. (2017),
beta-VAE; Burda et al. (2016) for the 784-200-200-50 architecture used by the benchmarks.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from zoo.models.nets import (
    DIGITS_DEFAULTS,
    GaussianEncoder,
    check_number,
    check_rows,
    check_sizes,
    mlp,
)
from zoo.registry import register


@dataclass
class VAEConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    z_dim: int = field(default=50, metadata={"help": "latent units"})
    hidden: Tuple[int, ...] = field(default=(200, 200), metadata={"help": "hidden widths"})
    # "bernoulli" (binary data) or "gaussian"
    likelihood: str = field(default="bernoulli", metadata={"data": "likelihood"})
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term"})


@register(
    "vae",
    description="variational autoencoder (beta knob, Bernoulli or Gaussian decoder)",
    drivers={"reparam": {}, "svi": {"loss": "TraceMeanField_ELBO"}},
    default_data="mnist",
    default_binarize="dynamic",
    config=VAEConfig,
    data_defaults={"digits": DIGITS_DEFAULTS},  # MNIST's sizes collapse on the digits
    comparison={
        "data": ("mnist", "digits"),
        "gradient_variance": True,
        "methods": {
            "trace": {
                "driver": "svi",
                "loss": "Trace_ELBO",
                "description": "Trace_ELBO (Monte Carlo KL)",
            },
            "meanfield": {
                "driver": "svi",
                "loss": "TraceMeanField_ELBO",
                "description": "TraceMeanField_ELBO (analytic KL)",
            },
            "iwae5": {
                "driver": "reparam",
                "num_particles": 5,
                "description": "importance-weighted bound, K = 5",
            },
            "iwae50": {
                "driver": "reparam",
                "num_particles": 50,
                "description": "importance-weighted bound, K = 50",
            },
            "tracegraph": {
                "driver": "svi",
                "loss": "TraceGraph_ELBO",
                "guide": "score_function",
                "description": "TraceGraph_ELBO, score function (no reparameterization)",
            },
        },
    },
)
class VAE(nn.Module):
    """``.model`` and ``.guide`` go to the SVI or the reparameterized-ELBO driver."""

    capacity_options = ("z_dim", "hidden")  # named by the collapse warning

    def __init__(self, config: Optional[VAEConfig] = None, name: str = "vae", **kwargs):
        super().__init__()
        config = config or VAEConfig(**kwargs)
        if config.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'gaussian', not {config.likelihood!r}"
            )
        config.hidden = tuple(config.hidden)
        check_sizes(config, "x_dim", "z_dim", "hidden")
        check_number(config, "beta", 0.0)
        self.config = config
        self.encoder = GaussianEncoder(config.x_dim, config.hidden, config.z_dim)
        self.decoder = mlp([config.z_dim, *reversed(config.hidden), config.x_dim])
        if config.likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(config.x_dim))  # (X,), one per feature
        # The prefix of this VAE's parameters in Pyro's global param store. Checkpoints are
        # keyed by it, so it is stable; give two VAEs in one session different names (or call
        # pyro.clear_param_store() between fits), since pyro.module shares same-named params.
        self._pyro_name = name

    def likelihood(self, z: torch.Tensor):
        out = self.decoder(z)  # (..., N, X)
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, self.log_scale.exp()).to_event(1)

    def model(self, x: Optional[torch.Tensor] = None, num_samples: Optional[int] = None):
        pyro.module(self._pyro_name, self)
        num_data = self._check(x) if x is not None else int(num_samples)
        device = x.device if x is not None else self.decoder[0].weight.device
        prior = dist.Normal(torch.zeros(self.config.z_dim, device=device), 1.0).to_event(1)
        with pyro.plate("data", num_data):
            with poutine.scale(scale=self.config.beta):
                z = pyro.sample("z", prior)  # (N, Z)
            return pyro.sample("x", self.likelihood(z), obs=x)  # (N, X)

    def guide(self, x: torch.Tensor, num_samples: Optional[int] = None):
        pyro.module(self._pyro_name, self)
        num_data = self._check(x)
        loc, scale = self.encoder(x)  # (N, Z), (N, Z)
        with pyro.plate("data", num_data):
            with poutine.scale(scale=self.config.beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------------ helpers

    @torch.no_grad()
    def encode(self, x: torch.Tensor):
        """Posterior mean and scale of z, (N, Z) each."""
        self._check(x)
        return self.encoder(x)

    @torch.no_grad()
    def active_units(self, x: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
        """Indices of the latent units in use: Var_x(E_q[z_u | x]) > threshold over the rows
        of ``x`` (Burda et al. 2016). The others have collapsed onto the prior, (U,) integers."""
        means = torch.cat([self.encode(chunk)[0] for chunk in x.split(4096)])
        return torch.nonzero(means.var(0) > threshold).squeeze(-1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z): pixel probabilities or Gaussian means, (N, X)."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each input: (N, X) -> (N, X)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Images from the prior: decoder means (``mean=True``) or draws of x, (S, X)."""
        device = self.decoder[0].weight.device
        z = torch.randn(num_samples, self.config.z_dim, device=device)
        return self.decode(z) if mean else self.likelihood(z).sample()

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Samples, reconstructions of held-out images (square images only), and the posterior
        means of 2000 held-out rows in the latent space, coloured by label where there is one."""
        from zoo import plots  # matplotlib only when figures are drawn

        x, y = splits["test"] if "test" in splits else splits["train"]
        device = self.decoder[0].weight.device
        loc, _ = self.encode(x[:2000].to(device))
        labels = None if y is None else y[:2000]
        out = {"latent_space.png": plots.latent_space(loc.cpu(), labels)}
        side = int(round(self.config.x_dim**0.5))
        if side * side == self.config.x_dim:
            title = "samples (decoder means)"
            out["samples.png"] = plots.image_grid(self.sample(64), num_cols=8, title=title)
            pairs = torch.cat([x[:10].to(device), self.reconstruct(x[:10].to(device))])
            out["reconstructions.png"] = plots.image_grid(
                pairs, num_cols=10, title="reconstructions", row_labels=("input", "reconstruction")
            )
        return out

    def _check(self, x) -> int:
        return check_rows(x, self.config.x_dim)
