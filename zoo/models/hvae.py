"""
Hierarchical VAE: the ladder VAE of Sonderby, Raiko, Maaloe, Sonderby and Winther (2016).

Generative model, top-down over L stochastic layers (z1 is the bottom, zL the top):

    zL[n] ~ Normal(0, I)
    zl[n] ~ Normal(mu_p(z{l+1}[n]), sigma_p(z{l+1}[n]))    l = L-1, ..., 1
    x[n]  ~ Bernoulli(logits=decoder(z1[n]))

Inference: a deterministic bottom-up pass d1 = f1(x), dl = fl(d{l-1}) gives each layer a
likelihood-like estimate (mu_hat_l, sigma_hat_l). The top layer is q(zL | x) = Normal(mu_hat_L,
sigma_hat_L); going down, each q(zl | z{l+1}, x) merges that estimate with the generative
model's own top-down prior p(zl | z{l+1}) by precision weighting,

    sigma_q^-2 = sigma_hat^-2 + sigma_p^-2
    mu_q = sigma_q^2 (mu_hat sigma_hat^-2 + mu_p sigma_p^-2)

so the inference and generative networks share the top-down path (the same ``down`` networks
appear in the model and the guide).

KL warm-up: ``kl_weight`` (in (0, 1]) multiplies every z site of the model and the guide, which
multiplies the KL terms of the training objective. It applies only while gradients are being
taken; anything evaluated under ``torch.no_grad()`` (validation, the importance-sampled
log-likelihood) sees the true bound. ``warmup(epochs)`` returns a schedule for the drivers'
``schedule=`` hook that raises it linearly from 0 to 1. ``active_units_per_layer`` counts, per
layer, the units whose posterior mean varies across the data (Burda et al. 2016: Cov_x
E_q[u | x] > 0.01); units that do not are collapsed onto the prior.

Defaults follow the paper's MNIST model cut to L layers: z sizes 64-32-16-8-4 and deterministic
widths 512-256-128-64-32 (two dense layers each), without batch normalization. The networks use
ELU and LeCun-normal weights (std 1 / sqrt(fan_in)) rather than the Softplus and PyTorch default
of the other zoo models: with those, the variance of the features across inputs shrinks about
tenfold per layer at initialization, the top layers start out blind to x, and on small data
(sklearn digits) the precision-weighted posterior collapsed onto the prior in every short run
we tried, with or without warm-up.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from zoo.models.nets import GaussianEncoder, check_rows, check_sizes, mlp
from zoo.registry import register

_PAPER_Z = (64, 32, 16, 8, 4)
_PAPER_HIDDEN = (512, 256, 128, 64, 32)


@dataclass
class HVAEConfig:
    """Sizes bottom (z1) to top (zL). Give ``layers`` for the paper's sizes cut to that many
    layers (1 to 5), or ``z_dims`` and ``hidden`` themselves; neither: two layers."""

    x_dim: int = field(default=784, metadata={"data": "dim"})
    layers: Optional[int] = field(
        default=None, metadata={"help": "stochastic layers, with the paper's sizes (1-5)"}
    )
    z_dims: Optional[Tuple[int, ...]] = field(
        default=None, metadata={"help": "latent units per layer, bottom to top"}
    )
    hidden: Optional[Tuple[int, ...]] = field(
        default=None, metadata={"help": "deterministic width per layer, bottom to top"}
    )
    # KL warm-up: epochs over which kl_weight rises linearly from 0 to 1 (None: a fifth of the
    # fit's epochs; 0: none)
    warmup: Optional[int] = field(
        default=None, metadata={"help": "KL warm-up epochs (default: a fifth of --epochs)"}
    )

    def __post_init__(self):
        given = self.z_dims is not None or self.hidden is not None
        layers = self.layers
        if layers is None:
            layers = len(self.z_dims or self.hidden or _PAPER_Z[:2])
        elif not given and not 1 <= layers <= len(_PAPER_Z):
            raise ValueError(
                f"layers must be 1 to {len(_PAPER_Z)} for the default sizes, got {layers};"
                " pass z_dims and hidden for more"
            )
        self.layers = layers
        self.z_dims = tuple(self.z_dims if self.z_dims is not None else _PAPER_Z[:layers])
        self.hidden = tuple(self.hidden if self.hidden is not None else _PAPER_HIDDEN[:layers])
        if not (len(self.z_dims) == len(self.hidden) == layers):
            raise ValueError(
                f"z_dims {self.z_dims} and hidden {self.hidden} must have one entry per"
                f" stochastic layer ({layers} layers)"
            )
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative number of epochs, got {self.warmup}")

    @classmethod
    def with_layers(cls, layers: int, x_dim: int = 784) -> "HVAEConfig":
        """The paper's sizes for ``layers`` stochastic layers (1 to 5)."""
        return cls(x_dim=x_dim, layers=layers)


@register(
    "hvae",
    description="hierarchical ladder VAE (Sonderby et al. 2016) with L stochastic layers",
    drivers={"reparam": {}, "svi": {"loss": "TraceMeanField_ELBO"}},
    default_data="mnist",
    default_binarize="dynamic",
    # the 8x8 digits: MNIST's sizes collapse there in a few epochs (tests/test_digits_defaults.py)
    data_defaults={
        "digits": {
            "z_dims": (16, 8),
            "hidden": (256, 128),
            "warmup": 0,
            "batch_size": 16,
            "lr": 3e-3,
            "binarize": "threshold",
            "_unless": ("layers", "z_dims", "hidden"),
        }
    },
    config=HVAEConfig,
)
class HVAE(nn.Module):
    """``.model(x)`` and ``.guide(x)`` for the reparameterized-ELBO driver (or SVI)."""

    capacity_options = ("z_dims", "hidden", "warmup")  # named by the collapse warning

    def __init__(self, config: Optional[HVAEConfig] = None, name: str = "hvae", **kwargs):
        super().__init__()
        config = config or HVAEConfig(**kwargs)
        check_sizes(config, "x_dim", "z_dims", "hidden")
        self.config = config
        z, h = config.z_dims, config.hidden
        widths = (config.x_dim, *h)
        self.up = nn.ModuleList(
            nn.Sequential(mlp([widths[i], h[i], h[i]], nn.ELU), nn.ELU()) for i in range(len(z))
        )
        self.up_heads = nn.ModuleList(GaussianEncoder(h[i], (), z[i]) for i in range(len(z)))
        # p(z_l | z_{l+1}) for l = 1 .. L-1, shared by the model and the guide
        self.down = nn.ModuleList(
            GaussianEncoder(z[i + 1], (h[i], h[i]), z[i], nn.ELU) for i in range(len(z) - 1)
        )
        self.decoder = mlp([z[0], h[0], h[0], config.x_dim], nn.ELU)
        for layer in self.modules():  # LeCun-normal weights: see the module docstring
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="linear")
                nn.init.zeros_(layer.bias)
        self.kl_weight = 1.0
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.models.vae)

    @property
    def num_layers(self) -> int:
        return len(self.config.z_dims)

    @property
    def objective_label(self) -> str:
        """What the drivers maximize, for the learning curve: during the KL warm-up not the
        ELBO itself."""
        if self.config.warmup == 0:
            return "ELBO"
        return "ELBO (its KL weighted by the warm-up's factor, under 1 at first)"

    @property
    def kl_weight(self) -> float:
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"kl_weight must lie in (0, 1], got {value}")
        self._kl_weight = float(value)

    def _beta(self) -> float:
        return self.kl_weight if torch.is_grad_enabled() else 1.0

    # ------------------------------------------------------------------ model and guide

    def model(self, x: Optional[torch.Tensor] = None, num_samples: Optional[int] = None):
        pyro.module(self._pyro_name, self)
        num_data = self._check(x) if x is not None else int(num_samples)
        device = self.decoder[0].weight.device
        top = dist.Normal(torch.zeros(self.config.z_dims[-1], device=device), 1.0).to_event(1)
        with pyro.plate("data", num_data):
            with poutine.scale(scale=self._beta()):
                z = pyro.sample(f"z{self.num_layers}", top)
                for layer in reversed(range(self.num_layers - 1)):
                    loc, scale = self.down[layer](z)
                    z = pyro.sample(f"z{layer + 1}", dist.Normal(loc, scale).to_event(1))
            return pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_samples: Optional[int] = None):
        pyro.module(self._pyro_name, self)
        num_data = self._check(x)
        estimates = self._bottom_up(x)
        with pyro.plate("data", num_data):
            with poutine.scale(scale=self._beta()):
                loc, scale = estimates[-1]
                z = pyro.sample(f"z{self.num_layers}", dist.Normal(loc, scale).to_event(1))
                for layer in reversed(range(self.num_layers - 1)):
                    loc, scale = precision_weighted(estimates[layer], self.down[layer](z))
                    z = pyro.sample(f"z{layer + 1}", dist.Normal(loc, scale).to_event(1))

    def _bottom_up(self, x) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        estimates, d = [], x
        for up, head in zip(self.up, self.up_heads):
            d = up(d)
            estimates.append(head(d))  # (mu_hat, sigma_hat) of this layer, (N, Z_l) each
        return estimates

    # ------------------------------------------------------------------------ helpers

    def warmup(self, epochs: int) -> Callable[[int], None]:
        """A ``schedule`` for the drivers: kl_weight = min(1, (epoch + 1) / epochs)."""
        if epochs < 0:
            raise ValueError(f"warm-up epochs must be non-negative, got {epochs}")

        def schedule(epoch: int) -> None:
            self.kl_weight = 1.0 if epochs == 0 else min(1.0, (epoch + 1) / epochs)

        return schedule

    def fit_options(self, num_epochs: int) -> dict:
        """The training loop's KL warm-up: over ``config.warmup`` epochs, by default a fifth of
        the fit's (the model surface)."""
        epochs = self.config.warmup
        if epochs == 0:  # no warm-up: kl_weight stays 1 (and a compiled bound is allowed)
            return {}
        return {"schedule": self.warmup(max(1, num_epochs // 5) if epochs is None else epochs)}

    @classmethod
    def from_data(cls, options: dict, info) -> dict:
        if not info.binary:
            raise ValueError("the ladder VAE has a Bernoulli decoder: binarize the data")
        return options

    @torch.no_grad()
    def metrics(self, splits, num_samples=None, progress=False) -> dict:
        """Active units per layer on (up to 5000) held-out rows, beside each layer's size."""
        x = (splits["test"] if "test" in splits else splits["train"])[0][:5000]
        units = self.active_units_per_layer(x)
        return {
            "active_units": {f"z{i + 1}": n for i, n in enumerate(units)},
            "latent_units": {f"z{i + 1}": n for i, n in enumerate(self.config.z_dims)},
        }

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Samples layer by layer (square images), and the active units per layer."""
        from zoo import plots  # matplotlib only when figures are drawn

        x = (splits["test"] if "test" in splits else splits["train"])[0][:5000]
        units = self.active_units_per_layer(x)
        out = {"active_units.png": plots.active_units(units, self.config.z_dims)}
        side = int(round(self.config.x_dim**0.5))
        if side * side == self.config.x_dim:
            rows = [self.sample(10, random_layers=k) for k in range(1, self.num_layers + 1)]
            title = "the top k layers drawn at random, the layers below at their means"
            labels = [f"k = {k}" for k in range(1, self.num_layers + 1)]
            out["layer_samples.png"] = plots.image_grid(
                torch.cat(rows), num_cols=10, title=title, row_labels=labels
            )
        return out

    @torch.no_grad()
    def sample(self, num_samples: int, random_layers: Optional[int] = None) -> torch.Tensor:
        """Decoder means (pixel probabilities), (S, X).

        random_layers: how many layers from the top are drawn at random; the layers below take
        their conditional means. The default (all) is ancestral sampling; 1 shows what the top
        layer alone decides.
        """
        count = self.num_layers if random_layers is None else random_layers
        if not 1 <= count <= self.num_layers:
            raise ValueError(f"random_layers must be 1 to {self.num_layers}, got {count}")
        device = self.decoder[0].weight.device
        z = torch.randn(num_samples, self.config.z_dims[-1], device=device)
        for depth, layer in enumerate(reversed(range(self.num_layers - 1)), start=2):
            loc, scale = self.down[layer](z)
            z = loc + scale * torch.randn_like(loc) if depth <= count else loc
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor, num_samples: int = 10) -> List[torch.Tensor]:
        """E_q[z_l | x] per layer, bottom to top, (N, Z_l) each, averaged over guide draws."""
        self._check(x)
        totals = [0.0] * self.num_layers
        for _ in range(num_samples):
            trace = poutine.trace(self.guide).get_trace(x)
            for layer in range(self.num_layers):
                totals[layer] = totals[layer] + trace.nodes[f"z{layer + 1}"]["fn"].mean
        return [t / num_samples for t in totals]

    @torch.no_grad()
    def active_units_per_layer(
        self, x: torch.Tensor, threshold: float = 0.01, num_samples: int = 10
    ) -> List[int]:
        """Units per layer (bottom to top) with Var_x(E_q[u | x]) > threshold."""
        means = self.posterior_means(x, num_samples)
        return [int((m.var(0) > threshold).sum()) for m in means]

    def _check(self, x) -> int:
        return check_rows(x, self.config.x_dim)


def precision_weighted(estimate, prior):
    """Combine two Gaussians (loc, scale) by adding precisions: the ladder VAE's merge."""
    (mu_hat, sigma_hat), (mu_p, sigma_p) = estimate, prior
    precision_hat, precision_p = sigma_hat.pow(-2), sigma_p.pow(-2)
    variance = 1.0 / (precision_hat + precision_p)
    return (mu_hat * precision_hat + mu_p * precision_p) * variance, variance.sqrt()
