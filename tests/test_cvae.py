import pyro
import pytest
import torch

from inference import evaluate, reparam, svi
from zoo import data
from zoo.models.cvae import CVAE, Baseline, CVAEConfig, one_hot, quadrant_task


def digits(num=400):
    x, y = data.load("digits", split="train", binarize="threshold")
    return x[:num], y[:num]


def test_label_mode_trains_generates_and_transfers_style():
    x, labels = digits()
    y = one_hot(labels)
    torch.manual_seed(0)
    cvae = CVAE(CVAEConfig(x_dim=64, y_dim=10, z_dim=2, hidden=(32,)))
    result = reparam.fit(cvae.model, cvae.guide, (x, y), batch_size=64, num_epochs=15, lr=1e-2)
    assert result.curve()[-1] > result.curve()[0] + 2.0
    assert cvae.generate(one_hot(torch.tensor([3, 3, 7]))).shape == (3, 64)
    out = cvae.style_transfer(x[:4], y[:4], torch.eye(10))
    assert out.shape == (4, 10, 64)
    # each input's style (its posterior mean) decoded under its own label, by hand
    with torch.no_grad():
        loc, _ = cvae.encoder(torch.cat([x[:4], y[:4]], -1))
        own = torch.sigmoid(cvae.decoder(torch.cat([loc, y[:4]], -1)))  # (4, 64)
    torch.testing.assert_close(out[torch.arange(4), labels[:4]], own)
    # the conditional log-likelihood log p(x | y): importance sampling beats the ELBO
    torch.manual_seed(1)
    elbo = evaluate.elbo(cvae.model, cvae.guide, (x, y), num_samples=1).mean()
    log_px = evaluate.log_likelihood(cvae.model, cvae.guide, (x, y), num_samples=200).mean()
    assert log_px > elbo


def test_label_mode_fits_by_svi_too():
    x, labels = digits(200)
    cvae = CVAE(CVAEConfig(x_dim=64, y_dim=10, z_dim=2, hidden=(16,)))
    result = svi.fit(
        cvae.model,
        cvae.guide,
        (x, one_hot(labels)),
        loss="TraceMeanField_ELBO",
        batch_size=50,
        num_epochs=5,
        lr=1e-2,
    )
    assert result.curve()[-1] > result.curve()[0]


@pytest.mark.parametrize("num_given", [1, 2, 3])
def test_quadrant_task_data(num_given):
    x = torch.rand(20, 784)
    condition, target, mask = quadrant_task(x, num_given, seed=0)
    assert torch.equal(target, x)
    shown = mask == 0
    assert torch.all(shown.sum(-1) == num_given * 196)  # 196 pixels a quadrant
    assert torch.all(condition[~shown] == -1) and torch.equal(condition[shown], x[shown])
    images = shown.reshape(20, 28, 28)
    for img in images:  # every quadrant is all shown or all hidden
        for r in (slice(0, 14), slice(14, 28)):
            for c in (slice(0, 14), slice(14, 28)):
                assert img[r, c].all() or not img[r, c].any()
    again = quadrant_task(x, num_given, seed=0)[2]
    assert torch.equal(again, mask)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        quadrant_task(x, 4)


def test_quadrant_likelihood_ignores_the_given_pixels():
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    condition, target, mask = quadrant_task(x, 2, seed=1)
    cvae = CVAE(CVAEConfig(y_dim=784, z_dim=4, hidden=(32,)))
    changed = torch.where(mask.bool(), target, 1 - target)  # flip only the given pixels
    trace = pyro.poutine.trace(cvae.guide).get_trace(target, condition, mask)
    lp = []
    for t in (target, changed):
        model = pyro.poutine.trace(pyro.poutine.replay(cvae.model, trace=trace))
        lp.append(model.get_trace(t, condition, mask).log_prob_sum(lambda n, s: n == "x"))
    torch.testing.assert_close(lp[0], lp[1])


def test_quadrant_mode_and_baseline_train():
    x, _ = data.load("digits", split="train", binarize="threshold")
    x = x[:300]
    condition, target, mask = quadrant_task(x, 2, seed=0, side=8)
    cvae = CVAE(CVAEConfig(x_dim=64, y_dim=64, z_dim=2, hidden=(32,)))
    result = reparam.fit(
        cvae.model, cvae.guide, (target, condition, mask), batch_size=50, num_epochs=10, lr=1e-2
    )
    assert result.curve()[-1] > result.curve()[0]
    baseline = Baseline(64, (32,))
    opt = torch.optim.Adam(baseline.parameters(), lr=1e-2)
    before = baseline.loss(target, condition, mask).mean().item()
    for _ in range(100):
        opt.zero_grad()
        baseline.loss(target, condition, mask).mean().backward()
        opt.step()
    assert baseline.loss(target, condition, mask).mean().item() < before - 5


def test_bad_condition_shape():
    cvae = CVAE(CVAEConfig(x_dim=64, y_dim=10, z_dim=2, hidden=(8,)))
    with pytest.raises(ValueError, match=r"shape \(N, 10\)"):
        reparam.fit(cvae.model, cvae.guide, (torch.zeros(8, 64), torch.zeros(8, 3)))
