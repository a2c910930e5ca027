"""
Semi-supervised VAE, model M2 of Kingma, Rezende, Mohamed and Welling (2014)::

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
then exactly the paper's::

    sum over labelled (x, y)  of  L(x, y) + alpha * log q(y | x)
    + sum over unlabelled x   of  U(x) = sum_y q(y | x) L(x, y) + H(q(y | x))

with L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]. The
classification term (site ``y_classify``, weight ``alpha``) trains q(y | x) on the labels,
which the ELBO alone does not do. Kingma et al. used alpha = 0.1 N; Pyro's tutorial uses 46 with
the same per-point scaling as here, which we take as the default.

M1+M2, the paper's stacked model (``SSVAE.stacked_on(vae, x)``, ``zoo fit ssvae --stack-on``):
M2 generates the latent z1 of a VAE fitted beforehand on all the images (M1), and M1 generates
the pixels from it::

    z1[n] ~ Normal(decoder(z[n], y[n]), scale(...))    on the units of z1 that M1 uses
          ~ Normal(0, 1)                               on its collapsed units
    x[n]  ~ p_M1(x | z1[n])
    q(z1[n] | x[n]) = q_M1(z1 | x[n])                  M1's encoder, a fresh draw every step
    q(y[n] | x[n], z1[n]) = Categorical(classifier(z1[n]))

M1 stays frozen (its weights are buffers, saved with the model but invisible to Pyro and the
optimizers), so the gradients are those of M2 fitted to draws of z1, as in the paper; the
objective above gains log p_M1(x | z1) - log q_M1(z1 | x), which makes it a bound on log p(x)
that the importance-sampled evaluation can use. Only the units whose posterior mean varies over
the images are modelled (Kingma et al. drop the others too): a collapsed unit is pure noise to
a classifier. Prediction uses the posterior mean of z1.

References: Kingma et al. (2014), Semi-Supervised Learning with Deep Generative Models;
Pyro's SS-VAE tutorial (networks 784-500-10, 794-500-50, 60-500-784).
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from torch import nn

from zoo.models.nets import DIGITS_DEFAULTS, check_number, check_rows, check_sizes, mlp
from zoo.models.vae import VAE, VAEConfig
from zoo.registry import register

_POINT_MASS = -3.0e4  # logit of the classes a labelled row cannot take: exp() is exactly 0


@dataclass
class SSVAEConfig:
    x_dim: int = field(default=784, metadata={"data": "dim"})
    num_classes: int = field(default=10, metadata={"data": "num_classes"})
    z_dim: int = field(default=50, metadata={"help": "latent units"})
    hidden: Tuple[int, ...] = field(default=(500,), metadata={"help": "hidden widths"})
    # weight of the classification term on labelled data
    alpha: float = field(default=46.0, metadata={"help": "weight of the classification term"})
    # of what M2 generates: "bernoulli" (images) or "gaussian"
    likelihood: str = field(default="bernoulli", metadata={"choices": ("bernoulli", "gaussian")})
    # sum over y in the guide (TraceEnum_ELBO); False samples it
    enumerate: bool = field(default=True, metadata={"help": "sum over y (else sample it)"})
    # the training labels kept: a class-balanced subset of this size (the rest become -1)
    labels: int = field(default=100, metadata={"help": "labelled training rows (balanced)"})
    label_seed: int = field(default=0, metadata={"help": "which labelled subset"})
    # M1+M2: the run directory of a fitted VAE whose latent space M2 models (``build_on``)
    stack_on: Optional[str] = field(
        default=None,
        metadata={"run": True, "help": "M1+M2: an M2 over the latents of the fitted VAE in RUN"},
    )
    # M1+M2: the frozen VAE (M1) whose latent M2 models
    stack: Optional[VAEConfig] = field(default=None, metadata={"internal": True})
    # the M1 units M2 models (None: all)
    stack_units: Optional[Tuple[int, ...]] = field(default=None, metadata={"internal": True})


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


@register(
    "ssvae",
    description="semi-supervised VAE (Kingma et al. 2014, M2): a classifier from few labels",
    drivers={"svi": {"loss": "TraceEnum_ELBO", "max_plate_nesting": 1}},
    default_data="mnist",
    default_binarize="dynamic",
    # the digits: a 3e-3 rate leaves the samples nearly one image after 3 epochs
    data_defaults={"digits": {**DIGITS_DEFAULTS, "lr": 1e-2}},
    config=SSVAEConfig,
    comparison={
        "data": ("mnist", "digits"),
        "seeded": ("label_seed",),  # each seed its own labelled subset
        "methods": {
            "sampled": {
                "driver": "svi",
                "options": {"enumerate": False, "alpha": 0.0},
                "description": "y sampled, Trace_ELBO, alpha = 0",
            },
            "enumerated": {
                "driver": "svi",
                "options": {"alpha": 0.0},
                "description": "y enumerated, TraceEnum_ELBO, alpha = 0",
            },
            "classifier": {
                "driver": "svi",
                "description": "y enumerated, TraceEnum_ELBO, alpha as configured (46)",
            },
        },
    },
)
class SSVAE(nn.Module):
    """``.model(x, y)`` and ``.guide(x, y)``; ``y`` holds class indices, -1 where unknown."""

    capacity_options = ("z_dim", "hidden")  # named by the collapse warning

    def __init__(self, config: Optional[SSVAEConfig] = None, name: str = "ssvae", **kwargs):
        super().__init__()
        config = config or SSVAEConfig(**kwargs)
        config.hidden = tuple(config.hidden)
        if isinstance(config.stack, dict):  # as saved in a run's config.json
            config.stack = VAEConfig(**config.stack)
        if not config.hidden:
            raise ValueError("the SSVAE needs at least one hidden layer")
        check_sizes(config, "x_dim", "num_classes", "z_dim", "hidden")
        check_number(config, "alpha", 0.0)
        if config.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'gaussian', not {config.likelihood!r}"
            )
        self.config = config
        self.m1 = None
        h_dim = config.x_dim  # what M2 generates and classifies: x, or M1's latent units
        if config.stack is not None:
            self.m1, units = _frozen_m1(config)
            config.stack_units = tuple(units.tolist())
            self.register_buffer("_units", units, persistent=False)
            h_dim = len(units)
        c = config.num_classes
        self.classifier = mlp([h_dim, *config.hidden, c])  # logits of q(y | h)
        self.encoder = _JointEncoder(h_dim, c, config.hidden, config.z_dim)
        self.decoder = mlp([config.z_dim + c, *reversed(config.hidden), h_dim])
        if config.likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(h_dim))  # (H,), one per feature
        self._pyro_name = name  # stable: checkpoints are keyed by it (see zoo.models.vae)

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
            if self.m1 is None:
                h = pyro.sample("x", self.likelihood(z, y_all), obs=x)  # (N, X): h is x
            else:  # M1+M2: M2 generates M1's latent z1, and M1 generates x from it
                z1 = pyro.sample("z1", self._z1_prior(z, y_all))  # (N, Z1), the guide's draw
                pyro.sample("x", self.m1.likelihood(z1), obs=x)
                h = z1[..., self._units]
            if self.config.alpha > 0:
                with poutine.scale(scale=self.config.alpha):
                    classify = dist.OneHotCategorical(logits=self.classifier(h))
                    pyro.sample("y_classify", classify.mask(labelled), obs=y_onehot)

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        pyro.module(self._pyro_name, self)
        labelled, y_onehot = self._labels(x, y)
        # labelled rows: all mass on the known label, so log q = 0 and the sum over y is L(x, y)
        known = (y_onehot - 1.0) * -_POINT_MASS
        infer = {"enumerate": "parallel"} if self.config.enumerate else {}
        with pyro.plate("data", len(x)):
            h = x
            if self.m1 is not None:  # a fresh draw of M1's z1 for every image and step
                z1 = pyro.sample("z1", dist.Normal(*self.m1.encoder(x)).to_event(1))
                h = z1[..., self._units]
            logits = torch.where(labelled.unsqueeze(-1), known, self.classifier(h))  # (N, C)
            y_latent = pyro.sample("y", dist.OneHotCategorical(logits=logits), infer=infer)
            y_all = torch.where(labelled.unsqueeze(-1), y_onehot, y_latent)  # (..., N, C)
            loc, scale = self.encoder(h, y_all)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def likelihood(self, z: torch.Tensor, y: torch.Tensor):
        """What M2 generates from style z (..., N, Z) and one-hot labels y (..., N, C): p(x | y, z),
        or with a stack p(h | y, z) of the M1 units it models (the rest: ``_z1_prior``)."""
        out = self.decoder(_concat(z, y))  # (..., N, H)
        if self.config.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, self.log_scale.exp()).to_event(1)

    def _z1_prior(self, z: torch.Tensor, y: torch.Tensor):
        """p(z1 | y, z) of M1+M2 over all of M1's units: M2's Gaussian on the units it models,
        M1's own prior Normal(0, 1) on the collapsed ones (their posterior is that prior)."""
        h = self.likelihood(z, y).base_dist  # Normal, (..., N, H)
        width = self.config.stack.z_dim
        loc = h.loc.new_zeros(h.loc.shape[:-1] + (width,)).index_copy(-1, self._units, h.loc)
        scale = h.loc.new_ones(loc.shape).index_copy(-1, self._units, h.scale)
        return dist.Normal(loc, scale).to_event(1)

    @classmethod
    def stacked_on(cls, m1: VAE, x: torch.Tensor, threshold: float = 0.01, **kwargs) -> "SSVAE":
        """Kingma et al.'s M1+M2: an M2 that models the latent z1 of a fitted VAE ``m1`` (kept
        frozen) instead of the images. It models the units of z1 active on the images ``x``
        (``VAE.active_units``: Var_x E_q[u | x] > threshold); the collapsed ones keep M1's
        prior. ``kwargs`` set the M2 part (hidden, z_dim, alpha, ...)."""
        if not isinstance(m1, VAE) or m1.config.likelihood != "bernoulli":
            raise ValueError("M1+M2 stacks on a zoo.models.vae.VAE with a Bernoulli decoder")
        units = m1.active_units(x, threshold)
        if len(units) == 0:
            raise ValueError("no unit of the VAE is active on x: it has nothing to give M2")
        config = SSVAEConfig(
            **kwargs,
            x_dim=m1.config.x_dim,
            likelihood="gaussian",
            stack=m1.config,
            stack_units=tuple(units.tolist()),
        )
        model = cls(config)
        model.m1.load_state_dict(m1.state_dict())
        return model

    # ------------------------------------------------------------------------ helpers

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x): (N, X) -> (N, C) class probabilities."""
        self._check(x)
        return torch.softmax(self.classifier(self.features(x)), -1)

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
        h, m1_terms = x, 0.0
        if self.m1 is not None:  # the same z1 draws for every label: log p(x|z1) - log q(z1|x)
            q_z1 = dist.Normal(*self.m1.encoder(x)).to_event(1)
            z1 = q_z1.sample((num_samples,))  # (S, N, Z1)
            m1_terms = self.m1.likelihood(z1).log_prob(x) - q_z1.log_prob(z1)  # (S, N)
            h = z1[..., self._units]
        out = []
        for k in range(c):
            y = self._one_hot(torch.full((len(x),), k, device=x.device))
            loc, scale = self.encoder(h, y)
            q_z = dist.Normal(loc, scale).to_event(1)
            if self.m1 is None:
                z = q_z.rsample((num_samples,))  # (S, N, Z)
                log_p = self.likelihood(z, y).log_prob(x)
            else:
                z = q_z.rsample()  # (S, N, Z): one per draw of z1
                log_p = self._z1_prior(z, y).log_prob(z1)
            value = log_p + prior_z.log_prob(z) - q_z.log_prob(z) + m1_terms
            out.append(value.mean(0) - math.log(c))
        return torch.stack(out, -1)

    def driver_options(self, driver: str) -> dict:
        """y summed out by TraceEnum_ELBO, or sampled (the score-function estimator)."""
        loss = "TraceEnum_ELBO" if self.config.enumerate else "Trace_ELBO"
        return {"loss": loss, "max_plate_nesting": 1}

    @classmethod
    def from_data(cls, options: dict, info) -> dict:
        if not info.binary and options.get("likelihood", "bernoulli") == "bernoulli":
            raise ValueError("the SSVAE has a Bernoulli decoder: binarize the data (--binarize)")
        return options

    @classmethod
    def build_on(cls, options: dict, fitted: dict, x: torch.Tensor) -> "SSVAE":
        """M1+M2 from the command line: ``fitted["stack_on"]`` is the fitted VAE of the run
        ``options["stack_on"]`` names, ``x`` the training images it judges active units on."""
        kept = {k: v for k, v in options.items() if k not in ("x_dim", "likelihood")}
        return cls.stacked_on(fitted["stack_on"], x, **kept)

    def arguments(self, x: torch.Tensor, y: Optional[torch.Tensor], split: str):
        """The model's arguments: (x, labels), -1 where a label is unknown: in the training
        split all but a class-balanced ``labels`` of them (``data.partial_labels``), all of
        them without y."""
        if y is None:
            return x, torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        if split == "train":
            from zoo.data import partial_labels

            y = partial_labels(y.cpu(), self.config.labels, self.config.label_seed)
        return x, y.to(x.device)

    validation_label = "validation accuracy of q(y | x)"

    @property
    def objective_label(self) -> str:
        """What the drivers maximize, for the learning curve: not the ELBO alone."""
        if self.config.alpha > 0:
            return f"ELBO + {self.config.alpha:g} x log q(y | x) of the labelled rows"
        return "ELBO"

    def validation_score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """What early stopping watches (higher is better): the accuracy of q(y | x)."""
        return self.accuracy(x, y)

    @torch.no_grad()
    def metrics(self, splits, num_samples=100, progress=False) -> dict:
        """Test accuracy of q(y | x) and of the generative classifier argmax_y L(x, y), and the
        bounds on log p(x) with the test labels hidden."""
        from inference import evaluate, svi  # the shared scores; no driver

        x, y = splits["test"] if "test" in splits else splits["train"]
        log_px = evaluate.log_likelihood(
            self.model, self.guide, x, num_samples=num_samples, progress=progress
        )
        enumerated, self.config.enumerate = self.config.enumerate, True  # the ELBO exact in y
        try:
            elbo = svi.make_loss("TraceEnum_ELBO", max_plate_nesting=1)
            test_elbo = svi.elbo_per_datum(self.model, self.guide, x, elbo)
        finally:
            self.config.enumerate = enumerated
        out = {
            "test_elbo": test_elbo,
            "test_log_likelihood": log_px.mean().item(),
            "log_likelihood_samples": num_samples,
            "num_test": len(x),
            "units": "nats per data point (labels hidden; y and z importance-sampled)",
        }
        if y is not None:  # the generative model's own classification, argmax_y L(x, y)
            by_label = torch.cat([self.elbo_by_label(chunk) for chunk in x.split(1000)])
            out["test_accuracy"] = self.accuracy(x, y)
            out["generative_accuracy"] = (by_label.argmax(-1) == y).float().mean().item()
        return out

    @torch.no_grad()
    def figures(self, splits, history=None, info=None) -> dict:
        """Samples per label, and style analogies of test images (square images only)."""
        from zoo import plots  # matplotlib only when figures are drawn

        side = int(round(self.config.x_dim**0.5))
        if side * side != self.config.x_dim:
            return {}
        c = self.config.num_classes
        device = self.decoder[0].weight.device
        images = self.generate(torch.arange(c, device=device).repeat_interleave(8))
        title = "samples per label: one row per class, z from the prior"
        out = {"digits.png": plots.image_grid(images, num_cols=8, title=title)}
        x = (splits["test"] if "test" in splits else splits["train"])[0][:8].to(device)
        grid = torch.cat([x.unsqueeze(1), self.analogies(x)], 1).reshape(-1, x.shape[1])
        title = "analogies: each image, then its style z decoded as every class"
        out["analogies.png"] = plots.image_grid(grid, num_cols=c + 1, title=title)
        return out

    @torch.no_grad()
    def sample(self, num_samples: int, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Means of p(x | y, z) for class indices ``labels`` (N,), by default drawn uniformly,
        and z from the prior: (N, X)."""
        device = self.decoder[0].weight.device
        if labels is None:
            labels = torch.randint(self.config.num_classes, (num_samples,), device=device)
        if len(labels) != num_samples:
            raise ValueError(f"{num_samples} samples need {num_samples} labels, got {len(labels)}")
        return self.generate(labels.to(device))

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of p(x | y, z), pixel probabilities, for class indices (N,); z ~ p(z) unless
        given. With a stack, M1 decodes the mean of p(z1 | y, z)."""
        y = self._one_hot(labels)
        if z is None:
            z = torch.randn(len(labels), self.config.z_dim, device=y.device)
        if self.m1 is not None:
            return self.m1.decode(self._z1_prior(z, y).mean)
        return self.likelihood(z, y).mean

    @torch.no_grad()
    def analogies(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Style analogies: infer z from each image (with its label, or the predicted one),
        then decode that z with every class. (N, X) -> (N, C, X)."""
        self._check(x)
        labels = self.classify(x) if y is None else y
        loc, _ = self.encoder(self.features(x), self._one_hot(labels))  # (N, Z): each style
        c = self.config.num_classes
        classes = torch.arange(c, device=x.device)
        out = [self.generate(classes, z.expand(c, -1)) for z in loc]
        return torch.stack(out)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What q(y | .) and q(z | ., y) see when predicting: the images, or with a stack the
        posterior mean of M1's modelled units. (N, X) -> (N, H)."""
        if self.m1 is None:
            return x
        return self.m1.encoder(x)[0][..., self._units]

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


def _frozen_m1(config: SSVAEConfig):
    """M1 of M1+M2 with its weights as buffers: saved with the model, never trained (Pyro and
    the optimizers only see parameters). Returns the VAE and the indices of the units M2 models."""
    if config.stack.x_dim != config.x_dim or config.stack.likelihood != "bernoulli":
        raise ValueError(
            f"the stacked VAE must model the same {config.x_dim} binary pixels, got x_dim"
            f" {config.stack.x_dim} and a {config.stack.likelihood} decoder"
        )
    if config.likelihood != "gaussian":
        raise ValueError("with a stack M2 generates a continuous latent: likelihood='gaussian'")
    m1 = VAE(config.stack, name="m1")
    for module in m1.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    width = config.stack.z_dim
    units = torch.arange(width) if config.stack_units is None else torch.tensor(config.stack_units)
    if units.dim() != 1 or len(units) == 0 or units.unique().numel() != len(units):
        raise ValueError(f"stack_units must be distinct unit indices, got {config.stack_units}")
    if units.min() < 0 or units.max() >= width:
        raise ValueError(f"stack_units must lie in 0 .. {width - 1}, got {config.stack_units}")
    return m1, units.long()


def _concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate the last dimension after broadcasting the others (enumerated y is (C, 1, C))."""
    shape = broadcast_shape(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(shape + a.shape[-1:]), b.expand(shape + b.shape[-1:])], -1)
