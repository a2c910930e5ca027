"""
Conditional variational autoencoder: a VAE whose prior, decoder and encoder all see a condition y.

    z[n] ~ Normal(prior_net(y[n]))                      z: (N, Z), y: (N, Y) any tensor
    x[n] ~ Bernoulli(logits=decoder(z[n], y[n]))        x: (N, X); only pixels where mask = 1
    q(z[n] | x[n], y[n]) = Normal(encoder(x[n], y[n]))  the guide

Two uses ship with the zoo:
- label mode: y is a one-hot digit label; ``generate(y)`` draws a chosen digit, and encoding an
  image then decoding its z with every label transfers its style (``style_transfer``).
- quadrant mode (Pyro's CVAE example): y is an MNIST image with 1-3 quadrants visible and the
  rest set to -1, x is the whole image, and the likelihood covers only the hidden pixels
  (``quadrant_task`` builds the data). ``Baseline`` is the deterministic network the CVAE is
  compared with: it predicts the hidden pixels from the visible ones.

References: Sohn, Lee and Yan (2015), Learning Structured Output Representation using Deep
Conditional Generative Models; Pyro's examples/cvae.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from zoo.nets import GaussianEncoder, check_sizes, mlp
from zoo.registry import register


@dataclass
class CVAEConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    # condition size: 10 for one-hot labels, 784 for the quadrant task
    y_dim: int = field(default=10, metadata={"help": "condition size"})
    z_dim: int = field(default=20, metadata={"help": "latent units"})
    hidden: Tuple[int, ...] = field(default=(500, 500), metadata={"help": "hidden widths"})


@register(
    "cvae",
    description="conditional VAE: a digit label, or the visible quadrants of an image",
    drivers={"reparam": {}, "svi": {"loss": "TraceMeanField_ELBO"}},
    default_data="mnist",
    default_binarize="static",
    config=CVAEConfig,
)
class CVAE(nn.Module):
    """``.model(x, y, mask)`` and ``.guide(x, y, mask)`` go to the SVI or reparameterized driver."""

    def __init__(self, config: Optional[CVAEConfig] = None, name: str = "cvae", **kwargs):
        super().__init__()
        config = config or CVAEConfig(**kwargs)
        config.hidden = tuple(config.hidden)
        check_sizes(config, "x_dim", "y_dim", "z_dim", "hidden")
        self.config = config
        self.prior_net = GaussianEncoder(config.y_dim, config.hidden, config.z_dim)
        self.encoder = GaussianEncoder(config.x_dim + config.y_dim, config.hidden, config.z_dim)
        self.decoder = mlp([config.z_dim + config.y_dim, *reversed(config.hidden), config.x_dim])
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.vae)

    def model(self, x: Optional[torch.Tensor], y: torch.Tensor, mask=None):
        pyro.module(self._pyro_name, self)
        self._check(x, y)
        loc, scale = self.prior_net(y)  # (N, Z), (N, Z)
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))  # (N, Z)
            logits = self.decoder(torch.cat([z, y.expand(z.shape[:-1] + y.shape[-1:])], -1))
            likelihood = dist.Bernoulli(logits=logits)  # (..., N, X)
            if mask is not None:
                likelihood = likelihood.mask(mask)  # only the pixels to predict count
            return pyro.sample("x", likelihood.to_event(1), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor, mask=None):
        pyro.module(self._pyro_name, self)
        self._check(x, y)
        loc, scale = self.encoder(torch.cat([x, y], -1))  # (N, Z), (N, Z)
        with pyro.plate("data", len(y)):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------------ the model surface

    def arguments(self, x: torch.Tensor, y: Optional[torch.Tensor], split: str):
        """The model's arguments for labelled data: (x, one-hot y), y_dim classes."""
        if y is None:
            raise ValueError("the CVAE conditions on labels: these data have none")
        return x, one_hot(y, self.config.y_dim)

    @torch.no_grad()
    def sample(self, num_samples: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel probabilities for ``num_samples`` conditions ``y`` (N, Y), by default one-hot
        labels drawn uniformly: (N, X)."""
        device = self.decoder[0].weight.device
        if y is None:
            labels = torch.randint(self.config.y_dim, (num_samples,), device=device)
            y = one_hot(labels, self.config.y_dim)
        if len(y) != num_samples:
            raise ValueError(f"{num_samples} samples need {num_samples} conditions, got {len(y)}")
        return self.generate(y.to(device))

    # ------------------------------------------------------------------------ helpers

    @torch.no_grad()
    def generate(self, y: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel probabilities of p(x | y, z), z from the prior p(z | y) unless given: (N, X)."""
        if z is None:
            loc, scale = self.prior_net(y)
            z = loc + scale * torch.randn_like(loc)
        return torch.sigmoid(self.decoder(torch.cat([z, y], -1)))

    @torch.no_grad()
    def style_transfer(self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor):
        """Encode each (x, y), then decode its z under every target condition: (N, T, X)."""
        z, _ = self.encoder(torch.cat([x, y], -1))  # (N, Z)
        out = [self.generate(target.expand(len(z), -1), z) for target in targets]
        return torch.stack(out, 1)

    def _check(self, x, y):
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[-1] != self.config.y_dim:
            raise ValueError(f"condition y must have shape (N, {self.config.y_dim})")
        if x is not None and (x.dim() != 2 or x.shape != (len(y), self.config.x_dim)):
            raise ValueError(
                f"x must have shape ({len(y)}, {self.config.x_dim}), got {tuple(x.shape)}"
            )


class Baseline(nn.Module):
    """Deterministic baseline for the quadrant task: visible pixels -> logits of all pixels."""

    def __init__(self, x_dim: int = 784, hidden: Tuple[int, ...] = (500, 500)):
        super().__init__()
        self.net = mlp([x_dim, *hidden, x_dim], activation=nn.ReLU)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (N, X) -> (N, X) logits
        return self.net(y)

    def loss(self, x, y, mask) -> torch.Tensor:
        """Bernoulli negative log-likelihood of the hidden pixels, summed per image, (N,)."""
        nll = nn.functional.binary_cross_entropy_with_logits(self(y), x, reduction="none")
        return (nll * mask).sum(-1)


def one_hot(labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    return nn.functional.one_hot(labels, num_classes).float()  # (N,) -> (N, C)


def quadrant_task(x: torch.Tensor, num_given: int, seed: int = 0, side: int = 28):
    """Pyro's masked-quadrant task: (condition, target, mask) for images x (N, side * side).

    Each image shows ``num_given`` of its four quadrants (which ones, drawn per image with a
    fixed seed); hidden pixels are set to -1 in the condition. The mask marks the pixels to
    predict: the hidden ones.
    """
    if not 1 <= num_given <= 3:
        raise ValueError(f"num_given must be 1, 2 or 3, got {num_given}")
    num = len(x)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(num, 4, generator=g), dim=-1)  # (N, 4) random quadrants
    visible = torch.zeros(num, 4, dtype=torch.bool)
    visible.scatter_(1, order[:, :num_given], True)
    half = side // 2
    rows = torch.arange(side).unsqueeze(-1).expand(side, side)
    cols = torch.arange(side).unsqueeze(0).expand(side, side)
    quadrant = ((rows >= half).long() * 2 + (cols >= half).long()).reshape(-1)  # (X,) in 0..3
    shown = visible[:, quadrant]  # (N, X)
    condition = torch.where(shown, x, torch.full_like(x, -1.0))
    return condition, x, (~shown).float()
