"""
What the two finite mixtures share: the categorical assignment, its Dirichlet prior, the Pyro
model/guide pair, and the predictions that follow from Bayes' rule.

    weights ~ Dirichlet(weight_concentration)   (a MAP prior; concentration 1 means none)
    z[n] ~ Categorical(weights)                 weights: (K,)
    x[n] ~ component(z[n])                      x: (N, D)

Subclasses define ``component(z)``, their own priors, closed-form sufficient statistics and
M-step, and the number of free parameters. Nothing here knows about any inference driver.
"""

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.util import is_validation_enabled
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch.distributions import transform_to

from zoo.models.nets import check_number, check_sizes, one_row

# what both mixtures are compared by (zoo.comparisons): EM, and SVI on the same MAP objective
# from EM's start, so that only the optimizer differs; SVI full-batch-like, at a mixture's rate
COMPARISON_SETTINGS = {"epochs": 1000, "lr": 0.05, "batch_size": 1000}
COMPARISON_METHODS = {
    "em": {"driver": "em", "description": "closed-form EM (k-means++ start)"},
    "svi": {
        "driver": "svi",
        "start": "em",
        "description": "SVI, TraceEnum_ELBO (MAP), Adam from EM's start",
    },
}

_instances = itertools.count()


class Mixture(PyroModule):
    # whether the component's log_prob and sufficient statistics take CSR data (SparseRows chunks)
    takes_sparse_data = False

    def __init__(self, config):
        # A unique prefix keeps two mixtures in one session from sharing Pyro's global param store.
        super().__init__(name=f"{type(self).__name__}{next(_instances)}")
        check_sizes(config, "num_components", "dim")
        check_number(config, "weight_concentration")
        if config.weight_concentration < 1:
            raise ValueError("weight_concentration below 1 has no MAP estimate; use >= 1")
        self.config = config
        num_components = config.num_components
        self.weights = PyroParam(  # (K,)
            torch.full((num_components,), 1.0 / num_components), constraint=constraints.simplex
        )

    # ------------------------------------------------------------------------ the Pyro program

    @pyro_method
    def model(self, x=None, num_samples=None):
        """p(weights, x, z); ``x=None`` draws ``num_samples`` new points instead of observing."""
        num_data = self.check_data(x) if x is not None else int(num_samples)
        weights = self.weights  # (K,)
        log_prior = self.log_prior()
        if log_prior.requires_grad or log_prior.item() != 0:
            pyro.factor("prior", log_prior)  # MAP priors on the parameters, outside the data plate
        with pyro.plate("data", num_data):
            # z is summed out exactly by enumeration: shape (N,) when sampled, (K, 1) enumerated
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            return pyro.sample("x", self.component(z), obs=x)  # (N, D)

    def guide(self, x=None, num_samples=None):
        """Empty: z is enumerated in the model and the parameters are point estimates."""

    # ------------------------------------------------------------------------ predictions

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log weights[k] + log p(x[n] | z[n] = k), shape (N, K)."""
        self.check_data(x)
        k = torch.arange(self.config.num_components, device=x.device).unsqueeze(-1)  # (K, 1)
        log_px = self.component(k).log_prob(x)  # (K, N)
        return (self.weights.log().unsqueeze(-1) + log_px).T  # (N, K)

    @torch.no_grad()
    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior p(z[n] = k | x[n]), shape (N, K)."""
        return self.component_log_prob(x).softmax(-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of each point, shape (N,)."""
        return self.component_log_prob(x).argmax(-1)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x[n]) in nats, shape (N,)."""
        return self.component_log_prob(x).logsumexp(-1)

    @torch.no_grad()
    def sample(self, num_samples: int):
        """Draw ``(x, z)`` by running the model forward: x (S, D), z (S,)."""
        trace = pyro.poutine.trace(self.model).get_trace(num_samples=num_samples)
        return trace.nodes["x"]["value"], trace.nodes["z"]["value"]

    # ------------------------------------------------------------------------ the model surface

    @torch.no_grad()
    def metrics(self, splits, num_samples=None, progress=False) -> dict:
        """Exact log-likelihood per split (nats per data point), BIC and AIC of the training
        data (lower is better), and where a split has labels the clustering accuracy (one to
        one when there are no more components than classes, else majority), NMI and ARI;
        ``splits``: {"train": (x, y), "test": (x, y)}, y None where unlabelled."""
        from inference import evaluate  # the shared metrics; no driver

        metrics = {}
        for split, (x, y) in splits.items():
            log_px = self.log_likelihood(x)  # (N,)
            metrics[f"{split}_log_likelihood"] = log_px.mean().item()
            if split == "train":
                total = log_px.double().sum().item()
                metrics["bic"] = evaluate.bic(total, self.num_parameters, len(x))
                metrics["aic"] = evaluate.aic(total, self.num_parameters)
            if y is not None:
                pred = self.predict(x).cpu()
                one_to_one = self.config.num_components <= len(y.unique())
                mapping = "hungarian" if one_to_one else "majority"
                metrics["clustering_accuracy_mapping"] = mapping
                accuracy = evaluate.clustering_accuracy(y, pred, mapping)
                metrics[f"{split}_clustering_accuracy"] = accuracy
                metrics[f"{split}_nmi"] = evaluate.nmi(y, pred)
                metrics[f"{split}_ari"] = evaluate.ari(y, pred)
        x_train = splits["train"][0]
        counts = self.responsibilities(x_train).sum(0)  # expected points per component (K,)
        metrics.update(
            num_train=len(x_train),
            num_parameters=self.num_parameters,
            empty_components=int((counts < 1).sum()),
            units="nats per data point (BIC and AIC: totals, lower is better)",
        )
        return metrics

    # ------------------------------------------------------------------------ priors, M-step

    def log_prior(self) -> torch.Tensor:
        alpha = self.config.weight_concentration
        if alpha == 1:
            return self.weights.new_zeros(())
        return ((alpha - 1) * self.weights.log()).sum()  # Dirichlet, up to a constant

    def _m_step_weights(self, counts: torch.Tensor) -> None:
        alpha = self.config.weight_concentration
        # sklearn adds 10 * eps to every count, so that an empty component keeps a finite log weight
        counts = counts + 10 * torch.finfo(counts.dtype).eps + (alpha - 1)  # (K,)
        self.set_param("weights", counts / counts.sum())

    def set_param(self, name: str, value: torch.Tensor) -> None:
        """Overwrite a constrained parameter in place, so optimizers and the param store see it."""
        constraint = self._pyro_params[name][0]
        unconstrained = getattr(self, name + "_unconstrained")
        with torch.no_grad():
            unconstrained.copy_(transform_to(constraint).inv(value.to(unconstrained)))

    # ------------------------------------------------------------------------ checks

    def check_data(self, x) -> int:
        """Raise a clear error unless ``x`` is a finite float tensor of shape (N, dim).

        The value checks (finite, and binary for Bernoulli mixtures) run while Pyro's validation
        is enabled, as it is by default; drivers switch it off after their first pass.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"data must be a floating-point tensor, got dtype {x.dtype}")
        if x.layout != torch.strided and not self.takes_sparse_data:
            raise TypeError(
                f"{type(self).__name__} takes dense data, not {x.layout} (sparse rows are for"
                " the Bernoulli mixture)"
            )
        if x.dim() != 2 or x.shape[-1] != self.config.dim:
            raise ValueError(
                f"data must have shape (N, {self.config.dim}), got {tuple(x.shape)}"
                + one_row(x, self.config.dim)
            )
        if x.shape[0] == 0:
            raise ValueError("data is empty (N = 0)")
        if not is_validation_enabled():  # value checks cost a pass over the data
            return x.shape[0]
        if x.layout != torch.strided:  # a sparse block: its stored values
            if not torch.isfinite(x.values()).all():
                raise ValueError("data contains NaN or infinite values")
        elif not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(-1).nonzero()[:5, 0].tolist()
            raise ValueError(f"data contains NaN or infinite values (rows {bad}...)")
        return x.shape[0]

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"


def relabel(draws: dict, key: str, sites, num_iters: int = 5) -> tuple:
    """Undo label switching in MCMC draws of a Bayesian mixture.

    draws: arrays with leading dims (chains, draws) and the component axis next; ``draws[key]``
    (K, ...) describes each component (locations, pixel probabilities) and every site named in
    ``sites`` is permuted along the component axis.

    The components are exchangeable, so the posterior has K! symmetric modes and a sampler may
    visit several (within a chain, or one per chain). Each draw is permuted to the labelling
    whose components are nearest (squared distance, each coordinate in units of its spread over
    all draws) to a reference, matched by the Hungarian algorithm: first the first draw of the
    first chain (a pivot), then the mean of the relabelled draws, up to ``num_iters`` times (in
    the spirit of Stephens 2000). Returns ``(relabelled draws, permuted)``, permuted a boolean
    array (chains, draws) marking the draws whose labels were changed.
    """
    from scipy.optimize import linear_sum_assignment

    features = np.asarray(draws[key], dtype=np.float64)
    chains, samples, num_components = features.shape[:3]
    features = features.reshape(chains * samples, num_components, -1)  # (C*S, K, F)
    features = features / (features.reshape(-1, features.shape[-1]).std(0) + 1e-12)
    order = np.tile(np.arange(num_components), (len(features), 1))  # draw component per slot
    reference = features[0]
    for iteration in range(num_iters):
        new = np.empty_like(order)
        for i, draw in enumerate(features):
            cost = ((draw[:, None, :] - reference[None, :, :]) ** 2).sum(-1)  # (K, K)
            rows, cols = linear_sum_assignment(cost)
            new[i, cols] = rows  # slot j of the reference takes the draw's component rows[j]
        converged = iteration > 0 and np.array_equal(new, order)
        order = new
        reference = np.take_along_axis(features, order[..., None], axis=1).mean(0)
        if converged:
            break
    order = order.reshape(chains, samples, num_components)
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        if name in sites:
            index = order.reshape(order.shape + (1,) * (value.ndim - 3))
            value = np.take_along_axis(value, index, axis=2)
        out[name] = value
    return out, (order != np.arange(num_components)).any(-1)
