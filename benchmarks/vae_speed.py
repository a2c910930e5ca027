"""
Seconds per epoch of the VAE drivers against a plain torch loop of the identical network, batch,
optimizer and objective, all measured in one run on this machine; prints a table, saves JSON
and Markdown.

    python benchmarks/vae_speed.py            # 20,000 MNIST images, 6 epochs of each
    python benchmarks/vae_speed.py --quick    # seconds: check that the script works
    python benchmarks/vae_speed.py --device cuda   # the same on a GPU (results/vae_speed-cuda)

Network 784-400-20 (one hidden layer of 400, z of 20), batch 128, Adam(1e-3), statically
binarized MNIST, 2 threads. The plain loop computes the same objective as TraceMeanField_ELBO:
Bernoulli log-likelihood from one reparameterized sample plus the analytic Gaussian KL.
Goals (issue 3): reparameterized driver at most 1.05x, SVI driver at most 1.20x the plain loop.
The reparameterized driver is timed as it is, compiled by torch.jit (jit=True), and compiled by
torch.compile (jit="inductor").
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

from inference import loop, reparam, svi  # noqa: E402
from zoo import data  # noqa: E402
from zoo.vae import VAE, VAEConfig  # noqa: E402


def make_vae(device="cpu"):
    torch.manual_seed(0)
    pyro.clear_param_store()
    return VAE(VAEConfig(x_dim=784, z_dim=20, hidden=(400,))).to(device)


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so that a host clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(vae, x, batch_size, optimizer, generator):
    """One epoch of the hand-written loop over the same modules."""
    for idx in torch.randperm(len(x), generator=generator).split(batch_size):
        batch = x[idx.to(x.device)]
        optimizer.zero_grad()
        loc, scale = vae.encoder(batch)
        z = loc + scale * torch.randn_like(loc)
        logits = vae.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
        kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()
        loss = -(log_lik - kl) / len(x) * (len(x) / len(batch))
        loss.backward()
        optimizer.step()


class PlainLoop:
    """The hand-written loop on its own copy of the network, run one epoch at a time."""

    def __init__(self, x, batch_size):
        self.vae, self.x, self.batch_size = make_vae(x.device), x, batch_size
        # the drivers' own default optimizer (fused Adam where it can be): identical updates
        self.optimizer = loop.adam(self.vae.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(0)
        plain_epoch(self.vae, x[:1024], batch_size, self.optimizer, self.generator)  # warm-up

    def epoch(self) -> float:
        synchronize(self.x.device)
        start = time.perf_counter()
        plain_epoch(self.vae, self.x, self.batch_size, self.optimizer, self.generator)
        synchronize(self.x.device)
        return time.perf_counter() - start


def time_pairs(fit, x, batch_size, epochs, validation, **options):
    """Driver and plain-loop epochs interleaved: after each driver epoch the loop's callback
    runs one plain epoch, so each ratio compares two epochs timed seconds apart (this machine's
    speed drifts by tens of percent over minutes). The plain epoch's time is taken out of the
    driver's clock. The first driver epoch (compilation, warm caches) is not used. On a GPU
    both clocks wait for the device: the driver's loop reads every step's loss back, and the
    plain epoch synchronizes before and after itself.
    Returns [(driver seconds, plain seconds)] for epochs 2..epochs."""
    plain = PlainLoop(x, batch_size)
    vae = make_vae(x.device)
    ends, plain_times = [], []

    def clock(record):
        ends.append(record["time"])
        plain_times.append(plain.epoch())

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
    # driver epoch i ran between the end of epoch i-1's callback and the end of epoch i
    return [
        (ends[i] - ends[i - 1] - plain_times[i - 1], plain_times[i - 1])
        for i in range(1, len(ends))
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    num, epochs = (2048, 2) if args.quick else (20000, 6)
    x, _ = data.load("mnist", split="train", binarize="static")
    x = x[:num].to(args.device)
    batch_size = 128
    cases = [
        ("reparam driver (TraceMeanField)", reparam.fit, {}),
        ("reparam driver (TraceMeanField, jit=True)", reparam.fit, {"jit": True}),
        ("reparam driver (TraceMeanField, jit='inductor')", reparam.fit, {"jit": "inductor"}),
        ("svi driver, Trace_ELBO", svi.fit, {"loss": "Trace_ELBO"}),
        ("svi driver, TraceMeanField_ELBO", svi.fit, {"loss": "TraceMeanField_ELBO"}),
        ("svi driver, JitTraceMeanField_ELBO (fixed)", svi.fit, {"loss": "JitTraceMeanField_ELBO"}),
    ]
    table = {}
    for validation in (False, True):
        for name, fit, options in cases:
            label = f"{name}, validation {'on' if validation else 'off'}"
            pairs = time_pairs(fit, x, batch_size, epochs, validation, **options)
            ratios = [d / p for d, p in pairs]
            table[label] = {
                "sec_per_epoch": statistics.median(d for d, _ in pairs),
                "plain_sec_per_epoch": statistics.median(p for _, p in pairs),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "pairs": pairs,
            }
            row = table[label]
            print(
                f"  {label}: {row['sec_per_epoch']:.3f} s/epoch, plain loop"
                f" {row['plain_sec_per_epoch']:.3f}: {row['ratio']:.2f}x"
                f" (pairs {row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
                flush=True,
            )
    report = {
        "num_images": num,
        "batch_size": batch_size,
        "network": "784-400-20",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if x.is_cuda else "cpu",
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "rows": table,
        "command": "python benchmarks/vae_speed.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if x.is_cuda else ""),
    }
    lines = [
        f"# VAE driver speed\n\n`{report['command']}`: {num} static MNIST images, batch "
        f"{batch_size}, 784-400-20, on {report['device']} with {report['threads']} CPU threads,"
        f" torch {torch.__version__},"
        f" pyro {pyro.__version__}. Each driver epoch is followed by one plain-loop epoch;"
        f" the ratio is the median over {epochs - 1} such adjacent pairs (the first, compiling"
        " epoch left out), with the smallest and largest pair beside it. jit=True traces the"
        " bound with torch.jit; jit='inductor' compiles it with torch.compile, which fuses its"
        " elementwise operations into generated kernels (about half a minute of compiling, in"
        " the first epoch). The plain loop runs eagerly, as the goal states it.\n",
        "| loop | s / epoch (median) | plain loop (median) | ratio (median of pairs) |"
        " pairs, min-max |",
        "|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['sec_per_epoch']:.3f} | {row['plain_sec_per_epoch']:.3f} |"
            f" {row['ratio']:.2f}x | {row['ratio_min']:.2f}-{row['ratio_max']:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "vae_speed" + ("-quick" if args.quick else "") + ("-cuda" if x.is_cuda else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


if __name__ == "__main__":
    main()
