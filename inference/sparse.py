"""
Mostly-zero data, such as binarized images, stored so that its two matrix products skip the zeros.

    rows = SparseRows(x)                    # x: (N, D), mostly zeros; stored as CSR
    result = em.fit(model.model, model.guide, rows)

A binarized MNIST digit has about 13 % of its pixels lit. An EM iteration of a mixture of
Bernoulli products is two matrix products over the data, x @ W (E-step) and R^T @ x (M-step
statistics); on the nonzeros alone they do about an eighth of the dense work. ``SparseRows`` holds
the rows as one CSR tensor and, beside it, the CSR of the transpose of every tile of 2048 rows,
because a product with the transpose of a CSR tensor that is not stored reads memory in an order
that made it 80x slower on MNIST than with the stored transpose, and one transpose of all rows
was 3x slower than tiles small enough that the rows of R a tile touches stay in the cache.

A driver iterates ``chunks(size)``; a model sees each chunk as an ordinary ``torch.Tensor`` with
``layout == torch.sparse_csr`` whose products ``x @ w`` work as for a dense tensor, and computes
``x^T @ y`` with ``t_matmul(x, y)``, which uses the stored transposes when there are any.
Nothing here knows about any model.
"""

import contextlib
import warnings
from typing import List, Tuple

import torch


class SparseRows:
    """The rows of an (N, D) float tensor as CSR, with the transposes of its row tiles stored.

    Args:
        x: a dense (N, D) floating-point tensor with no NaN or infinite values, or a CSR tensor.
        tile_rows: rows per stored transpose; 2048 keeps a tile's share of the (N, K)
            responsibilities in the cache for K up to a few hundred (measured on MNIST: the M-step
            product ran 2-3x faster in tiles of 2048 rows than in one piece of 50000).

    ``chunks(size)`` cuts the rows into chunks of about ``size`` rows (a multiple of
    ``tile_rows``) for a driver's pass over the data: few chunks, because the model runs once per
    chunk, while the M-step product runs tile by tile inside each chunk (``t_matmul``).
    """

    def __init__(self, x: torch.Tensor, tile_rows: int = 2048):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseRows needs a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"SparseRows needs a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"SparseRows needs a floating-point tensor, got dtype {x.dtype}")
        if len(x) == 0:
            raise ValueError("SparseRows got no rows (N = 0)")
        if tile_rows < 1:
            raise ValueError(f"tile_rows must be at least 1, got {tile_rows}")
        x = x.to_dense() if x.layout != torch.strided else x
        if not torch.isfinite(x).all():
            raise ValueError("SparseRows got NaN or infinite values")
        self.shape = x.shape
        self.dtype, self.device = x.dtype, x.device
        self.tile_rows = tile_rows
        self.csr = _csr(x)
        self.nnz = int(self.csr.values().numel())
        self._tiles = [_csr(x[i : i + tile_rows].T) for i in range(0, len(x), tile_rows)]
        self._chunks = {}  # rows per chunk -> the chunks, made once

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self):
        return (
            f"SparseRows({self.shape[0]} x {self.shape[1]}, density {self.density:.3f}, "
            f"{self.dtype}, transposes stored in tiles of {self.tile_rows} rows)"
        )

    @property
    def density(self) -> float:
        """The fraction of entries that are stored (nonzero)."""
        return self.nnz / (self.shape[0] * self.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a CSR tensor that shares memory with the whole."""
        stop = min(stop, len(self))
        crow = self.csr.crow_indices()[start : stop + 1]
        first, last = int(crow[0]), int(crow[-1])
        return torch.sparse_csr_tensor(
            crow - first,
            self.csr.col_indices()[first:last],
            self.csr.values()[first:last],
            size=(stop - start, self.shape[1]),
            check_invariants=False,  # slices of a valid CSR tensor are valid
        )

    def chunks(self, size: int) -> List[Tuple[int, torch.Tensor]]:
        """``(first row, CSR chunk)`` pairs covering the rows in order, each chunk a whole
        number of tiles of about ``size`` rows, its transpose known to ``t_matmul``."""
        tiles = max(1, round(size / self.tile_rows))
        if tiles not in self._chunks:
            made = []
            for j in range(0, len(self._tiles), tiles):
                start = j * self.tile_rows
                chunk = self.rows(start, start + tiles * self.tile_rows)
                last = min(j + tiles, len(self._tiles))
                # (first row within the chunk, CSR of that tile's transpose), for t_matmul
                chunk.row_tiles = [
                    (i * self.tile_rows - start, self._tiles[i]) for i in range(j, last)
                ]
                made.append((start, chunk))
            self._chunks[tiles] = made
        return self._chunks[tiles]

    def to_dense(self) -> torch.Tensor:
        return self.csr.to_dense()


def _csr(x: torch.Tensor) -> torch.Tensor:
    """CSR of a dense matrix, with 32-bit indices where they fit: the sparse kernels want them
    and would otherwise convert the indices on every product (measured: 20 % of an EM iteration
    at K = 10 on MNIST)."""
    with _beta_ok():
        csr = x.contiguous().to_sparse_csr()
    if csr.values().numel() >= 2**31 - 1 or max(x.shape) >= 2**31 - 1:
        return csr
    return torch.sparse_csr_tensor(
        csr.crow_indices().int(),
        csr.col_indices().int(),
        csr.values(),
        size=csr.shape,
        check_invariants=False,  # the indices of a valid CSR tensor, narrowed
    )


def t_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^T @ y for a dense x, or for a CSR x (fast when it is a chunk of ``SparseRows``)."""
    if x.layout == torch.strided:
        return x.T @ y
    tiles = getattr(x, "row_tiles", None)
    if tiles is None:  # a CSR tensor from elsewhere: transpose it (a sort of its entries)
        with _beta_ok():
            return x.t().to_sparse_csr() @ y
    out = None
    for start, transpose in tiles:  # sum over the tiles of tile^T @ (its rows of y)
        part = transpose @ y[start : start + transpose.shape[1]]
        out = part if out is None else out.add_(part)
    return out


@contextlib.contextmanager
def _beta_ok():
    """Silence torch's warning that CSR support is "in beta": the operations used here are
    tested (tests/test_sparse.py) against their dense equivalents."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        yield


def values(x: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor, or the tensor itself: what value checks look at."""
    return x if x.layout == torch.strided else x.values()
