"""
Semi-supervised VAE, model M2 of Kingma, Rezende, Mohamed and Welling (2014).

    y[n] ~ Categorical(1 / C)                          y: (N,) class, observed when labelled
    z[n] ~ Normal(0, I)                                z: (N, Z) style
    x[n] ~ Bernoulli(logits=decoder(z[n], y[n]))       x: (N, X) binary images
    q(y[n] | x[n]) = Categorical(classifier(x[n]))     the classifier we are after
    q(z[n] | x[n], y[n]) = Normal(encoder(x[n], y[n]))

Labels come as an integer tensor with -1 for "unknown", so one minibatch may mix labelled and
unlabelled images. The model observes y where it is known (site ``y_observed``) and treats it
as latent elsewhere (site ``y``). In the guide, ``y`` is enumerated over the C classes (with
TraceEnum_ELBO; ``enumerate=False`` samples it instead), and on labelled rows the guide puts all
its mass on the known label, so those rows contribute nothing to that site. The objective is
then exactly the paper's:

    sum over labelled (x, y)  of  L(x, y) + alpha * log q(y | x)
    + sum over unlabelled x   of  U(x) = sum_y q(y | x) L(x, y) + H(q(y | x))

with L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]. The
classification term (site ``y_classify``, weight ``alpha``) trains q(y | x) on the labels,
which the ELBO alone does not do. Kingma et al. used alpha = 0.1 N; Pyro's tutorial uses 46 with
the same per-point scaling as here, which we take as the default.

References: Kingma et al. (2014), Semi-Supervised Learning with Deep Generative Models;
Pyro's SS-VAE tutorial (networks 784-500-10, 794-500-50, 60-500-784).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from torch import nn

from zoo.nets import check_rows, mlp

_POINT_MASS = -3.0e4  # logit of the classes a labelled row cannot take: exp() is exactly 0


@dataclass
class SSVAEConfig:
    x_dim: int = 784
    num_classes: int = 10
    z_dim: int = 50
    hidden: Tuple[int, ...] = (500,)
    alpha: float = 46.0  # weight of the classification term on labelled data
    enumerate: bool = True  # sum over y in the guide (TraceEnum_ELBO); False samples it


class _JointEncoder(nn.Module):
    """(x, one-hot y) -> (loc, scale) of q(z | x, y).

    The first layer is split as W_x x + W_y y, so that W_x x is computed once per image even
    when y is enumerated over all C classes (the input of shape (C, N, C) broadcasts against
    (N, H)); a plain concatenation would repeat the largest product C times.
    """

    def __init__(self, x_dim, y_dim, hidden, z_dim):
        super().__init__()
        self.from_x = nn.Linear(x_dim, hidden[0])
        self.from_y = nn.Linear(y_dim, hidden[0], bias=False)
        self.body = mlp(list(hidden)) if len(hidden) > 1 else None
        self.loc = nn.Linear(hidden[-1], z_dim)
        self.scale = nn.Linear(hidden[-1], z_dim)

    def forward(self, x, y):
        h = nn.functional.softplus(self.from_x(x) + self.from_y(y))
        if self.body is not None:
            h = nn.functional.softplus(self.body(h))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class SSVAE(nn.Module):
    """``.model(x, y)`` and ``.guide(x, y)``; ``y`` holds class indices, -1 where unknown."""

    def __init__(self, config: Optional[SSVAEConfig] = None, name: str = "ssvae", **kwargs):
        super().__init__()
        config = config or SSVAEConfig(**kwargs)
        config.hidden = tuple(config.hidden)
        if not config.hidden:
            raise ValueError("the SSVAE needs at least one hidden layer")
        if config.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {config.alpha}")
        self.config = config
        c = config.num_classes
        self.classifier = mlp([config.x_dim, *config.hidden, c])  # logits of q(y | x)
        self.encoder = _JointEncoder(config.x_dim, c, config.hidden, config.z_dim)
        self.decoder = mlp([config.z_dim + c, *reversed(config.hidden), config.x_dim])
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.vae)

    # ------------------------------------------------------------------ model and guide

    def model(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        pyro.module(self._pyro_name, self)
        labelled, y_onehot = self._labels(x, y)
        c = self.config.num_classes
        prior_y = dist.OneHotCategorical(logits=x.new_zeros(c))
        prior_z = dist.Normal(x.new_zeros(self.config.z_dim), 1.0).to_event(1)
        with pyro.plate("data", len(x)):
            pyro.sample("y_observed", prior_y.mask(labelled), obs=y_onehot)
            y_latent = pyro.sample("y", prior_y.mask(~labelled))  # (N, C) or (C, 1, C)
            y_all = torch.where(labelled.unsqueeze(-1), y_onehot, y_latent)
            z = pyro.sample("z", prior_z)  # (..., N, Z)
            logits = self.decoder(_concat(z, y_all))  # (..., N, X)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            if self.config.alpha > 0:
                with poutine.scale(scale=self.config.alpha):
                    classify = dist.OneHotCategorical(logits=self.classifier(x))
                    pyro.sample("y_classify", classify.mask(labelled), obs=y_onehot)

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        pyro.module(self._pyro_name, self)
        labelled, y_onehot = self._labels(x, y)
        logits = self.classifier(x)  # (N, C)
        # labelled rows: all mass on the known label, so log q = 0 and the sum over y is L(x, y)
        known = (y_onehot - 1.0) * -_POINT_MASS
        logits = torch.where(labelled.unsqueeze(-1), known, logits)
        infer = {"enumerate": "parallel"} if self.config.enumerate else {}
        with pyro.plate("data", len(x)):
            y_latent = pyro.sample("y", dist.OneHotCategorical(logits=logits), infer=infer)
            y_all = torch.where(labelled.unsqueeze(-1), y_onehot, y_latent)  # (..., N, C)
            loc, scale = self.encoder(x, y_all)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------------ helpers

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x): (N, X) -> (N, C) class probabilities."""
        self._check(x)
        return torch.softmax(self.classifier(x), -1)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x): (N, X) -> (N,) integers."""
        return self.predict_proba(x).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
        """Fraction of ``x`` whose predicted class equals ``y``."""
        hits = sum(
            (self.classify(x[i : i + batch_size]) == y[i : i + batch_size]).sum().item()
            for i in range(0, len(x), batch_size)
        )
        return hits / len(x)

    @torch.no_grad()
    def elbo_by_label(self, x: torch.Tensor, num_samples: int = 10) -> torch.Tensor:
        """L(x, y) for every class y: the ELBO of x given that label, from ``num_samples`` draws
        of q(z | x, y). (N, X) -> (N, C) nats.

        Its argmax is the generative model's own classification, and softmax(L) is where the
        unlabelled term pulls q(y | x): the sum over y is maximized by q(y | x) proportional to
        exp L(x, y). When that generative classifier is worse than q(y | x), the unlabelled
        images pull the classifier the wrong way (see ``benchmarks/ssvae_accuracy.py``).
        """
        self._check(x)
        c = self.config.num_classes
        prior_z = dist.Normal(x.new_zeros(self.config.z_dim), 1.0).to_event(1)
        out = []
        for k in range(c):
            y = self._one_hot(torch.full((len(x),), k, device=x.device))
            loc, scale = self.encoder(x, y)
            q_z = dist.Normal(loc, scale).to_event(1)
            z = q_z.rsample((num_samples,))  # (S, N, Z)
            logits = self.decoder(_concat(z, y))
            log_px = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
            out.append((log_px + prior_z.log_prob(z) - q_z.log_prob(z)).mean(0) - math.log(c))
        return torch.stack(out, -1)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel probabilities of p(x | y, z) for class indices (N,); z ~ p(z) unless given."""
        y = self._one_hot(labels)
        if z is None:
            z = torch.randn(len(labels), self.config.z_dim, device=y.device)
        return torch.sigmoid(self.decoder(_concat(z, y)))

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Style analogies: infer z from each image (with its label, or the predicted one),
        then decode that z with every class. (N, X) -> (N, C, X)."""
        self._check(x)
        labels = self.classify(x) if y is None else y
        loc, _ = self.encoder(x, self._one_hot(labels))  # (N, Z): the style of each image
        c = self.config.num_classes
        classes = torch.arange(c, device=x.device)
        out = [self.generate(classes, z.expand(c, -1)) for z in loc]
        return torch.stack(out)

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        device = self.decoder[0].weight.device
        return nn.functional.one_hot(labels.long(), self.config.num_classes).float().to(device)

    def _labels(self, x, y):
        """(labelled mask (N,), one-hot labels (N, C) with class 0 standing in where unknown)."""
        self._check(x)
        if y is None:
            y = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.shape != x.shape[:1]:
            raise ValueError(
                f"y must be an integer tensor of shape ({len(x)},) with -1 for unknown labels"
            )
        if ((y < -1) | (y >= self.config.num_classes)).any():
            raise ValueError(
                f"labels must lie in -1 (unknown) .. {self.config.num_classes - 1}, got"
                f" {y.min().item()} .. {y.max().item()}"
            )
        labelled = y >= 0
        y_onehot = nn.functional.one_hot(y.clamp(min=0), self.config.num_classes).to(x.dtype)
        return labelled, y_onehot

    def _check(self, x) -> None:
        check_rows(x, self.config.x_dim)


def _concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate the last dimension after broadcasting the others (enumerated y is (C, 1, C))."""
    shape = broadcast_shape(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(shape + a.shape[-1:]), b.expand(shape + b.shape[-1:])], -1)
