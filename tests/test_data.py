import gzip
import hashlib
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from inference.io import atomic_write
from tests.conftest import requires_mnist
from zoo import data


def test_faithful_is_shipped_and_split():
    x_all, y = data.load("faithful", split="all")
    assert y is None
    assert x_all.shape == (272, 2) and x_all.dtype == torch.float32
    assert torch.allclose(x_all[0], torch.tensor([3.6, 79.0]))  # first row of the R table
    x_train, _ = data.load("faithful")
    x_test, _ = data.load("faithful", split="test")
    assert len(x_train) == 218 and len(x_test) == 54
    # the two splits partition the table
    assert sorted(torch.cat([x_train, x_test]).tolist()) == sorted(x_all.tolist())


def test_digits_range_and_labels():
    x, y = data.load("digits", split="all")
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == 0 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    xb, _ = data.load("digits", split="test", binarize="threshold")
    assert xb.shape == (360, 64) and set(xb.unique().tolist()) <= {0.0, 1.0}


def test_synthetic_gaussian_mixture_has_its_parameters():
    spec = data.default_gaussian_mixture()
    x, z = data.make_gaussian_mixture(30000, spec, seed=3)
    for k in range(3):
        xk = x[z == k]
        # sample means and covariances within 5 standard errors of the truth
        se = (spec.covariances[k].diagonal() / len(xk)).sqrt()
        assert torch.all((xk.mean(0) - spec.locs[k]).abs() < 5 * se)
        assert torch.allclose(torch.cov(xk.T), spec.covariances[k], atol=0.05)
    freq = torch.bincount(z, minlength=3) / len(z)
    assert torch.allclose(freq, spec.weights, atol=0.01)


def test_synthetic_bernoulli_mixture_has_its_parameters():
    spec = data.default_bernoulli_mixture()
    x, z = data.make_bernoulli_mixture(20000, spec, seed=1)
    for k in range(4):
        assert torch.allclose(x[z == k].mean(0), spec.probs[k], atol=0.03)


def test_static_binarization_is_fixed_and_unbiased():
    x = torch.rand(200, 50, generator=torch.Generator().manual_seed(0))
    a = data.binarize(x, "static", seed=5)
    b = data.binarize(x, "static", seed=5)
    c = data.binarize(x, "static", seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # E[b] = x: the mean difference is within 4 standard errors
    se = (x * (1 - x)).sum().sqrt() / x.numel()
    assert abs((a - x).mean()) < 4 * se
    # The stream is PCG64's raw output, pinned here: the same bits on every machine and numpy.
    raw = np.random.PCG64(7).random_raw(3).astype(np.int64).tolist()
    assert raw == [-6915767979617203573, -1896070707823613291, -4137868664117724830]


def test_dynamic_and_threshold_binarization():
    x = torch.full((100, 100), 0.3)
    d1 = data.binarize(x, "dynamic", generator=torch.Generator().manual_seed(1))
    d2 = data.binarize(x, "dynamic", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(d1, d2)
    assert abs(d1.mean().item() - 0.3) < 4 * (0.3 * 0.7 / 1e4) ** 0.5
    assert data.binarize(torch.tensor([0.2, 0.5, 0.7]), "threshold").tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "cifar"}, "unknown data set"),
        ({"name": "faithful", "split": "valid"}, "has splits"),
        ({"name": "digits", "binarize": "otsu"}, "unknown binarization"),
        ({"name": "faithful", "binarize": "static"}, "continuous"),
    ],
)
def test_load_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load(**kwargs)


def test_binarize_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.binarize(torch.tensor([1.5]), "threshold")


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        data.restricted_loads(payload)
    assert not marker.exists()


def test_restricted_unpickler_loads_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    loaded = data.restricted_loads(pickle.dumps(arrays, protocol=2))
    assert np.array_equal(loaded[0], arrays[0]) and np.array_equal(loaded[1], arrays[1])


def test_sha256_mismatch_is_an_error():
    with pytest.raises(data.DataError, match="SHA-256"):
        data._check_sha256(b"not mnist", data._PICKLE_SHA256, "mnist.pkl.gz")


def test_idx_parser():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + struct.pack(">iii", 2, 3, 4) + images.tobytes()
    parsed = data._parse_idx(gzip.decompress(gzip.compress(raw)))
    assert np.array_equal(parsed, images.reshape(2, 12))
    with pytest.raises(data.DataError, match="truncated"):
        data._parse_idx(raw[:-1])
    with pytest.raises(data.DataError, match="IDX"):
        data._parse_idx(b"\x00\x00\x0d\x01")


def test_missing_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_memo", {})
    with pytest.raises(data.DataError) as err:
        data.load("mnist", download=False)
    text = str(err.value)
    assert str(tmp_path) in text and "train-images-idx3-ubyte.gz" in text and "mnist.pkl.gz" in text


def test_hand_placed_corrupt_pickle_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_memo", {})
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(b"garbage"))
    with pytest.raises(data.DataError, match="SHA-256"):
        data.load("mnist", download=False)
    assert not (tmp_path / "mnist.npz").exists()


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "cache.npz"

    def write(f):
        f.write(b"half of a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


@requires_mnist
def test_mnist_splits_labels_and_static_binarization():
    x, y = data.load("mnist", split="train")
    assert x.shape == (50000, 784) and y.shape == (50000,)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the official training order
    assert x.min() == 0 and x.max() == 1
    xv, yv = data.load("mnist", split="valid")
    xt, yt = data.load("mnist", split="test")
    assert len(xv) == len(xt) == 10000 and yt[:5].tolist() == [7, 2, 1, 0, 4]
    xb, _ = data.load("mnist", split="train", binarize="static")
    digest = hashlib.sha256(xb[:1000].to(torch.uint8).numpy().tobytes()).hexdigest()
    # pinned: the static binarization must be the same on every machine
    assert digest == "daa03d24b1178a88a3671716112823fb58af6ba9fa5ae2834e062c61366d6d24"


@requires_mnist
def test_corrupt_cache_is_detected(tmp_path, monkeypatch):
    source = data.cache_dir() / "mnist.npz"
    with np.load(source) as f:
        arrays = {k: f[k].copy() for k in f.files}
    arrays["test_labels"][0] = 3
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "mnist.npz").write_bytes(buf.getvalue())
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_memo", {})
    with pytest.raises(data.DataError, match="corrupt"):
        data.load("mnist", split="test")
