"""
The diffusion model (zoo/models/diffusion.py) against the VAE at the same training budget, and its
ELBO as the hierarchy deepens.

    python benchmarks/diffusion_nll.py --epochs 3            # MNIST table (minutes on a CPU)
    python benchmarks/diffusion_nll.py --digits-only         # the depth and schedule table
    python benchmarks/diffusion_nll.py --quick --out /tmp/x  # what the tests run

1. MNIST, dynamically binarized for training and scored on the fixed static test draw (as
   every image model here): `zoo fit diffusion` (U-Net, T = 1000, one level per image and
   step) and `zoo fit vae` (784-200-200-50) for the same epochs, batch size and rate; the test
   ELBO in nats per image and bits per dimension (the diffusion ELBO with --eval-samples
   stratified levels per image, its standard error stated), the VAE's importance-sampled NLL,
   the training seconds.
2. The 8x8 digits (threshold binarization), T = 10, 100, 1000 and the three schedules, the same
   epochs each: the test ELBO as a function of the depth of the hierarchy (all T levels summed
   exactly), and a plot, diffusion_depth.png.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import _zoo_runs  # noqa: E402


def mnist_rows(args):
    shared = ["--data", "mnist", "--binarize", "dynamic", "--inference", "reparam"]
    shared += ["--epochs", str(args.epochs), "--batch-size", "128", "--lr", "0.001"]
    shared += ["--eval-samples", str(args.eval_samples), "--overwrite", "--quiet"]
    models = {"diffusion, U-Net, T = 1000": ["diffusion"], "VAE 784-200-200-50": ["vae"]}
    rows = []
    for name, model in models.items():
        run = Path(args.runs) / f"{model[0]}-e{args.epochs}"
        command = ["fit", *model, *shared, "--out", str(run)]
        m = _zoo_runs.fit(command, run, reuse=args.reuse)
        rows.append(
            {
                "model": name,
                "epochs": args.epochs,
                "test_neg_elbo": -m["test_elbo"],
                "test_neg_elbo_se": m.get("test_elbo_se"),
                "bits_per_dim": -m["test_elbo"] / (784 * math.log(2)),
                "test_nll": -m["test_log_likelihood"] if "test_log_likelihood" in m else None,
                "fit_seconds": m["fit_seconds"],
                "command": "zoo " + " ".join(command),
            }
        )
    return rows


def depth_rows(epochs: int, steps_list, schedules):
    """The test ELBO of the 8x8 digits for each depth T and schedule, the same training."""
    import pyro
    import torch

    from inference import reparam
    from zoo import data
    from zoo.models.diffusion import Diffusion, DiffusionConfig

    x, _ = data.load("digits", "train", "threshold")
    x_test, _ = data.load("digits", "test", "threshold")
    rows = []
    for schedule in schedules:
        for steps in steps_list:
            pyro.clear_param_store()
            torch.manual_seed(0)
            config = DiffusionConfig(x_dim=64, steps=steps, schedule=schedule, hidden=(256, 256))
            model = Diffusion(config)
            started = time.time()
            reparam.fit(
                model.model,
                model.guide,
                x,
                batch_size=64,
                num_epochs=epochs,
                lr=1e-3,
                seed=0,
                progress=False,
            )
            seconds = time.time() - started
            elbo = torch.stack([model.elbo(x_test) for _ in range(3)]).mean(0)  # all T levels
            rows.append(
                {
                    "schedule": schedule,
                    "steps": steps,
                    "epochs": epochs,
                    "test_neg_elbo": -elbo.mean().item(),
                    "se": (elbo.std() / math.sqrt(len(elbo))).item(),
                    "fit_seconds": seconds,
                }
            )
            print(rows[-1])
    return rows


def plot_depth(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule in sorted({r["schedule"] for r in rows}):
        mine = [r for r in rows if r["schedule"] == schedule]
        ax.errorbar(
            [r["steps"] for r in mine],
            [r["test_neg_elbo"] for r in mine],
            yerr=[2 * r["se"] for r in mine],
            marker="o",
            label=schedule,
        )
    ax.axhline(64 * math.log(2), color="0.6", ls="--", label="uniform pixels (64 log 2)")
    ax.set_xscale("log")
    ax.set_xlabel("T, levels of the hierarchy")
    ax.set_ylabel("test -ELBO, nats per image")
    ax.set_title(f"diffusion on 8x8 digits, {rows[0]['epochs']} epochs each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="MNIST epochs")
    parser.add_argument("--digits-epochs", type=int, default=40)
    parser.add_argument("--eval-samples", type=int, default=20, help="levels per test image")
    parser.add_argument("--digits-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="digits only, tiny: for the tests")
    parser.add_argument("--reuse", action="store_true", help="read runs the same command finished")
    parser.add_argument("--runs", default="runs/diffusion_nll")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        depth = depth_rows(2, (10, 100), ("cosine",))
        name = "diffusion_depth-quick"
    else:
        depth = depth_rows(args.digits_epochs, (10, 100, 1000), ("cosine", "linear", "learned"))
        name = f"diffusion_depth-e{args.digits_epochs}"
    plot_depth(depth, out / f"{name}.png")
    lines = [
        f"# Diffusion on the 8x8 digits: the test -ELBO by depth T, {depth[0]['epochs']} epochs",
        "",
        "Threshold-binarized digits (1438 training, 359 test images), MLP denoiser 256-256, one",
        "level per image and step, Adam 1e-3, batch 64; the ELBO sums all T levels exactly",
        "(mean of 3 draws of the z_t), nats per image, +- its standard error over images.",
        "Uniform pixels: 64 log 2 = 44.36.",
        "",
        "| schedule | T | test -ELBO | +- | fit seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['schedule']} | {r['steps']} | {r['test_neg_elbo']:.2f} | {r['se']:.2f} |"
        f" {r['fit_seconds']:.0f} |"
        for r in depth
    ]
    (out / f"{name}.json").write_text(json.dumps(depth, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.md')}")
    if args.quick or args.digits_only:
        return
    rows = mnist_rows(args)
    table = [
        f"# Diffusion against the VAE on binarized MNIST, {args.epochs} epochs each",
        "",
        "Dynamic binarization for training, the fixed static draw of the 10,000 test images for",
        "scoring; reparameterized driver, batch 128, Adam 1e-3, the same epochs for both.",
        f"Diffusion: ELBO from {args.eval_samples} stratified levels per image (unbiased; +- its",
        "standard error). VAE: ELBO, and the NLL by importance sampling.",
        "",
        "| model | epochs | test -ELBO (nats) | +- | bits/dim | test NLL | fit seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        se = "-" if r["test_neg_elbo_se"] is None else f"{r['test_neg_elbo_se']:.2f}"
        nll = "-" if r["test_nll"] is None else f"{r['test_nll']:.2f}"
        table.append(
            f"| {r['model']} | {r['epochs']} | {r['test_neg_elbo']:.2f} | {se} |"
            f" {r['bits_per_dim']:.4f} | {nll} | {r['fit_seconds']:.0f} |"
        )
    table += [
        "",
        "For scale, long runs on the same data: the VAE 87.81 nats after 3280 epochs, the ladder",
        "VAE (published, Sonderby et al. 2016) 81.74; benchmarks/results/vae_quality-*.md.",
    ]
    _zoo_runs.save(args.out, f"diffusion_nll-e{args.epochs}", rows, table)


if __name__ == "__main__":
    main()
