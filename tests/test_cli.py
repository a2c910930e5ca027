"""Every command of the CLI, with tiny flags (Pyro's tests/test_examples.py habit)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import requires_mnist
from zoo import cli, fitting, registry, report, runs
from zoo import flags as zoo_flags
from zoo.models import cvae

FITS = [
    ["gmm", "--data", "faithful"],
    ["gmm", "--data", "gmm-synthetic", "-k", "3", "--covariance", "diag", "--n-init", "2"],
    ["bmm", "--data", "digits", "-k", "5", "--binarize", "threshold", "--max-data", "400"],
    ["bmm", "--data", "bmm-synthetic", "-k", "4", "--binarize", "none"],
]


@pytest.mark.parametrize("argv", FITS, ids=[" ".join(a[:3]) for a in FITS])
def test_fit_evaluate_sample(tmp_path, argv, capsys):
    out = tmp_path / "run"
    assert cli.main(["fit", *argv, "--out", str(out), "--quiet"]) == 0
    for name in ("config.json", "params.pt", "history.json", "metrics.json", "log_likelihood.png"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["command"].startswith("zoo fit " + argv[0])
    assert metrics["converged"]
    # the EM objective is the training log-likelihood plus the log prior per data point
    model, _ = runs.restore(out)
    log_prior = model.log_prior().item() / metrics["num_train"]
    assert metrics["objective"] == pytest.approx(
        metrics["train_log_likelihood"] + log_prior, abs=1e-5
    )
    assert "test_log_likelihood" in metrics and "bic" in metrics
    if argv[0] == "gmm":
        assert (out / "mixture.png").exists()
    else:
        assert (out / "components.png").exists()
    if "digits" in argv:  # measured 0.425 with 5 components; a random clustering scores ~0.12
        assert metrics["test_clustering_accuracy"] > 0.3 and "test_nmi" in metrics
    # evaluate rebuilds the model from the run directory and computes the numbers again
    # (removed from metrics.json first, so that a copy of the old ones cannot pass)
    stale = {k: v for k, v in metrics.items() if not k.startswith("test_")}
    (out / "metrics.json").write_text(json.dumps(stale))
    assert cli.main(["evaluate", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], abs=1e-6)
    if "digits" in argv:
        assert again["test_clustering_accuracy"] == metrics["test_clustering_accuracy"]
    assert cli.main(["sample", str(out), "--num-samples", "16"]) == 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples["x"].shape[0] == 16 and (out / "samples.png").exists()


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    args = ["fit", "gmm", "--data", "faithful", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main(args)
    assert cli.main([*args, "--overwrite"]) == 0


def test_user_errors_exit_with_a_message(tmp_path, capsys):
    # a continuous data set cannot feed a Bernoulli mixture
    assert (
        cli.main(["fit", "bmm", "--data", "faithful", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    )
    assert "continuous" in capsys.readouterr().err
    assert cli.main(["fit", "gmm", "--components", "0", "--out", str(tmp_path / "c")]) == 2
    assert "num_components must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a run directory"):
        cli.main(["evaluate", str(tmp_path)])
    with pytest.raises(SystemExit):  # the drivers the GMM declares: em, svi
        cli.main(["fit", "gmm", "--inference", "reparam", "--out", str(tmp_path / "b")])
    assert "invalid choice: 'reparam' (choose from 'em', 'svi')" in capsys.readouterr().err


def test_console_script_lists_models():
    proc = subprocess.run(
        [sys.executable, "-m", "zoo.cli", "list"], capture_output=True, text=True, check=True
    )
    assert "gmm" in proc.stdout and "bmm" in proc.stdout and "mnist" in proc.stdout


def test_help_answers_before_torch_and_pyro_load():
    """``zoo --help`` imports neither torch, Pyro nor matplotlib (they take seconds on a busy
    machine); ``from zoo import VAE`` still works; the data names the parser offers are
    zoo.data's."""
    code = (
        "import sys, contextlib, io\n"
        "from zoo import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'pyro', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    from zoo import VAE, data
    from zoo.models.vae import VAE as same

    assert VAE is same and cli.catalog.NAMES is data.NAMES


@requires_mnist
def test_fit_bmm_on_mnist(tmp_path):
    argv = ["fit", "bmm", "--data", "mnist", "-k", "5", "--max-data", "1000", "--max-iter", "200"]
    metrics = {}
    for sparse in ("no", "yes"):  # the same fit on the dense images and on their sparse rows
        out = tmp_path / sparse
        assert cli.main([*argv, "--sparse", sparse, "--out", str(out), "--quiet"]) == 0
        metrics[sparse] = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())
        assert config["options"]["sparse"] is (sparse == "yes")
        assert metrics[sparse]["empty_components"] == 0
        assert -260 < metrics[sparse]["test_log_likelihood"] < -150  # 5 components, 1000 digits
    assert metrics["yes"]["iterations"] == metrics["no"]["iterations"]
    ll = metrics["no"]["test_log_likelihood"]
    assert metrics["yes"]["test_log_likelihood"] == pytest.approx(ll, rel=1e-6)
    with pytest.raises(SystemExit, match="takes dense data only"):
        cli.main(["fit", "gmm", "--sparse", "yes", "--out", str(tmp_path / "g"), "--quiet"])


# two epochs of a tiny network: every command runs, in a second or two
TINY_DEEP = ["--epochs", "2", "--z-dim", "2", "--hidden", "16", "--quiet"]

DEEP = [
    ["--inference", "reparam", "--jit", "--lr-decay", "0.5", "--binarize", "threshold"],
    ["--inference", "reparam", "--iwae", "3", "--binarize", "dynamic", "--jit"],
    ["--inference", "svi", "--loss", "JitTraceMeanField_ELBO", "--binarize", "dynamic"],
]


@pytest.mark.parametrize("flags", DEEP, ids=[" ".join(f[1:4]) for f in DEEP])
def test_fit_vae_on_digits(tmp_path, flags, device, capsys):
    out = tmp_path / "vae"
    argv = ["fit", "vae", "--data", "digits", *TINY_DEEP, "--eval-samples", "20"]
    argv += ["--out", str(out), "--device", device.type, *flags]
    assert cli.main(argv) == 0
    for name in (
        "config.json",
        "params.pt",
        "checkpoint.pt",
        "metrics.json",
        "learning_curve.png",
        "samples.png",
        "reconstructions.png",
        "latent_space.png",
    ):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["options"]["device"] == device.type
    # importance sampling tightens the bound: log p(x) estimate >= ELBO, up to noise
    assert metrics["test_log_likelihood"] > metrics["test_elbo"] - 0.5
    assert 0 < metrics["test_log_likelihood_std_error"] < 1  # 360 digits, spread ~ 5 nats
    assert "latent_usage" in metrics and metrics["latent_usage"]["sites"]["z"]["units"] == 2
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--num-samples", "10"]) == 0
    # new draws: the old numbers are kept beside and what changed is said
    before = json.loads((out / "metrics_before_evaluate.json").read_text())
    assert before["test_log_likelihood"] == metrics["test_log_likelihood"]
    assert "new Monte Carlo draws (10 importance samples" in capsys.readouterr().out
    assert cli.main(["sample", str(out), "--num-samples", "8"]) == 0


def test_vae_resume_from_the_cli(tmp_path, pinned_threads):
    out = tmp_path / "vae"
    base = [
        "fit",
        "vae",
        "--data",
        "digits",
        "--binarize",
        "threshold",
        "--z-dim",
        "2",
        "--hidden",
        "16",
        "--eval-samples",
        "5",
        "--lr",
        "0.001",  # not the model's digits default: the schedule below is read against it
        "--quiet",
    ]
    assert cli.main([*base, "--epochs", "2", "--out", str(out)]) == 0
    assert cli.main([*base, "--epochs", "4", "--resume", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    config = json.loads((out / "config.json").read_text())
    assert "--resume" not in config["command"] and "--epochs 2" in config["command"]
    assert len(config["resumes"]) == 1 and "--resume" in config["resumes"][0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fit_seconds"] == history[-1]["time"]  # both parts of the run
    with pytest.raises(SystemExit, match="nothing to resume"):
        cli.main([*base, "--resume", str(tmp_path / "elsewhere")])
    with pytest.raises(SystemExit, match="--iwae applies to --inference reparam"):
        cli.main([*base, "--inference", "svi", "--iwae", "5", "--out", str(tmp_path / "x")])

    # a decaying rate: 1e-3 falls to 0.5e-3 in the last epoch; a resume must keep the schedule
    decayed = tmp_path / "decayed"
    assert cli.main([*base, "--epochs", "3", "--lr-decay", "0.5", "--out", str(decayed)]) == 0
    saved = torch.load(decayed / "checkpoint.pt", weights_only=True)
    assert saved["state"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    # left out, the run's own --lr-decay is carried; another value is refused
    assert cli.main([*base, "--epochs", "3", "--resume", str(decayed)]) == 0
    assert "--lr-decay 0.5" in json.loads((decayed / "config.json").read_text())["command"]
    with pytest.raises(SystemExit, match="--lr-decay 0.5; resume it with the same value"):
        cli.main([*base, "--epochs", "3", "--lr-decay", "0.9", "--resume", str(decayed)])
    with pytest.raises(SystemExit, match="--epochs 3; resume it with the same value"):
        cli.main([*base, "--epochs", "4", "--lr-decay", "0.5", "--resume", str(decayed)])


@pytest.mark.parametrize("condition", ["label", "quadrants"])
def test_fit_cvae_on_digits(tmp_path, condition):
    out = tmp_path / condition
    argv = ["fit", "cvae", "--data", "digits", "--binarize", "threshold", *TINY_DEEP]
    argv += ["--condition", condition, "--given", "2", "--eval-samples", "10", "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    figures = ["digits.png", "style_transfer.png"] if condition == "label" else ["completions.png"]
    for name in figures:
        assert (out / name).exists(), name
    if condition == "quadrants":
        # both score the hidden pixels only: about 32 of 64 pixels, so < 32 * log 2 * 2 nats
        assert 0 < -metrics["test_log_likelihood"] < 45 and 0 < metrics["test_baseline_nll"] < 45
        # the baseline was trained after the CVAE and saved with it: params.pt gives its score
        model, _ = runs.restore(out)
        untrained = cvae.Baseline(64, (16,))
        arguments = model.arguments(*runs.split("digits", "test", "threshold"), "test")
        with torch.no_grad():
            nll = model.baseline.loss(*arguments).mean().item()
            assert untrained.loss(*arguments).mean().item() > nll + 1.0
        assert nll == pytest.approx(metrics["test_baseline_nll"], rel=1e-6)
    assert cli.main(["evaluate", str(out), "--num-samples", "5"]) == 0
    # label mode draws digits; the quadrant task draws only given the visible quadrants
    assert cli.main(["sample", str(out)]) == (0 if condition == "label" else 2)


def test_torchrun_two_processes(tmp_path):
    """`zoo fit` under torchrun: two gloo ranks on CPU, rank 0 writes the run directory."""
    out = tmp_path / "ddp"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "zoo.cli",
        "fit",
        "vae",
        "--data",
        "digits",
        "--binarize",
        "threshold",
        *TINY_DEEP,
        "--eval-samples",
        "5",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and (out / "checkpoint.pt").exists()
    svi_run = launch[:-2] + ["--inference", "svi", "--out", str(tmp_path / "svi")]
    proc = subprocess.run(svi_run, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "only --inference reparam" in proc.stderr


@requires_mnist
def test_fit_ssvae_on_mnist_with_few_labels(tmp_path):
    out = tmp_path / "ssvae"
    argv = ["fit", "ssvae", "--labels", "100", "--max-data", "2000", "--epochs", "2"]
    argv += ["--hidden", "64", "--z-dim", "8", "--eval-samples", "5", "--patience", "3"]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["labels"] == 100
    assert config["options"]["loss"] == "TraceEnum_ELBO"
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    # early stopping watches the classifier's validation accuracy and keeps its best epoch
    assert metrics["best_valid_score"] == max(r["valid_objective"] for r in history)
    # measured 0.325 after 2 epochs with 100 labels (chance 0.1)
    assert metrics["test_accuracy"] > 0.2 and metrics["num_test"] == 10000
    assert metrics["test_log_likelihood"] > metrics["test_elbo"] - 1.0
    for name in ("digits.png", "analogies.png", "learning_curve.png"):
        assert (out / name).exists(), name
    assert cli.main([*argv, "--labels", "105", "--out", str(tmp_path / "bad"), "--quiet"]) == 2


def test_fit_hvae_resumes_its_warmup_exactly(tmp_path, device, pinned_threads):
    base = ["fit", "hvae", "--data", "digits", "--binarize", "threshold", "--layers", "2"]
    base += ["--device", device.type]
    base += ["--warmup", "4", "--eval-samples", "5", "--quiet", "--batch-size", "64"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main([*base, "--epochs", "4", "--out", str(straight)]) == 0
    assert cli.main([*base, "--epochs", "2", "--out", str(split)]) == 0
    assert cli.main([*base, "--epochs", "4", "--resume", str(split)]) == 0
    a = json.loads((straight / "history.json").read_text())
    b = json.loads((split / "history.json").read_text())
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # same KL weights, same draws
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["latent_units"] == {"z1": 64, "z2": 32}
    # the run's count of active units is that of the saved model on the test images
    model, config = runs.restore(split)
    x_test, _ = runs.split("digits", "test", "threshold")
    counts = model.active_units_per_layer(x_test[:5000])
    assert metrics["active_units"] == {"z1": counts[0], "z2": counts[1]}
    for name in ("layer_samples.png", "active_units.png"):
        assert (split / name).exists(), name


def test_long_run_learning_curve_zooms_on_the_late_epochs():
    history = [
        {"epoch": e, "objective": -100 - 100 / e, "valid_objective": -102 - 100 / e}
        for e in range(1, 61)
    ]
    fig = report.learning_curve(history, {"model": "vae", "data": "mnist"})
    axis = fig.axes[0]
    assert axis.get_xscale() == "log"
    low, high = axis.get_ylim()
    # the first tenth (epochs 1-6) is off the scale, the rest fits with a margin
    assert -102 - 100 / 6 < low < -102 - 100 / 7 and -100 - 100 / 60 < high < -100
    short = report.learning_curve(history[:10], {"model": "vae", "data": "mnist"})
    assert short.axes[0].get_xscale() == "linear"


def test_jit_flag_picks_the_compiler():
    """--jit alone is torch.jit (as before it took a value); --jit inductor is TorchInductor."""
    parser = zoo_flags.fit_parser(registry.get("vae"))
    assert parser.parse_args([]).jit is None
    vae = registry.get("vae")
    settings = fitting.driver_settings(vae, cli.fit_request(["fit", "vae"]))
    assert settings["jit"] is False
    assert parser.parse_args(["--jit", "--iwae", "5"]).jit == "jit"
    assert parser.parse_args(["--jit", "inductor"]).jit == "inductor"
    with pytest.raises(SystemExit):
        parser.parse_args(["--jit", "xla"])
    # the SVI driver compiles its step too (svi.fit refuses what it cannot compile)
    svi_flags = cli.fit_request(["fit", "vae", "--inference", "svi", "--jit", "inductor"])
    assert fitting.driver_settings(vae, svi_flags)["jit"] == "inductor"


def test_fit_m1_m2_stacks_on_a_fitted_vae(tmp_path, capsys):
    """`zoo fit ssvae --stack-on RUN` (Kingma's M1+M2): M2 over the latent space of the VAE in
    RUN, which stays frozen; the run records which VAE (by digest) and refuses to resume on
    another; evaluate and sample work on it like on any SSVAE run."""
    base = ["--data", "digits", "--binarize", "threshold", "--quiet", "--batch-size", "64"]
    vae_run, run = tmp_path / "m1", tmp_path / "m1m2"
    m1 = ["fit", "vae", *base, "--epochs", "15", "--z-dim", "6", "--hidden", "64"]
    assert cli.main([*m1, "--out", str(vae_run)]) == 0
    ssvae = ["fit", "ssvae", *base, "--labels", "50", "--epochs", "2", "--hidden", "32"]
    argv = [*ssvae, "--z-dim", "4", "--eval-samples", "5", "--stack-on", str(vae_run)]
    assert cli.main([*argv, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    units = config["model_config"]["stack_units"]
    assert 0 < len(units) <= 6 and config["model_config"]["likelihood"] == "gaussian"
    assert config["built_on"]["stack_on"]["run"] == str(vae_run)
    m1_state = torch.load(vae_run / "params.pt", weights_only=True)
    state = torch.load(run / "params.pt", weights_only=True)
    for name, value in m1_state.items():  # M1 saved inside the run, untouched by training
        assert torch.equal(state[f"m1.{name}"], value), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_log_likelihood"] > metrics["test_elbo"] - 1.0
    (run / "metrics.json").write_text("{}")  # evaluate must compute the accuracy again
    assert cli.main(["evaluate", str(run), "--num-samples", "5"]) == 0
    # q(y | x)'s argmax is deterministic: the saved model gives the fit's accuracy exactly
    again = json.loads((run / "metrics.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"]
    assert cli.main(["sample", str(run), "--num-samples", "10"]) == 0

    capsys.readouterr()
    m1_state["decoder.0.bias"] += 1.0  # a different M1 under the same path
    torch.save(m1_state, vae_run / "params.pt")
    with pytest.raises(SystemExit, match="built on the fitted run"):
        cli.main([*argv, "--epochs", "3", "--resume", str(run)])
    assert cli.main([*ssvae, "--stack-on", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "stacks on a zoo.models.vae.VAE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no fitted run there"):
        cli.main([*ssvae, "--stack-on", str(tmp_path), "--out", str(tmp_path / "y")])


def test_a_flag_the_model_or_driver_does_not_take_is_refused_by_name(tmp_path, capsys):
    """The issue's example: the ladder VAE has no --z-dim (not even as an abbreviation of its
    --z-dims) and no --beta; an EM flag under SVI, or an SVI flag under EM, names the drivers
    it applies to. Nothing is written."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        cli.main(
            ["fit", "hvae", "--hidden", "16", "--z-dim", "2", "--beta", "5", "--out", str(out)]
        )
    assert "unrecognized arguments: --z-dim 2 --beta 5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--tol applies to --inference em"):
        cli.main(["fit", "gmm", "--inference", "svi", "--tol", "1e-3", "--out", str(out)])
    with pytest.raises(SystemExit, match="--epochs applies to --inference svi|reparam"):
        cli.main(["fit", "gmm", "--epochs", "3", "--out", str(out)])
    assert not out.exists()


def test_a_check_is_an_exit_code_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """main turns a ValueError raised by a check (a ``raise`` statement) into a message and exit
    code 2; a ValueError or TypeError from an operation that failed is a bug, and propagates."""
    from zoo import data

    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,nan\n" * 5)
    assert cli.main(["fit", "gmm", "--data", str(bad), "--out", str(tmp_path / "one")]) == 2
    assert "zoo: error: " in capsys.readouterr().err and not (tmp_path / "one").exists()

    def broken(*args, **kwargs):
        return int("not a number")  # an operation's ValueError: a bug

    monkeypatch.setattr(data, "load", broken)
    with pytest.raises(ValueError, match="invalid literal for int"):
        cli.main(["fit", "gmm", "--data", "faithful", "--out", str(tmp_path / "bug")])


def test_list_and_help_answer_without_torch_once_printed(tmp_path):
    """`zoo list` and `zoo fit MODEL --help` import every model (torch) the first time and keep
    what they printed (keyed by the zoo's source files); the next time they print the same
    text with torch never imported. A user's file is read afresh each time."""
    env = {**os.environ, "ZOO_DATA": str(tmp_path), "COLUMNS": "100"}
    probe = (
        "import sys; from zoo import cli; cli.main(sys.argv[1:]);"
        " print('torch loaded:', 'torch' in sys.modules)"
    )
    for argv in (["list"], ["fit", "vae", "--help"], ["compare", "gmm", "-h"]):
        runs_ = [
            subprocess.run(
                [sys.executable, "-c", probe, *argv],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout  # fmt: skip
            for _ in range(2)
        ]
        assert runs_[0].endswith("torch loaded: True\n"), argv
        assert runs_[1].endswith("torch loaded: False\n"), argv
        assert runs_[0].rsplit("torch loaded", 1)[0] == runs_[1].rsplit("torch loaded", 1)[0]
    user = [sys.executable, "-c", probe, "fit", "tests/user_models/ppca.py:PPCA", "--help"]
    again = subprocess.run(user, env=env, capture_output=True, text=True, check=True).stdout
    assert "--z-dim" in again and again.endswith("torch loaded: True\n")
