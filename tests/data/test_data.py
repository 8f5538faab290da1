"""Tests for `ulr.data`. None of them touches the network."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ulr.data
from ulr.data import Dataset, available, batches, load, read_idx
from ulr.data import _loaders as loaders
from ulr.data import fashion_mnist as fm
from ulr.data._dataset import stratified_split
from ulr.data.idx import parse_idx

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_MNIST1D = importlib.util.find_spec("mnist1d") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None

needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed")


# ---------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write `arr` as an IDX file (gzip-compressed if `path` ends in .gz)."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
    codes |= {np.float32: 0x0D, np.float64: 0x0E}
    code = codes[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.reshape(len(x), -1).numpy()
    return a[np.lexsort(a.T[::-1])]


def check_classification(ds: Dataset, input_shape: tuple[int, ...], unit_range: bool = True):
    assert ds.task == "classification" and ds.num_classes == 10
    assert ds.input_shape == input_shape
    for x, y in (ds.train, ds.val, ds.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), *input_shape) and y.shape == (len(y),)
        assert torch.isfinite(x).all()
        if len(y) == 0:
            continue
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
        if unit_range:
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(ds.train[1].tolist()) == set(range(10))


def assert_same(a: Dataset, b: Dataset) -> None:
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """No env var, an empty cache and no system directory: nothing can be found."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-dir")
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the network must not be touched")

    monkeypatch.setattr(fm, "_fetch", fail)


def make_fake_fashion(directory: Path, monkeypatch, n_train: int = 40, n_test: int = 20):
    """Write small fake Fashion-MNIST files and make their checksums the expected ones."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (stem, _) in fm.FILES.items():
        path = write_idx(directory / f"{stem}.gz", arrays[key])
        files[key] = (stem, hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest())
    monkeypatch.setattr(fm, "FILES", files)
    return arrays


# ---------------------------------------------------------------------------- registry / API


def test_public_api():
    assert sorted(ulr.data.__all__) == sorted(
        ["Dataset", "available", "batches", "download_fashion_mnist", "load", "read_idx"]
    )
    assert available() == [
        "digits",
        "mnist-subset",
        "fashion-mnist",
        "mnist1d",
        "adding",
        "sequential-digits",
        "karate",
        "sbm",
    ]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'") as info:
        load("cifar10")
    for name in available():
        assert name in str(info.value)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        load("adding", val_fraction=fraction)


def test_unexpected_kwarg():
    with pytest.raises(TypeError, match="seq_len"):
        load("adding", bogus=1)


def test_stratified_split_partitions():
    y = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    rest, held = stratified_split(y, 0.2, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate([rest, held])), np.arange(len(y)))
    assert np.bincount(y[held]).tolist() == [2, 4, 6, 8, 10]
    rest0, held0 = stratified_split(y, 0.0, np.random.default_rng(0))
    assert len(held0) == 0 and len(rest0) == len(y)


# ---------------------------------------------------------------------------- digits


@needs_sklearn
def test_digits_shapes_and_partition():
    ds = load("digits")
    check_classification(ds, (1, 8, 8))
    sizes = [len(ds.train[1]), len(ds.val[1]), len(ds.test[1])]
    assert sum(sizes) == 1797
    assert abs(sizes[2] - 0.2 * 1797) <= 10 and abs(sizes[1] - 0.1 * (1797 - sizes[2])) <= 10
    # The three splits are exactly a partition of the full data set (as a multiset of rows).
    from sklearn.datasets import load_digits

    full = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    joined = torch.cat([ds.train[0], ds.val[0], ds.test[0]])
    assert np.array_equal(sorted_rows(joined), sorted_rows(full))


@needs_sklearn
def test_digits_determinism():
    a, b, c = load("digits", seed=0), load("digits", seed=0), load("digits", seed=1)
    assert_same(a, b)
    assert not torch.equal(a.train[0], c.train[0])
    # The test split is fixed across seeds; only train/val change.
    assert torch.equal(a.test[0], c.test[0]) and torch.equal(a.test[1], c.test[1])


@needs_sklearn
def test_digits_no_validation_and_flatten():
    ds = load("digits", val_fraction=0.0, flatten=True)
    assert ds.val[0].shape == (0, 64) and ds.val[1].shape == (0,)
    assert ds.input_shape == (64,) and ds.input_dim == 64
    assert ds.train[0].shape == (len(ds.train[1]), 64)


@needs_sklearn
def test_sequential_digits_matches_digits():
    seq, img = load("sequential-digits", seed=3), load("digits", seed=3)
    check_classification(seq, (8, 8))
    assert torch.equal(seq.train[0], img.train[0].squeeze(1))
    assert torch.equal(seq.test[1], img.test[1])


def test_missing_sklearn_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(loaders, "_digits_arrays", loaders._digits_arrays.__wrapped__)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"scikit-learn.*constraints/cpu\.txt"):
        load("digits")


# ---------------------------------------------------------------------------- mnist-subset


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed (pip install ulr[data])")
def test_mnist_subset():
    ds = load("mnist-subset")
    check_classification(ds, (1, 28, 28))
    assert (len(ds.train[1]), len(ds.val[1]), len(ds.test[1])) == (3600, 400, 1000)
    assert torch.bincount(ds.test[1]).tolist() == [100] * 10
    other = load("mnist-subset", seed=1)
    assert not torch.equal(ds.train[1], other.train[1])
    assert torch.equal(ds.test[0], other.test[0])


def test_missing_mlxtend_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(loaders, "_mnist_subset_arrays", loaders._mnist_subset_arrays.__wrapped__)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install -c constraints/cpu\.txt 'ulr\[data\]'"):
        load("mnist-subset")


# ---------------------------------------------------------------------------- mnist1d


@pytest.mark.skipif(not HAS_MNIST1D, reason="mnist1d not installed (pip install ulr[data])")
def test_mnist1d_shapes_determinism_and_global_rng():
    loaders._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    ds = load("mnist1d")
    assert (np.random.rand(), random.random()) == expected, "global RNG state was changed"

    check_classification(ds, (1, 40), unit_range=False)
    assert (len(ds.train[1]) + len(ds.val[1]), len(ds.test[1])) == (4000, 1000)
    assert abs(len(ds.val[1]) - 400) <= 10
    assert_same(ds, load("mnist1d"))
    other = load("mnist1d", seed=1)
    assert not torch.equal(ds.train[1], other.train[1])
    assert torch.equal(ds.test[0], other.test[0])


# ---------------------------------------------------------------------------- adding


def test_adding_problem():
    ds = load("adding", seq_len=20, n_train=300, n_val=50, n_test=40)
    assert ds.task == "regression" and ds.num_classes == 0 and ds.input_shape == (20, 2)
    for (x, y), n in zip((ds.train, ds.val, ds.test), (300, 50, 40), strict=True):
        assert x.shape == (n, 20, 2) and y.shape == (n,)
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        values, markers = x[..., 0], x[..., 1]
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
        assert set(markers.unique().tolist()) <= {0.0, 1.0}
        assert (markers[:, :10].sum(1) == 1).all() and (markers[:, 10:].sum(1) == 1).all()
        torch.testing.assert_close(y, (values * markers).sum(1))
    assert_same(ds, load("adding", seq_len=20, n_train=300, n_val=50, n_test=40))
    other = load("adding", seed=1, seq_len=20, n_train=300, n_val=50, n_test=40)
    assert not torch.equal(ds.train[0], other.train[0])
    assert torch.equal(ds.test[0], other.test[0])


def test_adding_defaults():
    ds = load("adding")
    assert [len(s[1]) for s in (ds.train, ds.val, ds.test)] == [10_000, 1_000, 1_000]
    assert ds.input_shape == (50, 2)
    with pytest.raises(ValueError, match="seq_len"):
        load("adding", seq_len=1)


# ---------------------------------------------------------------------------- batches


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_example_once(shuffle):
    x = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(103)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs
        got = list(batches(x, y, 10, shuffle=shuffle, generator=gen))
        assert [len(b[1]) for b in got] == [10] * 10 + [3]
        seen = torch.cat([b[1] for b in got])
        assert sorted(seen.tolist()) == list(range(103))
        assert torch.equal(torch.cat([b[0] for b in got]).squeeze(1).long(), seen)
        assert torch.equal(seen, y) != shuffle


def test_batches_determinism_and_options():
    x, y = torch.randn(50, 3), torch.arange(50)

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([b for _, b in batches(x, y, 8, shuffle=True, generator=gen)])

    assert torch.equal(epoch(0), epoch(0)) and not torch.equal(epoch(0), epoch(1))
    dropped = list(batches(x, y, 8, shuffle=False, drop_last=True))
    assert [len(b) for _, b in dropped] == [8] * 6
    with pytest.raises(ValueError, match="generator"):
        list(batches(x, y, 8, shuffle=True))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(x, y, 0, shuffle=False))
    with pytest.raises(ValueError, match="differ in length"):
        list(batches(x, y[:-1], 8, shuffle=False))


# ---------------------------------------------------------------------------- IDX parser


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.array([[-7, 70000], [1, 2]], dtype=np.int32),
        np.array([1.5, -2.25], dtype=np.float64),
        np.array([[0.5, 2.0]], dtype=np.float32),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, arr, suffix):
    out = read_idx(write_idx(tmp_path / f"a-idx{suffix}", arr))
    assert out.shape == arr.shape and out.dtype == arr.dtype
    assert np.array_equal(out, arr)
    out[...] = 0  # writable


def test_idx_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 5, 5), dtype=np.uint8)).read_bytes()

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good[:-7])
    with pytest.raises(ValueError, match=r"truncated-idx3-ubyte.*truncated or corrupt"):
        read_idx(truncated)

    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="bad-magic: not an IDX file"):
        read_idx(bad_magic)

    with pytest.raises(ValueError, match="unknown IDX data type"):
        parse_idx(b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"x")
    with pytest.raises(ValueError, match="truncated IDX header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00")

    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(cut_gz)

    garbage_gz = tmp_path / "garbage.gz"
    garbage_gz.write_bytes(b"\x1f\x8b" + b"not really gzip" * 3)
    with pytest.raises(ValueError, match=r"garbage\.gz: corrupt or truncated gzip"):
        read_idx(garbage_gz)

    gunzipped = tmp_path / "gunzipped-but-named.gz"  # compression is detected from the content
    gunzipped.write_bytes(good)
    assert read_idx(gunzipped).shape == (4, 5, 5)

    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------------------- Fashion-MNIST files


def test_fashion_missing_files_error(tmp_path, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load("fashion-mnist", root=empty)
    msg = str(info.value)
    assert str(empty) in msg and "train-images-idx3-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg


def test_fashion_missing_everywhere_error(isolated_search, no_network, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(isolated_search / "env"))
    with pytest.raises(FileNotFoundError) as info:
        load("fashion-mnist")
    msg = str(info.value)
    for place in ("env", "no-system-dir", str(Path("cache") / "ulr" / "fashion-mnist")):
        assert place in msg


def test_fashion_load_from_root_and_env(tmp_path, monkeypatch, isolated_search, no_network):
    arrays = make_fake_fashion(tmp_path / "data" / "fashion-mnist", monkeypatch)
    ds = load("fashion-mnist", root=tmp_path / "data", val_fraction=0.25, seed=0)
    check_classification(ds, (1, 28, 28))
    assert (len(ds.train[1]), len(ds.val[1]), len(ds.test[1])) == (30, 10, 20)
    expected = torch.from_numpy(arrays["test_images"]).float().div(255).unsqueeze(1)
    assert torch.equal(ds.test[0], expected)
    joined = torch.cat([ds.train[0], ds.val[0]])
    full = torch.from_numpy(arrays["train_images"]).float().div(255)
    assert np.array_equal(sorted_rows(joined), sorted_rows(full))

    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "data"))
    assert_same(ds, load("fashion-mnist", val_fraction=0.25, seed=0))
    assert not torch.equal(ds.val[1], load("fashion-mnist", val_fraction=0.25, seed=5).val[1])


def test_fashion_checksum_mismatch_at_load(tmp_path, no_network):
    for stem, _ in fm.FILES.values():
        shape = (3, 28, 28) if "images" in stem else (3,)
        write_idx(tmp_path / f"{stem}.gz", np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not the official"):
        load("fashion-mnist", root=tmp_path)


def test_download_checksum_mismatch_writes_nothing(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, dest, timeout):
        calls.append(url)
        dest.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))

    monkeypatch.setattr(fm, "_fetch", fake_fetch)
    with pytest.raises(ValueError, match="checksum mismatch for train-images-idx3-ubyte.gz"):
        load("fashion-mnist", root=tmp_path, download=True)
    assert len(calls) == len(fm.MIRRORS)
    assert list(tmp_path.iterdir()) == []  # no partial or unverified file left behind


def test_download_network_failure_message(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, dest, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fm, "_fetch", offline)
    with pytest.raises(ConnectionError) as info:
        ulr.data.download_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert "name resolution" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []


def test_download_success_is_atomic_and_skips_valid_files(tmp_path, monkeypatch):
    source = tmp_path / "source"
    arrays = make_fake_fashion(source, monkeypatch)
    calls = []

    def fake_fetch(url, dest, timeout):
        calls.append(url)
        if url.startswith(fm.MIRRORS[0]) and "t10k-labels" in url:
            raise OSError("mirror down")  # falls back to the second mirror
        dest.write_bytes((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(fm, "_fetch", fake_fetch)
    dest = tmp_path / "dest"
    ds = load("fashion-mnist", root=dest, download=True, val_fraction=0.0)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s, _ in fm.FILES.values())
    assert len(calls) == 5
    assert sorted(ds.train[1].tolist()) == sorted(arrays["train_labels"].tolist())
    assert torch.equal(ds.test[1], torch.from_numpy(arrays["test_labels"]).long())
    assert fm.download(dest) == dest and len(calls) == 5  # valid files are not fetched again


# ---------------------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(
    fm.find_files() is None,
    reason="Fashion-MNIST files absent (apt-get install dataset-fashion-mnist or set ULR_DATA_DIR)",
)
def test_real_fashion_mnist(no_network):
    ds = load("fashion-mnist", val_fraction=0.0)
    check_classification(ds, (1, 28, 28))
    assert (len(ds.train[1]), len(ds.val[1]), len(ds.test[1])) == (60_000, 0, 10_000)
    assert torch.bincount(ds.train[1]).tolist() == [6000] * 10
    assert torch.bincount(ds.test[1]).tolist() == [1000] * 10
    split = load("fashion-mnist")
    assert (len(split.train[1]), len(split.val[1])) == (54_000, 6_000)
    assert torch.bincount(split.val[1]).tolist() == [600] * 10
