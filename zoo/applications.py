"""
``zoo score``, ``zoo complete`` and ``zoo denoise`` on a run directory: the masks, the noise,
the metrics beside their baselines and the figures. The posterior computations themselves are
model-agnostic and live in ``inference.uses``; this module knows images and run directories.

    zoo score RUN [--split test] [--outliers noise,upside-down,FILE.npy]
    zoo complete RUN --mask random:0.4 | bottom-half | right-half | quadrants:G | FILE
    zoo denoise RUN --flip 0.1 | --noise-scale 0.3

Each writes its rows (``.csv`` or ``.pt``), a summary (``.json``) and a figure (``.png``) into
the run directory, named after the split and the setting, and prints the summary.

A model that takes more than the data for a split (its ``arguments``: a conditional VAE's
labels, a semi-supervised VAE's) is completed, denoised and scored with those further
arguments held fixed as its condition: the posterior given the seen entries *and* the label.
``labels=False`` (``--hide-labels``) hands the model the split without its labels, for a
model that can go without them (the SSVAE infers the class; the CVAE refuses).
"""

import math
from pathlib import Path
from typing import Tuple

import torch

from inference import uses
from inference.io import atomic_write_bytes, save_json, save_torch
from zoo import plots, registry, runs


def parse_mask(text: str, shape: Tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The observed entries (True) of ``shape`` = (N, D) for a mask spec: ``random:P`` (each
    entry hidden with probability P), ``bottom-half``, ``right-half`` or ``quadrants:G`` (the
    first G of the four quadrants, in reading order, seen) of square images, or a ``.pt`` /
    ``.npy`` file of a boolean (N', D) or (D,) array, True where seen (its first N rows)."""
    num, dim = shape
    if text.endswith((".pt", ".npy")):
        return _mask_file(text, shape)
    kind, _, arg = text.partition(":")
    if kind == "random":
        try:
            p = float(arg)
        except ValueError:
            p = math.nan
        if not 0 < p < 1:
            raise ValueError(f"--mask random:P needs a fraction P in (0, 1), got {arg!r}")
        g = torch.Generator().manual_seed(seed)
        observed = torch.rand(num, dim, generator=g) >= p
        observed[~observed.any(1), 0] = True  # every row keeps something to go on
        return observed
    side = math.isqrt(dim)
    if side * side != dim:
        raise ValueError(f"--mask {text}: the image masks need square images, not {dim} features")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    half = side // 2
    if kind == "bottom-half" and not arg:
        image = rows < half
    elif kind == "right-half" and not arg:
        image = cols < half
    elif kind == "quadrants":
        if arg not in ("1", "2", "3"):
            raise ValueError(f"--mask quadrants:G needs G = 1, 2 or 3 quadrants seen, got {arg!r}")
        quadrant = (rows >= half).long() * 2 + (cols >= half).long()  # 0 1 / 2 3
        image = quadrant < int(arg)
    else:
        raise ValueError(
            f"--mask {text!r}: use random:P, bottom-half, right-half, quadrants:G or a .pt / .npy"
            " file"
        )
    return image.flatten().expand(num, dim).clone()


def _mask_file(text: str, shape: Tuple[int, int]) -> torch.Tensor:
    import numpy as np

    from inference.io import UnreadableFile, load_tensors

    path = runs.run_path(text)
    if not path.is_file():
        raise ValueError(f"--mask {text}: no such file")
    wanted = "a boolean array (True where seen) saved by torch.save or numpy.save"
    try:
        if text.endswith(".pt"):
            value = load_tensors(path, "mask")
        else:
            value = np.load(path, allow_pickle=False)
    except UnreadableFile as error:
        raise ValueError(f"--mask: {error}; it should hold {wanted}") from None
    except (ValueError, OSError, EOFError):  # numpy's own words would suggest unpickling
        head = path.read_bytes()[:6]
        why = "a pickle of Python objects" if head[:1] == b"\x80" else "not a .npy array"
        raise ValueError(f"--mask {text}: {why}; it should hold {wanted}") from None
    if not isinstance(value, (torch.Tensor, np.ndarray)):  # an .npz archive, a dict of tensors
        raise ValueError(f"--mask {text}: holds a {type(value).__name__}; it should hold {wanted}")
    mask = torch.as_tensor(value)
    if mask.dtype != torch.bool:
        raise ValueError(f"--mask {text}: a boolean array (True where seen), not {mask.dtype}")
    num, dim = shape
    if mask.dim() == 1:
        mask = mask.expand(num, -1)
    if mask.dim() != 2 or mask.shape[1] != dim or len(mask) < num:
        raise ValueError(
            f"--mask {text}: shape {tuple(mask.shape)}, the rows need ({num}, {dim}) or ({dim},)"
        )
    mask = mask[:num].clone()
    if mask.all():
        raise ValueError(
            f"--mask {text}: every entry is True (seen), so there is nothing to fill in; mark"
            " the hidden entries False"
        )
    return mask


def score(model, config, run, split=None, outliers=(), num_samples=1000, seed=0,
          labels=True, corrected=False, data=None) -> dict:  # fmt: skip
    """Per-point log p(x) of a split (exact or with standard errors), a histogram, and with
    ``outliers`` (``noise``, ``upside-down`` or files of rows) the ROC AUC of -log p(x); with
    ``corrected`` also of the complexity-corrected score -log p(x) - ``complexity(x)``.
    ``data``: another data set's split, or a .csv / .npy file of rows (all of them), scored
    instead of the run's own (binarized as the run's held-out rows are)."""
    split = split or default_split(config, data)
    x, arguments = _arguments(config, split, model, labels, data)
    value = registry.as_data(arguments)
    result = uses.scores(model.model, model.guide, value, num_samples=num_samples)
    if data is not None:
        split = "all" if Path(data).suffix in (".csv", ".npy") else split
    tag = f"scores_{split}" if data is None else f"scores_{Path(data).stem}_{split}"
    simple = complexity(x) if corrected else None  # zlib over every row: once
    columns = [result.log_prob.tolist(), result.std_error.tolist()]
    if corrected:
        columns.append(simple.tolist())
    header = "row,log_prob,std_error" + (",complexity" if corrected else "")
    lines = [header] + [",".join([str(i)] + [f"{v:.6f}" for v in row])
                        for i, row in enumerate(zip(*columns))]  # fmt: skip
    atomic_write_bytes(run / f"{tag}.csv", ("\n".join(lines) + "\n").encode())
    summary = {
        "data": data or config["data"],
        "split": split,
        "num_rows": len(x),
        "mean_log_prob": result.log_prob.mean().item(),
        "exact": result.exact,
        "num_samples": result.num_samples,
        "mean_std_error": result.std_error.mean().item(),
        # a Delta guide site: log p(x, z = v) at its point (a bound for discrete z), not log p(x)
        "point_mass_guide_site": result.point_mass,
        "auroc": {},
    }
    sets = {split: -result.log_prob}
    fixed = {split: -result.log_prob - simple} if corrected else {}
    if corrected:
        summary["auroc_complexity_corrected"] = {}
    if outliers and len(arguments) != 1 and labels:
        raise ValueError(
            f"--outliers: {config['model']} takes {len(arguments)} arguments for a split (a"
            " condition or labels), which the outlier rows do not have; score both without"
            " labels (--hide-labels), if the model can go without them"
        )
    for name in outliers:
        rows = _outliers(name, x, seed, config.get("held_out_binarize", config.get("binarize")))
        given = registry.model_arguments(model, rows, None, split)  # no labels, as the data
        anomalous = uses.scores(
            model.model, model.guide, registry.as_data(given), num_samples=num_samples
        )
        sets[name] = -anomalous.log_prob
        summary["auroc"][name] = uses.roc_auc(sets[split], sets[name])
        if corrected:
            fixed[name] = sets[name] - complexity(rows)
            summary["auroc_complexity_corrected"][name] = uses.roc_auc(fixed[split], fixed[name])
    plots.save(plots.score_histograms(sets, summary["auroc"]), run / f"{tag}.png")
    if corrected:
        figure = plots.score_histograms(
            fixed, summary["auroc_complexity_corrected"], title="complexity-corrected scores",
            xlabel="-log p(x) - compressed length, nats",
        )  # fmt: skip
        plots.save(figure, run / f"{tag}_corrected.png")
    save_json(run / f"{tag}.json", summary)
    return summary


def complexity(x: torch.Tensor) -> torch.Tensor:
    """Each row's length in nats compressed by zlib (level 9), binary rows packed eight
    entries to a byte and rows in [0, 1] quantized to 8 bits: the input complexity of Serra et
    al. (2020, Input complexity and out-of-distribution detection with likelihood-based
    generative models). A likelihood model gives simple inputs (few strokes, flat images) a
    high p(x) whatever it learned, and so does a generic compressor; their corrected anomaly
    score -log p(x) - complexity(x) keeps what the model knows beyond that."""
    import zlib

    import numpy as np

    rows = x.detach().cpu()
    if ((rows == 0) | (rows == 1)).all():
        data = np.packbits(rows.numpy().astype(np.uint8), axis=1)
    elif rows.min() >= 0 and rows.max() <= 1:
        data = (rows * 255).round().numpy().astype(np.uint8)
    else:
        raise ValueError(
            "the complexity correction compresses binary rows or rows in [0, 1] (images);"
            f" these range over [{rows.min().item():.3g}, {rows.max().item():.3g}]"
        )
    lengths = [8 * len(zlib.compress(row.tobytes(), 9)) for row in data]
    return torch.tensor(lengths, dtype=x.dtype, device=x.device) * math.log(2)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int, path: str = "linear"):
    """``steps`` points from ``z0`` to ``z1`` (each (..., Z)), both ends included: (steps, ...,
    Z). ``linear``: (1 - t) z0 + t z1; ``spherical``: the great circle between them (White
    2016), whose points keep the norm a draw of N(0, I) has, where a straight line between
    two draws passes nearer the origin than the prior ever puts a point."""
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps, got {steps}")
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)
    t = t.reshape(-1, *([1] * z0.dim()))
    if path == "linear":
        return (1 - t) * z0 + t * z1
    if path != "spherical":
        raise ValueError(f"path must be 'linear' or 'spherical', not {path!r}")
    cos = (z0 * z1).sum(-1, keepdim=True) / (
        z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True)
    )
    omega = cos.clamp(-1, 1).acos()
    small = omega.abs() < 1e-4  # (nearly) the same direction: the straight line is the arc
    sin = omega.sin().where(~small, torch.ones_like(omega))
    arc = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / sin
    return torch.where(small, (1 - t) * z0 + t * z1, arc)


def interpolations(model, config, run, pairs=((0, 1),), steps=9, split=None) -> dict:
    """Encode each pair of rows of a split (the guide's mean code), walk between the codes
    linearly and along the great circle, decode every point; ``interpolation.pt`` holds the
    images, (pairs, 2 paths, steps, D), and ``interpolation.png`` shows them."""
    missing = [n for n in ("encode", "decode") if not callable(getattr(model, n, None))]
    if missing:
        raise ValueError(
            f"--interpolate needs a model that offers encode(x) and decode(z); {config['model']}"
            f" lacks {' and '.join(missing)}"
        )
    split = split or default_split(config)
    x, _ = _arguments(config, split, model, labels=False)
    rows = sorted({i for pair in pairs for i in pair})
    if rows[-1] >= len(x):
        raise ValueError(f"--interpolate: row {rows[-1]} of {split}, which has {len(x)} rows")
    with torch.no_grad():
        images = []
        for a, b in pairs:
            z = model.encode(x[[a, b]])[0]  # (2, Z) posterior means
            paths = [interpolate(z[0], z[1], steps, p) for p in ("linear", "spherical")]
            images.append(torch.stack([model.decode(p) for p in paths]))  # (2, S, D)
        images = torch.stack(images)  # (P, 2, S, D)
    save_torch(run / "interpolation.pt", {"images": images.cpu(), "pairs": list(pairs)})
    summary = {"pairs": [list(p) for p in pairs], "steps": steps, "split": split}
    if _square(x):
        grid = images.reshape(-1, x.shape[1]).cpu()
        labels = [f"rows {a}-{b}, {p}" for a, b in pairs for p in ("linear", "spherical")]
        figure = plots.image_grid(grid, num_cols=steps, title="latent interpolation",
                                  row_labels=labels)  # fmt: skip
        plots.save(figure, run / "interpolation.png")
    return summary


def complete(model, config, run, mask, split=None, num_rows=1000, num_samples=500, seed=0,
             method="importance", num_steps=1000, labels=True, proposal="guide"):  # fmt: skip
    """Fill the hidden entries of ``num_rows`` rows of a split (by importance sampling, exact
    enumeration, or the Metropolis-within-Gibbs ``method="chain"`` of ``num_steps``); the
    hidden entries' log-loss (binary data) or squared error beside the training mean's, and a
    figure."""
    split = split or default_split(config)
    x, condition = _data_and_condition(config, split, model, labels, num_rows)
    observed = parse_mask(mask, tuple(x.shape), seed).to(x.device)
    torch.manual_seed(seed)
    result = uses.complete(
        model.model, model.guide, x, observed, num_samples=num_samples, method=method,
        num_steps=num_steps, condition=condition, proposal=proposal,
    )  # fmt: skip
    baseline = _training_mean(config, x)
    hidden = ~observed
    summary = {"mask": mask, "split": split, "num_rows": len(x), "exact": result.exact}
    summary["conditioned"] = bool(condition)
    summary["labels_hidden"] = not labels
    summary["method"] = "exact" if result.exact else method
    summary["proposal"] = proposal
    summary["num_samples" if method == "importance" else "num_steps"] = result.num_samples
    summary["hidden_fraction"] = hidden.float().mean().item()
    which = "median_ess" if method == "importance" else "median_acceptance_rate"
    summary[which] = result.ess.median().item()
    if method == "importance" and not result.exact:  # uses.DegenerateWeights said so too
        summary["weights_degenerate"] = summary[which] < 0.05 * num_samples
    summary.update(_errors(x, result.mean, baseline.expand_as(x), hidden, "completion", "mean"))
    setting = Path(mask).stem if mask.endswith((".pt", ".npy")) else mask.replace(":", "-")
    tag = f"completion_{setting}_{split}" + ("_chain" if method == "chain" else "")
    tag += "_prior" if proposal == "prior" else ""
    save_torch(run / f"{tag}.pt", {"mean": result.mean.cpu(), "observed": observed.cpu()})
    save_json(run / f"{tag}.json", summary)
    if _square(x):
        shown = torch.where(observed, x, torch.full_like(x, 0.3))
        rows = torch.cat([shown[:10], result.mean[:10], x[:10]])
        labels = ("seen (hidden grey)", "completion", "truth")
        figure = plots.image_grid(rows.cpu(), num_cols=min(10, len(x)), title=f"mask {mask}",
                                  row_labels=labels)  # fmt: skip
        plots.save(figure, run / f"{tag}.png")
    return summary


def denoise(model, config, run, flip=None, noise_scale=None, split=None, num_rows=1000,
            num_samples=500, seed=0, labels=True):  # fmt: skip
    """Corrupt ``num_rows`` rows of a split by the stated noise, then clean them: the clean
    data's log-loss (binary) or squared error beside the noisy input's and a reconstruction's."""
    split = split or default_split(config)
    clean, condition = _data_and_condition(config, split, model, labels, num_rows)
    g = torch.Generator().manual_seed(seed)
    if flip is not None:
        flips = (torch.rand(clean.shape, generator=g) < flip).to(clean.device)
        noisy = torch.where(flips, 1 - clean, clean)
        from_input = noisy * (1 - flip) + (1 - noisy) * flip  # the best guess from the pixel alone
        setting = f"flip-{flip:g}"
    else:
        if not (noise_scale > 0 and math.isfinite(noise_scale)):
            raise ValueError(f"--noise-scale must be a positive finite number, not {noise_scale}")
        noise = torch.randn(clean.shape, generator=g).to(clean.device)
        noisy = clean + noise_scale * noise
        if not torch.isfinite(noisy).all():
            raise ValueError(
                f"--noise-scale {noise_scale:g} makes the noisy data overflow {noisy.dtype}:"
                " choose a scale on the order of the data's"
            )
        from_input = noisy
        setting = f"noise-{noise_scale:g}"
    torch.manual_seed(seed)
    result = uses.denoise(
        model.model, model.guide, noisy, flip=flip, noise_scale=noise_scale,
        num_samples=num_samples, condition=condition,
    )  # fmt: skip
    if not torch.isfinite(result.mean).all():
        raise FloatingPointError(
            f"the denoised rows are not finite under {setting}: the noise swamps what the model"
            " can tell apart (a smaller --noise-scale, or more --num-samples)"
        )
    everything = torch.ones_like(clean, dtype=torch.bool)
    summary = {"noise": setting, "split": split, "num_rows": len(clean), "exact": result.exact}
    summary["conditioned"] = bool(condition)
    summary["labels_hidden"] = not labels
    summary["num_samples"] = result.num_samples
    summary["median_ess"] = result.ess.median().item()
    if not result.exact:  # uses.DegenerateWeights said so too
        summary["weights_degenerate"] = summary["median_ess"] < 0.05 * num_samples
    summary.update(_errors(clean, result.mean, from_input, everything, "denoised", "noisy_input"))
    reconstruct = registry.hook(model, "reconstruct")
    if callable(reconstruct) and flip is not None and not condition:
        with torch.no_grad():
            again = _errors(
                clean, reconstruct(noisy), from_input, everything, "reconstruction", "_"
            )
        summary.update({k: v for k, v in again.items() if k.startswith("reconstruction")})
    tag = f"denoising_{setting}_{split}"
    save_torch(run / f"{tag}.pt", {"mean": result.mean.cpu(), "noisy": noisy.cpu()})
    save_json(run / f"{tag}.json", summary)
    if _square(clean):
        rows = torch.cat([noisy[:10], result.mean[:10], clean[:10]])
        figure = plots.image_grid(rows.cpu(), num_cols=min(10, len(clean)), title=setting,
                                  row_labels=("noisy", "denoised", "clean"))  # fmt: skip
        plots.save(figure, run / f"{tag}.png")
    return summary


# ---------------------------------------------------------------------------------- helpers


def default_split(config, data=None) -> str:
    """The split a use of the run reads when none is named: the test split, or for data from
    a file (which has none: its rows are the training rows) "train"."""
    return "train" if _is_file(config["data"] if data is None else data) else "test"


def _is_file(name) -> bool:
    return Path(str(name)).suffix in (".csv", ".npy")


def _arguments(config, split, model, labels=True, data=None):
    """A split's rows as the run's scores see them, and the model's arguments for it (with
    the split's labels, or without them); of ``data`` (a data set or a file) where given.
    --max-data cut the run's training rows only: a held-out split is read whole, as the fit's
    own scores read it."""
    binarize = config.get("held_out_binarize", config.get("binarize"))
    name = config["data"] if data is None else data
    if _is_file(name) and split != "train":
        raise ValueError(
            f"{name} is a data file: its rows have no {split!r} split (they are all the rows the"
            " run was fitted on); pass --split train to use them as such"
        )
    max_data = config.get("max_data") if data is None and split == "train" else None
    try:
        x, y = runs.split(name, split, binarize, max_data)
    except ValueError as error:
        if data is None:
            raise ValueError(
                f"the run's data ({name}, binarize {binarize!r}, as its config.json records"
                f" them) cannot be read for the {split!r} split: {error}"
            ) from None
        raise ValueError(
            f"--data {name}: {error} (rows are read as the run's own: binarize {binarize!r})"
        ) from None
    recorded = config.get("row_shape")
    if data is None and recorded is not None and list(x.shape[1:]) != list(recorded):
        raise ValueError(
            f"the run's data ({name}, as its config.json records it) has rows of shape"
            f" {tuple(x.shape[1:])}, but the run was fitted on rows of shape {tuple(recorded)}:"
            " config.json's data was changed since the fit: set it back to the data its"
            ' "command" names'
        )
    if data is not None:
        own, _ = runs.split(config["data"], "train", binarize, 1)
        if x.shape[1:] != own.shape[1:]:
            raise ValueError(
                f"--data {data}: rows of {x.shape[1]} features; the run's model was fitted on"
                f" {own.shape[1]} ({config['data']})"
            )
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    x = x.to(params[0].device) if params else x
    arguments = registry.model_arguments(model, x, y if labels else None, split)
    return x, tuple(a.to(x.device) if isinstance(a, torch.Tensor) else a for a in arguments)


def _data_and_condition(config, split, model, labels, num_rows):
    """The first ``num_rows`` rows of the model's data argument for a split, and its further
    arguments (a condition, labels) for the same rows."""
    _, arguments = _arguments(config, split, model, labels)
    num = len(arguments[0])
    head = tuple(
        a[:num_rows] if isinstance(a, torch.Tensor) and a.dim() and len(a) == num else a
        for a in arguments
    )
    return head[0], head[1:]


def _outliers(name: str, x: torch.Tensor, seed: int, binarize=None) -> torch.Tensor:
    """Rows to score against ``x``: generated (noise, upside-down), or a file's, binarized as
    the run's held-out rows are (``binarize``)."""
    g = torch.Generator().manual_seed(seed + 1)
    binary = bool(((x == 0) | (x == 1)).all())
    if name == "noise":  # images of independent pixels with the data's mean intensity
        p = x.mean().item()
        if binary:
            return (torch.rand(x.shape, generator=g) < p).to(x)
        return (x.mean(0) + x.std(0) * torch.randn(x.shape, generator=g)).to(x)
    if name == "upside-down":
        if not _square(x):
            raise ValueError("--outliers upside-down needs square images")
        side = math.isqrt(x.shape[1])
        return x.reshape(-1, side, side).flip(1).reshape(len(x), -1)
    from zoo import data

    rows = data.load_file(runs.run_path(name)).to(x)
    if rows.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"--outliers {name}: rows of {rows.shape[1]} features, the data has {x.shape[1]}"
        )
    if binarize is not None:
        try:
            rows = data.binarize(rows, "threshold" if binarize == "dynamic" else binarize, seed=0)
        except ValueError as error:
            raise ValueError(
                f"--outliers {name}: the run's rows are binarized ({binarize}) and these cannot"
                f" be: {error}"
            ) from None
    return rows


def _training_mean(config, x) -> torch.Tensor:
    binarize = config.get("held_out_binarize", config.get("binarize"))
    train, _ = runs.split(config["data"], "train", binarize, config.get("max_data"))
    return train.mean(0).to(x)


def _errors(truth, prediction, baseline, where, name, baseline_name) -> dict:
    """Nats per row (binary truth: Bernoulli log-loss of the entries ``where``) or squared
    error per row, for the prediction and the baseline; and the binary accuracy."""
    binary = bool(((truth == 0) | (truth == 1)).all())
    out = {}
    for key, guess in ((name, prediction), (baseline_name, baseline)):
        if binary:
            p = guess.clamp(1e-4, 1 - 1e-4)
            loss = -(truth * p.log() + (1 - truth) * (1 - p).log())
            out[f"{key}_log_loss"] = (loss * where).sum(-1).mean().item()
            out[f"{key}_accuracy"] = ((guess.round() == truth) & where).sum().item() / max(
                1, int(where.sum())
            )
        else:
            out[f"{key}_squared_error"] = (((guess - truth) ** 2) * where).sum(-1).mean().item()
    return out


def _square(x) -> bool:
    side = math.isqrt(x.shape[1])
    return side * side == x.shape[1]
