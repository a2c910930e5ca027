"""
Seconds per epoch of the VAE drivers against a plain torch loop of the identical network, batch,
optimizer and objective, all measured in one run on this machine; prints a table, saves JSON
and Markdown.

    python benchmarks/vae_speed.py            # 20,000 MNIST images, 3 timed epochs each
    python benchmarks/vae_speed.py --quick    # seconds: check that the script works

Network 784-400-20 (one hidden layer of 400, z of 20), batch 128, Adam(1e-3), statically
binarized MNIST, 2 threads. The plain loop computes the same objective as TraceMeanField_ELBO:
Bernoulli log-likelihood from one reparameterized sample plus the analytic Gaussian KL.
Goals (issue 3): reparameterized driver at most 1.05x, SVI driver at most 1.20x the plain loop.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference import reparam, svi  # noqa: E402
from zoo import data  # noqa: E402
from zoo.vae import VAE, VAEConfig  # noqa: E402


def make_vae():
    torch.manual_seed(0)
    pyro.clear_param_store()
    return VAE(VAEConfig(x_dim=784, z_dim=20, hidden=(400,)))


def plain_epoch(vae, x, batch_size, optimizer, generator):
    """One epoch of the hand-written loop over the same modules."""
    for idx in torch.randperm(len(x), generator=generator).split(batch_size):
        batch = x[idx]
        optimizer.zero_grad()
        loc, scale = vae.encoder(batch)
        z = loc + scale * torch.randn_like(loc)
        logits = vae.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
        kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()
        loss = -(log_lik - kl) / len(x) * (len(x) / len(batch))
        loss.backward()
        optimizer.step()


def time_plain(x, batch_size, epochs):
    vae = make_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    plain_epoch(vae, x[:1024], batch_size, optimizer, generator)  # warm-up
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        plain_epoch(vae, x, batch_size, optimizer, generator)
        times.append(time.perf_counter() - start)
    return times


def time_driver(fit, x, batch_size, epochs, validation, **options):
    vae = make_vae()
    times = []

    def clock(record):
        times.append(record["time"])

    with pyro.validation_enabled(validation):
        fit(vae.model, vae.guide, x[:1024], batch_size=batch_size, num_epochs=1, **options)
        fit(
            vae.model,
            vae.guide,
            x,
            batch_size=batch_size,
            num_epochs=epochs,
            callback=clock,
            **options,
        )
    return [b - a for a, b in zip([0.0] + times[:-1], times)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    num, epochs = (2048, 1) if args.quick else (20000, 3)
    x, _ = data.load("mnist", split="train", binarize="static")
    x = x[:num]
    batch_size = 128
    cases = [
        ("reparam driver (TraceMeanField)", reparam.fit, {}),
        ("reparam driver (TraceMeanField, jit=True)", reparam.fit, {"jit": True}),
        ("svi driver, Trace_ELBO", svi.fit, {"loss": "Trace_ELBO"}),
        ("svi driver, TraceMeanField_ELBO", svi.fit, {"loss": "TraceMeanField_ELBO"}),
        ("svi driver, JitTraceMeanField_ELBO (fixed)", svi.fit, {"loss": "JitTraceMeanField_ELBO"}),
    ]
    # This machine's speed drifts by tens of percent over minutes: every driver row is timed
    # right after its own plain-loop run, and its ratio is against that neighbour.
    table = {}
    for validation in (False, True):
        for name, fit, options in cases:
            label = f"{name}, validation {'on' if validation else 'off'}"
            plain = statistics.median(time_plain(x, batch_size, epochs))
            times = time_driver(fit, x, batch_size, epochs, validation, **options)
            sec = statistics.median(times)
            table[label] = {
                "sec_per_epoch": sec,
                "plain_sec_per_epoch": plain,
                "ratio": sec / plain,
                "epochs": times,
            }
            print(
                f"  {label}: {sec:.3f} s/epoch, plain loop {plain:.3f}: {sec / plain:.2f}x",
                flush=True,
            )
    report = {
        "num_images": num,
        "batch_size": batch_size,
        "network": "784-400-20",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "rows": table,
        "command": "python benchmarks/vae_speed.py" + (" --quick" if args.quick else ""),
    }
    lines = [
        f"# VAE driver speed\n\n`{report['command']}`: {num} static MNIST images, batch "
        f"{batch_size}, 784-400-20, {report['threads']} threads, torch {torch.__version__},"
        f" pyro {pyro.__version__}; median of {epochs} timed epochs.\n",
        "| loop | s / epoch | plain loop just before | ratio |",
        "|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['sec_per_epoch']:.3f} | {row['plain_sec_per_epoch']:.3f} |"
            f" {row['ratio']:.2f}x |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "vae_speed-quick" if args.quick else "vae_speed"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


if __name__ == "__main__":
    main()
