"""A worker for the torch.distributed test (importable, as torch.multiprocessing needs)."""

import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from torch import nn

from inference import reparam


class DeterministicAutoencoder(nn.Module):
    """z[n] ~ N(0, 1), x[n] ~ Bernoulli(decoder(z[n])), guide Delta(encoder(x[n])): no sampling
    noise, so a single process and two ranks see the same numbers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder = nn.Linear(12, 2), nn.Linear(2, 12)

    def model(self, x):
        pyro.module("ae", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("ae", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))


def train(x, rank, world):
    pyro.clear_param_store()
    net = DeterministicAutoencoder()
    reparam.fit(
        net.model, net.guide, x, batch_size=16, num_epochs=3, lr=0.05, seed=0, analytic_kl=False
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def run(rank, world, folder, x):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        params = train(x, rank, world)
        if rank == 0:
            torch.save(params, os.path.join(folder, "rank0.pt"))
    finally:
        tdist.destroy_process_group()


class NoisyAutoencoder(DeterministicAutoencoder):
    """The autoencoder with a Normal guide: each rank draws its own noise, so a resumed fit
    is the uninterrupted one only if every rank's random state was kept."""

    def guide(self, x):
        pyro.module("ae", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(self.encoder(x), 0.5).to_event(1))


def resume_runs(rank, world, folder, x):
    """On each rank: a 2-epoch fit, then the same stopped after epoch 1 and resumed from its
    checkpoint; rank 0 saves both ends."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        ends = {}
        for name, runs in (
            ("straight", [(2, False, None)]),
            ("resumed", [(2, False, 1), (2, True, None)]),
        ):
            checkpoint = os.path.join(folder, f"{name}.pt")
            for num_epochs, resume, stop in runs:
                if not resume:  # the same start on each rank, another noise stream per rank
                    pyro.clear_param_store()
                    net = NoisyAutoencoder()
                    torch.manual_seed(100 + rank)
                reparam.fit(
                    net.model, net.guide, x, batch_size=16, num_epochs=num_epochs, lr=0.05,
                    seed=0, checkpoint=checkpoint, resume=resume, threads=1,
                    callback=None if stop is None else (lambda r, s=stop: r["epoch"] == s),
                )  # fmt: skip
                tdist.barrier()  # rank 0's checkpoint is written before any rank resumes
            ends[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if rank == 0:
            torch.save(ends, os.path.join(folder, "ends.pt"))
    finally:
        tdist.destroy_process_group()
