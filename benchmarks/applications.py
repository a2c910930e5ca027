"""
What a fitted model is for, measured: completion, denoising and one-class anomaly detection by
``inference.uses`` for the Bernoulli mixture, the VAE and the ladder VAE, beside baselines.

    python benchmarks/applications.py --part completion --epochs 20   # MNIST (~10 min, 2 cores)
    python benchmarks/applications.py --part oneclass --epochs 20     # MNIST (~20 min)
    python benchmarks/applications.py --quick --out /tmp/x            # 8x8 digits, the tests

completion: statically binarized MNIST; `zoo fit` of each model; then `zoo complete` on 1000
test images with 20 / 40 / 60 % of the pixels hidden at random, the bottom half hidden, one
quadrant seen (the top-left, and one drawn per image as in the CVAE's quadrant task), and
`zoo denoise` at 5 / 10 / 20 % bit flips: nats per image of the hidden (or clean) pixels,
beside the training mean image (completion), the noisy pixels read with the known flip rate
and a plain reconstruction (denoising). The mixture's posterior is exact; the VAEs' is
importance-sampled with their guide (500 draws, the effective sample size in the table) or
followed by the Metropolis-within-Gibbs chain. The supervised reference for the quadrant task:
the CVAE trained on it (Pyro's example; 500-500 hidden, z 200), completed through the same
`zoo complete` with the seen quadrant as its condition, and its deterministic baseline net.

oneclass: the protocol of Ruff et al. (2018, Deep SVDD): for each digit, fit on that digit's
training images alone, score every test image by -log p(x), and report the ROC AUC of telling
the other nine digits from it; also the complexity-corrected score -log p(x) - L(x) of Serra
et al. (2020), L the zlib length in nats; scikit-learn's IsolationForest and OneClassSVM (RBF,
nu = 0.1, gamma "scale") on the same images, and the published One-Class Deep SVDD row, as
references. A sanity table: the models fitted on all training digits (the completion runs)
against random-pixel images and upside-down test digits.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import _zoo_runs  # noqa: E402
import torch  # noqa: E402

MASKS = ("random:0.2", "random:0.4", "random:0.6", "bottom-half", "quadrants:1")
FLIPS = (0.05, 0.1, 0.2)
# Ruff et al. (2018), Deep One-Class Classification, ICML, Table 1: One-Class Deep SVDD, mean
# ROC AUC (%) over 10 seeds per normal MNIST digit (their preprocessing: global contrast
# normalization and min-max scaling of the grey images; a LeNet-type CNN).
DEEP_SVDD = (98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5)


def models(epochs, quick):
    loop = ["--epochs", str(epochs), "--batch-size", "128", "--lr", "0.001"]
    return {
        "Bernoulli mixture": ["bmm", "--components", "20" if quick else "100"],
        "VAE": ["vae", *loop],
        "ladder VAE, 2 layers": ["hvae", "--layers", "2", *loop],
    }


def _finished_rows(args, name: str) -> dict:
    """With --reuse, the rows of an earlier table of the same settings, by (model, task, fit
    command); nothing otherwise."""
    path = Path(args.out) / f"{name}.json"
    if not args.reuse or not path.exists():
        return {}
    import json

    out = {}
    for r in json.loads(path.read_text()):
        counts = r.get("num_samples") in (args.samples, None) and r.get("num_steps") in (
            args.steps, None)  # fmt: skip
        kind = "mask" in r or "noise" in r  # a task's row, not a reference network's
        if r.get("num_rows") == args.rows and counts and kind:
            out[(r["model"], r["task"], r["command"])] = r
    return out


def task_mask(args, data) -> Path:
    """The seen pixels of the CVAE's quadrant task on the test split (one quadrant per image,
    drawn with the task's own seed), saved for `zoo complete --mask FILE`."""
    from zoo import runs
    from zoo.models import cvae

    x, _ = runs.split(data, "test", "static")
    side = int(round(x.shape[1] ** 0.5))
    visible, _, _ = cvae.quadrant_task(x, 1, seed=cvae._QUADRANT_SEEDS["test"], side=side)
    path = Path(args.runs) / f"quadrant-task-1-{data}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(visible != -1, path)
    return path


def cvae_reference(args, data, mask_file):
    """The CVAE trained for the one-quadrant task, completed by `zoo complete` on its own task
    (the seen quadrant is its condition), and its deterministic baseline on the same rows."""
    from zoo import applications, runs

    run = Path(args.runs) / f"cvae-quadrants-{data}"
    size = ["--hidden", "128", "--z-dim", "8"] if args.quick else ["--hidden", "500", "500",
                                                                   "--z-dim", "200"]  # fmt: skip
    command = ["fit", "cvae", "--condition", "quadrants", "--given", "1", *size, "--epochs",
               str(args.epochs), "--data", data, "--binarize", "static", "--out", str(run),
               "--overwrite", "--quiet"]  # fmt: skip
    metrics = _zoo_runs.fit(command, run, reuse=args.reuse)
    model, config = runs.restore(run)
    model.eval()
    started = time.perf_counter()
    # z from the CVAE's own prior network p(z | seen quadrant): nothing else is seen at its
    # likelihood's pixels, so the weights are equal (its guide, which reads the filled image,
    # gives degenerate ones: median ESS 6 of 500 in the first run of this table)
    summary = applications.complete(model, config, run, str(mask_file), num_rows=args.rows,
                                    num_samples=args.samples, proposal="prior")  # fmt: skip
    x, y = runs.split(data, "test", "static")
    target, visible, hidden = model.arguments(x, y, "test")
    with torch.no_grad():
        baseline = model.baseline.loss(target, visible, hidden)[: args.rows].mean().item()
        guess = torch.sigmoid(model.baseline(visible[: args.rows])).round()
    right = ((guess == target[: args.rows]) & hidden[: args.rows].bool()).sum().item()
    row = {"model": "CVAE trained for the quadrant task",
           "task": "complete one quadrant (task), prior proposal",
           **summary, "seconds": time.perf_counter() - started,
           "fit_seconds": metrics["fit_seconds"],
           "command": "zoo " + " ".join(command)}  # fmt: skip
    deterministic = {"model": "its deterministic baseline net",
                     "task": "complete one quadrant (task)",
                     "exact": True, "completion_log_loss": baseline,
                     "completion_accuracy": right / hidden[: args.rows].sum().item(),
                     "mean_log_loss": summary["mean_log_loss"],
                     "mean_accuracy": summary["mean_accuracy"], "seconds": 0.0,
                     "deterministic": True, "command": row["command"]}  # fmt: skip
    return [row, deterministic]


def completion(args, data):
    from zoo import applications, runs

    rows = []
    mask_file = task_mask(args, data)
    tag = "quick" if args.quick else f"e{args.epochs}"
    done = _finished_rows(args, f"applications_completion-{tag}")
    for name, spec in models(args.epochs, args.quick).items():
        run = Path(args.runs) / f"{spec[0]}-{data}"
        command = ["fit", *spec, "--data", data, "--binarize", "static", "--out", str(run)]
        command += ["--overwrite", "--quiet"]
        metrics = _zoo_runs.fit(command, run, reuse=args.reuse)
        model, config = runs.restore(run)
        model.eval()
        shared = dict(num_rows=args.rows, num_samples=args.samples)
        chain = functools.partial(applications.complete, method="chain", num_steps=args.steps)
        tasks = (
            [
                (f"complete {mask}", functools.partial(applications.complete, mask=mask, **shared))
                for mask in MASKS
            ]
            + [
                (
                    "complete one quadrant (task)",
                    functools.partial(applications.complete, mask=str(mask_file), **shared),
                )
            ]
            + [
                (f"complete {mask}, chain", functools.partial(chain, mask=mask, num_rows=args.rows))
                for mask in MASKS
                if spec[0] != "bmm"  # the mixture's posterior is exact already
            ]
            + [
                (
                    f"denoise flip {flip}",
                    functools.partial(applications.denoise, flip=flip, **shared),
                )
                for flip in FLIPS
            ]
        )
        for task, run_task in tasks:
            key = (name, task, "zoo " + " ".join(command))
            if key in done:  # --reuse: the same task on the same run, settings unchanged
                rows.append(done[key])
                print(f"reusing the row {name}: {task}", flush=True)
                continue
            started = time.perf_counter()
            summary = run_task(model, config, run)
            rows.append({"model": name, "task": task, **summary,
                         "seconds": time.perf_counter() - started,
                         "fit_seconds": metrics["fit_seconds"],
                         "command": "zoo " + " ".join(command)})  # fmt: skip
            print(rows[-1], flush=True)
    rows += cvae_reference(args, data, mask_file)
    print(rows[-2:], flush=True)
    lines = [
        f"# Completion and denoising, {data}\n",
        f"Statically binarized {data}, {args.rows} test images, nats per image of the hidden"
        " pixels (completion) or of the clean image (denoising); accuracy of the rounded"
        f" prediction. Importance sampling: {args.samples} draws of the guide, three rounds"
        " (the guide reads the previous round's completion); the chain: Metropolis-within-"
        f"Gibbs, {args.steps} steps, the first fifth discarded; the mixture's posterior is"
        ' exact. "one quadrant (task)": each image shows one quadrant, drawn per image as in'
        " the CVAE's quadrant task (the same images and quadrants for every row); the CVAE"
        f" trained for it ({args.epochs} epochs) is the supervised upper reference.\n",
        "| model | task | log-loss | accuracy | baseline log-loss | baseline accuracy |"
        " median ESS | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["task"].startswith("complete"):
            ours, base = "completion", "mean"
        else:
            ours, base = "denoised", "noisy_input"
        if r.get("deterministic"):
            ess = "deterministic"
        elif r["exact"]:
            ess = "exact"
        elif "median_acceptance_rate" in r:
            ess = f"chain, acceptance {r['median_acceptance_rate']:.2f}"
        else:
            ess = f"{r['median_ess']:.0f}" + (
                " (degenerate)" if r.get("weights_degenerate") else ""
            )
        lines.append(
            f"| {r['model']} | {r['task']} | {r[ours + '_log_loss']:.2f} |"
            f" {r[ours + '_accuracy']:.4f} | {r[base + '_log_loss']:.2f} |"
            f" {r[base + '_accuracy']:.4f} | {ess} | {r['seconds']:.1f} |"
        )
    recon = [r for r in rows if "reconstruction_log_loss" in r]
    if recon:
        lines += [
            "\nDenoising beside a plain reconstruction (the decoder's mean at the guide's mean"
            " code of the noisy image, the posterior ignored):\n",
            "| model | task | denoised log-loss | reconstruction log-loss | noisy input |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['task']} | {r['denoised_log_loss']:.2f} |"
            f" {r['reconstruction_log_loss']:.2f} | {r['noisy_input_log_loss']:.2f} |"
            for r in recon
        ]
    lines.append(
        "\nBaselines: for completion the training mean image; for denoising the noisy pixel"
        " itself, read with the known flip rate (P(clean = noisy) = 1 - rate)."
    )
    tag = "quick" if args.quick else f"e{args.epochs}"
    _zoo_runs.save(args.out, f"applications_completion-{tag}", rows, lines)


def oneclass(args, data):
    import warnings

    import pyro
    from sklearn.ensemble import IsolationForest
    from sklearn.svm import OneClassSVM

    from inference import em, reparam, uses
    from zoo import applications, registry
    from zoo import data as zoo_data

    x, y = zoo_data.load(data, "train", "static")
    xt, yt = zoo_data.load(data, "test", "static")
    simple = applications.complexity(xt)  # (N,) nats, the same for every model
    classes = range(10)
    rows = []
    for digit in classes:
        train = x[y == digit]
        normal = yt == digit
        scores = {}
        for name, spec in models(args.epochs, args.quick).items():
            started = time.perf_counter()
            built = registry.get(spec[0])
            options = {"num_components": 20 if args.quick else 100} if spec[0] == "bmm" else {}
            if spec[0] == "hvae":
                options["layers"] = 2
            info = registry.DataInfo.of(train, None, data, "static")
            model = built.build(built.complete(options, info))
            pyro.clear_param_store()
            torch.manual_seed(digit)
            if spec[0] == "bmm":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", em.ConvergenceWarning)
                    em.fit(model.model, model.guide, train, progress=False, seed=digit)
            else:
                fit_options = getattr(model, "fit_options", lambda e: {})(args.epochs)
                reparam.fit(model.model, model.guide, train, num_epochs=args.epochs,
                            progress=False, seed=digit, **fit_options)  # fmt: skip
            if hasattr(model, "eval"):
                model.eval()
            s = uses.scores(model.model, model.guide, xt, num_samples=args.score_samples)
            scores[name] = (-s.log_prob, time.perf_counter() - started)
            scores[f"{name}, complexity-corrected"] = (-s.log_prob - simple, 0.0)
        for name, peer in (
            ("IsolationForest", IsolationForest(random_state=digit)),
            ("OneClassSVM (RBF)", OneClassSVM(nu=0.1, gamma="scale")),
        ):
            started = time.perf_counter()
            fitted = peer.fit(train.numpy())
            scores[name] = (-torch.as_tensor(fitted.score_samples(xt.numpy())),
                            time.perf_counter() - started)  # fmt: skip
        for name, (score, seconds) in scores.items():
            auc = uses.roc_auc(score[normal], score[~normal])
            rows.append({"digit": digit, "method": name, "auroc": auc, "seconds": seconds,
                         "command": "python benchmarks/applications.py --part oneclass"
                         f" --epochs {args.epochs}"})  # fmt: skip
            print(rows[-1], flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sanity = sanity_rows(args, data)
    rows += sanity
    lines = [
        f"# One-class anomaly detection, {data} (the protocol of Ruff et al. 2018)\n",
        f"Fit on one digit's training images (statically binarized), score all {len(xt)} test"
        " images; ROC AUC (%) of -log p(x) (the models; importance-sampled with"
        f" {args.score_samples} draws for the VAEs, exact for the mixture), of the"
        " complexity-corrected -log p(x) - L(x) (Serra et al. 2020; L the zlib length of the"
        " packed image in nats, `zoo score --complexity`) or of scikit-learn's score_samples,"
        f" per normal digit. VAEs: {args.epochs} epochs.\n",
        "| method | " + " | ".join(str(d) for d in classes) + " | mean |",
        "|---|" + "---|" * (len(classes) + 1),
    ]
    for method in methods:
        values = [r["auroc"] for r in rows if r["method"] == method and r["digit"] != "all"]
        cells = " | ".join(f"{100 * v:.1f}" for v in values)
        lines.append(f"| {method} | {cells} | {100 * sum(values) / len(values):.1f} |")
    if not args.quick:
        cells = " | ".join(f"{v:.1f}" for v in DEEP_SVDD)
        mean = sum(DEEP_SVDD) / len(DEEP_SVDD)
        lines.append(f"| One-Class Deep SVDD (published) | {cells} | {mean:.1f} |")
        lines.append(
            "\nThe Deep SVDD row is Ruff et al. (2018), Deep One-Class Classification, ICML,"
            " Table 1 (mean of 10 seeds; grey images, global contrast normalization, a"
            " LeNet-type CNN), not run here; its KDE, OC-SVM, isolation forest, DCAE and AnoGAN"
            " rows are left out: only the Deep SVDD row could be checked here (quoted in a"
            " reproduction's README), not the paper's table itself. Our rows read statically"
            " binarized images."
        )
    lines += [
        "\nSanity: the models fitted on all training digits (the completion part's runs),"
        f" the {len(xt)} test digits against as many images of independent pixels at the data's"
        " mean intensity (noise) and the test digits upside down, ROC AUC (%):\n",
        "| model | noise | upside-down | noise, corrected | upside-down, corrected |",
        "|---|---|---|---|---|",
    ]
    for r in sanity:
        a, c = r["auroc"], r["auroc_complexity_corrected"]
        lines.append(
            f"| {r['method']} | {100 * a['noise']:.1f} | {100 * a['upside-down']:.1f} |"
            f" {100 * c['noise']:.1f} | {100 * c['upside-down']:.1f} |"
        )
    tag = "quick" if args.quick else f"e{args.epochs}"
    _zoo_runs.save(args.out, f"applications_oneclass-{tag}", rows, lines)


def sanity_rows(args, data):
    """The easy cases: each model fitted on every training digit (the completion part's
    runs) scores the test digits against noise images and upside-down digits."""
    from zoo import applications, runs

    out = []
    for name, spec in models(args.epochs, args.quick).items():
        run = Path(args.runs) / f"{spec[0]}-{data}"
        command = ["fit", *spec, "--data", data, "--binarize", "static", "--out", str(run)]
        command += ["--overwrite", "--quiet"]
        _zoo_runs.fit(command, run, reuse=args.reuse)
        model, config = runs.restore(run)
        model.eval()
        summary = applications.score(model, config, run, outliers=("noise", "upside-down"),
                                     num_samples=args.score_samples, corrected=True)  # fmt: skip
        out.append({"digit": "all", "method": name, **summary,
                    "command": "zoo " + " ".join(command)})  # fmt: skip
        print(out[-1], flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("completion", "oneclass", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1000, help="test images completed")
    parser.add_argument("--samples", type=int, default=500, help="importance samples")
    parser.add_argument("--steps", type=int, default=1000, help="chain steps (completion)")
    parser.add_argument("--score-samples", type=int, default=100, help="IS samples (oneclass)")
    parser.add_argument("--quick", action="store_true", help="8x8 digits, a few epochs")
    parser.add_argument("--reuse", action="store_true", help="read runs the same command finished")
    parser.add_argument("--runs", default="runs/applications")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    data = "digits" if args.quick else "mnist"
    if args.quick:
        args.epochs, args.rows, args.samples, args.steps, args.score_samples = 3, 200, 50, 50, 50
    if args.part in ("completion", "both"):
        completion(args, data)
    if args.part in ("oneclass", "both"):
        oneclass(args, data)


if __name__ == "__main__":
    main()
