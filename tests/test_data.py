import random
import re

import numpy as np
import pytest
import torch

from resnorm import _checks
from resnorm.data import DataSplit, cache_dir, load_dataset, load_mnist1d, mnist1d
from resnorm.data import base as data_base
from resnorm.errors import UsageError


def test_mnist1d_shapes_dtypes_and_split():
    data = load_mnist1d(500, seed=3)
    assert isinstance(data, DataSplit)
    assert data.x_train.shape == (400, 40) and data.x_test.shape == (100, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.sample_shape == (40,)
    labels = torch.cat([data.y_train, data.y_test])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    assert "400 train / 100 test" in data.summary()
    # make_dataset standardizes the whole set to mean 0, std 1.
    x = torch.cat([data.x_train, data.x_test])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_mnist1d_is_deterministic_and_cached_equal_to_fresh():
    cached = load_mnist1d(300, seed=1)
    again = load_mnist1d(300, seed=1)
    fresh = load_mnist1d(300, seed=1, cache=False)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(cached, name), getattr(again, name))
        assert torch.equal(getattr(cached, name), getattr(fresh, name))
    other = load_mnist1d(300, seed=2)
    assert not torch.equal(cached.x_train, other.x_train)
    files = list(cache_dir().glob("mnist1d-*.npz"))
    assert files and not list(cache_dir().glob("*.tmp"))


def test_mnist1d_restores_global_random_state():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(200, seed=9, cache=False)
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_corrupted_cache_file_is_rebuilt():
    good = load_mnist1d(200, seed=5)
    path = next(
        p
        for p in cache_dir().glob("mnist1d-*.npz")
        if data_base.load_arrays(p) is not None
        and np.array_equal(data_base.load_arrays(p)["x_train"], good.x_train.numpy())
    )
    path.write_bytes(b"not an npz file")
    rebuilt = load_mnist1d(200, seed=5)
    assert torch.equal(rebuilt.x_train, good.x_train)
    assert data_base.load_arrays(path) is not None


def test_cache_refuses_pickled_content(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))  # an object array needs pickle
    assert data_base.load_arrays(path) is None


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "arrays.npz"

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(data_base.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        data_base.save_arrays(target, x=np.zeros(3))
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNORM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RESNORM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "resnorm"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 5}, "num_samples must be an integer >= 10"),
        ({"num_samples": 100, "train_split": 1.5}, r"train_split must be in \(0, 1\)"),
        ({"num_samples": 100, "seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_mnist1d_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnist1d(**kwargs)


def test_mnist1d_too_large_for_memory_is_refused_before_generating(monkeypatch):
    """make_dataset loops in Python per sample: without the check, 10^11 samples would run
    for days before running out of memory."""
    monkeypatch.setattr(_checks, "physical_memory", lambda: 16 * 2**30)

    def no_generating(*args):
        raise AssertionError("started generating before checking num_samples")

    monkeypatch.setattr(mnist1d, "_generate", no_generating)
    with pytest.raises(
        UsageError,
        match=re.escape(
            "MNIST-1D with num_samples=99999999999 would need 223,517 GiB (about 2,400 bytes "
            "per sample while generating), more than this machine's 16 GiB of memory"
        ),
    ):
        load_dataset("mnist1d", num_samples=99999999999)
    # A size that fits still gets as far as generating.
    with pytest.raises(AssertionError, match="started generating"):
        load_mnist1d(1_000_000, cache=False)


def test_a_split_moves_to_a_device_whole_and_stays_put_where_it_is():
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    split = DataSplit("tiny", x[:4], y[:4], x[4:], y[4:], 3, "about")
    same = split.to("cpu")
    assert same.x_train is split.x_train and same.y_test is split.y_test  # no copy
    moved = split.to("meta")
    assert {t.device.type for t in (moved.x_train, moved.y_train, moved.x_test, moved.y_test)} == {
        "meta"
    }
    assert (moved.name, moved.num_classes, moved.description) == ("tiny", 3, "about")
    assert split.x_train.device.type == "cpu"
