"""
Semi-supervised VAE (M2) test accuracy on MNIST with 100 / 600 / 1000 / 3000 labels, over label
draws, beside Pyro's tutorial and Kingma et al. (2014).

    python benchmarks/ssvae_accuracy.py                                  # the full table
    python benchmarks/ssvae_accuracy.py --labels 100 --seeds 0 --epochs 20  # what fits in minutes
    python benchmarks/ssvae_accuracy.py --stack-on runs/vae_quality/iwae5-e500 --labels 100
                                                                         # M1+M2

Each run is `zoo fit ssvae` with Pyro's tutorial settings (hidden 500, z 50, batch 200,
lr 4.2e-4, alpha 46, y enumerated), early-stopped on validation accuracy; the label draw is
``--label-seed``. One epoch takes about 30 s on 2 CPU cores, so the full table (4 x 3 runs of 50
epochs) is about 5 hours there. Beside each M2 run, the same classifier network trained on the
labelled images alone (the baseline of Pyro's table), so the table shows what the unlabelled
images add. Goal (issue 4): at least 95 % with 100 labels.

With ``--stack-on RUN`` the runs are Kingma et al.'s M1+M2 instead: M2 over the latent space of
the fitted VAE in RUN (M1, frozen; for instance the IWAE-5 run of ``benchmarks/vae_quality.py``),
hidden 500, z 10, batch 200, lr 1e-3, alpha 46. One epoch takes about 10 s on one core. The
table then sets Kingma's M1+M2 beside it and records M1's own command line.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _zoo_runs  # noqa: E402
import torch  # noqa: E402

from zoo import data  # noqa: E402
from zoo.models.nets import mlp  # noqa: E402

PYRO = {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82}  # tutorial, with the auxiliary loss
PYRO_BASELINE = {100: 77.12, 600: 87.16, 1000: 88.63, 3000: 91.08}  # labelled data only
KINGMA = {100: 88.03, 600: 95.06, 1000: 96.40, 3000: 96.08}  # M2, Table 1 (100 - error %)
KINGMA_M1M2 = {100: 96.67, 600: 97.41, 1000: 97.60, 3000: 97.82}  # M1+M2, Table 1


def baseline_accuracy(labels: int, seed: int, steps: int = 2000) -> float:
    """Test accuracy (%) of M2's classifier network (784-500-10, softplus) trained on the
    labelled subset alone: full-batch Adam, a fresh binarization of the labelled images every
    step as M2 sees them, the step with the best validation accuracy kept (M2 is early-stopped
    on validation too). The "baseline classifier" column of Pyro's table."""
    x, y = data.load("mnist", "train", None)
    known = data.partial_labels(y, labels, seed) >= 0
    x, y = x[known], y[known]
    x_valid, y_valid = data.load("mnist", "valid", "static")
    x_test, y_test = data.load("mnist", "test", "static")
    torch.manual_seed(seed)
    net = mlp([784, 500, 10])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    best = (-1.0, 0.0)  # (validation accuracy, test accuracy)
    for step in range(steps):
        optimizer.zero_grad()
        logits = net(data.binarize(x, "dynamic", generator=generator))
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        if step % 50 == 49:
            with torch.no_grad():
                valid = (net(x_valid).argmax(-1) == y_valid).float().mean().item()
                if valid > best[0]:
                    best = (valid, (net(x_test).argmax(-1) == y_test).float().mean().item())
    return 100 * best[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--runs", default="runs/ssvae_accuracy")
    parser.add_argument("--stack-on", metavar="RUN", help="M1+M2 over the VAE fitted in RUN")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read the metrics of runs already made by the same command instead of fitting again",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    stacked = args.stack_on is not None
    prefix = "m1m2-" if stacked else ""  # of the run directories and of the results file
    rows = []
    for labels in args.labels:
        for seed in args.seeds:
            run = Path(args.runs) / f"{prefix}labels{labels}-seed{seed}-e{args.epochs}"
            command = ["fit", "ssvae", "--labels", str(labels), "--label-seed", str(seed)]
            if stacked:
                command += ["--stack-on", args.stack_on, "--hidden", "500", "--z-dim", "10"]
                command += ["--batch-size", "200", "--lr", "0.001"]
            else:
                command += ["--hidden", "500", "--z-dim", "50", "--batch-size", "200"]
                command += ["--lr", "0.00042"]
            command += ["--alpha", "46", "--epochs", str(args.epochs)]
            command += ["--patience", str(args.patience), "--eval-samples", "10"]
            command += ["--out", str(run), "--overwrite", "--quiet"]
            metrics = _zoo_runs.fit(command, run, reuse=args.reuse)
            baseline = baseline_accuracy(labels, seed)
            rows.append(
                {
                    "labels": labels,
                    "label_seed": seed,
                    "epochs_run": metrics["epochs"],
                    "test_accuracy": 100 * metrics["test_accuracy"],
                    "best_valid_accuracy": 100 * metrics["best_valid_score"],
                    "generative_test_accuracy": 100 * metrics["generative_accuracy"],
                    "baseline_test_accuracy": baseline,
                    "fit_seconds": metrics["fit_seconds"],
                    "run": str(run),
                    "command": "zoo " + " ".join(command),
                }
            )
            print(rows[-1], flush=True)
    what = "M1+M2" if stacked else "M2"
    lines = [
        f"# SSVAE ({what}) test accuracy, at most {args.epochs} epochs\n",
        "MNIST 50k training images of which LABELS keep their label (class-balanced draw per"
        " seed), dynamic binarization; accuracy of q(y | x) on the 10k test images, %.\n",
    ]
    if stacked:
        m1 = json.loads((Path(args.stack_on) / "config.json").read_text())
        m1_metrics = json.loads((Path(args.stack_on) / "metrics.json").read_text())
        units = json.loads((Path(rows[0]["run"]) / "config.json").read_text())["model_config"]
        lines += [
            f"M1 ({args.stack_on}, test NLL {-m1_metrics['test_log_likelihood']:.2f} nats),"
            " fitted on the same 50k training images without their labels:\n",
            f"    {m1['command']}\n",
            f"M2 models the {len(units['stack_units'])} of its {units['stack']['z_dim']} latent"
            " units whose posterior mean varies over the images (Var_x E_q[u | x] > 0.01)."
            f" Mean fit time per run: {statistics.mean(r['fit_seconds'] for r in rows):.0f} s.\n",
        ]
    lines += [
        f"| labels | draws | {what} test accuracy (mean +- sd) | per draw | labelled-only"
        f" classifier (mean +- sd) | {what}'s generative classifier, argmax_y L(x, y) |"
        " Pyro tutorial M2 | Pyro baseline | Kingma M2 | Kingma M1+M2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for labels in args.labels:
        accs = [r["test_accuracy"] for r in rows if r["labels"] == labels]
        base = [r["baseline_test_accuracy"] for r in rows if r["labels"] == labels]
        gen = [r["generative_test_accuracy"] for r in rows if r["labels"] == labels]
        lines.append(
            f"| {labels} | {len(accs)} | {_mean_sd(accs)} | {', '.join(f'{a:.2f}' for a in accs)}"
            f" | {_mean_sd(base)} | {_mean_sd(gen)} | {PYRO[labels]} | {PYRO_BASELINE[labels]} |"
            f" {KINGMA[labels]} | {KINGMA_M1M2[labels]} |"
        )
    _zoo_runs.save(args.out, f"ssvae_accuracy-{prefix}e{args.epochs}", rows, lines)


def _mean_sd(values) -> str:
    sd = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else " (one draw)"
    return f"{statistics.mean(values):.2f}{sd}"


if __name__ == "__main__":
    main()
