"""
Seconds per epoch of the VAE drivers against a plain torch loop of the identical network, batch,
optimizer and objective, all measured in one run on this machine; prints a table, saves JSON
and Markdown.

    python benchmarks/vae_speed.py            # 20,000 MNIST images, 6 epochs of each
    python benchmarks/vae_speed.py --quick    # seconds: check that the script works
    python benchmarks/vae_speed.py --device cuda   # the same on a GPU (results/vae_speed-cuda)
    python benchmarks/vae_speed.py --batch-size 512   # another batch (results/vae_speed-b512)

Network 784-400-20 (one hidden layer of 400, z of 20), batch 128 (the drivers' default; others
with ``--batch-size``: larger batches make larger products, which run nearer the GEMM rate),
Adam(1e-3), statically binarized MNIST, 2 threads. The plain loop computes the same objective as
TraceMeanField_ELBO: Bernoulli log-likelihood from one reparameterized sample plus the analytic
Gaussian KL.
Goals (issue 3): reparameterized driver at most 1.05x, SVI driver at most 1.20x the plain loop.
Goals (issue 19), against NumPyro's SVI under jax.jit on the same network ([peers] extra):
reparameterized driver at most 0.9x its epoch, SVI driver (TraceMeanField_ELBO) at most 1.0x,
and at least 70 % of the matrix-multiply roofline (the best GEMM rate measured in the same run,
or the step's products' own rate, timed alone, where that is higher).
The drivers are timed as they are, compiled by torch.jit (jit=True), and with jit="inductor",
which compiles the whole step (the bound, its gradient and Adam's update) with TorchInductor.
The drivers run with their default thread setting ("auto"); every peer runs on the
benchmark's thread count.
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

from _rates import (  # noqa: E402
    MachineState,
    best_time,
    matmul_rate,
    numpyro_available,
    synchronize,
)

from inference import loop, reparam, svi  # noqa: E402
from zoo import data  # noqa: E402
from zoo.models.vae import VAE, VAEConfig  # noqa: E402

LAYERS = ((784, 400), (400, 20), (400, 20), (20, 400), (400, 784))  # (in, out) of each layer


def make_vae(device="cpu"):
    torch.manual_seed(0)
    pyro.clear_param_store()
    return VAE(VAEConfig(x_dim=784, z_dim=20, hidden=(400,))).to(device)


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
    """The hand-written loop on its own copy of the network, run one epoch at a time.
    compiled: the loss (forward and backward, through AOTAutograd) and the optimizer's step
    each compiled by ``torch.compile``, the whole step a user could compile."""

    def __init__(self, x, batch_size, compiled=False):
        self.vae, self.x, self.batch_size = make_vae(x.device), x, batch_size
        # the drivers' own default optimizer (fused Adam where it can be): identical updates
        self.optimizer = loop.adam(self.vae.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(0)
        self.run = plain_epoch
        if compiled:
            self.run = compiled_epoch(self.vae, self.optimizer)
        self.run(self.vae, x[:1024], batch_size, self.optimizer, self.generator)  # warm-up

    def epoch(self) -> float:
        synchronize(self.x.device)
        start = time.perf_counter()
        self.run(self.vae, self.x, self.batch_size, self.optimizer, self.generator)
        synchronize(self.x.device)
        return time.perf_counter() - start


def compiled_epoch(vae, optimizer):
    def loss_of(batch, noise, num_data):
        loc, scale = vae.encoder(batch)
        logits = vae.decoder(loc + scale * noise)
        log_lik = -F.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
        kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()
        return -(log_lik - kl) / len(batch)

    loss_of = torch.compile(loss_of)
    step = torch.compile(optimizer.step)

    def run(vae, x, batch_size, optimizer, generator):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            batch = x[idx.to(x.device)]
            optimizer.zero_grad()
            loss = loss_of(batch, torch.randn(len(batch), vae.config.z_dim, device=x.device), 0)
            loss.backward()
            step()

    return run


class NumPyroLoop:
    """NumPyro's SVI on the same network (stax), objective (TraceMeanField_ELBO, the same
    scaling by N / B), optimizer (Adam 1e-3) and batches, its step compiled by ``jax.jit``."""

    def __init__(self, x, batch_size, loss="TraceMeanField_ELBO"):
        import jax
        import numpyro
        import numpyro.distributions as nd
        from jax.example_libraries import stax
        from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

        self.jax = jax
        z_dim, num_data = 20, len(x)
        softplus = stax.elementwise(jax.nn.softplus)
        scale = stax.elementwise(lambda h: jax.nn.softplus(h) + 1e-4)  # the zoo's encoder floor
        encoder = stax.serial(
            stax.Dense(400),
            softplus,
            stax.FanOut(2),
            stax.parallel(stax.Dense(z_dim), stax.serial(stax.Dense(z_dim), scale)),
        )
        decoder = stax.serial(stax.Dense(400), softplus, stax.Dense(784))

        def model(batch):
            decode = numpyro.module("decoder", decoder, (batch_size, z_dim))
            with numpyro.plate("data", num_data, subsample_size=batch.shape[0]):
                z = numpyro.sample("z", nd.Normal(0, 1).expand([z_dim]).to_event(1))
                numpyro.sample("x", nd.Bernoulli(logits=decode(z)).to_event(1), obs=batch)

        def guide(batch):
            encode = numpyro.module("encoder", encoder, (batch_size, 784))
            loc, scale = encode(batch)
            with numpyro.plate("data", num_data, subsample_size=batch.shape[0]):
                numpyro.sample("z", nd.Normal(loc, scale).to_event(1))

        elbo = {"TraceMeanField_ELBO": TraceMeanField_ELBO, "Trace_ELBO": Trace_ELBO}[loss]()
        self.svi = SVI(model, guide, numpyro.optim.Adam(1e-3), elbo)
        self.x = jax.numpy.asarray(x.cpu().numpy())
        self.batch_size = batch_size
        self.update = jax.jit(self.svi.update)
        self.state = self.svi.init(jax.random.PRNGKey(0), self.x[:batch_size])
        self.rng = torch.Generator().manual_seed(0)
        self._run(self.x[:1024])  # warm-up: compiles the full and the last, smaller batch

    def _run(self, x):
        import numpy as np

        order = np.asarray(torch.randperm(len(x), generator=self.rng))
        loss = None
        for i in range(0, len(x), self.batch_size):
            self.state, loss = self.update(self.state, x[order[i : i + self.batch_size]])
        self.jax.block_until_ready((self.state, loss))

    def epoch(self) -> float:
        start = time.perf_counter()
        self._run(self.x)
        return time.perf_counter() - start


def make_peers(x, batch_size, loss):
    peers = {"plain": PlainLoop(x, batch_size), "compiled": PlainLoop(x, batch_size, True)}
    if numpyro_available() and not x.is_cuda:
        peers["numpyro"] = NumPyroLoop(x, batch_size, loss)
    return peers


def time_pairs(fit, x, batch_size, epochs, validation, peers, **options):
    """Driver and peer epochs interleaved: after each driver epoch the loop's callback runs
    one epoch of every peer, so each ratio compares epochs timed seconds apart (this machine's
    speed drifts by tens of percent over minutes). The peers' time is taken out of the
    driver's clock. The first driver epoch (compilation, warm caches) is not used. On a GPU
    the clocks wait for the device: the driver's loop reads every step's loss back, and the
    plain epochs synchronize before and after themselves.
    Returns {"driver": [seconds], peer: [seconds]} for epochs 2..epochs."""
    vae = make_vae(x.device)
    ends, times = [], {name: [] for name in peers}

    threads = torch.get_num_threads()

    def clock(record):
        ends.append(record["time"])
        driver_threads = torch.get_num_threads()  # the driver's own choice ("auto")
        torch.set_num_threads(threads)
        for name, peer in peers.items():
            times[name].append(peer.epoch())
        torch.set_num_threads(driver_threads)

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
    spent = [sum(times[name][i] for name in peers) for i in range(len(ends))]
    times["driver"] = [ends[i] - ends[i - 1] - spent[i - 1] for i in range(1, len(ends))]
    for name in peers:
        times[name] = times[name][: len(ends) - 1]
    return times


def step_flops(batch_size: int, sizes=LAYERS):
    """Matrix-multiply flops of one training step of the 784-400-20 VAE: the forward products
    (2 B in out each), the weight gradients (the same again) and the input gradients of every
    layer but the first, whose input is the data."""
    products = sum(a * b for a, b in sizes)
    return 2 * batch_size * (3 * products - sizes[0][0] * sizes[0][1])


def products_alone(batch_size: int, device="cpu", repeats: int = 20) -> float:
    """Seconds of one training step's matrix products alone, back to back, at the VAE's shapes
    and in the layouts its backward pass uses (forward x W^T, weight gradient G^T x, input
    gradient G W for every layer but the first): the ceiling a loop can reach on this machine,
    beside the roofline. The fastest of three timings of ``repeats`` steps, after a warm-up."""
    products = []
    for i, (n_in, n_out) in enumerate(LAYERS):
        x = torch.randn(batch_size, n_in, device=device)
        w = torch.randn(n_out, n_in, device=device)
        g = torch.randn(batch_size, n_out, device=device)
        products += [lambda x=x, w=w: x @ w.t(), lambda x=x, g=g: g.t() @ x]
        if i:
            products.append(lambda g=g, w=w: g @ w)

    def steps():
        for _ in range(repeats):
            for product in products:
                product()

    return best_time(steps, 3, device) / repeats


def roofline_rate(flops, rates, alone) -> float:
    """GFLOP/s of the roofline: the best GEMM rate so far, or the products' own where they ran
    faster (the host's speed drifts: a square product timed in a slow moment is no ceiling)."""
    return max(max(rates), flops / min(alone) / 1e9)


def summarize(times, roofline_s):
    driver = times["driver"]
    row = {"sec_per_epoch": statistics.median(driver), "epochs": times}
    row["roofline_fraction"] = roofline_s / row["sec_per_epoch"]
    for name in times:
        if name == "driver":
            continue
        ratios = [d / p for d, p in zip(driver, times[name])]
        row[f"{name}_sec_per_epoch"] = statistics.median(times[name])
        row[f"ratio_{name}"] = statistics.median(ratios)
        row[f"ratio_{name}_range"] = (min(ratios), max(ratios))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per step (default 128)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, not {args.batch_size}")
    num, epochs = (2048, 2) if args.quick else (20000, 6)
    machine = MachineState()  # the machine's state before this run adds its own threads
    x, _ = data.load("mnist", split="train", binarize="static")
    x = x[:num].to(args.device)
    batch_size = args.batch_size
    cases = [
        ("reparam driver (TraceMeanField)", reparam.fit, {}),
        ("reparam driver (TraceMeanField, jit=True)", reparam.fit, {"jit": True}),
        ("reparam driver (TraceMeanField, jit='inductor')", reparam.fit, {"jit": "inductor"}),
        ("svi driver, Trace_ELBO", svi.fit, {"loss": "Trace_ELBO"}),
        ("svi driver, TraceMeanField_ELBO", svi.fit, {"loss": "TraceMeanField_ELBO"}),
        ("svi driver, JitTraceMeanField_ELBO (fixed)", svi.fit, {"loss": "JitTraceMeanField_ELBO"}),
        (
            "svi driver, TraceMeanField_ELBO, jit='inductor'",
            svi.fit,
            {"loss": "TraceMeanField_ELBO", "jit": "inductor"},
        ),
    ]
    flops = sum(step_flops(len(b)) for b in torch.arange(num).split(batch_size))
    rates = [matmul_rate(device=args.device)]
    steps = num / batch_size  # the products' time scales with the rows
    alone = [products_alone(batch_size, args.device) * steps]
    peers = make_peers(x, batch_size, "TraceMeanField_ELBO")
    print(f"peers: {', '.join(peers)}", flush=True)
    table = {}
    for validation in (False, True):
        for name, fit, options in cases:
            label = f"{name}, validation {'on' if validation else 'off'}"
            times = time_pairs(fit, x, batch_size, epochs, validation, peers, **options)
            rates.append(matmul_rate(device=args.device))
            alone.append(products_alone(batch_size, args.device) * steps)
            table[label] = summarize(times, flops / roofline_rate(flops, rates, alone) / 1e9)
            row = table[label]
            print(
                f"  {label}: {row['sec_per_epoch']:.3f} s/epoch;"
                + "".join(
                    f" {p} {row[f'{p}_sec_per_epoch']:.3f} ({row[f'ratio_{p}']:.2f}x)"
                    for p in peers
                )
                + f"; {100 * row['roofline_fraction']:.0f}% of the matmul roofline",
                flush=True,
            )
    state = machine.finish()
    rate = roofline_rate(flops, rates, alone)
    roofline_s = flops / rate / 1e9
    for row in table.values():  # at that rate
        row["roofline_fraction"] = roofline_s / row["sec_per_epoch"]
    report = {
        "num_images": num,
        "batch_size": batch_size,
        "epochs": epochs,
        "network": "784-400-20",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if x.is_cuda else "cpu",
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        **state,
        "peers": list(peers),
        "matmul_gflops": max(rates),
        "matmul_gflops_all": rates,
        "roofline_gflops": rate,
        "epoch_gflop": flops / 1e9,
        "roofline_sec_per_epoch": roofline_s,
        "products_sec_per_epoch": min(alone),
        "products_sec_per_epoch_all": alone,
        "rows": table,
        "command": "python benchmarks/vae_speed.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if x.is_cuda else "")
        + (f" --batch-size {batch_size}" if batch_size != 128 else ""),
    }
    if "numpyro" in peers:
        import jax
        import numpyro

        report["numpyro"], report["jax"] = numpyro.__version__, jax.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "vae_speed" + ("-quick" if args.quick else "") + ("-cuda" if x.is_cuda else "")
    name += f"-b{batch_size}" if batch_size != 128 else ""
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


PEER_NAMES = {
    "plain": "plain torch loop",
    "compiled": "plain loop, torch.compile'd",
    "numpyro": "NumPyro, jax.jit",
}


def markdown(report) -> str:
    """The report's Markdown table (also from a saved JSON: ``markdown(json.load(f))``)."""
    peers, rows = report["peers"], report["rows"]
    epochs = report.get("epochs") or 1 + len(next(iter(rows.values()))["epochs"]["driver"])
    versions = f"torch {report['torch']}, pyro {report['pyro']}" + (
        f", numpyro {report['numpyro']}, jax {report['jax']}" if "numpyro" in peers else ""
    )
    gemm, rate = report["matmul_gflops"], report.get("roofline_gflops", report["matmul_gflops"])
    flops, roofline_s = report["epoch_gflop"], report["roofline_sec_per_epoch"]
    alone = report["products_sec_per_epoch"]
    if rate > gemm:
        rate_words = (
            f"the rate of the step's own products ({rate:.0f} GFLOP/s), which ran faster than the"
            f" best 2048^3 GEMM of the run ({gemm:.0f} GFLOP/s: the host's speed drifts)"
        )
    else:
        rate_words = (
            f"this machine's float32 GEMM rate ({rate:.0f} GFLOP/s, 2048^3, best over the run)"
        )
    lines = [
        f"# VAE driver speed\n\n`{report['command']}`: {report['num_images']} static MNIST images,"
        f" batch {report['batch_size']}, 784-400-20, on {report['device']} with"
        f" {report['threads']} CPU threads, {versions}. Each driver epoch is followed by one"
        f" epoch of each peer ({', '.join(peers)}); each ratio is the median over"
        f" {epochs - 1} such adjacent pairs (the first, compiling epoch left out), its range"
        " beside it. jit=True traces the bound with torch.jit; jit='inductor' compiles the whole"
        " step (bound, gradient and Adam's update) with TorchInductor. The drivers choose their"
        " thread count (the default, 'auto'); the peers run on the run's count. The plain loop"
        " runs eagerly; the compiled plain loop compiles its loss"
        " (forward and backward) and its optimizer step with torch.compile; NumPyro runs"
        " `SVI.update` under `jax.jit` on the same network (stax), TraceMeanField_ELBO and"
        f" Adam. Roofline: {flops:.1f} GFLOP of matrix products per epoch at {rate_words} ="
        f" {roofline_s:.3f} s per epoch; the column is that over the epoch's time. The step's"
        f" matrix products alone, at its shapes and layouts, back to back (fastest over the"
        f" run): {alone:.3f} s per epoch, {100 * roofline_s / alone:.0f}% of the"
        " roofline, the ceiling of any loop of this network here."
        f" {MachineState.sentence(report, report['threads'])}\n",
        "| loop | s / epoch | "
        + " | ".join(f"{PEER_NAMES[p]} (s)" for p in peers)
        + " | "
        + " | ".join(f"ratio to {PEER_NAMES[p]} (range)" for p in peers)
        + " | of roofline |",
        "|---" * (3 + 2 * len(peers)) + "|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['sec_per_epoch']:.3f} | "
            + " | ".join(f"{row[f'{p}_sec_per_epoch']:.3f}" for p in peers)
            + " | "
            + " | ".join(
                f"{row[f'ratio_{p}']:.2f}x ({row[f'ratio_{p}_range'][0]:.2f}-"
                f"{row[f'ratio_{p}_range'][1]:.2f})"
                for p in peers
            )
            + f" | {100 * row['roofline_fraction']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
