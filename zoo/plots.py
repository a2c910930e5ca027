"""Figures the CLI writes and the tutorials show. Each function returns a matplotlib Figure.

Importing this module also lets every figure draw Japanese text (the Japanese tutorials' titles,
labels and legends): ``japanese_font()`` puts a font that has the glyphs behind matplotlib's own,
so Latin text looks as before and only the glyphs the first font lacks come from the second.
"""

import importlib.util
import logging
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.patches import Ellipse

from inference.io import atomic_write

# installed fonts with Japanese glyphs, by family, where matplotlib-fontja's is not there
JAPANESE_FAMILIES = (
    "IPAexGothic",
    "Noto Sans CJK JP",
    "Noto Sans JP",
    "IPAGothic",
    "Hiragino Sans",
    "Yu Gothic",
    "Meiryo",
    "TakaoGothic",
)


def japanese_font() -> Optional[str]:
    """Add a font that draws Japanese to the end of matplotlib's ``font.family`` list, where
    matplotlib takes the glyphs the fonts before it lack; returns its family, or None, with a
    warning that says how to get one (Japanese text would otherwise show as empty boxes).

    The font is IPAexGothic from the ``matplotlib-fontja`` package (a dependency of the zoo, so
    the set-up installs it), else the first of ``JAPANESE_FAMILIES`` the system has."""
    family = None
    spec = importlib.util.find_spec("matplotlib_fontja")  # found without importing it: its
    if spec is not None and spec.origin:  # import would make the font every figure's first
        path = Path(spec.origin).parent / "fonts" / "ipaexg.ttf"
        if path.exists():
            font_manager.fontManager.addfont(str(path))
            family = font_manager.FontProperties(fname=str(path)).get_name()
    if family is None:
        installed = {font.name for font in font_manager.fontManager.ttflist}
        family = next((name for name in JAPANESE_FAMILIES if name in installed), None)
    if family is None:
        warnings.warn(
            "no font with Japanese glyphs found: Japanese text in figures would show as empty "
            "boxes. Install one: `pip install matplotlib-fontja` (the zoo's set-up does), or a "
            "system font such as Noto Sans CJK JP (Debian: apt-get install fonts-noto-cjk)",
            stacklevel=2,
        )
        return None
    _quiet_about_weights(family)
    families = list(matplotlib.rcParams["font.family"])
    if families == ["sans-serif"]:  # the default: name its first font, the one drawn now
        families = matplotlib.rcParams["font.sans-serif"][:1]
    if family not in families:
        matplotlib.rcParams["font.family"] = families + [family]
    return family


def _quiet_about_weights(family: str) -> None:
    """IPAexGothic has one weight, so matplotlib draws bold Japanese in the regular one (which
    is right) and logs a warning each time it does, into every notebook's output: not that one."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("findfont: Failed to find font weight") and family in message
        )

    logger = logging.getLogger("matplotlib.font_manager")
    if not any(getattr(f, "zoo_family", None) == family for f in logger.filters):
        keep.zoo_family = family
        logger.addFilter(keep)


japanese_font()


def gaussian_ellipses(
    x: torch.Tensor,
    weights: torch.Tensor,
    locs: torch.Tensor,
    covariances: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    axis_names: Sequence[str] = ("x1", "x2"),
    title: str = "Gaussian mixture",
    n_stds: Sequence[int] = (1, 2),
):
    """2-D data with each component's ellipses at ``n_stds`` standard deviations (the
    Mahalanobis distance; thicker nearer the centre) and its weight; points with ``labels``
    (component indices) take their component's colour."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6, 5))
    x = x.detach().cpu().numpy()
    colors = plt.get_cmap("tab10")
    if labels is None:
        ax.scatter(x[:, 0], x[:, 1], s=8, color="0.4", alpha=0.6)
    else:  # colour k for component k, as its ellipses (not a colormap stretched over labels)
        shades = [colors(int(k) % 10) for k in labels.cpu().tolist()]
        ax.scatter(x[:, 0], x[:, 1], s=8, c=shades, alpha=0.6)
    widths = {n: 2.5 - 1.5 * i / max(1, len(n_stds) - 1) for i, n in enumerate(n_stds)}
    for k in range(len(weights)):
        cov = covariances[k].detach().cpu().numpy()
        values, vectors = np.linalg.eigh(cov)
        angle = math.degrees(math.atan2(vectors[1, -1], vectors[0, -1]))
        for n_std in n_stds:
            width, height = 2 * n_std * np.sqrt(np.maximum(values[::-1], 0))
            ax.add_patch(
                Ellipse(
                    locs[k].detach().cpu().numpy(),
                    width,
                    height,
                    angle=angle,
                    fill=False,
                    lw=widths[n_std],
                    color=colors(k % 10),
                )
            )
        ax.annotate(
            f"{weights[k].item():.2f}",
            locs[k].detach().cpu().numpy(),
            color=colors(k % 10),
            weight="bold",
            ha="center",
            va="center",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
    handles = [Line2D([], [], color="0.2", lw=widths[n], label=f"{n} sd") for n in n_stds]
    ax.legend(handles=handles, loc="best", fontsize=8, title="numbers: weights", title_fontsize=8)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_grid(
    images: torch.Tensor,
    image_shape=None,
    titles=None,
    num_cols: int = 10,
    title: str = "",
    cmap="gray",
    row_labels=None,
):
    """A grid of images, one row-major (H*W,) or (H, W) tensor each; ``row_labels`` names the
    rows of the grid (written at their left)."""
    images = images.detach().cpu()
    num = len(images)
    if image_shape is None:
        side = int(round(math.sqrt(images[0].numel())))
        image_shape = (side, images[0].numel() // side)
    num_cols = min(num_cols, num)
    num_rows = math.ceil(num / num_cols)
    fig, axes = plt.subplots(
        num_rows, num_cols, figsize=(num_cols * 1.0, num_rows * 1.1 + 0.4), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < num:
            ax.imshow(images[i].reshape(image_shape).numpy(), cmap=cmap, vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        if len(row_labels) != num_rows:
            raise ValueError(f"{len(row_labels)} row labels for a grid of {num_rows} rows")
        for label, ax in zip(row_labels, axes[:, 0]):
            ax.text(-0.08, 0.5, label, transform=ax.transAxes, ha="right", va="center",
                    fontsize=8)  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if row_labels is not None:  # room at the left for the labels
        fig.subplots_adjust(left=min(0.5, 0.012 * max(len(str(r)) for r in row_labels) + 0.02))
    return fig


def curve(
    history,
    key: str = "objective",
    xkey: Optional[str] = None,
    ylabel: str = None,
    title: str = "Training curve",
):
    """One line of ``record[key]`` against ``record[xkey]`` over a fit's history; ``xkey``
    None: what the records count, "epoch" (the training loop) or "iteration" (EM; "step" in
    runs written before the two were told apart)."""
    if xkey is None:
        first = history[0] if history else {}
        xkey = next((k for k in ("epoch", "iteration", "step") if k in first), "epoch")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[xkey] for r in history if key in r]
    ys = [r[key] for r in history if key in r]
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
    ax.set_xlabel("iteration" if xkey == "step" else xkey)  # "step": EM's, in older runs
    ax.set_ylabel(ylabel or key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def latent_space(
    z: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    title: str = "latent space (posterior means)",
):
    """Posterior means in 2-D: the latent itself when Z = 2, else its first two principal axes."""
    z = z.detach().cpu().float()
    axes = ("z1", "z2")
    if z.shape[1] == 1:  # one unit: along the x axis, the rows spread out vertically
        z, axes = torch.cat([z, torch.linspace(-1, 1, len(z)).unsqueeze(1)], 1), ("z1", "row")
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        z, axes = centred @ v[:2].T, ("principal axis 1", "principal axis 2")
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=4, color="0.4", alpha=0.6)
    else:
        points = ax.scatter(z[:, 0], z[:, 1], s=4, c=labels.numpy(), cmap="tab10", alpha=0.7)
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    fig.tight_layout()
    return fig


def terms_by_level(levels: Sequence[int], terms: Sequence[float], title: str = ""):
    """A diffusion ELBO's per-level terms L_t (nats per image) against the level t, log y."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, terms, marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("level t (noise grows with t)")
    ax.set_ylabel("L_t, nats per image")
    ax.set_title(title or "the ELBO's terms by level (held-out images)")
    fig.tight_layout()
    return fig


def active_units(active: Sequence[int], sizes: Sequence[int], title: str = "active units"):
    """Bars of active units per stochastic layer (bottom z1 first) against the layer's size;
    the gap is posterior collapse."""
    fig, ax = plt.subplots(figsize=(1.2 * len(sizes) + 3, 3.5))
    names = [f"z{i + 1}" for i in range(len(sizes))]
    ax.bar(names, sizes, color="0.85", label="units")
    ax.bar(names, active, color="tab:blue", label="active (Cov_x E_q[u|x] > 0.01)")
    for i, (a, n) in enumerate(zip(active, sizes)):
        ax.text(i, a, f"{a}/{n}", ha="center", va="bottom")
    ax.set_ylabel("units")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def code_maps(images: torch.Tensor, codes: torch.Tensor, num_codes: int, title: str = ""):
    """Each image beside its grid of discrete codes (the index of the codebook vector at each
    position, coloured and written in the cell)."""
    images, codes = images.detach().cpu().float().numpy(), codes.detach().cpu().numpy()
    num, side = len(images), int(round(images.shape[1] ** 0.5))
    fig, axes = plt.subplots(2, num, figsize=(1.6 * num, 3.4), squeeze=False)
    for i in range(num):
        axes[0, i].imshow(images[i].reshape(side, side), cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(codes[i], cmap="tab20", vmin=0, vmax=max(num_codes - 1, 1))
        if codes.shape[1] * codes.shape[2] <= 64:
            for (r, c), k in np.ndenumerate(codes[i]):
                axes[1, i].text(c, r, str(k), ha="center", va="center", fontsize=6)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("codes")
    fig.suptitle(title or f"code maps (K = {num_codes} codes)")
    fig.tight_layout()
    return fig


def codebook_usage(usage: Sequence[dict], num_codes: int, title: str = "codebook use"):
    """Per training step: the perplexity of the batch's code histogram (K when every code is
    used equally) and the number of dead codes (restarted ones marked)."""
    steps = np.arange(1, len(usage) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(steps, [u["perplexity"] for u in usage])
    left.axhline(num_codes, color="0.6", ls="--", label=f"K = {num_codes}")
    left.set_xlabel("training step")
    left.set_ylabel("perplexity of the codes in the batch")
    left.legend()
    right.plot(steps, [u["dead"] for u in usage], label="dead codes")
    right.plot(steps, np.cumsum([u["restarted"] for u in usage]), label="restarts, in total")
    right.set_xlabel("training step")
    right.set_yscale("symlog")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def score_histograms(sets: dict, auroc: dict, title: str = "anomaly scores",
                     xlabel: str = "-log p(x), nats"):  # fmt: skip
    """Histograms of -log p(x) per set of rows ({name: scores}), the first the normal data;
    the ROC AUC of each other set against it in the legend."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, values in sets.items():
        values = values.detach().cpu().float().numpy()
        label = name if name not in auroc else f"{name} (ROC AUC {auroc[name]:.3f})"
        ax.hist(values, bins=60, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write ``fig`` as PNG (atomically: the old file or the new one, never half) and free its
    memory."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
