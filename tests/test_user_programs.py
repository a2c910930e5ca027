"""Users' own Pyro programs, written in the styles of Pyro's examples and tutorials, through the
shared drivers: each is fitted exactly as Pyro's own ``pyro.infer.SVI`` loop fits it on the same
batches (same optimizer, same random draws), or matches a closed form or a reference
implementation, or is refused with an error that names the plate, site or argument.

Pyro's loop is given the driver's batches: the driver draws a permutation of the rows per epoch
from ``torch.Generator().manual_seed(seed)`` and takes them ``batch_size`` at a time; the
reference model indexes the full data through Pyro's own subsampling plate, which scales by
N / B. Parameters are initialized without the global random state, so both loops draw the same
samples from the same seed.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn

from inference import batching, em, evaluate, reparam, svi


def driver_batches(num_data, batch_size, num_epochs, seed=0):
    """The row indices of every step the shared loop takes, in order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_epochs):
        out += list(torch.randperm(num_data, generator=g).split(batch_size))
    return out


def pyros_loop(model, guide, steps, *, seed, lr=0.05, loss=None):
    """Pyro's own SVI loop, one ``SVI.step(*args)`` per entry of ``steps`` from ``seed``, with
    Pyro's Adam; the parameters it ends on. The store is cleared first and after."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    reference = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    for args in steps:
        reference.step(*args)
    expected = store_values()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return expected


def store_values():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def assert_same_params(actual, expected, rtol=1e-5, atol=1e-6):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def regression_data(num=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.5 * torch.randn(num, generator=g)
    return x, y


# --------------------------------------------------------------- minibatch scaling, by plate


def local_latent_program(plate):
    """z[n] ~ N(0, 1), y[n] ~ N(w z[n] + b x[n], 1) with an amortized Normal guide; ``plate(x,
    name)`` opens the plate over the rows, in the style under test."""

    def model(x, y):
        w = pyro.param("w", torch.tensor(0.5))
        b = pyro.param("b", torch.zeros(3))
        with plate(x, "model"):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("y", dist.Normal(w * z + x @ b, 1.0), obs=y)

    def guide(x, y):
        a = pyro.param("a", torch.zeros(3))
        s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
        with plate(x, "guide"):
            pyro.sample("z", dist.Normal(x @ a + 0.1 * y, s))

    return model, guide


PLATES = {
    # Pyro's CVAE and SS-VAE examples: a plate with no size
    "sizeless": lambda x, who: pyro.plate("data"),
    # a plate named after what it indexes, not "data"
    "named": lambda x, who: pyro.plate("sequences", len(x)),
    # a plate that subsamples the rows it is given (here: all of them)
    "subsampling": lambda x, who: pyro.plate("data", len(x), subsample_size=len(x)),
}


@pytest.mark.parametrize("style", sorted(PLATES))
def test_minibatches_are_scaled_as_pyros_subsampling_plate_scales_them(style):
    """The driver on minibatches equals Pyro's loop with pyro.plate(N, subsample=idx)."""
    x, y = regression_data()
    model, guide = local_latent_program(PLATES[style])
    steps = driver_batches(len(x), 16, num_epochs=4)

    def reference_plate(x_full, who):
        return pyro.plate("data", len(x), subsample=reference_plate.idx)

    ref_model, ref_guide = local_latent_program(reference_plate)

    def ref(fn):
        return lambda idx: (setattr(reference_plate, "idx", idx), fn(x[idx], y[idx]))[1]

    expected = pyros_loop(ref(ref_model), ref(ref_guide), [(i,) for i in steps], seed=3)
    result = svi.fit(
        model, guide, (x, y), optim=pyro.optim.Adam({"lr": 0.05}), batch_size=16, num_epochs=4
    )
    assert result.extra["data_plates"] == ["sequences" if style == "named" else "data"]
    assert_same_params(store_values(), expected)
    assert_same_params(result.params, expected)


def test_the_minibatch_objective_averages_to_the_whole_data_elbo():
    """At fixed parameters (lr 0) and a deterministic guide, the epoch's mean minibatch objective
    is exactly the whole-data ELBO per point: global terms counted once, local ones N / B."""

    def model(x, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))  # global
        with pyro.plate("data"):  # sizeless
            pyro.sample("y", dist.Normal(mu + x[:, 0], 1.0), obs=y)

    def guide(x, y):
        pyro.sample("mu", dist.Delta(pyro.param("m", torch.tensor(0.4))))

    x, y = regression_data()
    full = -Trace_ELBO().loss(model, guide, x, y) / len(x)
    result = svi.fit(model, guide, (x, y), lr=0.0, batch_size=12, num_epochs=1)
    assert result.objective == pytest.approx(full, rel=1e-6)


def test_a_model_that_subsamples_itself_is_scaled_once():
    """svi_torch style: the model takes the whole data and subsamples in its plate. On the whole
    data each step it is Pyro's loop bit for bit; on minibatches the driver's N / B comes on top
    of Pyro's B / subsample_size, so every observation weighs N / subsample_size, not more."""

    def model(x, y):
        b = pyro.param("b", torch.zeros(3))
        with pyro.plate("data", len(x), subsample_size=8) as ind:
            pyro.sample("y", dist.Normal(x[ind] @ b, 1.0), obs=y[ind])

    def guide(x, y):
        pass

    x, y = regression_data()
    expected = pyros_loop(model, guide, [(x, y)] * 30, seed=1)
    result = svi.fit(
        model, guide, (x, y), optim=pyro.optim.Adam({"lr": 0.05}), batch_size=None, num_epochs=30
    )
    assert_same_params(store_values(), expected, rtol=0, atol=0)
    assert result.extra["data_plates"] == []

    rows = batching.Rows((x, y))
    plates = batching.find_data_plates(model, guide, rows, (16, 15))
    scaled = batching.scale_rows(model, plates, rows)
    trace = poutine.trace(scaled).get_trace(x[:16], y[:16])
    assert trace.nodes["y"]["scale"] == pytest.approx(len(x) / 8)


def test_a_site_over_the_rows_outside_every_plate_is_refused():
    """y declared as one event over the whole batch: its log-probability covers the rows but
    sits in no plate, so a minibatch could not be scaled (it would be N / B too light)."""

    def model(x, y):
        b = pyro.param("b", torch.zeros(3))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x @ b, 1.0).to_event(1), obs=y)

    def guide(x, y):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x, y = regression_data()
    with pytest.raises(ValueError, match="site 'y' has shape \\(16,\\) on 16 rows.*no plate"):
        svi.fit(model, guide, (x, y), batch_size=16, num_epochs=1)


def test_no_plate_over_the_rows_is_refused_and_named():
    def model(x, y):
        b = pyro.param("b", torch.zeros(3))
        with pyro.plate("features", 3):
            pyro.sample("c", dist.Normal(b, 1.0), obs=torch.zeros(3))
        pyro.sample("y", dist.Normal((x @ b).sum(), 1.0), obs=y.sum())

    x, y = regression_data()
    with pytest.raises(ValueError, match="no pyro.plate's size follows.*'features': \\[\\[3\\]"):
        svi.fit(model, lambda x, y: None, (x, y), batch_size=16, num_epochs=1)
    with pytest.raises(ValueError, match="pyro.plate\\('features'\\) has sizes"):
        svi.fit(model, lambda x, y: None, (x, y), batch_size=16, data_plate="features")
    # on the whole data there is nothing to scale: it fits
    svi.fit(model, lambda x, y: None, (x, y), batch_size=None, num_epochs=2)


def test_documents_along_dim_1_with_batch_dims():
    """LDA style: the data is (words, documents), documents on dim 1 and in the plate at dim -1;
    batch_dims=1 minibatches the documents, scaled as Pyro's subsampling plate scales them."""
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(3 * torch.rand(5, 40, generator=g))  # (W, D)

    def program(plate):
        def model(data):
            rate = pyro.param("rate", torch.ones(5, 1), constraint=constraints.positive)
            with plate(data):
                theta = pyro.sample("theta", dist.Gamma(2.0, 2.0))  # (D,)
                with pyro.plate("words", 5, dim=-2):
                    pyro.sample("x", dist.Poisson(rate * theta), obs=data)

        def guide(data):
            c = pyro.param("c", torch.tensor(2.0), constraint=constraints.positive)
            with plate(data):
                pyro.sample("theta", dist.Gamma(c + data.sum(0), 2.0 + 5.0))

        return model, guide

    model, guide = program(lambda data: pyro.plate("documents", data.shape[1]))
    steps = driver_batches(40, 10, 3)
    state = {}
    ref_model, ref_guide = program(lambda data: pyro.plate("documents", 40, subsample=state["i"]))

    def ref(fn):
        return lambda idx: (state.update(i=idx), fn(counts[:, idx]))[1]

    expected = pyros_loop(ref(ref_model), ref(ref_guide), [(i,) for i in steps], seed=0)
    result = svi.fit(
        model,
        guide,
        counts,
        batch_dims=1,
        optim=pyro.optim.Adam({"lr": 0.05}),
        batch_size=10,
        num_epochs=3,
    )
    assert result.extra["data_plates"] == ["documents"]
    assert_same_params(store_values(), expected)


# --------------------------------------------------------------- calling convention


def eight_schools(J, sigma, y=None):
    """Pyro's eight schools: sizes from an argument, data as keyword arguments."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


SCHOOLS = {
    "J": 8,
    "sigma": torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]),
    "y": torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]),
}


def test_keyword_data_with_a_constant_is_pyros_loop():
    """A mapping is passed as keyword arguments (J stays an int); an AutoNormal guide over the
    global and local latents; on the whole data every step, it is Pyro's loop exactly."""
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools)
    loop = SVI(eight_schools, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(50):
        loop.step(**SCHOOLS)
    expected = store_values()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools)
    result = svi.fit(
        eight_schools, guide, SCHOOLS, optim=pyro.optim.Adam({"lr": 0.05}), num_epochs=50
    )
    assert_same_params(store_values(), expected)
    assert set(result.params) == set(expected)


def test_keyword_data_that_cannot_be_minibatched_is_refused():
    with pytest.raises(ValueError, match="(?s)minibatch of 4 rows.*cannot be minibatched"):
        svi.fit(eight_schools, AutoNormal(eight_schools), SCHOOLS, batch_size=4)
    bad = dict(SCHOOLS, sigma=SCHOOLS["sigma"][:5])
    with pytest.raises(ValueError, match="data\\['y'\\] has 8 rows.*data\\['sigma'\\] has 5"):
        svi.fit(eight_schools, AutoNormal(eight_schools), bad)
    with pytest.raises(ValueError, match="batch_dims names \\['sigmas'\\]"):
        svi.fit(eight_schools, AutoNormal(eight_schools), SCHOOLS, batch_dims={"sigmas": 0})
    with pytest.raises(TypeError, match="not str"):
        svi.fit(eight_schools, AutoNormal(eight_schools), "schools.csv")


def test_a_tensor_passed_whole_with_batch_dims_none():
    """batch_dims=(0, 0, None): the third argument (a table of 3 weights) goes whole to every
    minibatch instead of being split or refused."""

    def model(x, y, prior_scale):
        b = pyro.param("b", torch.zeros(3))
        pyro.factor("prior", dist.Normal(0.0, prior_scale).log_prob(b).sum())
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ b, 1.0), obs=y)

    x, y = regression_data()
    scales = torch.ones(3)
    with pytest.raises(ValueError, match="data\\[2\\] has 3 rows along dim 0 but data\\[0\\]"):
        svi.fit(model, lambda *a: None, (x, y, scales))
    result = svi.fit(model, lambda *a: None, (x, y, scales), batch_dims=(0, 0, None), batch_size=16)
    assert result.extra["data_plates"] == ["data"]


# --------------------------------------------------------------- parameters


def test_local_parameters_fit_on_the_whole_data_and_are_refused_on_minibatches():
    """Pyro's GMM tutorial's full_guide: one parameter row per data point. The set-up run uses
    the first step's batch, so on the whole data it is Pyro's loop; minibatches are refused."""
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])

    def model(data):
        weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([0.0, 5.0]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)

    def full_guide(data):
        probs = pyro.param(
            "assignment_probs", torch.ones(len(data), 2) / 2, constraint=constraints.simplex
        )
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Categorical(probs), infer={"enumerate": "sequential"})

    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    expected = pyros_loop(model, full_guide, [(data,)] * 40, seed=0, loss=elbo)
    svi.fit(
        model,
        full_guide,
        data,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        optim=pyro.optim.Adam({"lr": 0.05}),
        num_epochs=40,
    )
    assert_same_params(store_values(), expected)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="(?s)run on 4 rows but fail on .* of 3.*non-amortized"):
        svi.fit(model, full_guide, data, loss="TraceEnum_ELBO", batch_size=4)


def test_autoguide_over_local_latents():
    """AutoNormal over a model with a latent per row: Pyro's loop on the whole data; refused
    with the reason on minibatches (its parameters have one row per data point)."""
    x, y = regression_data(24)
    model, _ = local_latent_program(lambda x, who: pyro.plate("data", len(x)))
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    loop = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        loop.step(x, y)
    expected = store_values()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi.fit(model, guide, (x, y), optim=pyro.optim.Adam({"lr": 0.05}), num_epochs=20)
    assert_same_params(store_values(), expected)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="(?s)fail on a minibatch of 7.*non-amortized"):
        svi.fit(model, AutoNormal(model), (x, y), batch_size=8)


class BayesianRegression(PyroModule):
    """Pyro's Bayesian regression tutorial: PyroModule[nn.Linear] with PyroSample weights and a
    PyroParam noise scale; forward(x, y) is the model."""

    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)  # (N,)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, self.sigma), obs=y)


@pytest.mark.parametrize("local", [False, True], ids=["param-store", "module-local"])
def test_pyro_module_with_pyro_params_and_module_local_params(local):
    """Also with pyro.settings module_local_params=True, which Pyro recommends for PyroModules:
    the driver finds the parameters in the modules and fits them as Pyro's loop does."""
    x, y = regression_data()
    with pyro.settings.context(module_local_params=local):
        finals = []
        for use_driver in (False, True):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            model = BayesianRegression()
            guide = AutoNormal(model)
            optim = pyro.optim.Adam({"lr": 0.03})
            if use_driver:
                result = svi.fit(model, guide, (x, y), optim=optim, num_epochs=30)
            else:
                loop = SVI(model, guide, optim, Trace_ELBO())
                for _ in range(30):
                    loop.step(x, y)
            finals.append({k: v.detach().clone() for k, v in guide.named_parameters()})
            finals[-1]["sigma"] = model.sigma.detach().clone()
        assert_same_params(finals[1], finals[0])
        fitted = pyro.param("sigma") if not local else model.sigma  # where Pyro keeps it
        torch.testing.assert_close(result.params["sigma"], fitted.detach())


def regression_both_ways(guide_class, num_epochs, lr, num_particles=1):
    """The Bayesian regression fitted by Pyro's loop and by the driver from the same seed;
    (Pyro's parameters, the driver's, the driver's result)."""
    finals, result = [], None
    for use_driver in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = BayesianRegression()
        guide = guide_class(model)
        x, y = regression_data()
        optim = pyro.optim.Adam({"lr": lr})
        if use_driver:
            options = dict(num_particles=num_particles, num_epochs=num_epochs, optim=optim)
            result = svi.fit(model, guide, (x, y), **options)
        else:
            elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
            loop = SVI(model, guide, optim, elbo)
            for _ in range(num_epochs):
                loop.step(x, y)
        finals.append(store_values())
    return finals[0], finals[1], result


def test_sequential_particles_when_the_program_does_not_broadcast():
    """nn.Linear on a (particles, N, 3) tensor of sampled weights fails under vectorized
    particles ("t() expects a tensor with <= 2 dimensions"); the driver falls back to Pyro's
    sequential particles and takes Pyro's steps with vectorize_particles=False."""
    expected, actual, result = regression_both_ways(AutoNormal, 10, 0.03, num_particles=3)
    assert result.extra["vectorize_particles"] is False
    assert_same_params(actual, expected)


def test_map_by_svi_with_an_autodelta_guide_matches_pyros_loop():
    """A closed loop with no randomness at all: AutoDelta (MAP) on the Bayesian regression."""
    expected, actual, _ = regression_both_ways(AutoDelta, 25, 0.05)
    assert_same_params(actual, expected, rtol=0, atol=0)


class TorchMMPPCA:
    """PPCA written with torch.mm, which takes 2-d tensors only: no vectorized particles."""

    def __init__(self, d=4, q=2):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(d, q, generator=g, dtype=torch.float64)
        self.mu = torch.randn(d, generator=g, dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.mm(z, self.w.t()) + self.mu, 0.5).to_event(1), obs=x)

    def guide(self, x):
        m = self.w.T @ self.w + 0.25 * torch.eye(2, dtype=x.dtype)
        m_inv = torch.linalg.inv(m)
        with pyro.plate("data", len(x)):
            pyro.sample(
                "z", dist.MultivariateNormal((x - self.mu) @ self.w @ m_inv.T, 0.25 * m_inv)
            )

    def exact(self, x):
        cov = self.w @ self.w.T + 0.25 * torch.eye(4, dtype=x.dtype)
        return dist.MultivariateNormal(self.mu, cov).log_prob(x)


def test_importance_sampling_one_particle_at_a_time():
    """evaluate.log_likelihood and the IWAE objective on a program that cannot be vectorized:
    with the exact posterior as proposal every weight is p(x), for any K."""
    ppca = TorchMMPPCA()
    x = torch.randn(10, 4, dtype=torch.float64) + ppca.mu
    estimate = evaluate.log_likelihood(ppca.model, ppca.guide, x, num_samples=3)
    torch.testing.assert_close(estimate, ppca.exact(x), atol=1e-8, rtol=0)
    objective = reparam.Objective(ppca.model, ppca.guide, x[:2], num_data=10, num_particles=4)
    torch.testing.assert_close(-objective(x), ppca.exact(x).mean(), atol=1e-8, rtol=0)
    with pytest.raises(RuntimeError):
        evaluate.log_likelihood(ppca.model, ppca.guide, x, num_samples=3, vectorize_particles=True)


# --------------------------------------------------------------- early stopping


@pytest.mark.parametrize("driver", ["svi", "reparam"])
def test_early_stopping_returns_the_kept_epochs_parameters(driver):
    """The validation scores peak at epoch 2: the parameters returned (in the param store and
    in result.params) are epoch 2's, and result.objective is epoch 2's training objective."""
    x, y = regression_data()
    model, guide = local_latent_program(lambda x, who: pyro.plate("data", len(x)))
    scores = iter([1.0, 3.0, 2.0, 2.5, 0.0, 0.0])
    seen = []

    def record(entry):
        seen.append(store_values())

    fit = svi.fit if driver == "svi" else reparam.fit
    result = fit(
        model,
        guide,
        (x, y),
        lr=0.1,
        batch_size=16,
        num_epochs=6,
        validate=lambda: next(scores),
        patience=2,
        callback=record,
    )
    assert result.best_epoch == 2 and result.valid_objective == 3.0
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.objective == result.history[1]["objective"]
    assert not torch.equal(seen[1]["w"], seen[3]["w"])
    assert_same_params(store_values(), seen[1], rtol=0, atol=0)
    assert_same_params(result.params, seen[1], rtol=0, atol=0)


def test_early_stopping_restores_module_local_parameters():
    """With module_local_params=True nothing is in Pyro's store: the kept epoch's values come
    back from the driver's own copy of the modules' parameters."""
    x, y = regression_data()
    scores, seen = iter([1.0, 3.0, 2.0, 2.5, 0.0]), []
    with pyro.settings.context(module_local_params=True):
        model = BayesianRegression()
        guide = AutoNormal(model)

        def record(entry):
            seen.append({k: v.detach().clone() for k, v in guide.named_parameters()})

        result = svi.fit(
            model,
            guide,
            (x, y),
            lr=0.1,
            batch_size=16,
            num_epochs=5,
            validate=lambda: next(scores),
            patience=2,
            callback=record,
        )
        assert len(pyro.get_param_store()) == 0 and result.best_epoch == 2
        assert any(not torch.equal(seen[1][k], seen[3][k]) for k in seen[1])
        now = {k: v.detach() for k, v in guide.named_parameters()}
        assert_same_params(now, seen[1], rtol=0, atol=0)


def test_patience_without_a_validation_score_is_refused():
    x, y = regression_data()
    model, guide = local_latent_program(lambda x, who: pyro.plate("data", len(x)))
    with pytest.raises(ValueError, match="patience= stops on the validation score"):
        svi.fit(model, guide, (x, y), patience=1)


# --------------------------------------------------------------- EM


class PoissonMixture(PyroModule):
    """A mixture of Poissons whose parameters are PyroParam attributes; forward is the model."""

    def __init__(self):
        super().__init__()
        self.weights = PyroParam(torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        self.rates = PyroParam(torch.tensor([1.0, 4.0]), constraint=constraints.positive)

    def forward(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(self.weights))
            pyro.sample("x", dist.Poisson(self.rates[z]), obs=x)

    def model(self, x):  # a plain method: PyroParams read outside Pyro's module context
        return self.forward(x)


def poisson_em_reference(x, weights, rates, num_iter):
    """Closed-form EM for a Poisson mixture, written out."""
    for _ in range(num_iter):
        log_joint = torch.log(weights) + dist.Poisson(rates).log_prob(x[:, None])  # (N, K)
        resp = log_joint.softmax(-1)
        weights = resp.mean(0)
        rates = (resp * x[:, None]).sum(0) / resp.sum(0)
    return weights, rates


@pytest.mark.parametrize("entry", ["forward", "method"])
def test_em_fits_a_pyro_module_with_pyro_params(entry):
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.poisson(torch.full((60,), 1.5), generator=g),
            torch.poisson(torch.full((40,), 7.0), generator=g),
        ]
    )
    mixture = PoissonMixture()
    fn = mixture if entry == "forward" else mixture.model
    with pytest.warns(em.ConvergenceWarning):  # 5 iterations: the trajectory, not the optimum
        em.fit(fn, None, x, init="params", max_iter=5, tol=1e-12, m_step_iters=200)
    weights, rates = poisson_em_reference(x, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 4.0]), 5)
    torch.testing.assert_close(mixture.rates.detach(), rates, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixture.weights.detach(), weights, atol=1e-4, rtol=0)


# --------------------------------------------------------------- EM for an HMM


def gaussian_hmm(num_states=3):
    """A Gaussian HMM over sequences (N, T): x[n, 0] ~ Cat(start), x[n, t] ~ Cat(trans[x[n,
    t-1]]), y[n, t] ~ N(locs[x[n, t]], scales[x[n, t]]); the chain under pyro.markov."""
    f64 = torch.float64
    start0 = torch.tensor([0.5, 0.3, 0.2], dtype=f64)
    trans0 = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]], dtype=f64)
    locs0 = torch.tensor([-2.0, 0.0, 3.0], dtype=f64)
    scales0 = torch.tensor([1.0, 0.7, 1.5], dtype=f64)

    def model(y):
        start = pyro.param("start", start0.clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", trans0.clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", locs0.clone())
        scales = pyro.param("scales", scales0.clone(), constraint=constraints.positive)
        with pyro.plate("sequences", y.shape[0]):
            state = None
            for t in pyro.markov(range(y.shape[1])):
                probs = start if state is None else trans[state]
                state = pyro.sample(f"x_{t}", dist.Categorical(probs))
                pyro.sample(f"y_{t}", dist.Normal(locs[state], scales[state]), obs=y[:, t])

    return model, (start0, trans0, locs0, scales0)


def forward_algorithm(y, start, trans, locs, scales):
    """log p(y[n]) per sequence, the forward recursion written out."""
    log_emit = dist.Normal(locs, scales).log_prob(y[..., None])  # (N, T, K)
    alpha = start.log() + log_emit[:, 0]
    for t in range(1, y.shape[1]):
        alpha = torch.logsumexp(alpha[:, :, None] + trans.log(), 1) + log_emit[:, t]
    return torch.logsumexp(alpha, -1)  # (N,)


def hmm_data(num=30, length=12):
    g = torch.Generator().manual_seed(0)
    states = torch.zeros(num, length, dtype=torch.long)
    trans = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    for t in range(1, length):
        states[:, t] = torch.multinomial(trans[states[:, t - 1]], 1, generator=g).squeeze(-1)
    y = torch.tensor([-3.0, 0.5, 4.0])[states] + torch.randn(num, length, generator=g)
    return y.double()


def test_an_hmm_by_svi_on_minibatches_of_sequences_is_pyros_loop():
    """Pyro's HMM example's style: sequences in a plate named "sequences", the states of each
    one a chain under pyro.markov summed out by TraceEnum_ELBO, MAP parameters (empty guide).
    On minibatches of 8 of 30 sequences the driver takes the steps of Pyro's loop with
    pyro.plate("sequences", 30, subsample=idx), exactly (no randomness is involved)."""
    y = hmm_data().float()

    def program(plate):
        def model(y):
            start = pyro.param("start", torch.ones(3) / 3, constraint=constraints.simplex)
            trans = pyro.param("trans", torch.eye(3) * 0.7 + 0.1, constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 0.0, 1.0]))
            with plate(y):
                state = None
                for t in pyro.markov(range(y.shape[1])):
                    probs = start if state is None else trans[state]
                    state = pyro.sample(f"x_{t}", dist.Categorical(probs))
                    pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[:, t])

        return model

    state = {}
    model = program(lambda y: pyro.plate("sequences", len(y)))
    reference = program(lambda y: pyro.plate("sequences", 30, subsample=state["i"]))
    steps = [(i,) for i in driver_batches(30, 8, 3)]
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    expected = pyros_loop(
        lambda i: (state.update(i=i), config_enumerate(reference)(y[i]))[1],
        lambda i: None,
        steps,
        seed=0,
        loss=elbo,
    )
    result = svi.fit(
        config_enumerate(model),
        lambda y: None,
        y,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        optim=pyro.optim.Adam({"lr": 0.05}),
        batch_size=8,
        num_epochs=3,
    )
    assert result.extra["data_plates"] == ["sequences"]
    assert_same_params(store_values(), expected)


def test_hmm_log_likelihood_is_the_forward_algorithm():
    y = hmm_data()
    model, (start, trans, locs, scales) = gaussian_hmm()
    with torch.no_grad():
        exact = evaluate.log_likelihood(model, None, y)
    torch.testing.assert_close(
        exact, forward_algorithm(y, start, trans, locs, scales).to(exact), atol=1e-4, rtol=0
    )


def test_em_fits_an_hmm_as_hmmlearn_does():
    """Baum-Welch from the same start: the E-step by Pyro's enumeration along pyro.markov, the
    M-step by L-BFGS on the expected complete-data log-likelihood; hmmlearn's closed-form
    iterations land on the same log-likelihoods and parameters."""
    hmmlearn = pytest.importorskip("hmmlearn.hmm")
    y = hmm_data()
    model, (start, trans, locs, scales) = gaussian_hmm()
    with pytest.warns(em.ConvergenceWarning):  # 8 iterations, compared step by step
        result = em.fit(model, None, y, init="params", max_iter=8, tol=1e-12, m_step_iters=300)
    assert result.extra["latents"][:2] == ["x_0", "x_1"]
    curve = result.curve("log_likelihood")
    assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:]))  # EM never goes down

    reference = hmmlearn.GaussianHMM(
        3, covariance_type="diag", n_iter=8, tol=0, init_params="", params="stmc"
    )
    reference.startprob_, reference.transmat_ = start.double().numpy(), trans.double().numpy()
    reference.means_ = locs.double().numpy()[:, None]
    reference.covars_ = (scales.double().numpy() ** 2)[:, None]
    reference.min_covar, reference.covars_prior = 0.0, 0.0  # plain ML, no prior on variances
    reference.fit(y.reshape(-1, 1).numpy(), lengths=[y.shape[1]] * y.shape[0])
    np.testing.assert_allclose(
        np.array(curve) * y.shape[0], reference.monitor_.history, rtol=0, atol=1e-3
    )
    fitted = result.params
    np.testing.assert_allclose(fitted["trans"].numpy(), reference.transmat_, atol=1e-4)
    np.testing.assert_allclose(fitted["locs"].numpy(), reference.means_[:, 0], atol=1e-4)
    np.testing.assert_allclose(
        fitted["scales"].numpy() ** 2, reference.covars_.reshape(3, -1)[:, 0], atol=1e-4
    )
    assert math.isfinite(result.objective)


# --------------------------------------------------------------- guide factors, program state


def factor_program(declared=True):
    """The local-latent program of above with a ``pyro.factor`` in the guide (a penalty on the
    guide's mean, the way a VQ-VAE adds its commitment term), and a state of its own that the
    guide updates while training (``torch.is_grad_enabled()``), as a moving-average codebook."""
    model, _ = local_latent_program(lambda x, who: pyro.plate("data", len(x)))
    updates = torch.zeros(())

    def guide(x, y):
        a = pyro.param("a", torch.zeros(3))
        s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            loc = x @ a + 0.1 * y
            pyro.sample("z", dist.Normal(loc, s))
            pyro.factor("penalty", 0.3 * loc**2, has_rsample=True if declared else None)
        if torch.is_grad_enabled():
            updates.add_(1)

    return model, guide, updates


@pytest.mark.parametrize("driver", ["reparam", "svi"])
def test_a_guide_factor_and_training_state_follow_pyros_loop(driver):
    """A factor in the guide counts in log q (the objective falls by it) and the guide's own
    state is updated once per step, the drivers' probes and validation leaving it alone: the
    parameters and the count are Pyro's loop's."""
    x, y = regression_data()
    model, guide, updates = factor_program()
    expected = pyros_loop(model, guide, [(x, y)] * 25, seed=1)
    assert updates.item() == 25
    updates.zero_()
    fit = reparam.fit if driver == "reparam" else svi.fit
    options = {"loss": "Trace_ELBO"} if driver == "svi" else {"analytic_kl": False}
    options.update(batch_size=None, lr=0.05, seed=1, progress=False)
    fit(model, guide, (x, y), num_epochs=25, **options)
    assert updates.item() == 25
    assert_same_params(store_values(), expected)
    pyro.clear_param_store()
    updates.zero_()
    fit(model, guide, (x, y), num_epochs=5, valid_data=(x, y), **options)
    assert updates.item() == 5  # validated after every epoch, updated by the steps alone


def test_a_guide_factor_counts_in_the_importance_weights():
    """With a point-mass guide every particle is the same, so the IWAE bound (K = 3) and the
    importance-sampled log p(x) are log p(y, z = v) - penalty exactly, by hand."""
    x, y = regression_data(num=6)
    model, _, _ = factor_program()

    def guide(x, y):
        v = x[:, 0]  # z[n] = x[n, 0], a point mass per row
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Delta(v))
            pyro.factor("penalty", 0.3 * v**2, has_rsample=True)

    v = x[:, 0]
    w, b = 0.5, torch.zeros(3)  # the program's initial parameters
    by_hand = dist.Normal(0.0, 1.0).log_prob(v) + dist.Normal(w * v + x @ b, 1.0).log_prob(y)
    by_hand = by_hand - 0.3 * v**2
    objective = reparam.Objective(model, guide, (x, y), len(x), num_particles=3, plates=())
    assert objective((x, y)).item() == pytest.approx(-by_hand.mean().item(), abs=1e-5)
    scores = evaluate.log_likelihood(model, guide, (x, y), num_samples=4)
    torch.testing.assert_close(scores, by_hand, atol=1e-5, rtol=0)


def test_an_undeclared_guide_factor_is_refused_by_name():
    x, y = regression_data()
    model, guide, _ = factor_program(declared=False)
    with pytest.raises(ValueError, match="guide factor 'penalty' .*has_rsample=True"):
        reparam.fit(model, guide, (x, y), batch_size=None, num_epochs=1, progress=False)
