"""
VQ-VAE (van den Oord, Vinyals and Kavukcuoglu 2017) and its autoregressive prior over codes.

An image x (a square of side s, s a multiple of 4) is encoded to a grid of H x W = s/4 x s/4
vectors, each snapped to the nearest of K codebook vectors e_1..e_K; the decoder sees only the
codes. 28x28 MNIST gives a 7x7 grid, sklearn's 8x8 digits a 2x2 one (four codes)::

    codes[n] ~ Categorical(1/K) at every one of the H x W positions     codes: (N, H, W)
    z[n]      = e[codes[n]]                       (a Delta site)       z: (N, D, H, W)
    x[n]     ~ Bernoulli(logits=decoder(z[n]))                         x: (N, s*s), binary
    guide:  codes[n] = argmin_k |z_e[n, :, h, w] - e_k|, z_e = encoder(x[n])   (deterministic)

The guide is a point mass, so its entropy is zero and the ELBO is a bound in nats::

    log p(x) >= log p(x | z_q(x)) + log p(codes(x)),

with log p(codes) = -H W log K under the uniform prior of stage 1. Stage 2 fits a masked-
convolution PixelCNN (``CodePrior``, van den Oord et al. 2016) to the codes of the training
images by maximum likelihood; the same bound with the learned prior is far tighter, because
the deterministic posterior pays the full code length and the learned prior shortens it.

Training signals, all as Pyro sees them:

- the straight-through estimator: the guide's z site holds sg(z_q) + (z_e - sg(z_e)), equal to
  z_q in value (bit for bit: z_e - z_e is 0) and to z_e in gradient, so the reconstruction's
  gradient reaches the encoder as if quantization were the identity;
- the commitment term ``beta |z_e - sg(z_q)|^2`` (and with ``codebook="loss"`` the codebook term
  ``|sg(z_e) - z_q|^2``), summed over positions per image, as a ``pyro.factor`` in the guide whose
  value is 0 and whose gradient is the penalty's (``p - sg(p)``): every driver differentiates
  it as a guide factor, and every number reported (objective, ELBO, bound) stays the bound;
- ``codebook="ema"`` (the paper's appendix, the default): codebook vectors are moving averages
  of the encoder outputs assigned to them (decay ``decay``, Laplace-smoothed counts), updated
  in the guide during training steps only (gradients on and ``self.training``: the drivers run
  their probes and validations without gradients), before the codes are looked up, as Sonnet's
  VectorQuantizerEMA does. The averages are parameters that take no gradient, so checkpoints,
  early stopping and run directories keep them;
- ``restart=True``: a code whose moving-average use falls below ``dead_below`` assignments per
  step is moved onto a random encoder output of the batch (Dhariwal et al. 2020, Jukebox). At
  the first step every code is dead, which starts the codebook on encoder outputs.

Two further stages follow the rule for state: in-place updates belong to training steps, and a
compiled objective (``jit=``) is refused while they are on (it would freeze them).

References: van den Oord, Vinyals, Kavukcuoglu (2017), Neural Discrete Representation Learning;
van den Oord, Kalchbrenner, Kavukcuoglu (2016), Pixel Recurrent Neural Networks.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from zoo.models.nets import check_number, check_rows, check_sizes
from zoo.registry import Stage, register

_CODEBOOKS = ("ema", "loss")


@dataclass
class VQVAEConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    num_codes: int = field(default=64, metadata={"help": "codebook size K"})
    code_dim: int = field(default=16, metadata={"help": "length D of a codebook vector"})
    channels: int = field(default=64, metadata={"help": "width of the conv encoder and decoder"})
    beta: float = field(default=0.25, metadata={"help": "weight of the commitment term"})
    codebook: str = field(
        default="ema",
        metadata={
            "help": "codebook update: moving averages or the codebook loss",
            "choices": _CODEBOOKS,
        },
    )
    decay: float = field(
        default=0.99,
        metadata={"help": "decay of the moving averages", "applies_with": {"codebook": "ema"}},
    )
    restart: bool = field(default=True, metadata={"help": "restart dead codes"})
    dead_below: float = field(
        default=0.03, metadata={"help": "a code used fewer times per step (on average) is dead"}
    )
    likelihood: str = field(default="bernoulli", metadata={"data": "likelihood"})
    prior_channels: int = field(default=64, metadata={"help": "width of the PixelCNN prior"})
    prior_layers: int = field(default=4, metadata={"help": "masked 3x3 layers of the prior"})


@register(
    "vqvae",
    description="VQ-VAE (discrete code grid, straight-through) with a learned PixelCNN prior",
    drivers={"reparam": {"analytic_kl": False}, "svi": {"loss": "Trace_ELBO"}},
    default_data="mnist",
    default_binarize="static",
    # the 8x8 digits: MNIST's rate and batch leave every input the same codes in a few epochs
    # (tests/test_digits_defaults.py)
    data_defaults={"digits": {"batch_size": 16, "lr": 3e-3, "binarize": "threshold"}},
    config=VQVAEConfig,
)
class VQVAE(nn.Module):
    """``.model`` and ``.guide`` (stage 1) and ``.prior.model`` / ``.prior.guide`` (stage 2,
    on ``.codes(x)``) go to the SVI or the reparameterized-ELBO driver."""

    def __init__(self, config: Optional[VQVAEConfig] = None, name: str = "vqvae", **kwargs):
        super().__init__()
        config = config or VQVAEConfig(**kwargs)
        check_sizes(config, "x_dim", "num_codes", "code_dim", "channels")
        check_sizes(config, "prior_channels", "prior_layers")
        if config.num_codes < 2:
            raise ValueError(
                f"num_codes must be at least 2 (a code carries log K nats), got {config.num_codes}"
            )
        if config.codebook not in _CODEBOOKS:
            raise ValueError(f"codebook must be one of {_CODEBOOKS}, not {config.codebook!r}")
        if config.likelihood != "bernoulli":
            raise ValueError(
                "the VQ-VAE's decoder is Bernoulli: it needs binary data (pass --binarize"
                " static for MNIST or digits), got likelihood="
                f"{config.likelihood!r}"
            )
        check_number(config, "beta", 0.0)
        check_number(config, "dead_below", 0.0)
        check_number(config, "decay", 0.0)
        if not config.decay < 1:
            raise ValueError(f"decay must be below 1, got {config.decay}")
        side = math.isqrt(config.x_dim)
        if side * side != config.x_dim or side % 4:
            raise ValueError(
                f"x_dim={config.x_dim}: the VQ-VAE's convolutions need square images whose side"
                " is a multiple of 4 (8x8 digits: a 2x2 code grid; 28x28 MNIST: 7x7)"
            )
        self.config, self.side, self.grid = config, side, (side // 4, side // 4)
        c, d, k = config.channels, config.code_dim, config.num_codes
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c, c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c, d, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, c, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, 1, 4, 2, 1),
        )  # fmt: skip
        self.quantizer = Quantizer(k, d)
        self.prior = CodePrior(k, self.grid, config.prior_channels, config.prior_layers,
                               name=f"{name}_prior")  # fmt: skip
        self.usage: List[dict] = []  # per training step: perplexity, dead codes (this process)
        self._pyro_name = name

    # ------------------------------------------------------------------ the Pyro programs

    def _register(self) -> None:
        """Stage 1's networks in Pyro's param store (the prior is stage 2's, under its own name)."""
        for part in ("encoder", "decoder", "quantizer"):
            pyro.module(f"{self._pyro_name}.{part}", getattr(self, part))

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook

    def model(self, x: Optional[torch.Tensor] = None, num_samples: Optional[int] = None):
        self._register()
        num = self._check(x) if x is not None else int(num_samples)
        device = self.codebook.device
        uniform = torch.zeros(*self.grid, self.config.num_codes, device=device)
        with pyro.plate("data", num):
            codes = pyro.sample("codes", dist.Categorical(logits=uniform).to_event(2))
            z = pyro.sample("z", dist.Delta(self.embed(codes), event_dim=3))
            logits = self.decoder(z).flatten(1)  # (N, X)
            return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_samples: Optional[int] = None):
        self._register()
        num = self._check(x)
        z_e = self.encoder(self._image(x))  # (N, D, H, W)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.config.code_dim)  # (N H W, D)
        codes = self.nearest(flat)
        if torch.is_grad_enabled() and self.training:
            self._train_codebook(flat.detach(), codes)
        codebook = self.codebook if self.config.codebook == "loss" else self.codebook.detach()
        z_q = codebook[codes].reshape(num, *self.grid, -1).permute(0, 3, 1, 2)  # (N, D, H, W)
        penalty = self.config.beta * (z_e - z_q.detach()).pow(2).flatten(1).sum(-1)
        if self.config.codebook == "loss":
            penalty = penalty + (z_e.detach() - z_q).pow(2).flatten(1).sum(-1)
        with pyro.plate("data", num):
            pyro.sample("codes", dist.Delta(codes.reshape(num, *self.grid).float(), event_dim=2))
            pyro.sample("z", dist.Delta(straight_through(z_e, z_q), event_dim=3))
            # zero in value, the penalty's gradient: every reported number is the bound
            pyro.factor("vq_penalty", penalty - penalty.detach(), has_rsample=True)

    # ------------------------------------------------------------------ quantization

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """The index of the nearest codebook vector of each row of ``flat`` (M, D) -> (M,)."""
        e = self.codebook.detach()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)
        return dist2.argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of a code grid, (N, H, W) -> (N, D, H, W)."""
        return self.codebook.detach()[codes.long()].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _train_codebook(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """One training step's moving averages, codebook update and dead-code restarts."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            raise ValueError(
                "the VQ-VAE updates its codebook averages in place during training, which a"
                " compiled objective would freeze: leave jit off (or fit with model.eval(),"
                " which turns the updates off)"
            )
        cfg, k = self.config, self.config.num_codes
        q = self.quantizer
        counts = torch.bincount(codes, minlength=k).to(flat.dtype)  # (K,)
        sums = torch.zeros_like(q.ema_sum).index_add_(0, codes, flat)  # (K, D)
        q.ema_count.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        q.ema_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        if cfg.codebook == "ema":
            total = q.ema_count.sum()
            smoothed = (q.ema_count + 1e-5) / (total + k * 1e-5) * total  # Laplace
            used = q.ema_count > 0
            q.codebook[used] = q.ema_sum[used] / smoothed[used, None]
        dead = q.ema_count < cfg.dead_below
        restarted = int(dead.sum()) if cfg.restart else 0
        if restarted:
            rows = torch.randint(len(flat), (restarted,), device=flat.device)
            # twice the threshold: unused, it is dead again after about 70 steps (decay 0.99)
            count = 2 * cfg.dead_below
            q.codebook[dead] = flat[rows]
            q.ema_count[dead] = count
            q.ema_sum[dead] = count * flat[rows]
        self.usage.append(
            {"perplexity": _perplexity(counts), "dead": int(dead.sum()), "restarted": restarted}
        )

    # ------------------------------------------------------------------ stage 2

    def stages(self) -> List[Stage]:
        """Stage 2: the PixelCNN prior, by maximum likelihood on the training images' codes."""
        return [
            Stage("prior", self.prior.model, self.prior.guide, lambda args: self.codes(args[0]))
        ]

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code grid of each image, (N, X) -> (N, H, W) integers."""
        self._check(x)
        out = []
        for chunk in x.split(4096):
            z_e = self.encoder(self._image(chunk)).permute(0, 2, 3, 1)
            out.append(self.nearest(z_e.reshape(-1, self.config.code_dim)))
        return torch.cat(out).reshape(len(x), *self.grid)

    # ------------------------------------------------------------------ scores and uses

    @torch.no_grad()
    def bound_terms(self, x: torch.Tensor, prior: str = "learned") -> dict:
        """Per image, in nats: the reconstruction term log p(x | z_q(x)), the code term
        log p(codes(x)) under the uniform or the learned prior, and their sum, the bound on
        log p(x)."""
        codes = self.codes(x)
        recon = torch.cat(
            [self._log_lik(xc, cc) for xc, cc in zip(x.split(4096), codes.split(4096))]
        )
        code_term = self.code_log_prob(codes, prior)
        return {"reconstruction": recon, "codes": code_term, "bound": recon + code_term}

    @torch.no_grad()
    def code_log_prob(self, codes: torch.Tensor, prior: str = "learned") -> torch.Tensor:
        """log p(codes) per grid, (N, H, W) -> (N,): the uniform -H W log K, or the PixelCNN's."""
        if prior == "uniform":
            num = codes.shape[1] * codes.shape[2]
            return torch.full((len(codes),), -num * math.log(self.config.num_codes),
                              device=codes.device)  # fmt: skip
        if prior != "learned":
            raise ValueError(f"prior must be 'learned' or 'uniform', not {prior!r}")
        self._check_prior()
        return torch.cat([self.prior.log_prob(chunk) for chunk in codes.split(4096)])

    def elbo(self, x: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """The bound per image with the learned prior (the uniform one before stage 2), (N,)."""
        return self.bound_terms(x, "learned" if self.prior_fitted else "uniform")["bound"]

    @property
    def prior_fitted(self) -> bool:
        return bool(self.prior.steps.item() > 0)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of code grids, (N, H, W) -> (N, X)."""
        return torch.sigmoid(self.decoder(self.embed(codes)).flatten(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode each image's own codes, (N, X) -> (N, X) pixel probabilities."""
        return self.decode(self.codes(x))

    @torch.no_grad()
    def sample(self, num_samples: int, prior: Optional[str] = None) -> torch.Tensor:
        """Images (pixel probabilities) from code grids drawn from the learned PixelCNN prior,
        or with ``prior="uniform"`` from independent uniform codes (the program's own prior,
        what stage 1 assumes), (S, X). The default: the learned prior once it is fitted."""
        device = self.codebook.device
        if prior is None:
            prior = "learned" if self.prior_fitted else "uniform"
        if prior == "uniform":
            codes = torch.randint(self.config.num_codes, (num_samples, *self.grid), device=device)
        elif prior == "learned":
            self._check_prior()
            codes = self.prior.sample(num_samples)
        else:
            raise ValueError(f"prior must be 'learned' or 'uniform', not {prior!r}")
        return self.decode(codes)

    @torch.no_grad()
    def codebook_usage(self, x: torch.Tensor) -> dict:
        """Perplexity of the code histogram over the images ``x`` (K when every code is used
        equally, 1 when one code takes all) and the number of codes never used."""
        counts = torch.bincount(self.codes(x).flatten(), minlength=self.config.num_codes)
        return {"perplexity": _perplexity(counts), "unused_codes": int((counts == 0).sum())}

    @torch.no_grad()
    def metrics(self, splits, num_samples=None, progress=False) -> dict:
        """The bound with the uniform and the learned prior, its two terms, the reconstructions'
        pixel error rate and the codebook's use, on the held-out split (the training split if
        there is none), in nats per image."""
        x = (splits["test"] if "test" in splits else splits["train"])[0]
        x = x.to(self.codebook.device)
        which = "test" if "test" in splits else "train"
        uniform = self.bound_terms(x, "uniform")
        out = {
            f"{which}_elbo": uniform["bound"].mean().item(),
            f"{which}_reconstruction_nll": -uniform["reconstruction"].mean().item(),
            f"{which}_code_nats_uniform": -uniform["codes"].mean().item(),
            f"{which}_bound_uniform_prior": uniform["bound"].mean().item(),
            f"{which}_pixel_error": (self.reconstruct(x).round() != x).float().mean().item(),
            "codebook": self.codebook_usage(x),
        }
        if self.prior_fitted:
            learned = self.code_log_prob(self.codes(x), "learned")
            bound = uniform["reconstruction"] + learned
            out.update({
                f"{which}_elbo": bound.mean().item(),
                f"{which}_code_nats_learned": -learned.mean().item(),
                f"{which}_bound_learned_prior": bound.mean().item(),
            })  # fmt: skip
        return out

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Reconstructions beside inputs, samples from the uniform and the learned prior, the
        code maps of a few images, and the codebook's use over training steps."""
        from zoo import plots  # matplotlib only when figures are drawn

        x = (splits["test"] if "test" in splits else splits["train"])[0].to(self.codebook.device)
        pairs = torch.cat([x[:10], self.reconstruct(x[:10])])
        out = {
            "reconstructions.png": plots.image_grid(
                pairs, num_cols=10, title="reconstructions from the codes",
                row_labels=("input", "from its codes"),
            ),
            "samples_uniform.png": plots.image_grid(
                self.sample(32, prior="uniform"), num_cols=8,
                title="codes drawn independently and uniformly (stage 1's prior)",
            ),
            "code_maps.png": plots.code_maps(x[:6], self.codes(x[:6]), self.config.num_codes),
        }  # fmt: skip
        if self.prior_fitted:
            out["samples_learned.png"] = plots.image_grid(
                self.sample(32, prior="learned"),
                num_cols=8,
                title="codes drawn from the learned PixelCNN prior",
            )
        if self.usage:
            out["codebook_usage.png"] = plots.codebook_usage(self.usage, self.config.num_codes)
        return out

    # ------------------------------------------------------------------ helpers

    def _log_lik(self, x, codes) -> torch.Tensor:
        logits = self.decoder(self.embed(codes)).flatten(1)
        return dist.Bernoulli(logits=logits).to_event(1).log_prob(x)

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), 1, self.side, self.side)

    def _check(self, x) -> int:
        num = check_rows(x, self.config.x_dim)
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(
                "the VQ-VAE's decoder is Bernoulli and these pixels are not all 0 or 1: binarize"
                " the data first (data.binarize(x, 'static'); --binarize static)"
            )
        return num

    def _check_prior(self) -> None:
        if not self.prior_fitted:
            raise ValueError(
                "the PixelCNN prior is not fitted yet: fit vq.prior.model / vq.prior.guide on"
                " vq.codes(x) (stage 2; zoo fit vqvae does it), or ask for prior='uniform'"
            )


def _perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: K when every code is used equally, 1 for one code."""
    p = counts.float() / counts.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_q in value, bit for bit (z_e - z_e is exactly 0), and the identity in gradient with
    respect to z_e: what the decoder's gradient sees as if quantization were not there. No
    gradient reaches z_q (the codebook learns from its own term or its averages)."""
    return z_q.detach() + (z_e - z_e.detach())


class Quantizer(nn.Module):
    """The codebook (K, D) and its moving averages: parameters, so that checkpoints and early
    stopping keep them; with ``codebook="ema"`` none of them is ever in a loss (no gradient)."""

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim) / math.sqrt(code_dim))
        self.ema_count = nn.Parameter(torch.zeros(num_codes))  # assignments per step
        self.ema_sum = nn.Parameter(torch.zeros(num_codes, code_dim))  # their encoder outputs


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the positions before the centre in raster order (type
    "A", for the first layer) or those and the centre (type "B", the layers after it)."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :, centre, centre + (kind == "B") :] = 0
        mask[:, :, centre + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class CodePrior(nn.Module):
    """An autoregressive prior over code grids: a PixelCNN of masked convolutions,

        p(codes) = prod_{i in raster order} Categorical(codes[i] | logits_i(codes[< i])),

    with codes observed, so fitting it is maximum likelihood (its guide is empty). The grid
    (H, W) and the codebook size K come from the VQ-VAE."""

    def __init__(self, num_codes: int, grid, channels: int = 64, layers: int = 4,
                 name: str = "vqvae_prior"):  # fmt: skip
        super().__init__()
        self.num_codes, self.grid = num_codes, tuple(grid)
        self.embedding = nn.Embedding(num_codes, channels)
        self.first = MaskedConv2d("A", channels, channels, 5)
        self.layers = nn.ModuleList(MaskedConv2d("B", channels, channels, 3) for _ in range(layers))
        self.out = nn.Conv2d(channels, num_codes, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps seen
        self._pyro_name = name

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, H, W) codes -> (N, H, W, K) logits of each position given those before it."""
        h = self.first(self.embedding(codes.long()).permute(0, 3, 1, 2))
        for layer in self.layers:
            h = h + layer(torch.relu(h))
        return self.out(torch.relu(h)).permute(0, 2, 3, 1)

    def model(self, codes: torch.Tensor):
        pyro.module(self._pyro_name, self)
        num = self._check(codes)
        if torch.is_grad_enabled() and self.training:
            self.steps.add_(1)
        with pyro.plate("data", num):
            pyro.sample("codes", dist.Categorical(logits=self.logits(codes)).to_event(2),
                        obs=codes)  # fmt: skip

    def guide(self, codes: torch.Tensor):
        """Nothing is latent: the codes are data."""
        self._check(codes)

    @torch.no_grad()
    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(codes) per grid, (N, H, W) -> (N,)."""
        self._check(codes)
        return dist.Categorical(logits=self.logits(codes)).log_prob(codes.long()).sum((-1, -2))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Code grids in raster order, one position per pass, (S, H, W) integers."""
        device = self.out.weight.device
        codes = torch.zeros(num_samples, *self.grid, dtype=torch.long, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                codes[:, i, j] = dist.Categorical(logits=self.logits(codes)[:, i, j]).sample()
        return codes

    def _check(self, codes) -> int:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point:
            raise TypeError(
                f"codes must be an integer tensor, got {getattr(codes, 'dtype', codes)}"
            )
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(
                f"codes must have shape (N, {self.grid[0]}, {self.grid[1]}) (the VQ-VAE's grid),"
                f" got {tuple(codes.shape)}"
            )
        if len(codes) and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"codes must lie in [0, {self.num_codes}), got {int(codes.min())} to"
                f" {int(codes.max())}"
            )
        return codes.shape[0]
