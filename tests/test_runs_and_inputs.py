"""No run is lost or mixed, and bad input gets an error that names the problem.

Run directories (``zoo.runs``) through the CLI: what may be written where, the lock, --overwrite,
resume consistency, corrupt files. Then a table of bad inputs to the Python API and the CLI,
each with the message it must produce.
"""

import hashlib
import json
import math
import os
import pickle
import random
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import em, evaluate, loop, reparam, svi
from tests.conftest import requires_mnist
from zoo import cli, data, runs
from zoo.models.bernoulli_mixture import BernoulliMixture
from zoo.models.gmm import GaussianMixture
from zoo.models.vae import VAE, VAEConfig

GMM = ["fit", "gmm", "--data", "faithful", "--quiet"]
VAE_DIGITS = ["fit", "vae", "--data", "digits", "--epochs", "1", "--z-dim", "2", "--hidden", "8"]
VAE_DIGITS += ["--quiet", "--eval-samples", "2", "--batch-size", "256"]
VAE_DIGITS += ["--lr", "0.001", "--binarize", "static"]  # not the model's digits defaults


def digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != runs.LOCK
    }


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A finished one-epoch VAE run on the digits (its checkpoint kept, as every deep run's)."""
    out = tmp_path_factory.mktemp("vae") / "run"
    pyro.clear_param_store()
    assert cli.main([*VAE_DIGITS, "--out", str(out)]) == 0
    return out


def copy_run(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ------------------------------------------------------------------------------- run directories


def test_an_em_fit_never_writes_into_the_run_it_was_told_to_resume(vae_run, tmp_path):
    run = copy_run(vae_run, tmp_path / "vae")
    before = digest(run)
    with pytest.raises(SystemExit, match="EM fits have no checkpoint to resume"):
        cli.main([*GMM, "--resume", str(run)])
    assert digest(run) == before


def test_a_folder_of_someone_elses_files_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "samples.png").write_bytes(b"my picture")
    before = digest(out)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="holds no zoo run: choose a new or empty folder"):
            cli.main([*GMM, "--out", str(out), *extra])
    assert digest(out) == before


def test_overwrite_removes_the_old_runs_files_checkpoint_and_temporaries(tmp_path):
    out = tmp_path / "run"
    assert cli.main([*GMM, "--out", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(b"an older deep run's checkpoint")
    (out / "stale.png").write_bytes(b"an older figure")
    (out / ".params.pt.x1y2.tmp").write_bytes(b"left by a killed write")
    with pytest.raises(SystemExit, match="already holds a run; pass --overwrite"):
        cli.main([*GMM, "--out", str(out)])
    assert cli.main([*GMM, "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "checkpoint.pt" not in names and "stale.png" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert json.loads((out / "config.json").read_text())["options"]["seed"] == 1
    assert json.loads((out / runs.MARKER).read_text())["model"] == "gmm"


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with runs._lock(out):  # what a running `zoo fit` holds; flock conflicts across descriptions
        with pytest.raises(SystemExit, match=f"another zoo process \\(pid {os.getpid()}\\)"):
            cli.main([*GMM, "--out", str(out)])
    assert cli.main([*GMM, "--out", str(out)]) == 0  # released with the first writer


def test_resume_refuses_settings_that_change_the_trajectory(vae_run, tmp_path):
    run = copy_run(vae_run, tmp_path / "vae")
    resume = [*VAE_DIGITS, "--resume", str(run), "--epochs", "2"]
    for flags, flag in (
        (["--seed", "1"], "--seed"),
        (["--binarize", "threshold"], "--binarize"),
        (["--lr", "0.01"], "--lr"),
        (["--max-data", "100"], "--max-data"),
    ):
        with pytest.raises(SystemExit, match=f"started with {flag} .*not"):
            cli.main([*resume, *flags])
    changed = [a if a != "256" else "64" for a in resume]  # --batch-size 64
    with pytest.raises(SystemExit, match="started with --batch-size 256; .*not 64"):
        cli.main(changed)
    with pytest.raises(SystemExit, match="--resume-lr LR"):
        cli.main([*resume, "--lr", "0.01"])
    # a deliberate new rate is its own option, recorded in config.json
    assert cli.main([*resume, "--resume-lr", "0.0005"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["lr_changes"] == [{"lr": 0.0005, "was": 0.001, "epoch": 1}]
    assert config["options"]["lr"] == 0.0005
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_a_truncated_checkpoint_is_named_on_resume(vae_run, tmp_path, capsys):
    run = copy_run(vae_run, tmp_path / "vae")
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:300])
    assert cli.main([*VAE_DIGITS, "--resume", str(run), "--epochs", "2"]) == 2
    assert re.search("checkpoint.pt cannot be read .*truncated", capsys.readouterr().err)


def test_the_loop_refuses_a_checkpoint_of_another_batch_size(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    loop.run(lambda b: 1.0, torch.zeros(8), state={}, batch_size=4, checkpoint=ckpt, num_epochs=1)
    with pytest.raises(ValueError, match="written with batch_size=4; .*not 2"):
        loop.run(
            lambda b: 1.0,
            torch.zeros(8),
            state={},
            batch_size=2,
            checkpoint=ckpt,
            resume=True,
            num_epochs=2,
        )


def test_contradictory_flags_are_refused(vae_run, tmp_path):
    with pytest.raises(SystemExit, match="names the run to continue and --out"):
        cli.main([*VAE_DIGITS, "--resume", str(vae_run), "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--resume continues a run and --overwrite replaces it"):
        cli.main([*VAE_DIGITS, "--resume", str(vae_run), "--overwrite"])
    with pytest.raises(SystemExit, match="--loss applies to --inference svi"):
        cli.main([*VAE_DIGITS, "--loss", "Trace_ELBO", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="digits has no validation split"):
        cli.main([*VAE_DIGITS, "--patience", "1", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--resume-lr continues a run"):
        cli.main([*VAE_DIGITS, "--resume-lr", "0.1", "--out", str(tmp_path / "c")])


def test_out_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main([*GMM, "--out", "~/run"]) == 0
    assert (tmp_path / "home" / "run" / "params.pt").exists()
    assert not (tmp_path / "~").exists()


def test_a_runaway_fit_is_warned_about_and_a_nan_one_stopped(tmp_path):
    """--lr 1e6: finite but a trillion times worse than the first step: a warning. --lr 1e30:
    the model computes NaN in the first epoch; no checkpoint exists yet, so the message does
    not claim one."""
    with pytest.warns(loop.DivergenceWarning, match="the fit is diverging; lower the learning"):
        assert (
            cli.main([*VAE_DIGITS, "--lr", "1e6", "--epochs", "2", "--out", str(tmp_path / "a")])
            == 0
        )
    with pytest.raises(SystemExit) as caught:
        cli.main([*VAE_DIGITS, "--lr", "1e30", "--out", str(tmp_path / "b")])
    message = str(caught.value)
    assert "zoo: error:" in message and "at epoch 1, step" in message and "NaN" in message
    assert "intact" not in message


# ------------------------------------------------------------------------------- the loop's guards


def test_nan_parameters_behind_a_pyro_error_are_named():
    loc = pyro.param("loc", torch.tensor(0.0))

    def step(batch):
        with torch.no_grad():
            loc.fill_(float("nan"))
        dist.Normal(loc, 1.0, validate_args=True)  # Pyro's check: "Expected parameter loc ..."
        return 1.0

    with pytest.raises(FloatingPointError, match="parameters \\['loc'\\] are no longer finite at"):
        loop.run(step, torch.zeros(4), state={}, batch_size=2, num_epochs=1)


def test_a_runaway_objective_is_warned_about():
    losses = iter([10.0, 1e3, 1e5, 1e7])
    with pytest.warns(loop.DivergenceWarning, match="fell from -10 .*the fit is diverging"):
        loop.run(lambda b: next(losses), torch.zeros(2), state={}, batch_size=2, num_epochs=4)


# ------------------------------------------------------------------------------- corrupt files


def make_run(tmp_path, name="run"):
    out = tmp_path / name
    assert cli.main([*GMM, "--out", str(out)]) == 0
    return out


RANDOM_BYTES = b"\x13" + random.Random(0).randbytes(2999)  # not a pickle's first byte


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/zoo-pwned",))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda run: (run / "params.pt").unlink(), "no saved parameters"),
        (lambda run: (run / "config.json").write_text("{not json"), "is not valid JSON"),
        (
            lambda run: (run / "config.json").write_text(json.dumps({"model": "gmm"})),
            "is not a zoo run's config",
        ),
        (
            lambda run: _edit_config(run, lambda c: c["model_config"].update(colour="red")),
            "its model_config does not make a gmm",
        ),
        (
            lambda run: _edit_config(run, lambda c: c["model_config"].update(num_components=3)),
            "does not hold this gmm's parameters",
        ),
        (lambda run: _edit_config(run, lambda c: c.update(max_data=-100)), "max_data must be"),
        (
            lambda run: (run / "params.pt").write_bytes((run / "params.pt").read_bytes()[:200]),
            "cannot be read .*it is truncated or was not written by zoo",
        ),
        (lambda run: (run / "params.pt").write_bytes(RANDOM_BYTES), "cannot be read"),
        (
            lambda run: (run / "params.pt").write_bytes(pickle.dumps(Exploit())),
            "is a pickle of Python objects, not a file of tensors that zoo writes; it is not",
        ),
    ],
    ids=[
        "no params",
        "bad json",
        "not a config",
        "unknown field",
        "mismatched params",
        "negative max_data",
        "truncated",
        "random bytes",
        "malicious pickle",
    ],
)
def test_a_spoilt_run_gets_an_error_naming_the_file(tmp_path, spoil, message):
    run = make_run(tmp_path)
    spoil(run)
    with pytest.raises(SystemExit, match=message) as caught:
        cli.main(["evaluate", str(run)])
    assert "weights_only=False" not in str(caught.value)
    assert not os.path.exists("/tmp/zoo-pwned")


def _edit_config(run, change):
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


REAL_CACHE = data.cache_dir() / "mnist.npz"  # read before a test points $ZOO_DATA elsewhere


@requires_mnist
def test_a_corrupt_mnist_cache_is_named_at_load_and_replaced_by_fetch(tmp_path, monkeypatch):
    """Truncated, pickled and one-pixel-tampered caches are refused at load with the file's
    name; `zoo data fetch` checks an existing cache and builds a bad one again (from a source
    stubbed here with the verified arrays, so the test needs no network)."""
    arrays = data._read_mnist_cache(REAL_CACHE)
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_memo", {})
    target = tmp_path / "mnist.npz"
    tampered = dict(arrays, test_images=arrays["test_images"].copy())
    tampered["test_images"][0, 400] ^= 1
    with open(target, "wb") as f:
        import numpy as np

        np.savez(f, **tampered)
    spoilt = [target.read_bytes(), target.read_bytes()[:5000], pickle.dumps({"x": 1})]
    for content in spoilt:
        target.write_bytes(content)
        with pytest.raises(data.DataError, match="mnist.npz is not a valid MNIST cache"):
            data.load("mnist", "test")
    monkeypatch.setattr(data, "_from_cached_files", lambda root: arrays)
    with pytest.warns(UserWarning, match="not a valid MNIST cache.*building it again"):
        assert cli.main(["data", "fetch", "mnist"]) == 0
    x, _ = data.load("mnist", "test")
    assert x.shape == (10000, 784)


# ------------------------------------------------------------------------------- bad inputs

X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]] * 5)


def small_vae(**kwargs):
    return VAE(VAEConfig(x_dim=2, z_dim=1, hidden=(4,), **kwargs))


def fit_vae(x, **options):
    vae = small_vae()
    return reparam.fit(vae.model, vae.guide, x, num_epochs=1, **options)


def fit_gmm(x, **options):
    gmm = GaussianMixture(num_components=2, dim=2)
    return em.fit(gmm.model, gmm.guide, x, **options)


def log_px(x, **options):
    vae = small_vae()
    return evaluate.log_likelihood(vae.model, vae.guide, x, **options)


NAN_X = X.clone()
NAN_X[3, 1] = float("nan")

BAD_INPUTS = [
    # (what is called, the exception, the message it must give)
    (lambda: GaussianMixture(num_components=2.5), ValueError, "num_components must be a positive"),
    (lambda: GaussianMixture(reg_covar=math.nan), ValueError, "reg_covar must be a finite number"),
    (lambda: BernoulliMixture(beta_a=math.nan), ValueError, "beta_a must be a finite number"),
    (lambda: small_vae(beta=math.nan), ValueError, "beta must be a finite number >= 0"),
    (lambda: VAE(VAEConfig(hidden=(0,))), ValueError, "hidden must be positive integers"),
    (lambda: VAE(VAEConfig(x_dim=0)), ValueError, "x_dim must be a positive integer"),
    (lambda: fit_gmm(X.double()), TypeError, "data is torch.float64 but the model's parameters"),
    (lambda: fit_gmm(X, tol=math.nan), ValueError, "tol must be a finite number > 0"),
    (lambda: fit_gmm(X, chunk_size=0), ValueError, "chunk_size must be a whole number"),
    (lambda: fit_gmm(NAN_X), ValueError, "NaN or infinite"),
    (lambda: fit_vae(X[:0]), ValueError, "data is empty"),
    (lambda: fit_vae(NAN_X), ValueError, "data contains 1 NaN or infinite values"),
    (
        lambda: fit_vae(X * 0.5),
        ValueError,
        "observed site 'x': 15 of 20 data points have values outside",
    ),
    (lambda: fit_vae(X, batch_size=0), ValueError, "batch_size must be a whole number"),
    (lambda: fit_vae(X, num_particles=0), ValueError, "num_particles must be a whole number"),
    (lambda: fit_vae(X, patience=1), ValueError, "patience= stops on the validation score"),
    (lambda: fit_vae([X, X[:3]]), ValueError, r"data\[1\] has 3 rows along dim 0 but data\[0\]"),
    (lambda: fit_vae("x.csv"), TypeError, "data must be a tensor, a tuple .* not str"),
    (lambda: log_px(X, particle_batch=0), ValueError, "particle_batch must be a whole number"),
    (lambda: log_px(X, num_samples=0), ValueError, "num_samples must be a whole number"),
    (lambda: log_px(NAN_X), ValueError, "NaN"),
    (lambda: log_px(X * 0.5), ValueError, "observed site 'x': 15 of 20 data points"),
    (lambda: data.binarize(NAN_X, "threshold"), ValueError, "cannot binarize: x holds 1 NaN"),
    (
        lambda: svi.fit(small_vae().model, small_vae().guide, X, loss="Nope_ELBO"),
        ValueError,
        "unknown loss 'Nope_ELBO'",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_to_the_python_api(call, error, message):
    with pytest.raises(error, match=message):
        call()


BAD_FLAGS = [
    (["--seed", str(2**64)], "must be an integer in \\[0, 2\\*\\*32\\)"),
    (["--device", "tpu"], "--device 'tpu': use cpu, cuda, cuda:N or auto"),
    (["--components", "2.5"], "invalid int value: '2.5'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[f[0] for f, _ in BAD_FLAGS])
def test_bad_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as caught:
        cli.main([*GMM, "--out", str(tmp_path / "run"), *flags])
    assert caught.value.code != 0
    assert re.search(message, str(caught.value) + capsys.readouterr().err)


def test_out_that_is_a_file_and_a_negative_budget(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cli.main([*GMM, "--out", str(file)])
    with pytest.raises(SystemExit):
        cli.main(["compare", "gmm", "--budget", "-1", "--out", str(tmp_path / "c")])
    assert "must be a positive number, got -1" in capsys.readouterr().err


def test_a_run_of_the_older_layout_is_refused_with_the_command_that_refits_it(tmp_path):
    """A deep model's run written before the models declared their task options (config.json
    without "format", with the CLI's old "held_out_binarize") cannot be rebuilt faithfully: a
    CVAE's condition lived outside its model_config. evaluate and sample say so, with the
    recorded command to fit it again."""
    run = tmp_path / "old"
    run.mkdir()
    config = {
        "model": "cvae",
        "model_config": {"x_dim": 64, "y_dim": 64, "z_dim": 2, "hidden": [16]},
        "data": "digits",
        "binarize": "threshold",
        "held_out_binarize": "threshold",
        "max_data": None,
        "inference": "reparam",
        "options": {"condition": "quadrants", "given": 2},
        "command": "zoo fit cvae --data digits --condition quadrants --given 2",
    }
    (run / "config.json").write_text(json.dumps(config))
    (run / "params.pt").write_bytes(b"")
    for command in (["evaluate", str(run)], ["sample", str(run)]):
        with pytest.raises(SystemExit, match="older zoo .* --given 2 --overwrite"):
            cli.main(command)
