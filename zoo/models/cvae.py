"""
Conditional variational autoencoder: a VAE whose prior, decoder and encoder all see a condition y::

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

from zoo.models.nets import DIGITS_DEFAULTS, GaussianEncoder, check_sizes, mlp
from zoo.registry import register

_QUADRANT_SEEDS = {"train": 0, "valid": 1, "test": 2}  # which quadrants show, fixed per split


@dataclass
class CVAEConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    # condition size: the classes for one-hot labels, x_dim for the quadrant task (set from
    # the data and the task by ``CVAE.from_data``)
    y_dim: int = field(default=10, metadata={"internal": True})
    z_dim: int = field(default=20, metadata={"help": "latent units"})
    hidden: Tuple[int, ...] = field(default=(500, 500), metadata={"help": "hidden widths"})
    # the task: y is a one-hot digit label, or the image with only some quadrants visible
    condition: str = field(
        default="label",
        metadata={"choices": ("label", "quadrants"), "help": "condition on the label or quadrants"},
    )
    given: int = field(
        default=1, metadata={"choices": (1, 2, 3), "help": "quadrant task: visible quadrants"}
    )


@register(
    "cvae",
    description="conditional VAE: a digit label, or the visible quadrants of an image",
    drivers={"reparam": {}, "svi": {"loss": "TraceMeanField_ELBO"}},
    default_data="mnist",
    default_binarize="static",
    data_defaults={"digits": DIGITS_DEFAULTS},  # MNIST's sizes collapse on the digits
    config=CVAEConfig,
)
class CVAE(nn.Module):
    """``.model(x, y, mask)`` and ``.guide(x, y, mask)`` go to the SVI or reparameterized driver."""

    capacity_options = ("z_dim", "hidden")  # named by the collapse warning

    def __init__(self, config: Optional[CVAEConfig] = None, name: str = "cvae", **kwargs):
        super().__init__()
        config = config or CVAEConfig(**kwargs)
        config.hidden = tuple(config.hidden)
        check_sizes(config, "x_dim", "y_dim", "z_dim", "hidden")
        self.config = config
        self.prior_net = GaussianEncoder(config.y_dim, config.hidden, config.z_dim)
        self.encoder = GaussianEncoder(config.x_dim + config.y_dim, config.hidden, config.z_dim)
        self.decoder = mlp([config.z_dim + config.y_dim, *reversed(config.hidden), config.x_dim])
        if config.condition not in ("label", "quadrants"):
            raise ValueError(f"condition must be 'label' or 'quadrants', not {config.condition!r}")
        if config.condition == "quadrants":
            if config.y_dim != config.x_dim:
                raise ValueError("the quadrant task conditions on the image: y_dim = x_dim")
            if _side(config.x_dim) ** 2 != config.x_dim:
                raise ValueError(f"the quadrant task needs square images, not x_dim {config.x_dim}")
            quadrant_task(torch.zeros(0, config.x_dim), config.given, side=_side(config.x_dim))
            # the deterministic network to beat, trained after the CVAE by ``after_fit`` (the
            # ELBO gives it no gradient: the optimizers step only parameters that have one)
            self.baseline = Baseline(config.x_dim, config.hidden)
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.models.vae)

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

    @classmethod
    def from_data(cls, options: dict, info) -> dict:
        """The condition's size from the task: the classes of the labels, or the image."""
        if not info.binary:
            raise ValueError("the CVAE has a Bernoulli decoder: binarize the data (--binarize)")
        out = dict(options)
        if out.get("condition", "label") == "quadrants":
            if info.binarize == "dynamic":
                raise ValueError(
                    "the quadrant task builds its condition from fixed pixels: --binarize static"
                    " or threshold"
                )
            out["y_dim"] = info.dim
        elif info.num_classes is not None:
            out.setdefault("y_dim", info.num_classes)
        return out

    def arguments(self, x: torch.Tensor, y: Optional[torch.Tensor], split: str):
        """The model's arguments for a split: (x, one-hot y) in label mode; in the quadrant task
        (target, visible, mask), the visible quadrants fixed per split."""
        if self.config.condition == "quadrants":
            seed = _QUADRANT_SEEDS.get(split, 0)
            visible, target, mask = quadrant_task(
                x, self.config.given, seed=seed, side=_side(x.shape[1])
            )
            return target, visible, mask
        if y is None:
            raise ValueError("the CVAE conditions on labels: these data have none")
        return x, one_hot(y, self.config.y_dim).to(x.device)

    def after_fit(self, arguments: tuple, settings: dict) -> None:
        """The quadrant task's baseline, trained for the same epochs, batch size, rate and seed
        as the CVAE (Adam on its mean negative log-likelihood of the hidden pixels)."""
        if self.config.condition != "quadrants":
            return
        target, visible, mask = arguments
        torch.manual_seed(settings["seed"])
        optimizer = torch.optim.Adam(self.baseline.parameters(), lr=settings["lr"])
        generator = torch.Generator().manual_seed(settings["seed"])
        for _ in range(settings["epochs"]):
            order = torch.randperm(len(target), generator=generator).to(target.device)
            for idx in order.split(settings["batch_size"]):
                optimizer.zero_grad()
                self.baseline.loss(target[idx], visible[idx], mask[idx]).mean().backward()
                optimizer.step()

    @torch.no_grad()
    def metrics(self, splits, num_samples=None, progress=False) -> dict:
        """In the quadrant task, the baseline's negative log-likelihood of the test images'
        hidden pixels, to set beside the CVAE's (minus its test_log_likelihood)."""
        if self.config.condition != "quadrants" or "test" not in splits:
            return {}
        target, visible, mask = self.arguments(*splits["test"], "test")
        nll = self.baseline.loss(target, visible, mask).mean().item()
        return {"test_baseline_nll": nll, "quadrants_given": self.config.given}

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Label mode: one row per digit, and style transfer; quadrant task: completions beside
        the truth and the baseline's prediction. Square images only."""
        from zoo import plots  # matplotlib only when figures are drawn

        split = "test" if "test" in splits else "train"
        x, y = splits[split]
        if _side(self.config.x_dim) ** 2 != self.config.x_dim:
            return {}
        if self.config.condition == "quadrants":
            return {"completions.png": self._completions(*self.arguments(x[:8], None, split))}
        device = self.decoder[0].weight.device
        c = self.config.y_dim
        images = self.generate(one_hot(torch.arange(c, device=device).repeat_interleave(8), c))
        labels = [f"label {k}" for k in range(c)]
        out = {"digits.png": plots.image_grid(images, num_cols=8, title="samples per label",
                                              row_labels=labels)}  # fmt: skip
        if y is not None:
            x, y = x[:8].to(device), one_hot(y[:8], c).to(device)
            moved = self.style_transfer(x, y, torch.eye(c, device=device))  # (8, C, X)
            grid = torch.cat([x.unsqueeze(1), moved], 1).reshape(-1, x.shape[1])
            title = "style transfer: each input, then its z decoded with every label"
            out["style_transfer.png"] = plots.image_grid(grid, num_cols=c + 1, title=title)
        return out

    def _completions(self, target, visible, mask):
        from zoo import plots

        device = self.decoder[0].weight.device
        target, visible, mask = target.to(device), visible.to(device), mask.bool().to(device)
        shown = torch.where(mask, torch.full_like(target, 0.5), target)  # hidden: grey
        completions = [torch.where(mask, self.generate(visible), target) for _ in range(3)]
        predicted = torch.where(mask, torch.sigmoid(self.baseline(visible)), target)
        rows = torch.cat([shown, target, predicted, *completions])
        labels = ("given", "truth", "baseline", "CVAE draw 1", "CVAE draw 2", "CVAE draw 3")
        return plots.image_grid(rows, num_cols=8, title="the quadrant task", row_labels=labels)

    @torch.no_grad()
    def sample(self, num_samples: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel probabilities for ``num_samples`` conditions ``y`` (N, Y), by default one-hot
        labels drawn uniformly (label mode; the quadrant task needs its visible quadrants):
        (N, X)."""
        device = self.decoder[0].weight.device
        if y is None and self.config.condition == "quadrants":
            raise ValueError("the quadrant task's samples need y: images with quadrants visible")
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


def _side(x_dim: int) -> int:
    return int(round(x_dim**0.5))


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
