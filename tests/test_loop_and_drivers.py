import os
import signal

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO

from inference import batching, evaluate, loop, reparam, svi
from tests._models import PPCA, delta_guide_for_mean, gaussian_with_global_mean
from zoo.models.vae import VAE, VAEConfig


def binary_batch(num=64, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    proto = (torch.rand(4, dim, generator=g) > 0.5).float()
    z = torch.randint(4, (num,), generator=g)
    flip = torch.rand(num, dim, generator=g) < 0.1
    return (proto[z] + flip.float()) % 2  # (N, D) binary


def small_vae(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VAE(VAEConfig(x_dim=12, z_dim=2, hidden=(16,), **kwargs))


# ------------------------------------------------------------------------------------ VAE


def test_vae_loss_falls_and_shapes():
    x = binary_batch()
    vae = small_vae()
    result = reparam.fit(vae.model, vae.guide, x, batch_size=16, num_epochs=40, lr=1e-2)
    curve = result.curve()
    assert curve[-1] > curve[0] + 1.0  # ELBO per data point rises by more than a nat
    assert vae.sample(5).shape == (5, 12) and vae.reconstruct(x[:3]).shape == (3, 12)
    loc, scale = vae.encode(x[:3])
    assert loc.shape == scale.shape == (3, 2) and torch.all(scale > 0)


def test_vae_bad_input():
    vae = small_vae()
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        reparam.fit(vae.model, vae.guide, torch.zeros(8, 5))
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="poisson")


def test_non_reparameterizable_site_is_named():
    def model(x):
        with pyro.plate("data", len(x)):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("data", len(x)):
            pyro.sample("k", dist.Bernoulli(p))

    with pytest.raises(ValueError, match="'k' .*no rsample"):
        reparam.fit(model, guide, torch.randn(10))


def test_a_model_latent_missing_from_the_guide_is_named():
    """A latent the guide does not sample would be drawn from the prior inside the model: the
    driver would optimize E_prior[log p(x | z)] instead of the ELBO, so it refuses."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    with pytest.raises(ValueError, match="model site 'z' is latent but the guide does not"):
        reparam.fit(model, lambda x: None, torch.randn(10))


# ------------------------------------------------------------------------------------ SVI


def test_svi_beta_bernoulli_posterior_mean():
    """Closed form: 8 heads in 10 flips under Beta(1, 1) gives posterior mean 9 / 12."""

    def model(x):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("p", dist.Beta(a, b))

    x = torch.tensor([1.0] * 8 + [0.0] * 2)
    svi.fit(model, guide, x, loss="TraceMeanField_ELBO", lr=0.05, batch_size=5, num_epochs=800)
    a, b = pyro.param("a").item(), pyro.param("b").item()
    assert a / (a + b) == pytest.approx(9 / 12, abs=0.03)


def test_svi_default_and_pyro_optimizers_agree_and_late_parameters_are_refused():
    """The default single torch Adam takes the same steps as Pyro's per-parameter Adam (same
    update rule, same learning rate); a guide that creates a parameter only after the first
    step is refused with a clear error instead of leaving that parameter unoptimized."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Delta(loc))

    x = torch.randn(40) + 3.0
    finals = []
    for optim in (None, pyro.optim.Adam({"lr": 0.1})):
        pyro.clear_param_store()
        svi.fit(
            model, guide, x, loss="Trace_ELBO", optim=optim, lr=0.1, batch_size=10, num_epochs=5
        )
        finals.append(pyro.param("loc").item())
    assert finals[0] == pytest.approx(finals[1], rel=1e-5)

    batches = []

    def late_guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        if len(batches) > 1:  # the driver's set-up runs and the first step see no "shift"
            loc = loc + pyro.param("shift", torch.tensor(0.0))
        pyro.sample("mu", dist.Delta(loc))

    def count(batch, generator):
        batches.append(batch)
        return batch

    pyro.clear_param_store()
    with pytest.raises(RuntimeError, match="created parameters after the first step"):
        svi.fit(
            model, late_guide, x, loss="Trace_ELBO", batch_size=10, num_epochs=1, transform=count
        )


def test_minibatch_objective_is_unbiased_with_a_global_latent():
    x = torch.randn(60)
    full = Trace_ELBO().loss(gaussian_with_global_mean, delta_guide_for_mean, x)
    rows = batching.Rows(x)
    model = batching.scale_rows(gaussian_with_global_mean, ["data"], rows)
    guide = batching.scale_rows(delta_guide_for_mean, ["data"], rows)
    batches = [Trace_ELBO().loss(model, guide, b) for b in x.split(15)]
    assert np.mean(batches) == pytest.approx(full, rel=1e-6)
    # a plain scale would count the global prior N / B times: not the same
    plain = [
        Trace_ELBO().loss(
            pyro.poutine.scale(gaussian_with_global_mean, 4.0),
            pyro.poutine.scale(delta_guide_for_mean, 4.0),
            b,
        )
        for b in x.split(15)
    ]
    assert np.mean(plain) != pytest.approx(full, rel=1e-3)


@pytest.mark.parametrize(
    "loss", ["Trace_ELBO", "TraceMeanField_ELBO", "JitTraceMeanField_ELBO", "TraceGraph_ELBO"]
)
def test_svi_fits_a_vae_with_each_loss(loss):
    x = binary_batch()
    vae = small_vae()
    result = svi.fit(
        vae.model, vae.guide, x, loss=loss, batch_size=32, num_epochs=15, lr=1e-2, valid_data=x[:16]
    )
    assert result.curve()[-1] > result.curve()[0]
    assert np.isfinite(result.history[-1]["valid_objective"])


@pytest.mark.parametrize("k, backend", [(1, "jit"), (5, "jit"), (1, "inductor")])
def test_compiled_objective_equals_the_eager_one(k, backend, device):
    """jit="jit" or "inductor": the same value and gradient as the eager objective for the same
    random draws (a trace that froze a Python number, as Pyro's public differentiable_loss would,
    fails the value), with its own trace for a smaller last batch."""
    x = binary_batch(100).to(device)
    vae = small_vae().to(device)
    pyro.clear_param_store()
    params = loop.parameters(vae.model, vae.guide, x[:2])
    eager = reparam.Objective(vae.model, vae.guide, x[:2], 100, num_particles=k)
    compiled = reparam.Objective(vae.model, vae.guide, x[:2], 100, num_particles=k, jit=backend)
    for batch in (x[:64], x[64:]):
        compiled(batch)  # trace this shape
        results = []
        for objective in (eager, compiled):
            torch.manual_seed(3)
            for p in params:
                p.grad = None
            loss = objective(batch)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in params]))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert len(compiled.total.traces) == 2


def test_jit_mean_field_compiles_once():
    x = binary_batch()
    vae = small_vae()
    elbo = svi.make_loss("JitTraceMeanField_ELBO")
    elbo.differentiable_loss(vae.model, vae.guide, x)
    compiled = elbo._differentiable_loss
    elbo.differentiable_loss(vae.model, vae.guide, x)
    assert elbo._differentiable_loss is compiled


# ------------------------------------------------------------------------------------ IS and IWAE


def test_importance_sampled_log_likelihood_matches_ppca(device):
    ppca = PPCA().to(device)
    x = ppca.sample(40)
    exact = ppca.exact_log_likelihood(x)
    # the exact posterior as proposal: every weight equals p(x), for any K
    estimate = evaluate.log_likelihood(ppca.model, ppca.guide, x, num_samples=3)
    torch.testing.assert_close(estimate, exact, atol=1e-8, rtol=0)
    # a spoiled proposal: the error shrinks like 1 / sqrt(K); with K = 20000 (in chunks of
    # 2000 particles) it is 0.003 nats on average here
    spoiled = PPCA(inflate=1.2, shift=0.1).to(device)
    torch.manual_seed(1)
    estimate = evaluate.log_likelihood(
        spoiled.model, spoiled.guide, x, num_samples=20000, particle_batch=2000, batch_size=40
    )
    assert (estimate - exact).abs().mean() < 0.006 and (estimate - exact).abs().max() < 0.02


def test_iwae_bound_with_the_exact_posterior_is_the_log_likelihood(device):
    ppca = PPCA().to(device)
    x = ppca.sample(30)
    objective = reparam.Objective(ppca.model, ppca.guide, x[:2], num_data=30, num_particles=5)
    torch.testing.assert_close(
        -objective(x), ppca.exact_log_likelihood(x).mean(), atol=1e-8, rtol=0
    )


def test_iwae_trains_and_tightens():
    x = binary_batch(128)
    vae = small_vae()
    reparam.fit(vae.model, vae.guide, x, num_particles=5, batch_size=32, num_epochs=20, lr=1e-2)
    torch.manual_seed(0)
    k1 = evaluate.log_likelihood(vae.model, vae.guide, x, num_samples=1).mean()
    k50 = evaluate.log_likelihood(vae.model, vae.guide, x, num_samples=50).mean()
    assert k50 > k1  # more samples, tighter bound


# ------------------------------------------------------------------------------------ the loop


def fit_vae(x, vae, **options):
    return reparam.fit(
        vae.model, vae.guide, x, batch_size=16, num_epochs=3, lr=1e-2, seed=7, **options
    )


def params_of(vae):
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def uninterrupted(x):
    """The parameters after three epochs without a break: what every resumed run must match."""
    pyro.clear_param_store()
    straight = small_vae().to(x.device)
    fit_vae(x, straight)
    return params_of(straight)


def test_resume_continues_exactly(tmp_path, device, pinned_threads):
    """Bit for bit, also on CUDA: the checkpoint carries the device's RNG state."""
    x = binary_batch().to(device)
    expected = uninterrupted(x)

    ckpt = tmp_path / "ckpt.pt"

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    pyro.clear_param_store()
    with pytest.raises(KeyboardInterrupt):
        fit_vae(x, small_vae().to(device), checkpoint=ckpt, callback=stop_after_first_epoch)
    assert torch.load(ckpt, weights_only=True)["position"]["epoch"] == 1

    pyro.clear_param_store()
    resumed = small_vae(seed=123).to(device)  # other initial weights: all come from the checkpoint
    result = fit_vae(x, resumed, checkpoint=ckpt, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    for name, value in params_of(resumed).items():
        assert value.device.type == device.type
        assert torch.equal(value, expected[name]), name


def test_default_adam_is_fused_and_takes_torch_adams_steps(device):
    """loop.adam, the drivers' default, fuses the update where it can; 20 steps on a quadratic
    land where torch's per-tensor Adam lands, to float32 rounding."""
    torch.manual_seed(0)
    start, target = torch.randn(2, 50, 30, device=device)
    finals = []
    for make in (loop.adam, torch.optim.Adam):
        w = start.clone().requires_grad_()
        optimizer = make([w], lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            ((w - target) ** 2).sum().backward()
            optimizer.step()
        finals.append(w.detach())
    assert loop.adam([w]).defaults["fused"] is True
    assert not torch.equal(finals[0], start)
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


def test_lr_schedule_follows_the_epoch_and_resumes_exactly(tmp_path, pinned_threads):
    """The rate of each epoch is lr * factor(epoch) (geometric from 1 to 0.1 here), also in a
    resumed run, which therefore ends on the uninterrupted run's parameters bit for bit."""
    factor = loop.exponential_lr(0.1, 3)
    assert [factor(e) for e in range(3)] == pytest.approx([1.0, 0.1**0.5, 0.1], rel=1e-12)
    x = binary_batch()

    def run(seed, **options):
        pyro.clear_param_store()
        vae, optimizers, rates = small_vae(seed), [], []
        stop_after = options.pop("stop_after", None)

        def adam(params):
            optimizers.append(torch.optim.Adam(params, lr=1e-2))
            return optimizers[-1]

        def record(entry):
            rates.append(optimizers[0].param_groups[0]["lr"])
            return entry["epoch"] == stop_after or None  # True stops the run there

        fit_vae(x, vae, optimizer=adam, callback=record, **options)
        return params_of(vae), rates

    constant, _ = run(0)
    straight, rates = run(0, lr_schedule=factor)
    assert rates == pytest.approx([1e-2, 1e-2 * 0.1**0.5, 1e-3], rel=1e-12)
    assert not torch.equal(straight["decoder.0.weight"], constant["decoder.0.weight"])

    ckpt = tmp_path / "ckpt.pt"
    run(0, lr_schedule=factor, checkpoint=ckpt, stop_after=1)
    resumed, rates = run(123, lr_schedule=factor, checkpoint=ckpt, resume=True)
    assert rates == pytest.approx([1e-2 * 0.1**0.5, 1e-3], rel=1e-12)
    for name, value in resumed.items():
        assert torch.equal(value, straight[name]), name


def test_lr_schedule_bad_input():
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        loop.exponential_lr(0.0, 10)
    with pytest.raises(ValueError, match="num_epochs"):
        loop.exponential_lr(0.5, 0)
    with pytest.raises(ValueError, match="pyro.optim.ExponentialLR"):
        svi.fit(
            gaussian_with_global_mean,
            delta_guide_for_mean,
            torch.randn(8),
            optim=pyro.optim.Adam({"lr": 0.1}),
            lr_schedule=loop.exponential_lr(0.1, 2),
        )


def test_sigint_mid_epoch_saves_and_resumes_exactly(tmp_path, pinned_threads):
    x = binary_batch()
    expected = uninterrupted(x)

    ckpt = tmp_path / "ckpt.pt"
    calls = []

    def interrupt_on_sixth_batch(batch, generator):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, second batch
            os.kill(os.getpid(), signal.SIGINT)
        return batch

    pyro.clear_param_store()
    with pytest.raises(KeyboardInterrupt):
        fit_vae(x, small_vae(), checkpoint=ckpt, transform=interrupt_on_sixth_batch)
    position = torch.load(ckpt, weights_only=True)["position"]
    assert (position["epoch"], position["step"]) == (1, 2)

    pyro.clear_param_store()
    resumed = small_vae(seed=5)
    fit_vae(x, resumed, checkpoint=ckpt, resume=True)
    for name, value in params_of(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_nan_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    x = binary_batch()
    ckpt = tmp_path / "ckpt.pt"
    calls = []

    def poison_seventh_batch(batch, generator):
        calls.append(1)
        return batch * float("nan") if len(calls) == 7 else batch

    # with validation on, Pyro would reject the NaN inputs first; the guard is for runs without
    with (
        pyro.validation_enabled(False),
        pytest.raises(FloatingPointError, match="epoch 2, step 3.*intact"),
    ):
        fit_vae(x, small_vae(), checkpoint=ckpt, transform=poison_seventh_batch)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["pyro_params"].values())


def test_early_stopping_restores_the_best_state():
    w = torch.nn.Linear(1, 1)
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.0, 0.0])
    weights = []

    def step(batch):
        with torch.no_grad():
            w.weight += 1.0
        return 0.5

    def validate():
        weights.append(w.weight.item())
        return next(scores)

    result = loop.run(
        step,
        torch.zeros(4, 1),
        state={"w": w},
        batch_size=4,
        num_epochs=6,
        validate=validate,
        patience=2,
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]  # two epochs past the best
    assert result.best_epoch == 2 and result.valid_objective == 3.0
    assert result.objective == result.history[1]["objective"]  # of the kept epoch
    assert w.weight.item() == weights[1]  # the weights of the best epoch are back
    assert "early stopping" in result.stop_reason


def test_early_stopping_restores_pyro_parameters_the_state_does_not_list():
    """A step that trains a Pyro parameter the loop's ``state`` does not hold: early stopping
    still puts back the best epoch's value, from its copy of the param store."""
    loc = pyro.param("loc", torch.tensor(0.0))
    scores = iter([1.0, 3.0, 2.0, 2.5])
    values = []

    def step(batch):
        with torch.no_grad():
            loc.add_(1.0)
        return 0.5

    def validate():
        values.append(loc.item())
        return next(scores)

    result = loop.run(
        step, torch.zeros(4, 1), state={}, batch_size=4, num_epochs=4, validate=validate, patience=2
    )
    assert result.best_epoch == 2 and pyro.param("loc").item() == values[1] == 2.0


def test_resume_keeps_the_best_validated_state(tmp_path, pinned_threads):
    """The best epoch's parameters travel in the checkpoint: a run interrupted after its best
    epoch and resumed ends on them, as the uninterrupted run does."""
    ckpt = tmp_path / "ckpt.pt"
    scores = [1.0, 3.0, 2.0, 2.5]  # epoch 2 is the best

    def run(num_epochs, resume, scores):
        w = torch.nn.Linear(1, 1)
        with torch.no_grad():
            w.weight.fill_(0.0)

        def step(batch):
            with torch.no_grad():
                w.weight += 1.0  # the weight counts the epochs
            return 0.5

        result = loop.run(
            step,
            torch.zeros(4, 1),
            state={"w": w},
            batch_size=4,
            num_epochs=num_epochs,
            validate=lambda: next(scores),
            checkpoint=ckpt,
            resume=resume,
        )
        return w.weight.item(), result

    straight, _ = run(4, False, iter(scores))
    ckpt.unlink()
    run(3, False, iter(scores[:3]))
    resumed, result = run(4, True, iter(scores[3:]))
    assert straight == 2.0 and resumed == straight
    assert result.best_epoch == 2 and result.valid_objective == 3.0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    vae = small_vae()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit_vae(binary_batch(), vae, checkpoint=tmp_path / "missing.pt", resume=True)


def test_distributed_matches_single_process(tmp_path):
    """Two gloo processes on CPU, each on half of every global batch, end where one process
    with the whole batch ends."""
    import torch.multiprocessing as mp

    from tests import _ddp_worker

    x = binary_batch(48)
    single = _ddp_worker.train(x, rank=0, world=1)
    mp.spawn(_ddp_worker.run, args=(2, str(tmp_path), x), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, atol=1e-5, rtol=1e-5)


def test_a_distributed_fit_resumes_exactly(tmp_path):
    """Two gloo ranks drawing their own noise: stopped after the first epoch and resumed, the
    fit ends bit for bit where the uninterrupted one ends (each rank's random state is in the
    checkpoint; with rank 0's alone, as before, rank 1 drew other noise after the resume)."""
    import torch.multiprocessing as mp

    from tests import _ddp_worker

    x = binary_batch(48)
    mp.spawn(_ddp_worker.resume_runs, args=(2, str(tmp_path), x), nprocs=2, join=True)
    ends = torch.load(tmp_path / "ends.pt", weights_only=True)
    for name, value in ends["straight"].items():
        assert torch.equal(ends["resumed"][name], value), name
    saved = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert len(saved["rank_rng"]) == 2


def test_svi_fits_the_gmm_by_map_like_em():
    """The mixtures also fit through SVI: TraceEnum_ELBO with the empty guide is exact MAP."""
    from inference import em
    from zoo import data
    from zoo.models.gmm import GaussianMixture

    x, _ = data.make_gaussian_mixture(300, seed=3)
    by_em = GaussianMixture(num_components=3, dim=2)
    em.fit(by_em.model, by_em.guide, x, tol=1e-8, n_init=3)
    gmm = GaussianMixture(num_components=3, dim=2)
    gmm.set_params(locs=by_em.locs.detach() + 0.3)  # start near, not at, the EM optimum
    result = svi.fit(
        gmm.model,
        gmm.guide,
        x,
        loss="TraceEnum_ELBO",
        max_plate_nesting=1,
        lr=0.02,
        batch_size=300,
        num_epochs=600,
    )
    assert result.objective == pytest.approx(by_em.log_likelihood(x).mean().item(), abs=0.01)
    torch.testing.assert_close(gmm.locs.detach(), by_em.locs.detach(), atol=0.05, rtol=0)


# ------------------------------------------------------------------- the compiled training step


@pytest.mark.parametrize("k", [1, 5])
def test_compiled_step_takes_the_eager_drivers_steps(k, device):
    """jit="inductor" with the default Adam runs one compiled graph per step (the bound, its
    gradient and Adam's update; the ELBO or the IWAE bound with K = 5): from the same seed it
    draws what the eager driver draws (the recording's run included) and lands on its
    parameters to float32 rounding, through a smaller last batch (70 rows in batches of 16)
    and a learning-rate schedule."""
    x = binary_batch(70).to(device)
    runs = []
    for jit in (False, "inductor"):
        pyro.clear_param_store()
        vae = small_vae().to(device)
        start = params_of(vae)
        schedule = loop.exponential_lr(0.1, 3)
        result = fit_vae(x, vae, jit=jit, lr_schedule=schedule, num_particles=k)
        grads = [p.grad for p in vae.parameters()]
        runs.append((params_of(vae), result.curve(), grads))
    (eager, eager_curve, eager_grads), (compiled, curve, grads) = runs
    assert all(g is not None for g in eager_grads)
    assert all(g is None for g in grads)  # the compiled step ran: it sets no .grad
    assert curve == pytest.approx(eager_curve, rel=1e-5)
    # atol 2e-6: the step differentiates the whole data's bound, as Pyro's loop does, so
    # Adam's eps no longer damps a gradient at rounding level, and the two graphs' rounding
    # moves such an entry by up to lr * 1e-4 over the run (1.2e-6 measured, K = 5)
    for name, value in eager.items():
        assert not torch.equal(value, start[name]), name
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=2e-6)


def test_compiled_step_resumes_exactly(tmp_path, pinned_threads):
    """Adam's state lives in the optimizer the compiled step updates in place: a run stopped
    after its first epoch and resumed from the checkpoint ends on the uninterrupted run's
    parameters bit for bit (the step count, read back from the loaded state, included)."""
    x = binary_batch()
    pyro.clear_param_store()
    straight = small_vae()
    fit_vae(x, straight, jit="inductor")
    ckpt = tmp_path / "ckpt.pt"
    pyro.clear_param_store()
    fit_vae(x, small_vae(), jit="inductor", checkpoint=ckpt, callback=lambda r: r["epoch"] == 1)
    assert torch.load(ckpt, weights_only=True)["position"]["epoch"] == 1
    pyro.clear_param_store()
    resumed = small_vae(seed=123)
    fit_vae(x, resumed, jit="inductor", checkpoint=ckpt, resume=True)
    for name, value in params_of(resumed).items():
        assert torch.equal(value, params_of(straight)[name]), name


def test_compiled_step_refusals_fall_back_to_the_compiled_objective():
    """Another optimizer than torch's plain Adam keeps the compiled objective and its own
    step(); the refusal says why."""
    x = binary_batch()
    vae = small_vae()
    params = loop.parameters(vae.model, vae.guide, x[:2])
    objective = reparam.Objective(vae.model, vae.guide, x[:2], 64, jit="inductor").total
    assert reparam.CompiledStep.refusal(objective, torch.optim.Adam(params)) is None
    cases = {
        "not torch's Adam": torch.optim.SGD(params, lr=0.1),
        "amsgrad": torch.optim.Adam(params, amsgrad=True),
        "weight decay": torch.optim.Adam(params, weight_decay=0.1),
        "parameters are not the objective's": torch.optim.Adam(params[:1]),
    }
    for reason, optimizer in cases.items():
        assert reason in reparam.CompiledStep.refusal(objective, optimizer)
    # SGD's step follows the gradient's scale: the whole data's ELBO, so 0.1 per data point
    fit_vae(x, vae, jit="inductor", optimizer=lambda p: torch.optim.SGD(p, lr=0.1 / len(x)))
    assert all(p.grad is not None for p in vae.parameters())  # optimizer.step() ran


def test_svi_compiled_step_takes_pyros_steps():
    """svi.fit(jit="inductor") compiles the step whole and still takes the steps of Pyro's
    loop with that loss: the eager driver's parameters to float32 rounding (1e-5 apart after
    ten steps), from the same draws."""
    x = binary_batch(70)
    runs = []
    for jit in (False, "inductor"):
        pyro.clear_param_store()
        vae = small_vae()
        svi.fit(
            vae.model,
            vae.guide,
            x,
            loss="TraceMeanField_ELBO",
            batch_size=16,
            num_epochs=2,
            lr=1e-2,
            seed=7,
            jit=jit,
        )
        runs.append((params_of(vae), [p.grad for p in vae.parameters()]))
    (eager, eager_grads), (compiled, grads) = runs
    assert all(g is not None for g in eager_grads) and all(g is None for g in grads)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5)


def test_svi_compiled_step_refuses_what_it_cannot_compile():
    x = binary_batch()
    vae = small_vae()

    def fit(**options):
        svi.fit(vae.model, vae.guide, x, batch_size=16, num_epochs=1, **options)

    with pytest.raises(ValueError, match="not loss='TraceGraph_ELBO'"):
        fit(loss="TraceGraph_ELBO", jit="inductor")
    with pytest.raises(ValueError, match="num_particles=2"):
        fit(loss="Trace_ELBO", num_particles=2, jit="inductor")
    with pytest.raises(ValueError, match="JitTraceMeanField_ELBO"):
        fit(loss="Trace_ELBO", jit=True)
    with pytest.raises(ValueError, match="leave optim unset"):
        fit(loss="Trace_ELBO", jit="inductor", optim=pyro.optim.Adam({"lr": 1e-3}))
    with pytest.raises(ValueError, match="guide site 'z'"):
        svi.fit(
            vae.model,
            svi.score_function(vae.guide),
            x,
            batch_size=16,
            num_epochs=1,
            loss="Trace_ELBO",
            jit="inductor",
        )


class _MovingAverage(torch.nn.Module):
    """A program that updates a buffer of its own in place at every run."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("average", torch.zeros(3))

    def model(self, x):
        pyro.module("moving", self)
        with torch.no_grad():
            self.average.mul_(0.9).add_(x.mean(0), alpha=0.1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


@pytest.mark.parametrize("fit", [reparam.fit, svi.fit])
def test_compiled_programs_refuse_what_a_graph_would_freeze(fit):
    """A buffer updated in place is a constant to the recorded graph, and a schedule changes
    Python numbers the graph holds: both are refused, naming the cause."""
    x = torch.randn(40, 3)
    options = {"batch_size": 16, "num_epochs": 1, "jit": "inductor", "progress": False}
    if fit is svi.fit:
        options["loss"] = "TraceMeanField_ELBO"
    program = _MovingAverage()
    with pytest.raises(ValueError, match="neither a parameter nor an argument.*leave jit off"):
        fit(program.model, program.guide, x, **options)
    vae = small_vae()
    with pytest.raises(ValueError, match="pass no schedule"):
        fit(vae.model, vae.guide, binary_batch(), schedule=lambda epoch: None, **options)
