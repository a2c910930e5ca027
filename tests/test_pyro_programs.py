"""Users' Pyro programs, round two: programs in the styles of Pyro's own examples and tutorials
(the VAE example's grey pixels, prodLDA's dropout, a batch-normed encoder, SVI part III's coin,
the custom-objectives tutorial's loss function, the svi_torch example's self-subsampling plate,
eight schools and a sparse-gamma-style guide under the reparameterized driver, an enumerated
mixture and a Bayesian model under an AutoGuide through the command line). Each is fitted
exactly as Pyro's own ``SVI`` loop fits it on the same batches and seed (bit for bit where the
arithmetic is the same, to float32 rounding where only the order of a reduction differs), or
matches a closed form, or is refused before any work with an error naming the plate, site or
argument. The helpers and the way Pyro's loop is given the driver's batches are those of
``tests/test_user_programs.py``.
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import (
    SVI,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from torch import nn

from inference import evaluate, reparam, svi
from tests.test_user_programs import (
    SCHOOLS,
    assert_same_params,
    driver_batches,
    eight_schools,
    pyros_loop,
    store_values,
)

# bit for bit: the drivers leave torch's thread count alone, as Pyro's loop does
pytestmark = pytest.mark.usefixtures("pinned_threads")


def scaled(fn, factor):
    """``fn`` with every site's log-density times ``factor`` (N / B for a minibatch of B)."""
    return poutine.scale(fn, scale=factor)


def reference_steps(model, guide, data, batch_size, num_epochs):
    """Pyro's loop on the driver's minibatches, each scaled to the whole data by N / B."""
    num = len(data[0])
    steps = driver_batches(num, batch_size, num_epochs)
    return [
        (scaled(model, num / len(idx)), scaled(guide, num / len(idx)), [t[idx] for t in data])
        for idx in steps
    ]


def pyros_scaled_loop(model, guide, data, batch_size, num_epochs, *, seed, lr, loss=None):
    """``pyros_loop`` on ``reference_steps``: one SVI per step shares Pyro's Adam state through
    the param store's names, so the steps are those of one loop."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    for m, g, args in reference_steps(model, guide, data, batch_size, num_epochs):
        SVI(m, g, optim, loss or Trace_ELBO()).step(*args)
    expected = store_values()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return expected


# ------------------------------------------------- Pyro's VAE example: grey pixels, modules


class Encoder(nn.Module):
    """Pyro's VAE example's encoder, with optional dropout and batch norm (prodLDA's habits)."""

    def __init__(self, x_dim=12, z_dim=2, hidden=16, dropout=0.0, batch_norm=False):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc21, self.fc22 = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x):  # (N, X) -> (N, Z), (N, Z)
        hidden = self.norm(self.drop(nn.functional.softplus(self.fc1(x))))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, x_dim=12, z_dim=2, hidden=16):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, x_dim)

    def forward(self, z):  # (N, Z) -> (N, X)
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class ExampleVAE(nn.Module):
    """As Pyro's examples/vae/vae.py writes it: pyro.module inside model and guide, a Bernoulli
    on grey pixels with validate_args=False (a cross-entropy)."""

    def __init__(self, checked=False, **encoder):
        super().__init__()
        self.encoder, self.decoder = Encoder(**encoder), Decoder()
        self.checked = checked

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            probs = self.decoder(z)  # (N, X)
            no_check = {} if self.checked else {"validate_args": False}
            pyro.sample("obs", dist.Bernoulli(probs, **no_check).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def grey_pixels(num=48):
    return torch.rand(num, 12, generator=torch.Generator().manual_seed(0))  # in [0, 1]


def make_vae(**options):
    torch.manual_seed(1)  # the same initial weights for Pyro's loop and the driver
    return ExampleVAE(**options)


def test_pyros_vae_example_on_grey_pixels_is_pyros_loop():
    """validate_args=False asked for no support check: honoured, as Pyro honours it (the
    driver refused these programs while its support check ignored it)."""
    x = grey_pixels()
    ref, vae = make_vae(), make_vae()  # (pyros_loop then sets the seed for both loops)
    expected = pyros_scaled_loop(ref.model, ref.guide, (x,), 16, 2, seed=4, lr=0.01)
    svi.fit(vae.model, vae.guide, x, optim=pyro.optim.Adam({"lr": 0.01}), batch_size=16,
            num_epochs=2)  # fmt: skip
    assert_same_params(store_values(), expected, rtol=0, atol=0)
    log_px = evaluate.log_likelihood(vae.model, vae.guide, x, num_samples=10)
    assert log_px.shape == (48,) and torch.isfinite(log_px).all()
    # without validate_args=False the grey data are still refused, by name
    checked = make_vae(checked=True)
    with pytest.raises(ValueError, match="observed site 'obs': 16 of 16 data points"):
        svi.fit(checked.model, checked.guide, x, batch_size=16, num_epochs=1)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_dropout_and_batch_norm_in_the_guide_are_pyros_loop(batch_size):
    """The set-up runs draw no dropout mask from torch's generator and leave batch norm's
    running statistics alone: the first step sees the modules as Pyro's first step does, and
    every buffer ends as Pyro's loop leaves it (num_batches_tracked counts the steps)."""
    x = grey_pixels()
    options = dict(dropout=0.2, batch_norm=True)
    ref, vae = make_vae(**options), make_vae(**options)
    if batch_size is None:
        expected = pyros_loop(ref.model, ref.guide, [(x,)] * 5, seed=4, lr=0.01)
    else:
        expected = pyros_scaled_loop(ref.model, ref.guide, (x,), 16, 2, seed=4, lr=0.01)
    svi.fit(
        vae.model,
        vae.guide,
        x,
        optim=pyro.optim.Adam({"lr": 0.01}),
        batch_size=batch_size,
        num_epochs=5 if batch_size is None else 2,
    )
    assert_same_params(store_values(), expected, rtol=0, atol=0)
    steps = 5 if batch_size is None else 6
    assert int(vae.encoder.norm.num_batches_tracked) == steps
    for name, buffer in ref.encoder.norm.named_buffers():
        assert torch.equal(buffer, dict(vae.encoder.norm.named_buffers())[name]), name
    assert vae.encoder.training and vae.encoder.norm.training and vae.encoder.drop.training


def joined(a, b):
    """``torch.cat`` of the last dims after broadcasting the others (y enumerated: (K, 1, C))."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], -1)


class ExampleSSVAE(nn.Module):
    """As Pyro's examples/vae/ss_vae_M2.py writes it: y ~ OneHotCategorical (observed where
    labelled, enumerated where not), z ~ N(0, I), the pixels ~ Bernoulli(validate_args=False)
    on grey values; the guide classifies and encodes."""

    def __init__(self):
        super().__init__()
        self.classify = nn.Linear(12, 3)
        self.encode = nn.Linear(12 + 3, 4)
        self.decode = nn.Linear(2 + 3, 12)

    @config_enumerate
    def model(self, x, y=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.OneHotCategorical(logits=x.new_zeros(len(x), 3)), obs=y)
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            probs = torch.sigmoid(self.decode(joined(z, y)))  # (..., N, X)
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    @config_enumerate
    def guide(self, x, y=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", len(x)):
            if y is None:
                y = pyro.sample("y", dist.OneHotCategorical(logits=self.classify(x)))
            loc, log_scale = self.encode(joined(x, y)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_pyros_ss_vae_example_on_grey_pixels_is_pyros_loop():
    """The unlabelled half: y enumerated in the guide, TraceEnum_ELBO, grey pixels under a
    Bernoulli with validate_args=False; the labelled half: y observed. Both bit for bit."""
    x = grey_pixels(24)
    labels = torch.nn.functional.one_hot(torch.arange(24) % 3, 3).float()
    for data, loss in (((x,), TraceEnum_ELBO), ((x, labels), Trace_ELBO)):
        torch.manual_seed(1)
        ref, ss = ExampleSSVAE(), ExampleSSVAE()
        ss.load_state_dict(ref.state_dict())
        expected = pyros_loop(ref.model, ref.guide, [data] * 4, seed=2, lr=0.01,
                              loss=loss(max_plate_nesting=1))  # fmt: skip
        svi.fit(ss.model, ss.guide, data, loss=loss(max_plate_nesting=1),
                optim=pyro.optim.Adam({"lr": 0.01}), batch_size=None, num_epochs=4)  # fmt: skip
        assert_same_params(store_values(), expected, rtol=0, atol=0)


# ------------------------------------------------------- reparam: Adam's eps, set-up batches


def linear_latent_program():
    """y[n] ~ N(z[n] + b . x[n], 1), z[n] ~ N(0, 1), with the guide N(a y[n], s)."""

    def model(x, y):
        b = pyro.param("b", torch.zeros(2))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z + x @ b, 1.0), obs=y)

    def guide(x, y):
        a = pyro.param("a", torch.tensor(0.1))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(a * y, s))

    return model, guide


def weak_covariate_program():
    """``linear_latent_program`` with a covariate 1e-6 the size of the other: its gradient is
    so small that Adam's eps (1e-8) matters unless the loss is on Pyro's scale."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g) * torch.tensor([1.0, 1e-6])
    y = x @ torch.tensor([0.5, 3e5]) + torch.randn(256, generator=g)
    return (*linear_latent_program(), (x, y))


def test_reparam_takes_pyros_adam_steps_on_a_small_gradient():
    """reparam.fit differentiates the ELBO of the whole data, as Pyro's loop does: Adam's
    steps on b[1] (gradient about 1e-6 per data point) are Pyro's. Dividing the loss by N
    first gave an eps N times larger in effect: b[1] ended 3.1 % short of Pyro's here (0.2689
    against 0.2775 after 30 steps, measured with Adam's eps set to 256e-8, the same update)."""
    model, guide, data = weak_covariate_program()
    expected = pyros_loop(model, guide, [data] * 30, seed=2, lr=0.01, loss=TraceMeanField_ELBO())
    reparam.fit(model, guide, data, batch_size=None, num_epochs=30, lr=0.01,
                optimizer=lambda p: torch.optim.Adam(p, lr=0.01))  # fmt: skip
    assert_same_params(store_values(), expected, rtol=1e-5, atol=1e-7)


def test_reparam_fits_eight_schools_on_its_keyword_data_as_pyros_loop():
    """A size fixed from a constant (J = 8): the reparameterization check runs on the first
    step's rows, the whole data, not on two rows (which raised Pyro's raw shape error)."""
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools)
    loop = SVI(eight_schools, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(20):
        loop.step(**SCHOOLS)
    expected = store_values()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools)
    reparam.fit(eight_schools, guide, SCHOOLS, batch_size=None, num_epochs=20,
                optimizer=lambda p: torch.optim.Adam(p, lr=0.05))  # fmt: skip
    assert_same_params(store_values(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be minibatched"):
        reparam.fit(eight_schools, AutoNormal(eight_schools), SCHOOLS, batch_size=4)


def gamma_factor_program(num=30):
    """Sparse gamma DEF's habit: a Gamma latent per data point with a guide of one parameter
    row per data point (not amortized), Poisson counts."""

    def model(x):
        w = pyro.param("w", torch.ones(2, 3), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z_top", dist.Gamma(torch.ones(2), 1.0).to_event(1))  # (N, 2)
            pyro.sample("x", dist.Poisson(z @ w).to_event(1), obs=x)

    def guide(x):
        shape = pyro.param("shape", torch.ones(num, 2), constraint=constraints.positive)
        rate = pyro.param("rate", torch.ones(num, 2), constraint=constraints.positive)
        with pyro.plate("data", len(x)):  # (N, 2) parameters: N rows only
            pyro.sample("z_top", dist.Gamma(shape, rate).to_event(1))

    g = torch.Generator().manual_seed(0)
    return model, guide, torch.poisson(torch.full((num, 3), 2.0), generator=g)


def test_reparam_fits_a_guide_with_a_parameter_row_per_data_point_as_pyros_loop():
    model, guide, x = gamma_factor_program()
    expected = pyros_loop(model, guide, [(x,)] * 10, seed=5, lr=0.05, loss=TraceMeanField_ELBO())
    reparam.fit(model, guide, x, batch_size=None, num_epochs=10,
                optimizer=lambda p: torch.optim.Adam(p, lr=0.05))  # fmt: skip
    assert_same_params(store_values(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ plates: sizeless, self-subsampling


def coin(plate):
    """SVI part III's coin: f ~ Beta(10, 10) global, flips in a data plate (``plate(x)``)."""

    def model(x):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with plate(x):
            pyro.sample("obs", dist.Bernoulli(f), obs=x)

    def guide(x):
        alpha = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
        beta = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
        pyro.sample("f", dist.Beta(alpha, beta))

    return model, guide


def test_a_sizeless_plate_beside_a_global_latent_is_minibatched_as_pyros_subsampling():
    """The plate has no size and its distribution no batch shape (f is a scalar): the rows
    are only in the observed value, and are read from it."""
    x = (torch.rand(40, generator=torch.Generator().manual_seed(0)) < 0.7).float()
    model, guide = coin(lambda x: pyro.plate("data"))
    steps = driver_batches(len(x), 16, 3)

    def ref_model(idx):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("obs", dist.Bernoulli(f), obs=x[idx])

    def ref_guide(idx):
        guide(x[idx])

    expected = pyros_loop(ref_model, ref_guide, [(i,) for i in steps], seed=3, lr=0.05,
                          loss=TraceGraph_ELBO())  # fmt: skip
    result = svi.fit(model, guide, x, loss="TraceGraph_ELBO", optim=pyro.optim.Adam({"lr": 0.05}),
                     batch_size=16, num_epochs=3)  # fmt: skip
    assert result.extra["data_plates"] == ["data"]
    assert_same_params(store_values(), expected, rtol=0, atol=0)


class SelfSubsampling(PyroModule):
    """Pyro's svi_torch example: the plate's full size fixed, its subsample the rows given."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, covariates, data=None):
        coeff = pyro.sample("coeff", dist.Normal(0.0, 1.0))
        bias = pyro.sample("bias", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", self.size, len(covariates)):
            return pyro.sample("obs", dist.Normal(bias + coeff * covariates, scale), obs=data)


def test_a_plate_that_subsamples_the_rows_it_is_given_is_scaled_by_pyro_alone():
    g = torch.Generator().manual_seed(0)
    covariates = torch.randn(100, generator=g)
    data = 0.5 + 2.0 * covariates + 0.3 * torch.randn(100, generator=g)
    steps = driver_batches(100, 20, 2)
    model = SelfSubsampling(100)
    expected = pyros_loop(model, AutoNormal(model), [(covariates[i], data[i]) for i in steps],
                          seed=6, lr=0.01)  # fmt: skip
    model = SelfSubsampling(100)
    result = svi.fit(model, AutoNormal(model), (covariates, data),
                     optim=pyro.optim.Adam({"lr": 0.01}), batch_size=20, num_epochs=2)  # fmt: skip
    assert result.extra["data_plates"] == []  # nothing scaled beyond Pyro's own N / B
    assert_same_params(store_values(), expected, rtol=0, atol=0)
    pyro.clear_param_store()
    wrong = SelfSubsampling(999)
    with pytest.raises(ValueError, match="pyro.plate\\('data'\\).*full size of 999.*100 rows"):
        svi.fit(wrong, AutoNormal(wrong), (covariates, data), batch_size=20)


# --------------------------------------------------------------------- callable losses


def simple_elbo(model, guide, *args, **kwargs):
    """The custom-objectives tutorial's ELBO written by hand, as a plain function."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return -1 * (model_trace.log_prob_sum() - guide_trace.log_prob_sum())


def regression_program():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, generator=g)
    y = x @ torch.tensor([1.0, -0.5]) + torch.randn(48, generator=g)
    return (*linear_latent_program(), (x, y))


@pytest.mark.parametrize("optimizer", ["pyro", "default"])
def test_a_loss_function_is_fitted_as_pyros_svi_fits_it(optimizer):
    model, guide, data = regression_program()
    expected = pyros_scaled_loop(model, guide, data, 16, 2, seed=1, lr=0.05, loss=simple_elbo)
    options = {"optim": pyro.optim.Adam({"lr": 0.05})} if optimizer == "pyro" else {"lr": 0.05}
    svi.fit(model, guide, data, loss=simple_elbo, batch_size=16, num_epochs=2, **options)
    tolerance = {"rtol": 0, "atol": 0} if optimizer == "pyro" else {"rtol": 1e-5, "atol": 1e-6}
    assert_same_params(store_values(), expected, **tolerance)
    # the validation score is minus the loss function's value per data point
    with torch.no_grad():
        pyro.set_rng_seed(0)
        value = -simple_elbo(model, guide, *data).item() / 48
        pyro.set_rng_seed(0)
        score = svi.elbo_per_datum(model, guide, data, simple_elbo)
    assert score == pytest.approx(value, rel=1e-6)
    result = svi.fit(model, guide, data, loss=simple_elbo, num_epochs=1, valid_data=data, lr=0)
    assert result.history[-1]["valid_objective"] == pytest.approx(value, abs=0.5)


def test_options_a_loss_object_carries_itself_are_refused_not_ignored():
    model, guide, data = regression_program()
    with pytest.raises(ValueError, match="num_particles go with a loss named by a string"):
        svi.fit(model, guide, data, loss=simple_elbo, num_particles=4)
    with pytest.raises(ValueError, match="max_plate_nesting go with.*Trace_ELBO"):
        svi.fit(model, guide, data, loss=Trace_ELBO(), max_plate_nesting=1)
    with pytest.raises(TypeError, match="loss must name one of"):
        svi.fit(model, guide, data, loss=3)
    assert len(pyro.get_param_store()) == 0  # refused before any work


# ---------------------------------------------------------------- data as one mapping


def test_a_program_taking_a_mapping_whole_is_told_how_before_any_work():
    """Pyro's toy mixture takes its data as one dict; a mapping is unpacked as keyword
    arguments (as SVI.step(**data)), so the driver says so and how to pass it whole."""

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(data["A"])):
            pyro.sample("A", dist.Normal(loc, 1.0), obs=data["A"])

    def guide(data):
        pass

    data = {"A": torch.randn(10)}
    with pytest.raises(TypeError, match="(?s)guide\\(\\*\\*data\\).*keys \\['A'\\].*lambda"):
        svi.fit(model, guide, data)
    assert len(pyro.get_param_store()) == 0
    result = svi.fit(lambda **d: model(d), lambda **d: guide(d), data, num_epochs=2)
    assert set(result.params) == {"loc"}


# ------------------------------------------------------------------------- scores


def labelled_offsets_program():
    """z[n] ~ N(0, 1), x[n] ~ N(z[n] + m[n], 1) with m[n] from a Python list, one entry per
    row (not a tensor: passed whole); the guide is the exact posterior N((x - m) / 2, 1/2),
    so every importance weight is p(x) itself: log p(x[n]) = log N(x[n]; m[n], 2)."""

    def model(x, offsets):
        m = torch.tensor(offsets, dtype=x.dtype)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + m, 1.0), obs=x)

    def guide(x, offsets):
        m = torch.tensor(offsets, dtype=x.dtype)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal((x - m) / 2, 0.5**0.5))

    offsets = [float(i % 3) for i in range(12)]
    x = torch.randn(12, generator=torch.Generator().manual_seed(0))
    return model, guide, x, offsets


def test_scores_of_a_program_with_a_per_row_list_fit_in_one_chunk():
    model, guide, x, offsets = labelled_offsets_program()
    exact = dist.Normal(torch.tensor(offsets), 2.0**0.5).log_prob(x)
    log_px = evaluate.log_likelihood(model, guide, (x, offsets), num_samples=5)
    torch.testing.assert_close(log_px, exact, rtol=0, atol=1e-5)
    elbo = evaluate.elbo(model, guide, (x, offsets))
    torch.testing.assert_close(elbo, exact, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="(?s)fail on a chunk of 4 rows.*batch_size=12"):
        evaluate.log_likelihood(model, guide, (x, offsets), num_samples=5, batch_size=4)


class EnumeratedPoissonMixture:
    """A Poisson mixture with its component enumerated and an empty guide (TraceEnum_ELBO)."""

    @config_enumerate
    def model(self, x):
        weights = pyro.param("weights", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        rates = pyro.param("rates", torch.tensor([1.0, 6.0]), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Poisson(rates[z]), obs=x)

    def guide(self, x):
        pass


def test_the_elbo_of_an_enumerated_program_is_traceenum_elbo_and_log_px():
    """Every latent summed out and none drawn: the ELBO is log p(x) exactly (the score drew z
    from its prior before, 2.6 nats per point below it on the CLI's data)."""
    mixture = EnumeratedPoissonMixture()
    x = torch.poisson(torch.full((50,), 3.0), generator=torch.Generator().manual_seed(0))
    joint = torch.tensor([0.3, 0.7]).log() + dist.Poisson(torch.tensor([1.0, 6.0])).log_prob(
        x[:, None]
    )  # (N, 2)
    closed = joint.logsumexp(-1)
    elbo = evaluate.elbo(mixture.model, mixture.guide, x)
    torch.testing.assert_close(elbo, closed, rtol=0, atol=1e-5)
    total = -TraceEnum_ELBO(max_plate_nesting=1).loss(mixture.model, mixture.guide, x)
    assert elbo.sum().item() == pytest.approx(total, abs=1e-3)

    def half_guided(x):  # a continuous latent left to the prior: the guide does not cover it
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    with pytest.raises(ValueError, match="model site 's' is latent but the guide does not"):
        evaluate.elbo(half_guided, lambda x: None, x)


def test_a_program_that_enumerates_one_latent_and_samples_another_is_sent_to_traceenum():
    """z enumerated (not in the guide), w[n] drawn by the guide: no per-point ELBO here, and
    the refusal names z and the way (svi.elbo_per_datum with TraceEnum_ELBO)."""
    from inference.particles import Uncovered

    @config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5])))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(torch.tensor([-2.0, 2.0])[z] + w, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("w", dist.Normal(0.1 * x, 0.5))

    x = torch.randn(20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        Uncovered, match="(?s)'z' is marked for enumeration.*TraceEnum_ELBO"
    ) as info:
        evaluate.elbo(model, guide, x)
    assert info.value.site == "z" and info.value.enumerated


# ------------------------------------------------------------------ the command line

POISSON_FILE = """
import pyro, torch
import pyro.distributions as dist
from pyro.distributions import constraints
from pyro.infer import config_enumerate


class PoissonMixture:
    drivers = {"svi": {"loss": "TraceEnum_ELBO"}}

    @config_enumerate
    def model(self, x):
        w = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        r = pyro.param("rates", torch.tensor([1.0, 5.0]), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Poisson(r[z].unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x):
        pass
"""

COIN_FILE = '''
import pyro, torch
import pyro.distributions as dist
from pyro.infer.autoguide import AutoDiagonalNormal


class Coin:
    """f ~ Beta(10, 10); x[n] ~ Bernoulli(f); the guide an AutoDiagonalNormal over f."""

    drivers = {"svi": {"loss": "Trace_ELBO"}}

    def __init__(self):
        self.auto = AutoDiagonalNormal(self.model)

    def model(self, x):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(f).expand([len(x), 1]).to_event(1), obs=x)

    def guide(self, x):
        return self.auto(x)
'''


def user_run(tmp_path, source, name, rows, argv):
    from zoo import cli

    (tmp_path / "user.py").write_text(source)
    path = tmp_path / "data.csv"
    path.write_text("\n".join(f"{v:g}" for v in rows) + "\n")
    out = tmp_path / "run"
    command = ["fit", f"{tmp_path / 'user.py'}:{name}", "--data", str(path), "--quiet"]
    assert cli.main([*command, "--inference", "svi", "--out", str(out), *argv]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_cli_scores_an_enumerated_mixture_exactly(tmp_path):
    counts = torch.poisson(torch.full((60,), 2.0), generator=torch.Generator().manual_seed(0))
    argv = ["--epochs", "20"]
    metrics = user_run(tmp_path, POISSON_FILE, "PoissonMixture", counts.tolist(), argv)
    # the ELBO with the latent summed out and an empty guide is log p(x): the two agree
    assert metrics["train_elbo"] == pytest.approx(metrics["train_log_likelihood"], abs=1e-5)
    assert metrics["train_log_likelihood_method"].startswith("exact")
    assert metrics["train_elbo_method"].startswith("exact")
    assert "log_likelihood_samples" not in metrics
    assert "guide samples no latent variable" in metrics["latent_usage"]["not_available"]


def test_cli_scores_a_bayesian_model_under_an_autoguide(tmp_path, capsys):
    """Global latents: the whole-data ELBO and the posterior of f are written (the Beta
    posterior's mean (10 + heads) / (20 + N), its sd, to the fit's precision), the per-point
    log-likelihood is left out with the reason, and the command succeeds."""
    flips = (torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.7).float()
    argv = ["--epochs", "300", "--batch-size", "200", "--lr", "0.05"]
    metrics = user_run(tmp_path, COIN_FILE, "Coin", flips.tolist(), argv)
    heads, n = flips.sum().item(), len(flips)
    a, b = 10 + heads, 10 + n - heads
    mean, sd = a / (a + b), (a * b / ((a + b) ** 2 * (a + b + 1))) ** 0.5
    posterior = metrics["posterior"]["f"]
    assert posterior["mean"][0] == pytest.approx(mean, abs=0.02)
    assert posterior["sd"][0] == pytest.approx(sd, rel=0.3)
    assert metrics["train_log_likelihood"] is None
    assert "global" in metrics["train_log_likelihood_method"]
    # the ELBO per flip sits below log p(x) / N, the Beta-Bernoulli evidence, within a nat
    log_beta = lambda a, b: math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # noqa: E731
    evidence = (log_beta(a, b) - log_beta(10.0, 10.0)) / n
    assert evidence - 0.05 < metrics["train_elbo"] <= evidence + 0.01
    assert "log-likelihood per data point is left out" in capsys.readouterr().err
