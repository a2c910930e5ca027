"""SparseRows: mostly-zero data whose EM products skip the zeros, with the same results as dense."""

import pytest
import torch

from inference import em
from inference.sparse import SparseRows, t_matmul
from zoo import data
from zoo.models.bernoulli_mixture import BernoulliMixture
from zoo.models.gmm import GaussianMixture

# the tests make CSR tensors of their own, of which torch warns once that they are "in beta"
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def _binary(num_rows, dim, density=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_rows, dim, generator=g) < density).float()


@pytest.mark.parametrize("tile_rows, chunk_size", [(7, 20), (16, 16), (64, 1000), (1000, 10)])
def test_chunks_cover_the_rows_and_their_transposed_products_are_exact(tile_rows, chunk_size):
    x = _binary(103, 9)  # 103 rows: the last tile and the last chunk are ragged
    rows = SparseRows(x, tile_rows)
    y = torch.randn(103, 4, dtype=torch.float64).float()
    chunks = rows.chunks(chunk_size)
    assert [start for start, _ in chunks] == sorted({start for start, _ in chunks})
    covered = torch.cat([chunk.to_dense() for _, chunk in chunks])
    assert torch.equal(covered, x)
    for start, chunk in chunks:
        n = chunk.shape[0]
        assert n % tile_rows == 0 or start + n == len(x)
        expected = x[start : start + n].T @ y[start : start + n]
        torch.testing.assert_close(t_matmul(chunk, y[start : start + n]), expected)
    # a CSR tensor made elsewhere is transposed on the spot; a dense one is multiplied directly
    torch.testing.assert_close(t_matmul(x.to_sparse_csr(), y), x.T @ y)
    torch.testing.assert_close(t_matmul(x, y), x.T @ y)
    assert rows.nnz == int((x != 0).sum()) and rows.density == pytest.approx(x.mean().item())
    assert torch.equal(rows.rows(5, 50).to_dense(), x[5:50])
    assert torch.equal(rows.to_dense(), x)


def test_em_on_sparse_rows_gives_the_dense_fit(device):
    """Same seeding, same arithmetic in another order: the same fit up to float rounding."""
    x, _ = data.make_bernoulli_mixture(3000, seed=3)
    x = x.to(device)
    fits = []
    for rows in (x, SparseRows(x, tile_rows=256)):
        torch.manual_seed(0)
        bmm = BernoulliMixture(num_components=6, dim=x.shape[1]).to(device)
        # one thread count for both: matrix products split by thread can round differently,
        # and a change of count mid-fit (threads="auto") can move the stop by an iteration
        result = em.fit(
            bmm.model, bmm.guide, rows, tol=1e-5, max_iter=200, chunk_size=1000, threads="torch"
        )
        fits.append((result, bmm.probs.detach(), bmm.weights.detach()))
    (dense, p_dense, w_dense), (sparse, p_sparse, w_sparse) = fits
    assert sparse.num_steps == dense.num_steps
    assert sparse.objective == pytest.approx(dense.objective, rel=1e-6)
    for a, b in zip(dense.curve(), sparse.curve()):
        assert b == pytest.approx(a, rel=1e-6)
    torch.testing.assert_close(p_sparse, p_dense, atol=1e-4, rtol=0)
    torch.testing.assert_close(w_sparse, w_dense, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::inference.em.ConvergenceWarning")
def test_gradient_m_step_on_sparse_rows_matches_dense():
    """Autograd through the sparse E-step product: the gradient M-step raises the objective as on
    the dense data (L-BFGS, unconverged after 100 steps, amplifies rounding: 1e-4 relative)."""
    x, _ = data.make_bernoulli_mixture(600, seed=4)
    curves = []
    for rows in (x, SparseRows(x, 128)):
        bmm = BernoulliMixture(num_components=4, dim=x.shape[1])
        result = em.fit(bmm.model, bmm.guide, rows, m_step="gradient", max_iter=4, chunk_size=256)
        curves.append(result.curve())
    dense, sparse = curves
    assert sparse[-1] > sparse[0] and all(b >= a - 1e-6 for a, b in zip(sparse, sparse[1:]))
    assert sparse == pytest.approx(dense, rel=1e-4)


def test_bad_sparse_input_is_a_clear_error():
    with pytest.raises(ValueError, match="NaN or infinite"):
        SparseRows(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        SparseRows(torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point"):
        SparseRows(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="no rows"):
        SparseRows(torch.zeros(0, 4))
    x = _binary(50, 6)
    bmm = BernoulliMixture(num_components=2, dim=6)
    with pytest.raises(TypeError, match="SparseRows"):  # a raw CSR tensor is not chunkable
        em.fit(bmm.model, bmm.guide, x.to_sparse_csr())
    with pytest.raises(ValueError, match="binary data"):
        em.fit(bmm.model, bmm.guide, SparseRows(0.5 * x))
    with pytest.raises(ValueError, match="shape"):  # rows of the wrong width
        em.fit(bmm.model, bmm.guide, SparseRows(_binary(50, 7)))
    gmm = GaussianMixture(num_components=2, dim=6)
    with pytest.raises(TypeError, match="GaussianMixture takes dense data"):
        em.fit(gmm.model, gmm.guide, SparseRows(x))
