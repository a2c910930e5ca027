"""`zoo score`, `zoo complete` and `zoo denoise` on run directories (``zoo.applications``): the
masks, the files, the numbers against their baselines and against ``inference.uses`` called
directly, and the refusals."""

import json
import math

import pytest
import torch

from inference import uses
from zoo import applications, cli, runs


def test_masks():
    g = applications.parse_mask("random:0.4", (500, 64), seed=3)
    assert g.dtype == torch.bool and g.shape == (500, 64)
    assert abs((~g).float().mean().item() - 0.4) < 0.01  # 32,000 entries: 4 standard errors
    assert g.any(1).all()
    assert torch.equal(g, applications.parse_mask("random:0.4", (500, 64), seed=3))
    bottom = applications.parse_mask("bottom-half", (2, 64))
    assert torch.equal(bottom[0].reshape(8, 8)[:4], torch.ones(4, 8, dtype=torch.bool))
    assert not bottom[0].reshape(8, 8)[4:].any()
    right = applications.parse_mask("right-half", (1, 64))[0].reshape(8, 8)
    assert right[:, :4].all() and not right[:, 4:].any()
    one = applications.parse_mask("quadrants:1", (1, 64))[0].reshape(8, 8)
    assert one[:4, :4].all() and one.sum() == 16
    three = applications.parse_mask("quadrants:3", (1, 64))[0].reshape(8, 8)
    assert three.sum() == 48 and not three[4:, 4:].any()
    for spec, message in (
        ("random:1.5", r"random:P needs a fraction P in \(0, 1\)"),
        ("random:x", r"random:P needs a fraction"),
        ("quadrants:4", "quadrants:G needs G = 1, 2 or 3"),
        ("left-half", "use random:P, bottom-half, right-half, quadrants:G or a .pt"),
    ):
        with pytest.raises(ValueError, match=message):
            applications.parse_mask(spec, (2, 64))
    with pytest.raises(ValueError, match="need square images, not 50 features"):
        applications.parse_mask("bottom-half", (2, 50))


@pytest.fixture(scope="module")
def bmm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bmm"
    argv = ["fit", "bmm", "--data", "digits", "--components", "10", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    return out


def test_zoo_score_writes_exact_scores_and_the_roc_auc(bmm_run):
    assert cli.main(["score", str(bmm_run), "--outliers", "noise,upside-down"]) == 0
    summary = json.loads((bmm_run / "scores_test.json").read_text())
    assert summary["exact"] and summary["mean_std_error"] == 0
    rows = [line.split(",") for line in (bmm_run / "scores_test.csv").read_text().split()[1:]]
    model, config = runs.restore(bmm_run)
    x, _ = runs.splits(config)["test"]
    expected = model.log_likelihood(x)  # the mixture's own exact log p(x)
    saved = torch.tensor([float(r[1]) for r in rows])
    torch.testing.assert_close(saved, expected.float(), rtol=0, atol=1e-4)
    assert summary["mean_log_prob"] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert summary["auroc"]["noise"] > 0.99  # random pixels are nothing like digits
    assert 0.5 < summary["auroc"]["upside-down"] < 1.0  # some digits look alike upside down
    assert (bmm_run / "scores_test.png").exists()


def test_zoo_complete_beats_the_mean_image_and_keeps_what_is_seen(bmm_run):
    assert cli.main(["complete", str(bmm_run), "--mask", "bottom-half"]) == 0
    summary = json.loads((bmm_run / "completion_bottom-half_test.json").read_text())
    assert summary["hidden_fraction"] == 0.5 and summary["exact"]
    assert summary["completion_log_loss"] < summary["mean_log_loss"]
    saved = torch.load(bmm_run / "completion_bottom-half_test.pt", weights_only=True)
    model, config = runs.restore(bmm_run)
    x, _ = runs.splits(config)["test"]
    observed = saved["observed"]
    assert torch.equal(saved["mean"][observed], x[observed])
    direct = uses.complete(model.model, model.guide, x, observed)
    torch.testing.assert_close(saved["mean"], direct.mean)
    assert (bmm_run / "completion_bottom-half_test.png").exists()


def test_zoo_denoise_beats_the_noisy_pixels(bmm_run):
    assert cli.main(["denoise", str(bmm_run), "--flip", "0.1"]) == 0
    summary = json.loads((bmm_run / "denoising_flip-0.1_test.json").read_text())
    assert summary["denoised_log_loss"] < 0.8 * summary["noisy_input_log_loss"]
    # the noisy input's own log-loss, in closed form from the share f of pixels flipped: each
    # pixel is guessed right with probability 0.9
    f = 1 - summary["noisy_input_accuracy"]
    expected = -64 * ((1 - f) * math.log(0.9) + f * math.log(0.1))
    assert summary["noisy_input_log_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(f - 0.1) < 0.01  # 23,040 pixels flipped at rate 0.1


def test_refusals_name_the_problem(bmm_run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="use random:P, bottom-half"):
        cli.main(["complete", str(bmm_run), "--mask", "top"])
    with pytest.raises(SystemExit, match="give one noise model"):
        cli.main(["denoise", str(bmm_run)])
    vq = tmp_path / "vq"
    argv = ["fit", "vqvae", "--data", "digits", "--epochs", "1", "--out", str(vq), "--quiet"]
    assert cli.main(argv) == 0
    with pytest.raises(SystemExit, match="guide site 'codes' is a point mass"):
        cli.main(["complete", str(vq), "--mask", "random:0.3"])
    assert cli.main(["score", str(vq)]) == 0  # a bound (discrete codes), and said so
    assert json.loads((vq / "scores_test.json").read_text())["point_mass_guide_site"] == "codes"


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cvae"
    argv = ["fit", "cvae", "--data", "digits", "--epochs", "10", "--hidden", "128", "--z-dim",
            "8", "--lr", "3e-3", "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_a_conditional_model_is_completed_given_its_labels(cvae_run, tmp_path):
    """The CVAE's labels are held fixed as its condition: the completion given the true labels
    is the one ``inference.uses`` gives with condition=(one-hot labels,), it beats the mean
    image, and it beats the completion given every label moved by one (the condition is
    read row by row). Without labels the CVAE refuses; a mask file is read as given."""
    from zoo.models.cvae import one_hot

    argv = ["complete", str(cvae_run), "--mask", "bottom-half", "--num-rows", "200"]
    assert cli.main(argv) == 0
    summary = json.loads((cvae_run / "completion_bottom-half_test.json").read_text())
    assert summary["conditioned"] and not summary["labels_hidden"]
    assert summary["completion_log_loss"] < 0.9 * summary["mean_log_loss"]
    model, config = runs.restore(cvae_run)
    model.eval()
    x, y = runs.splits(config)["test"]
    x, y = x[:200], y[:200]
    saved = torch.load(cvae_run / "completion_bottom-half_test.pt", weights_only=True)
    observed = saved["observed"]
    torch.manual_seed(0)
    given = uses.complete(model.model, model.guide, x, observed, num_samples=500,
                          condition=(one_hot(y),))  # fmt: skip
    torch.testing.assert_close(saved["mean"], given.mean)
    wrong = uses.complete(model.model, model.guide, x, observed, num_samples=500,
                          condition=(one_hot((y + 1) % 10),))  # fmt: skip

    def loss(mean):
        p = mean.clamp(1e-4, 1 - 1e-4)
        per = -(x * p.log() + (1 - x) * (1 - p).log())
        return (per * ~observed).sum(-1).mean().item()

    assert loss(given.mean) < loss(wrong.mean) - 1.0
    with pytest.raises(SystemExit, match="the CVAE conditions on labels: these data have none"):
        cli.main([*argv, "--hide-labels"])
    path = tmp_path / "left.pt"
    torch.save(torch.arange(64).remainder(8) < 4, path)  # the left half of every image seen
    assert cli.main(["complete", str(cvae_run), "--mask", str(path), "--num-rows", "20"]) == 0
    saved = torch.load(cvae_run / "completion_left_test.pt", weights_only=True)
    assert torch.equal(saved["observed"][0].reshape(8, 8)[:, :4], torch.ones(8, 4).bool())
    torch.save(torch.zeros(64), path)
    with pytest.raises(SystemExit, match="a boolean array"):
        cli.main(["complete", str(cvae_run), "--mask", str(path)])


def test_a_semi_supervised_model_goes_without_its_labels(tmp_path):
    """The SSVAE with --hide-labels: the class is a latent variable, importance-sampled with
    the style; outliers are scored like the data, and without --hide-labels refused."""
    run = tmp_path / "ssvae"
    argv = ["fit", "ssvae", "--data", "digits", "--epochs", "2", "--out", str(run), "--quiet"]
    assert cli.main(argv) == 0
    complete = ["complete", str(run), "--mask", "random:0.3", "--num-rows", "50"]
    assert cli.main([*complete, "--hide-labels", "--num-samples", "100"]) == 0
    summary = json.loads((run / "completion_random-0.3_test.json").read_text())
    assert summary["labels_hidden"] and not summary["exact"]
    saved = torch.load(run / "completion_random-0.3_test.pt", weights_only=True)
    model, config = runs.restore(run)
    model.eval()
    x, _ = runs.splits(config)["test"]
    torch.manual_seed(0)
    unknown = torch.full((50,), -1, dtype=torch.long)
    direct = uses.complete(model.model, model.guide, x[:50], saved["observed"],
                           num_samples=100, condition=(unknown,))  # fmt: skip
    torch.testing.assert_close(saved["mean"], direct.mean)
    with pytest.raises(SystemExit, match="score both without labels"):
        cli.main(["score", str(run), "--outliers", "noise"])
    assert cli.main(["score", str(run), "--hide-labels", "--outliers", "noise"]) == 0
    assert json.loads((run / "scores_test.json").read_text())["auroc"]["noise"] > 0.99


def test_the_complexity_corrected_score(bmm_run):
    """Serra et al.'s correction: -log p(x) minus the zlib length in nats. Blank rows compress
    to less than random ones; 8-bit rows in [0, 1] too; the corrected ROC AUC is the one of
    the corrected scores recomputed from the written rows and the model itself."""
    blank, noisy = (
        torch.zeros(3, 64),
        (torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) < 0.5).float(),
    )  # noqa: E501
    assert (applications.complexity(blank) < applications.complexity(noisy) - 5).all()
    grey = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    assert (applications.complexity(grey) > applications.complexity(noisy[:2])).all()
    with pytest.raises(ValueError, match="binary rows or rows in"):
        applications.complexity(torch.randn(2, 64))
    argv = ["score", str(bmm_run), "--outliers", "upside-down", "--complexity"]
    assert cli.main(argv) == 0
    summary = json.loads((bmm_run / "scores_test.json").read_text())
    rows = [line.split(",") for line in (bmm_run / "scores_test.csv").read_text().split()[1:]]
    lp = torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    cx = torch.tensor([float(r[3]) for r in rows], dtype=torch.float64)
    model, config = runs.restore(bmm_run)
    x, _ = runs.splits(config)["test"]
    torch.testing.assert_close(cx, applications.complexity(x).double(), rtol=0, atol=1e-5)
    flipped = x.reshape(-1, 8, 8).flip(1).reshape(len(x), -1)
    outlier = -model.log_likelihood(flipped).double() - applications.complexity(flipped).double()
    expected = uses.roc_auc(-lp - cx, outlier)
    assert summary["auroc_complexity_corrected"]["upside-down"] == pytest.approx(expected, abs=1e-6)
    assert (bmm_run / "scores_test_corrected.png").exists()


def test_interpolation_paths_and_zoo_sample_interpolate(tmp_path):
    """Linear and spherical paths in closed form: between orthogonal codes of norm r the
    great circle's midpoint is r (z0 + z1) / |z0 + z1| (norm r), the straight line's (z0 +
    z1) / 2 (norm r / sqrt 2); both start and end at the codes. ``zoo sample --interpolate``
    decodes them from the codes of the rows named."""
    z0 = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    z1 = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    arc = applications.interpolate(z0, z1, 5, "spherical")
    line = applications.interpolate(z0, z1, 5, "linear")
    for path in (arc, line):
        assert path.shape == (5, 4)
        torch.testing.assert_close(path[0], z0)
        torch.testing.assert_close(path[-1], z1)
    torch.testing.assert_close(arc[2], 3.0 * (z0 + z1) / (z0 + z1).norm())
    torch.testing.assert_close(line[2], (z0 + z1) / 2)
    torch.testing.assert_close(arc.norm(dim=-1), torch.full((5,), 3.0, dtype=torch.float64))
    same = applications.interpolate(z0, 2 * z0, 3, "spherical")  # one direction: the line
    torch.testing.assert_close(same[1], 1.5 * z0)
    with pytest.raises(ValueError, match="'linear' or 'spherical'"):
        applications.interpolate(z0, z1, 5, "geodesic")
    with pytest.raises(ValueError, match="at least 2 steps"):
        applications.interpolate(z0, z1, 1)

    run = tmp_path / "vae"
    argv = ["fit", "vae", "--data", "digits", "--epochs", "1", "--out", str(run), "--quiet"]
    assert cli.main(argv) == 0
    assert cli.main(["sample", str(run), "--interpolate", "0,1;4,2", "--steps", "5"]) == 0
    saved = torch.load(run / "interpolation.pt", weights_only=True)
    assert saved["images"].shape == (2, 2, 5, 64) and (run / "interpolation.png").exists()
    model, config = runs.restore(run)
    model.eval()
    x, _ = runs.splits(config)["test"]
    ends = model.decode(model.encode(x[[4, 2]])[0])
    torch.testing.assert_close(saved["images"][1, :, 0], ends[0].expand(2, -1))
    torch.testing.assert_close(saved["images"][1, :, -1], ends[1].expand(2, -1))
    with pytest.raises(SystemExit, match="pairs of row numbers like 0,1"):
        cli.main(["sample", str(run), "--interpolate", "0-1"])
    with pytest.raises(SystemExit, match="row 999 of test, which has 360 rows"):
        cli.main(["sample", str(run), "--interpolate", "0,999"])


def test_zoo_score_data_scores_rows_of_a_file(bmm_run, tmp_path):
    """--data FILE scores those rows (here the first 30 test digits: the mixture's own exact
    log p(x) of them), named after the file; rows of another width are refused."""
    import numpy as np

    model, config = runs.restore(bmm_run)
    x, _ = runs.splits(config)["test"]
    np.save(tmp_path / "some.npy", x[:30].numpy())
    assert cli.main(["score", str(bmm_run), "--data", str(tmp_path / "some.npy")]) == 0
    rows = (bmm_run / "scores_some_all.csv").read_text().split()[1:]
    saved = torch.tensor([float(r.split(",")[1]) for r in rows])
    torch.testing.assert_close(saved, model.log_likelihood(x[:30]).float(), rtol=0, atol=1e-4)
    np.save(tmp_path / "narrow.npy", np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(SystemExit, match="rows of 10 features; the run's model was fitted on 64"):
        cli.main(["score", str(bmm_run), "--data", str(tmp_path / "narrow.npy")])
