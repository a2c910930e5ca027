"""Small network blocks the deep models share, and the checks their configs share."""

import math
from typing import Optional, Sequence

import torch
from torch import nn

# What an MLP VAE on the 8x8 digits (1,437 training images) needs to learn in a few epochs,
# where MNIST's sizes and rate leave it collapsed: a small latent and network, more and smaller
# steps, thresholded pixels (tests/test_digits_defaults.py). Models declare it per data set
# (``register(data_defaults={"digits": DIGITS_DEFAULTS})``).
DIGITS_DEFAULTS = {
    "z_dim": 8,
    "hidden": (128,),
    "batch_size": 16,
    "lr": 3e-3,
    "binarize": "threshold",
}


def mlp(sizes: Sequence[int], activation=nn.Softplus) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian: the inference network of a VAE."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation=nn.Softplus):
        super().__init__()
        self.body = mlp([in_dim, *hidden], activation=activation) if hidden else nn.Identity()
        width = hidden[-1] if hidden else in_dim
        self.activation = activation() if hidden else nn.Identity()
        self.loc = nn.Linear(width, out_dim)
        self.scale = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor):  # (N, X) -> (N, Z), (N, Z)
        h = self.activation(self.body(x))
        # softplus keeps the scale positive; the floor keeps log q finite early in training
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


def check_rows(x, dim: int) -> int:
    """Raise a clear error unless ``x`` is a float tensor of shape (N, dim); return N."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (N, {dim}), got {tuple(x.shape)}{one_row(x, dim)}")
    return x.shape[0]


def one_row(x, dim: int) -> str:
    """The hint for a single row given without its row axis, else nothing."""
    return f": one row is x[None], of shape (1, {dim})" if tuple(x.shape) == (dim,) else ""


def check_sizes(config, *names: str) -> None:
    """Raise a ValueError naming the field unless each is a positive int (or a tuple of them)."""
    for name in names:
        value = getattr(config, name)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            kind = "positive integers" if isinstance(value, (tuple, list)) else "a positive integer"
            raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_number(config, name: str, low: Optional[float] = None, *, strict: bool = False) -> None:
    """Raise a ValueError naming the field unless it is a finite number at least ``low``
    (above it with ``strict``)."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
