"""The VQ-VAE and its PixelCNN prior: quantization, the straight-through gradient, the moving-
average codebook, the prior's causality, the bound in nats by hand, the drivers against Pyro's
own loop, exact resume, and the errors."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from inference import evaluate, reparam, svi
from zoo import cli, data
from zoo.models.vqvae import VQVAE, CodePrior, straight_through


def digits(num=64):
    x, _ = data.load("digits", split="train", binarize="static")
    return x[:num]


def small(**options) -> VQVAE:
    defaults = dict(x_dim=64, num_codes=8, code_dim=3, channels=8, prior_channels=8, prior_layers=2)
    return VQVAE(**{**defaults, **options})


def test_quantization_picks_the_nearest_code():
    vq = small(num_codes=16)
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(500, 3, generator=g)
    brute = torch.stack([((flat - e) ** 2).sum(1) for e in vq.codebook.detach()], 1).argmin(1)
    assert torch.equal(vq.nearest(flat), brute)


def test_straight_through_is_z_q_in_value_and_the_identity_in_gradient():
    g = torch.Generator().manual_seed(1)
    z_e = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True)
    z_q = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True)
    out = straight_through(z_e, z_q)
    assert torch.equal(out, z_q)  # bit for bit, so the model's Delta site has log-density 0
    upstream = torch.randn(4, 3, 2, 2, generator=g)
    (out * upstream).sum().backward()
    assert torch.equal(z_e.grad, upstream)  # d out / d z_e = I
    assert z_q.grad is None  # no gradient reaches the codebook through the decoder


def test_the_guides_code_vectors_are_the_models_so_the_delta_site_costs_nothing():
    vq, x = small(), digits(10)
    guide = poutine.trace(vq.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vq.model, trace=guide)).get_trace(x)
    model.compute_log_prob()
    assert torch.equal(model.nodes["z"]["log_prob"], torch.zeros(10))
    assert guide.nodes["vq_penalty"]["fn"].log_factor.abs().max() == 0  # zero in value


def test_ema_codebook_is_the_running_mean_of_its_assignments():
    """A stream of batches, every vector assigned to code 0: the codebook vector is the
    decay-weighted mean sum_t w_t s_t / sum_t w_t n_t, w_t = (1 - decay) decay^(T - t)."""
    decay = 0.9
    vq = small(num_codes=2, code_dim=2, decay=decay, restart=False)
    g = torch.Generator().manual_seed(2)
    sums, counts = torch.zeros(2, dtype=torch.float64), 0.0
    for t in range(12):
        n = 3 + t % 4
        flat = torch.randn(n, 2, generator=g) + 5.0
        vq._train_codebook(flat, torch.zeros(n, dtype=torch.long))
        sums = decay * sums + (1 - decay) * flat.double().sum(0)
        counts = decay * counts + (1 - decay) * n
    count = vq.quantizer.ema_count[0].item()
    assert count == pytest.approx(counts, rel=1e-6)  # float32 against float64
    # the Laplace smoothing moves the count by about K * 1e-5 / total, here < 1e-5 relative
    torch.testing.assert_close(vq.codebook[0].double(), sums / counts, rtol=1e-4, atol=0)
    assert vq.quantizer.ema_count[1] == 0  # never assigned


def test_dead_codes_restart_on_encoder_outputs():
    vq = small(num_codes=4, code_dim=2, restart=True)
    flat = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    vq._train_codebook(flat, torch.zeros(3, dtype=torch.long))
    # codes 1-3, never assigned, are dead and now sit on vectors of the batch; code 0 took
    # all three (a moving-average use of 0.03, at the threshold) and is their mean
    assert all(any(torch.equal(e, v) for v in flat) for e in vq.codebook.detach()[1:])
    assert vq.usage[-1]["restarted"] == 3
    torch.testing.assert_close(vq.codebook.detach()[0], flat.mean(0), rtol=1e-3, atol=0)


def test_the_prior_is_causal_and_its_likelihood_is_the_sum_of_its_conditionals():
    torch.manual_seed(3)
    prior = CodePrior(6, (3, 4), channels=8, layers=3)
    for p in prior.parameters():
        p.data.normal_(0, 0.5)  # far from uniform, so that every conditional matters
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(6, (5, 3, 4), generator=g)
    full = prior.log_prob(codes)
    one_at_a_time = torch.zeros(5)
    for i in range(3):
        for j in range(4):
            later = codes.clone().flatten(1)
            k = i * 4 + j
            # the code itself and every later one scrambled: its conditional must not notice
            later[:, k:] = torch.randint(6, later[:, k:].shape, generator=g)
            logits = prior.logits(later.reshape(5, 3, 4))[:, i, j]
            one_at_a_time += dist.Categorical(logits=logits).log_prob(codes[:, i, j])
    torch.testing.assert_close(one_at_a_time, full, rtol=1e-6, atol=0)
    # and the first position sees nothing: scrambling everything leaves it unchanged
    first = prior.logits(torch.randint(6, (5, 3, 4), generator=g))[:, 0, 0]
    torch.testing.assert_close(first, prior.logits(codes)[:, 0, 0])


def test_the_bound_in_nats_by_hand_and_as_the_programs_elbo():
    vq, x = small(num_codes=5), digits(7)
    z_e = vq.encoder(x.reshape(7, 1, 8, 8)).detach().permute(0, 2, 3, 1).reshape(-1, 3)
    codes = ((z_e[:, None] - vq.codebook.detach()[None]) ** 2).sum(-1).argmin(1).reshape(7, 2, 2)
    vectors = vq.codebook.detach()[codes].permute(0, 3, 1, 2)
    logits = vq.decoder(vectors).detach().flatten(1)
    by_hand = (x * torch.nn.functional.logsigmoid(logits)
               + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(1)  # fmt: skip
    by_hand = by_hand - 4 * math.log(5)  # four positions, uniform over K = 5
    terms = vq.bound_terms(x, "uniform")
    torch.testing.assert_close(terms["bound"], by_hand, rtol=0, atol=1e-4)
    # the Pyro program's ELBO is the same number (the guide's penalty factor is 0 in value)
    with torch.no_grad():
        elbo = -Trace_ELBO().loss(vq.model, vq.guide, x)
    assert elbo == pytest.approx(by_hand.sum().item(), abs=1e-3)
    scores = evaluate.log_likelihood(vq.model, vq.guide, x, num_samples=3)
    torch.testing.assert_close(scores, by_hand, rtol=0, atol=1e-4)
    # with a prior: the code term is the prior's log-probability of the codes
    vq.prior.steps.fill_(1)
    learned = vq.bound_terms(x, "learned")
    torch.testing.assert_close(learned["codes"], vq.prior.log_prob(codes))
    torch.testing.assert_close(learned["bound"], terms["reconstruction"] + learned["codes"])


def pyro_loop(vq, x, num_steps, optim, seed=0):
    """Pyro's SVI loop on the whole data every step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loop = SVI(vq.model, vq.guide, optim, Trace_ELBO())
    for _ in range(num_steps):
        loop.step(x)
    pyro.set_rng_seed(seed)  # the driver's fit starts from the same random state
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


@pytest.mark.parametrize("codebook", ["ema", "loss"])
@pytest.mark.parametrize("driver", ["reparam", "svi"])
def test_the_drivers_fit_the_vqvae_as_pyros_own_loop(driver, codebook):
    """Straight-through gradients, the penalty factor, the codebook averages and the restarts
    (which draw from torch's random state): over 6 Adam steps, Pyro's SVI loop and the driver
    end on the same parameters and codebook. Both drivers differentiate the ELBO of the whole
    data, as Pyro's loop does (Adam's eps makes the scale matter for the smallest gradients)."""
    x = digits(48)
    torch.manual_seed(0)
    vq = small(codebook=codebook)
    start = {k: v.clone() for k, v in vq.state_dict().items()}
    adam = pyro.optim.Adam({"lr": 0.01})
    expected = pyro_loop(vq, x, 6, adam, seed=5)
    vq.load_state_dict(start)
    vq.usage.clear()
    pyro.clear_param_store()
    fit = reparam.fit if driver == "reparam" else svi.fit
    options = {"analytic_kl": False} if driver == "reparam" else {"loss": "Trace_ELBO"}
    fit(vq.model, vq.guide, x, batch_size=None, num_epochs=6, lr=0.01, seed=5, progress=False,
        **options)  # fmt: skip
    assert len(vq.usage) == 6  # one codebook update per step, none from probes
    for name, value in expected.items():
        torch.testing.assert_close(vq.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(expected["quantizer.codebook"], start["quantizer.codebook"])


def test_a_resumed_fit_keeps_the_codebook_averages(tmp_path, pinned_threads):
    """Bit for bit: the averages and the restarts' random draws travel in the checkpoint."""
    x = digits(64)

    def fit(vq, **options):
        return reparam.fit(vq.model, vq.guide, x, batch_size=16, num_epochs=3, lr=1e-2,
                           progress=False, **options)  # fmt: skip

    def fresh(seed=0):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        return small()

    vq = fresh()
    fit(vq)
    whole = {k: v.clone() for k, v in vq.state_dict().items()}

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    path = tmp_path / "ckpt.pt"
    vq = fresh()
    with pytest.raises(KeyboardInterrupt):
        fit(vq, checkpoint=path, callback=stop_after_first_epoch)
    vq = fresh(seed=123)  # other initial weights: all come from the checkpoint
    fit(vq, checkpoint=path, resume=True)
    for name, value in whole.items():
        assert torch.equal(vq.state_dict()[name], value), name


@pytest.mark.parametrize("jit", [True, "inductor"])
def test_jit_is_refused_while_the_codebook_updates_in_place(jit):
    """torch.jit's trace is caught by the model; TorchInductor's recording (make_fx, which the
    model cannot see) stops at the first Python number read from a tensor (the codebook's
    dead-code count), which the recording turns into a ValueError."""
    vq, x = small(), digits(32)
    match = "codebook averages in place" if jit is True else "as a Python number"
    with pytest.raises(ValueError, match=f"{match}.*leave jit off"):
        reparam.fit(vq.model, vq.guide, x, batch_size=16, num_epochs=1, jit=jit,
                    progress=False)  # fmt: skip


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_codes must be at least 2"):
        small(num_codes=1)
    with pytest.raises(ValueError, match="x_dim=50: .*square images"):
        small(x_dim=50)
    with pytest.raises(ValueError, match="x_dim=36: .*multiple of 4"):
        small(x_dim=36)
    with pytest.raises(ValueError, match="codebook must be one of"):
        small(codebook="kmeans")
    with pytest.raises(ValueError, match="Bernoulli: it needs binary data"):
        small(likelihood="gaussian")
    vq = small()
    x, _ = data.load("digits", split="train")  # intensities, not binarized
    with pytest.raises(ValueError, match="not all 0 or 1: binarize"):
        vq.guide(x[:5])
    with pytest.raises(ValueError, match=r"codes must have shape \(N, 2, 2\)"):
        vq.prior.model(torch.zeros(3, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        vq.prior.model(torch.full((3, 2, 2), 8))
    with pytest.raises(TypeError, match="integer tensor"):
        vq.prior.model(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="prior is not fitted yet"):
        vq.sample(2, prior="learned")
    with pytest.raises(ValueError, match="prior must be 'learned' or 'uniform'"):
        vq.sample(2, prior="gaussian")


def test_zoo_fit_runs_both_stages_and_the_learned_prior_shortens_the_codes(tmp_path):
    out = tmp_path / "vq"
    argv = ["fit", "vqvae", "--data", "digits", "--epochs", "2", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("checkpoint_prior.pt", "history_prior.json", "samples_learned.png",
                 "samples_uniform.png", "code_maps.png", "codebook_usage.png"):  # fmt: skip
        assert (out / name).exists(), name
    assert metrics["prior_epochs"] == 2
    assert metrics["test_code_nats_uniform"] == pytest.approx(4 * math.log(64))
    assert metrics["test_code_nats_learned"] < metrics["test_code_nats_uniform"] - 1.0
    assert metrics["test_elbo"] == metrics["test_bound_learned_prior"]
    bound = -metrics["test_reconstruction_nll"] - metrics["test_code_nats_learned"]
    assert metrics["test_elbo"] == pytest.approx(bound, abs=1e-4)
