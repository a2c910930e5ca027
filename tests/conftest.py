import os

import pyro
import pytest
import torch

from zoo import data

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


# Tests that take the ``device`` fixture run on the CPU and, where torch sees one, on CUDA too:
# CI has no GPU; on a GPU machine `pytest -k cuda` runs the device half.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from the same seed and an empty Pyro param store, with validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield


@pytest.fixture
def pinned_threads(monkeypatch):
    """torch's thread count left as it is for the test's fits (ZOO_THREADS=torch): tests that
    compare two runs bit for bit (a resumed run with an uninterrupted one) must not see the
    drivers change the count between them, which can move a reduction's last bit."""
    monkeypatch.setenv("ZOO_THREADS", "torch")


def mnist_available() -> bool:
    return (data.cache_dir() / "mnist.npz").exists()


# scripts/test.sh fetches MNIST and sets ZOO_REQUIRE_MNIST=1, so in CI these tests always run
# (and fail if the data is missing); a bare `pytest` on a machine without the cache skips them.
requires_mnist = pytest.mark.skipif(
    not mnist_available() and not os.environ.get("ZOO_REQUIRE_MNIST"),
    reason="MNIST not in the cache: run `zoo data fetch mnist`",
)
