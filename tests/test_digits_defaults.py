"""Every deep model fitted with its defaults on the 8x8 digits for 3 epochs uses its latent
variables: no latent site is collapsed onto the prior (``evaluate.latent_usage``: each site
varies with the data or carries KL, the KL terms sum to more than 0.1 nats per digit, and the
reconstructions differ across inputs), the
reconstructions vary across inputs and the samples across draws (their variance, over the
data's, above 0.15 and 0.1; measured 0.21-0.42 and 0.15-1.08). MNIST's sizes and rate fail
the same checks on these data (the last test), as every default did before the models chose
their own per data set (``register(data_defaults=...)``)."""

import json

import pytest
import torch

from zoo import cli, registry, runs


def fit(tmp_path, capsys, model, *flags):
    out = tmp_path / model
    argv = ["fit", model, "--data", "digits", "--epochs", "3", "--out", str(out), *flags]
    assert cli.main([*argv, "--quiet"]) == 0
    said = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    model_, config = runs.restore(out)
    model_.eval()
    x, _ = runs.splits(config)["train"]
    torch.manual_seed(0)
    drawn = model_.sample(200)
    drawn = (drawn[0] if isinstance(drawn, tuple) else drawn).float()
    sample_spread = (drawn.var(0).mean() / x.var(0).mean()).item()
    return metrics["latent_usage"], sample_spread, said, config


def used(usage) -> bool:
    """Not collapsed: KL in total, no idle site, reconstructions that differ across inputs."""
    sites = [s for s in usage["sites"].values() if s["kl"] is not None]
    idle = [s for s in sites if s["kl"] < 0.1 and s["active"] == 0]
    total = sum(s["kl"] for s in sites)
    return bool(sites) and total >= 0.1 and not idle and usage["reconstruction_spread"] >= 0.05


@pytest.mark.parametrize("model", ["vae", "cvae", "ssvae", "hvae", "vqvae", "diffusion"])
def test_defaults_on_digits_learn_in_three_epochs(tmp_path, capsys, model):
    usage, sample_spread, said, config = fit(tmp_path, capsys, model)
    assert used(usage), usage
    assert "posterior collapse" not in said
    assert usage["reconstruction_spread"] > 0.15, usage
    assert sample_spread > 0.1
    chosen = registry.get(model).defaults_for("digits")
    chosen.pop("_unless", None)
    assert config["data_defaults"] == json.loads(json.dumps(chosen))  # recorded in the run


def test_mnist_sizes_collapse_on_digits_and_are_warned_about(tmp_path, capsys):
    flags = ["--z-dim", "50", "--hidden", "400", "--batch-size", "128", "--lr", "1e-3"]
    usage, sample_spread, said, config = fit(
        tmp_path, capsys, "vae", *flags, "--binarize", "static"
    )
    assert not used(usage) and usage["reconstruction_spread"] < 0.05 and sample_spread < 0.05
    assert "zoo: warning: posterior collapse: " in said and "--z-dim, --hidden" in said
    assert config["data_defaults"] == {}  # every choice was the user's
    capsys.readouterr()
    # a user's --layers keeps the ladder VAE's sizes its own, the data's rate and batch still
    out = tmp_path / "hvae3"
    argv = ["fit", "hvae", "--data", "digits", "--layers", "1", "--epochs", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    config = runs.read_config(out)
    assert config["model_config"]["z_dims"] == [64] and config["options"]["batch_size"] == 16
    said = capsys.readouterr().out
    assert "the model's defaults for these data: --batch-size 16, --lr 0.003" in said
