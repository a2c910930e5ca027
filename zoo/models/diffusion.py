"""
A diffusion model seen as a deep hierarchical VAE: the variational diffusion model in discrete
time (Ho, Jain and Abbeel 2020; Kingma, Salimans, Poole and Ho 2021, "Variational Diffusion
Models"), for binary images or images of L grey levels.

Latents z_0, ..., z_T (each (N, D), the data's shape); x is the image, x' = 2 x - 1 in {-1, 1}.
A noise schedule gives every level t a log signal-to-noise ratio -gamma_t, increasing in t:
alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t) (variance preserving).

Generative model (top-down, as the ladder VAE)::

    z_T ~ Normal(0, I)
    z_{t-1} ~ Normal(mu(z_t, t), sigma^2_{t-1} c_t I),   t = T, ..., 1
        mu = alpha_{t-1} ((1 - c_t) z_t / alpha_t + c_t x_hat(z_t, t)),
        c_t = -expm1(gamma_{t-1} - gamma_t)
    x ~ Bernoulli(logits = 2 alpha_0 z_0 / sigma_0^2)    (per pixel; the posterior of x' given z_0)
      or, for grey levels v_k = 2 k / (L - 1) - 1 (``likelihood="grey"``), the categorical
      p(v_k | z_0) proportional to exp(-(z_0 - alpha_0 v_k)^2 / (2 sigma_0^2)): VDM's discretized
      Gaussian, again q's posterior of x' under a uniform prior on the levels

The "encoder" is fixed, the forward noising process, and needs no network::

    q(z_t | x) = Normal(alpha_t x', sigma_t^2 I)          every level in closed form
    q(z_{t-1} | z_t, x) = Normal(alpha_{t-1} ((1 - c_t) z_t / alpha_t + c_t x'),
                                 sigma^2_{t-1} c_t I)

The reverse model is the forward posterior with x' replaced by the denoiser's guess x_hat of
E[x' | z_t], so the ELBO is a sum of closed-form KL terms::

    ELBO = E_q[log p(x | z_0)] - KL(q(z_T | x) || N(0, I)) - sum_t L_t,
    L_t = E_q(z_t|x) KL(q(z_{t-1} | z_t, x) || p(z_{t-1} | z_t))
        = 1/2 (SNR_{t-1} - SNR_t) E||x' - x_hat||^2

with SNR_t = exp(-gamma_t): a weighted denoising loss. Written with the implied noise guess
eps_hat = (z_t - alpha_t x_hat) / sigma_t it is (SNR_{t-1} / SNR_t - 1) / 2 E||eps - eps_hat||^2,
the eps-prediction loss of Ho et al., itself a weighted denoising score-matching loss, since
-eps_hat / sigma_t estimates the score of q(z_t). For binary pixels the denoiser is written in
log-odds: x_hat = tanh((2 alpha_t z_t / sigma_t^2 + network(z_t, t)) / 2), where the first term
is exactly E[x' | z_t] for independent uniform pixels; an untrained network thus starts at that
model's 64 log 2 nats (8x8 images), and near t = 0, where SNR_{t-1} - SNR_t is huge, the guess is
sharp by construction. Grey pixels the same way: x_hat is the mean over the L levels v_k with
weights q(z_t | v_k) exp(v_k r / 2), r the network's output (for L = 2 this is the binary form).

Two Pyro programs express it, by ``DiffusionConfig.timesteps``:

- ``timesteps=None``: the chain. The model is the generative process above (sites ``z{T}`` ...
  ``z0``, then ``x``), the guide the forward process in the same order (q(z_T | x), then
  q(z_{t-1} | z_t, x)); with ``TraceMeanField_ELBO`` every KL is analytic. T network calls per
  image per step.
- ``timesteps=k`` (default 1): the sampled-timestep estimator. Each ELBO term needs only the
  pair (z_t, z_{t-1}), so a subsampled plate ``pyro.plate("time", T, subsample_size=k)`` draws k
  levels per training step (shared by the minibatch's images: a plate draws one subsample) and
  Pyro scales their terms by T / k: an unbiased estimate of the same sum.
  Inside it, the site ``zt`` holds the pair's draw of z_t from q(z_t | x) in the guide and, by
  the same distribution, in the model, so its two log densities cancel exactly; ``zs`` is the
  term L_t. ``zT`` and ``z0`` carry the prior and reconstruction terms likewise. This program
  is an estimator of the chain's ELBO (same expectation, tests/test_diffusion.py), not a second
  generative story: ``sample`` draws from the chain.

The network: an MLP on the flat image for small images, or a small U-Net (two
down- and up-sampling levels with skips) for square images of side divisible by 4, both with a
sinusoidal time embedding. Schedules, all from gamma = -13.3 at t = 0 to 5 at t = T: "cosine"
(Nichol and Dhariwal 2021: alpha_t^2 = cos^2 of an evenly spaced angle), "linear" in gamma
(VDM's fixed schedule), or "learned": a monotone table (softplus
increments, endpoints learned), trained by the same ELBO (VDM's learned schedule, discretized).

Held-out score: the ELBO in nats per image (``elbo``; with ``num_samples`` levels per image
drawn stratified, an unbiased estimate with its standard error), and in bits per dimension.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence

from zoo.models.nets import check_rows, check_sizes, mlp
from zoo.registry import register

SCHEDULES = ("cosine", "linear", "learned")
LIKELIHOODS = ("bernoulli", "grey")
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # VDM's endpoints: log SNR from 13.3 down to -5


@dataclass
class DiffusionConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    steps: int = field(default=1000, metadata={"help": "T, the levels of the hierarchy"})
    schedule: str = field(
        default="cosine", metadata={"choices": SCHEDULES, "help": "the noise schedule"}
    )
    # levels drawn per training step, shared by the minibatch (None: the whole chain, T calls)
    timesteps: Optional[int] = field(
        default=1, metadata={"help": "levels sampled per step (unset: the whole chain)"}
    )
    network: str = field(
        default="auto",
        metadata={"choices": ("auto", "mlp", "unet"), "help": "the denoiser (auto: by size)"},
    )
    hidden: Tuple[int, ...] = field(default=(512, 512), metadata={"help": "the MLP's widths"})
    channels: Tuple[int, ...] = field(
        default=(32, 64), metadata={"help": "the U-Net's channels at full and half size"}
    )
    time_dim: int = field(default=64, metadata={"help": "size of the time embedding"})
    # p(x | z_0): "bernoulli" for binary pixels; "grey" for pixels on `levels` grey levels
    # k / (levels - 1) (a categorical over the levels, the discretized Gaussian of VDM)
    likelihood: str = field(
        default="bernoulli", metadata={"choices": LIKELIHOODS, "help": "binary or grey pixels"}
    )
    levels: int = field(
        default=256,
        metadata={"help": "grey levels", "applies_with": {"likelihood": "grey"}},
    )


@register(
    "diffusion",
    description="diffusion model as a deep hierarchical VAE (variational diffusion, binary images)",
    drivers={"reparam": {}, "svi": {"loss": "TraceMeanField_ELBO"}},
    default_data="mnist",
    default_binarize="dynamic",
    config=DiffusionConfig,
    comparison={
        "data": ("digits", "mnist"),
        # the whole chain takes T network calls per step: a shallower hierarchy for the table
        "options": {"digits": {"steps": 100}, "mnist": {"steps": 100}},
        "gradient_variance": True,  # one sampled level against every level, same parameters
        "methods": {
            "sampled": {
                "driver": "reparam",
                "description": "one level per step (its term scaled by T)",
            },
            "all-levels": {
                "driver": "reparam",
                "options": {"timesteps": None},
                "description": "the whole chain: every level, every step",
            },
        },
    },
)
class Diffusion(nn.Module):
    """``.model(x)`` and ``.guide(x)`` for the reparameterized driver or SVI; x binary (N, D)."""

    def __init__(self, config: Optional[DiffusionConfig] = None, name: str = "diffusion", **kw):
        super().__init__()
        config = config or DiffusionConfig(**kw)
        config.hidden = tuple(config.hidden)
        config.channels = tuple(config.channels)
        check_sizes(config, "x_dim", "steps", "hidden", "channels", "time_dim")
        if len(config.channels) != 2:
            raise ValueError(f"channels must be two sizes (full, half size), got {config.channels}")
        if config.timesteps is not None:
            check_sizes(config, "timesteps")
            if config.timesteps > config.steps:
                raise ValueError(
                    f"timesteps ({config.timesteps}) cannot exceed steps ({config.steps})"
                )
        if config.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {config.likelihood!r}")
        if config.likelihood == "grey" and not (
            isinstance(config.levels, int) and config.levels >= 2
        ):
            raise ValueError(f"levels must be an integer of at least 2, got {config.levels!r}")
        if config.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {config.schedule!r}")
        self.config = config
        self.network = _network(config)
        if config.schedule == "learned":  # a monotone table: endpoints and softplus increments
            self.gamma_ends = nn.Parameter(torch.tensor([GAMMA_MIN, GAMMA_MAX]))
            self.gamma_steps = nn.Parameter(torch.zeros(config.steps))
        else:
            self.register_buffer("_gamma", fixed_gamma(config.schedule, config.steps), False)
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.models.vae)

    # ------------------------------------------------------------------ the schedule

    def gamma(self) -> torch.Tensor:
        """gamma_t = -log SNR_t for t = 0 .. T, increasing, (T + 1,)."""
        if self.config.schedule != "learned":
            return self._gamma
        low, high = self.gamma_ends[0], self.gamma_ends[1]
        steps = nn.functional.softplus(self.gamma_steps)
        shape = torch.cat([steps.new_zeros(1), steps.cumsum(0) / steps.sum()])
        return low + (high - low) * shape

    def marginal(self, x, t):
        """q(z_t | x) = Normal(alpha_t x', sigma_t^2): (loc, scale), t an integer tensor."""
        g = self.gamma()[t].unsqueeze(-1)
        loc = torch.sigmoid(-g).sqrt() * (2 * x - 1)
        return loc, torch.sigmoid(g).sqrt().expand_as(loc)

    def posterior(self, z_t, x_signed, t, s=None):
        """q(z_s | z_t, x) for s < t (default t - 1), x' given: (loc, scale)."""
        s = t - 1 if s is None else s
        gamma = self.gamma()
        g_t, g_s = gamma[t].unsqueeze(-1), gamma[s].unsqueeze(-1)
        c = -torch.expm1(g_s - g_t)  # sigma^2_{t|s} / sigma_t^2, in (0, 1]
        alpha_t, alpha_s = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(-g_s).sqrt()
        loc = alpha_s * ((1 - c) * z_t / alpha_t + c * x_signed)
        return loc, (torch.sigmoid(g_s) * c).sqrt().expand_as(loc)

    def denoise(self, z_t, t) -> torch.Tensor:
        """x_hat(z_t, t), the denoiser's guess of E[x' | z_t]: the mean of x' over its values
        v (-1 and 1, or the grey levels) with weights q(z_t | v) exp(v r / 2), r the network's
        output per pixel. With r = 0 that is exactly E[x' | z_t] for independent uniform
        pixels; r tilts each pixel by what the others say. For binary pixels it is
        tanh((2 alpha_t z_t / sigma_t^2 + r) / 2)."""
        g = self.gamma()[t].unsqueeze(-1)
        alpha, variance = torch.sigmoid(-g).sqrt(), torch.sigmoid(g)
        out = self.network(z_t, t.float() / self.config.steps)
        if self.config.likelihood == "bernoulli":
            return torch.tanh((2 * alpha * z_t / variance + out) / 2)
        values = torch.linspace(-1, 1, self.config.levels, device=z_t.device, dtype=z_t.dtype)
        logits = -(z_t.unsqueeze(-1) - alpha.unsqueeze(-1) * values).pow(2)
        logits = logits / (2 * variance.unsqueeze(-1)) + values * out.unsqueeze(-1) / 2
        return torch.softmax(logits, -1) @ values  # (..., N, D)

    def likelihood(self, z_0):
        """p(x | z_0): per pixel the posterior of x' given z_0 under q, for x' uniform on its
        values: {-1, 1} (Bernoulli), or the grey levels (a categorical over them, whose value
        is ``observed(x)``), (..., N, D)."""
        g = self.gamma()[0]
        alpha, variance = torch.sigmoid(-g).sqrt(), torch.sigmoid(g)
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=2 * alpha * z_0 / variance).to_event(1)
        values = torch.linspace(-1, 1, self.config.levels, device=z_0.device, dtype=z_0.dtype)
        logits = -(z_0.unsqueeze(-1) - alpha * values).pow(2) / (2 * variance)  # (..., D, L)
        return dist.Categorical(logits=logits).to_event(1)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """What the x site observes: the pixels (binary), or their grey level's index; refused
        when x is not on the model's grid."""
        if self.config.likelihood == "bernoulli":
            return x
        index = x * (self.config.levels - 1)
        if (index - index.round()).abs().max() > 1e-4 or x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"grey pixels must be multiples of 1/{self.config.levels - 1} in [0, 1] (the"
                f" {self.config.levels} levels of --levels)"
            )
        return index.round().long()

    def _mean_image(self, z_0) -> torch.Tensor:
        """E[x | z_0] in [0, 1], (..., N, D)."""
        fn = self.likelihood(z_0).base_dist
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(fn.logits)
        return fn.probs @ torch.linspace(
            0, 1, self.config.levels, device=z_0.device, dtype=z_0.dtype
        )

    # ------------------------------------------------------------------ model and guide

    def model(self, x: torch.Tensor):
        pyro.module(self._pyro_name, self)
        num = check_rows(x, self.config.x_dim)
        steps = self.config.steps
        with pyro.plate("data", num):
            prior = dist.Normal(x.new_zeros(x.shape), 1.0).to_event(1)
            if self.config.timesteps is None:  # the chain, top-down
                z = pyro.sample(f"z{steps}", prior)
                for t in range(steps, 0, -1):
                    level = torch.full((num,), t, device=x.device)
                    loc, scale = self.posterior(z, self.denoise(z, level), level)
                    z = pyro.sample(f"z{t - 1}", dist.Normal(loc, scale).to_event(1))
                return pyro.sample("x", self.likelihood(z), obs=self.observed(x))
            pyro.sample("zT", prior)
            with self._time_plate() as index:  # the guide's levels, replayed
                t = (index.to(x.device) + 1).unsqueeze(-1)  # (k, 1), in 1..T
                z_t = pyro.sample("zt", dist.Normal(*self.marginal(x, t)).to_event(1))  # cancels
                x_hat = self.denoise(z_t, t.expand(z_t.shape[:-1]))  # (k, N, D)
                pyro.sample("zs", dist.Normal(*self.posterior(z_t, x_hat, t)).to_event(1))
            zero = torch.zeros((), dtype=torch.long, device=x.device)
            z_0 = pyro.sample("z0", dist.Normal(*self.marginal(x, zero)).to_event(1))  # cancels
            return pyro.sample("x", self.likelihood(z_0), obs=self.observed(x))

    def guide(self, x: torch.Tensor):
        pyro.module(self._pyro_name, self)
        num = check_rows(x, self.config.x_dim)
        steps = self.config.steps
        x_signed = 2 * x - 1
        top = torch.tensor(steps, device=x.device)
        with pyro.plate("data", num):
            if self.config.timesteps is None:  # the forward process, in the model's order
                z = pyro.sample(f"z{steps}", dist.Normal(*self.marginal(x, top)).to_event(1))
                for t in range(steps, 0, -1):
                    level = torch.tensor(t, device=x.device)
                    loc, scale = self.posterior(z, x_signed, level)
                    z = pyro.sample(f"z{t - 1}", dist.Normal(loc, scale).to_event(1))
                return
            pyro.sample("zT", dist.Normal(*self.marginal(x, top)).to_event(1))
            with self._time_plate() as index:
                t = (index.to(x.device) + 1).unsqueeze(-1)  # (k, 1)
                z_t = pyro.sample("zt", dist.Normal(*self.marginal(x, t)).to_event(1))  # (k, N, D)
                pyro.sample("zs", dist.Normal(*self.posterior(z_t, x_signed, t)).to_event(1))
            zero = torch.zeros((), dtype=torch.long, device=x.device)
            pyro.sample("z0", dist.Normal(*self.marginal(x, zero)).to_event(1))

    def _time_plate(self):
        """k of the T levels (indices 0 .. T-1 for t = 1 .. T), their terms scaled by T / k."""
        steps, k = self.config.steps, self.config.timesteps
        return pyro.plate("time", steps, subsample_size=k, dim=-2)

    # ------------------------------------------------------------------ the model surface

    @classmethod
    def from_data(cls, options: dict, info) -> dict:
        if not info.binary and options.get("likelihood", "bernoulli") == "bernoulli":
            raise ValueError(
                "the diffusion model's default decoder is Bernoulli: binarize the data"
                " (--binarize), or model grey levels (--likelihood grey --levels L)"
            )
        return options

    def terms(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t for each image at levels t ((N,) or (S, N)), analytic given one draw of z_t:
        1/2 (SNR_{t-1} - SNR_t) ||x' - x_hat||^2, nats, the shape of t."""
        gamma = self.gamma()
        x_signed = 2 * x - 1
        loc, scale = self.marginal(x, t)
        z_t = loc + scale * torch.randn_like(loc)
        snr = torch.exp(-gamma[t - 1]) - torch.exp(-gamma[t])
        return 0.5 * snr * (x_signed - self.denoise(z_t, t)).pow(2).sum(-1)

    def elbo(self, x: torch.Tensor, num_samples: Optional[int] = None, batch_size: int = 500):
        """The ELBO per image, nats, (N,): the reconstruction and prior terms exactly (the
        reconstruction from one draw of z_0), the sum over levels exactly (``num_samples``
        None: all T) or estimated from ``num_samples`` stratified levels per image, unbiased."""
        out = [self._elbo(chunk, num_samples) for chunk in x.split(batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def _elbo(self, x, num_samples):
        steps = self.config.steps
        loc, scale = self.marginal(x, torch.tensor(0, device=x.device))
        z_0 = loc + scale * torch.randn_like(loc)
        reconstruction = self.likelihood(z_0).log_prob(self.observed(x))
        loc, scale = self.marginal(x, torch.tensor(steps, device=x.device))
        prior = dist.Normal(loc, scale).to_event(1)
        kl_top = kl_divergence(prior, dist.Normal(torch.zeros_like(loc), 1.0).to_event(1))
        if num_samples is None or num_samples >= steps:
            levels = torch.arange(1, steps + 1, device=x.device)
            total = sum(self.terms(x, t.expand(len(x))) for t in levels)
        else:  # one level from each of num_samples equal strata of 1..T
            width = steps / num_samples
            u = torch.rand(num_samples, len(x), device=x.device)
            start = torch.arange(num_samples, device=x.device).unsqueeze(-1) * width
            t = (start + u * width).long().clamp(max=steps - 1) + 1  # (S, N)
            total = self.terms(x, t).mean(0) * steps
        return reconstruction - kl_top - total

    @torch.no_grad()
    def sample(self, num_samples: int, steps: Optional[int] = None, chain: bool = False):
        """Images by ancestral sampling, pixel probabilities (S, D): all T levels, or ``steps``
        strided ones (z_s from p(z_s | z_t) for the next level s below t). With ``chain``,
        also the denoiser's guess of x at every visited level, (L, S, D), top first."""
        levels = self._strided(steps)
        device = self._device()
        z = torch.randn(num_samples, self.config.x_dim, device=device)
        guesses = []
        for t, s in zip(levels[:-1], levels[1:]):
            level = torch.full((num_samples,), t, device=device)
            x_hat = self.denoise(z, level).clamp(-1, 1)
            guesses.append((x_hat + 1) / 2)
            loc, scale = self.posterior(z, x_hat, level, torch.full_like(level, s))
            z = loc + scale * torch.randn_like(loc) if s > 0 else loc
        probs = self._mean_image(z)
        return (probs, torch.stack(guesses)) if chain else probs

    def _strided(self, steps: Optional[int]):
        total = self.config.steps
        count = total if steps is None else int(steps)
        if not 1 <= count <= total:
            raise ValueError(f"steps must be 1 to {total}, got {steps}")
        levels = torch.linspace(total, 0, count + 1).round().long().tolist()
        return sorted(set(levels), reverse=True)

    def _device(self):
        return next(self.network.parameters()).device

    def validation_score(self, x: torch.Tensor) -> float:
        """What early stopping watches: the mean ELBO of the validation images from 4
        stratified levels each (the training program's own estimate shares one level across
        a whole chunk of images, far noisier)."""
        return self.elbo(x, 4).mean().item()

    @torch.no_grad()
    def metrics(self, splits, num_samples=100, progress=False) -> dict:
        """Held-out ELBO in nats per image (``num_samples`` stratified levels per image) with
        its standard error, and in bits per dimension."""
        x = (splits["test"] if "test" in splits else splits["train"])[0]
        split = "test" if "test" in splits else "train"
        elbo = self.elbo(x.to(self._device()), num_samples)
        mean, se = elbo.mean().item(), (elbo.std() / math.sqrt(len(elbo))).item()
        return {
            f"{split}_elbo": mean,
            f"{split}_elbo_se": se,
            f"{split}_bits_per_dim": -mean / (self.config.x_dim * math.log(2)),
            "elbo_levels_per_image": min(num_samples or self.config.steps, self.config.steps),
            f"num_{split}": len(x),
            "units": "nats per image (ELBO: a lower bound on log p(x))",
        }

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Samples, one reverse chain per row (the denoiser's guess of x as t falls), and the
        ELBO's terms L_t against the level t on held-out images."""
        from zoo import plots  # matplotlib only when figures are drawn

        out = {}
        side = int(round(self.config.x_dim**0.5))
        if side * side == self.config.x_dim:
            probs, chain = self.sample(8, steps=min(self.config.steps, 100), chain=True)
            picks = torch.linspace(0, len(chain) - 1, 9).round().long()
            rows = torch.cat([chain[picks].transpose(0, 1), probs.unsqueeze(1)], 1)
            title = "reverse chains: the denoiser's guess of x as t falls, then the sample"
            grid = rows.reshape(-1, side * side)
            out["reverse_chain.png"] = plots.image_grid(grid, num_cols=10, title=title)
            drawn = self.sample(64, steps=min(self.config.steps, 200))
            out["samples.png"] = plots.image_grid(drawn, num_cols=8, title="samples")
        x = (splits["test"] if "test" in splits else splits["train"])[0][:200].to(self._device())
        levels = torch.unique(torch.linspace(1, self.config.steps, 50).round().long())
        terms = [self.terms(x, t.expand(len(x)).to(x.device)).mean().item() for t in levels]
        out["elbo_terms.png"] = plots.terms_by_level(levels.tolist(), terms)
        return out


def fixed_gamma(schedule: str, steps: int) -> torch.Tensor:
    """gamma_t = -log SNR_t at t = 0 .. T of a fixed schedule, increasing, (T + 1,)."""
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if schedule == "linear":
        gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * s
    elif schedule == "cosine":  # alpha^2 = cos^2(pi u / 2), u spread evenly between the
        # values that give the same endpoints as "linear": gamma = 2 log tan(pi u / 2)
        ends = torch.tensor([GAMMA_MIN, GAMMA_MAX], dtype=torch.float64)
        u_min, u_max = (2 / math.pi) * torch.atan(torch.exp(ends / 2))
        gamma = 2 * torch.log(torch.tan(math.pi / 2 * (u_min + (u_max - u_min) * s)))
    else:
        raise ValueError(f"fixed schedules are 'cosine' and 'linear', not {schedule!r}")
    return gamma.float()


class _TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1], then an MLP: (...,) -> (..., E)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), dim // 2)), False)
        self.net = mlp([2 * (dim // 2), dim, dim], nn.SiLU)

    def forward(self, s):
        angles = 1000 * s.unsqueeze(-1) / self.freqs  # (..., E/2)
        return self.net(torch.cat([angles.sin(), angles.cos()], -1))


class _MLP(nn.Module):
    """The log-odds correction for flat images: (..., D), (...,) -> (..., D)."""

    def __init__(self, dim, hidden, time_dim):
        super().__init__()
        self.time = _TimeEmbedding(time_dim)
        self.net = mlp([dim + time_dim, *hidden, dim], nn.SiLU)
        nn.init.zeros_(self.net[-1].weight)  # no correction at first: the uniform model
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z, s):
        emb = self.time(s).expand(z.shape[:-1] + (-1,))
        return self.net(torch.cat([z, emb], -1))


class _UNet(nn.Module):
    """The log-odds correction for square images of side divisible by 4: two levels down,
    two up (transposed convs) with skips, the time embedding added to every block's channels.
    (..., side * side), (...,) -> (..., side * side)."""

    def __init__(self, side, channels, time_dim):
        super().__init__()
        c1, c2 = channels
        self.side = side
        self.time = _TimeEmbedding(time_dim)
        self.into = nn.Conv2d(1, c1, 3, padding=1)  # (B, c1, S, S)
        self.down1 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)  # (B, c2, S/2, S/2)
        self.down2 = nn.Conv2d(c2, c2, 4, stride=2, padding=1)  # (B, c2, S/4, S/4)
        self.middle = nn.Conv2d(c2, c2, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * c2, c2, 4, stride=2, padding=1)  # (B, c2, S/2, S/2)
        self.up1 = nn.ConvTranspose2d(2 * c2, c1, 4, stride=2, padding=1)  # (B, c1, S, S)
        self.out = nn.Conv2d(2 * c1, 1, 3, padding=1)
        self.scales = nn.ModuleList(nn.Linear(time_dim, c) for c in (c1, c2, c2, c2, c2, c1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z, s):
        batch = z.shape[:-1]
        h0 = z.reshape(-1, 1, self.side, self.side)
        emb = self.time(s.expand(batch).reshape(-1))  # (B, E)
        act = nn.functional.silu

        def add(h, i):
            return act(h + self.scales[i](emb)[:, :, None, None])

        h1 = add(self.into(h0), 0)
        h2 = add(self.down1(h1), 1)
        h3 = add(self.down2(h2), 2)
        h = add(self.middle(h3), 3)
        h = add(self.up2(torch.cat([h, h3], 1)), 4)
        h = add(self.up1(torch.cat([h, h2], 1)), 5)
        return self.out(torch.cat([h, h1], 1)).reshape(*batch, -1)


def _network(config: DiffusionConfig) -> nn.Module:
    side = int(round(config.x_dim**0.5))
    square = side * side == config.x_dim and side % 4 == 0
    kind = config.network
    if kind == "auto":
        kind = "unet" if square and side >= 16 else "mlp"
    if kind == "unet":
        if not square:
            raise ValueError(
                f"the U-Net denoiser needs square images of side divisible by 4, not x_dim"
                f" {config.x_dim}: use network='mlp'"
            )
        return _UNet(side, config.channels, config.time_dim)
    if kind != "mlp":
        raise ValueError(f"network must be 'auto', 'mlp' or 'unet', not {kind!r}")
    return _MLP(config.x_dim, config.hidden, config.time_dim)
