"""
Metrics shared by every model, all in nats per data point where they are densities.

- ``log_likelihood(model, guide, x)``: exact log p(x[n]) per data point, by enumerating the
  model's discrete latent (mixtures). Models with continuous latents need an importance-sampled
  estimate, which this function refuses with a message naming the continuous site.
- ``clustering_accuracy``: accuracy after the best one-to-one matching of clusters to labels
  (Hungarian algorithm), or after mapping each cluster to its majority label.
- ``nmi`` (arithmetic normalization, as scikit-learn's default) and ``ari``.
- ``bic`` and ``aic`` from a total log-likelihood and a number of free parameters.
"""

import math
from typing import Callable, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from inference.enumeration import Enumerated, posterior_, validation_off


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Optional[Callable],
    x: torch.Tensor,
    *,
    chunk_size: int = 4096,
    data_plate: str = "data",
) -> torch.Tensor:
    """Exact log p(x[n]) in nats, shape (N,), summing the model's discrete latent out."""
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise ValueError("x must be a non-empty tensor")
    enum = Enumerated(model, guide, x[: min(len(x), 4)], data_plate)
    with validation_off():
        return torch.cat(
            [
                posterior_(enum.log_joint(x[i : i + chunk_size])[0])[0]
                for i in range(0, len(x), chunk_size)
            ]
        )


def _contingency(labels_true, labels_pred) -> np.ndarray:
    a = np.asarray(torch.as_tensor(labels_true).cpu()).ravel()
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("no labels")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table  # (classes, clusters)


def clustering_accuracy(labels_true, labels_pred, mapping: str = "hungarian") -> float:
    """Fraction of points whose cluster maps to their label.

    mapping="hungarian": the best one-to-one matching of clusters to labels (clusters beyond
    the number of labels count as errors); "majority": every cluster maps to its most common
    label, the usual score when there are more clusters than labels.
    """
    table = _contingency(labels_true, labels_pred)  # (labels, clusters)
    if mapping == "majority":
        return float(table.max(0).sum() / table.sum())
    if mapping != "hungarian":
        raise ValueError(f"mapping must be 'hungarian' or 'majority', not {mapping!r}")
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def _entropy(counts) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalized mutual information, I(a; b) / mean(H(a), H(b))."""
    table = _contingency(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    h_a, h_b = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_a == 0 and h_b == 0:
        return 1.0
    outer = np.outer(table.sum(1), table.sum(0))
    nz = table > 0
    mutual = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return mutual / max((h_a + h_b) / 2, 1e-300)


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert and Arabie 1985)."""
    table = _contingency(labels_true, labels_pred).astype(np.float64)

    def pairs(v):
        return (v * (v - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(np.array([table.sum()]))
    expected = rows * cols / total if total > 0 else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def bic(total_log_likelihood: float, num_parameters: int, num_data: int) -> float:
    """Bayesian information criterion, -2 log L + p log N (lower is better)."""
    return -2.0 * total_log_likelihood + num_parameters * math.log(num_data)


def aic(total_log_likelihood: float, num_parameters: int) -> float:
    """Akaike information criterion, -2 log L + 2 p (lower is better)."""
    return -2.0 * total_log_likelihood + 2.0 * num_parameters
