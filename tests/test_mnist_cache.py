"""The preprocessed MNIST cache carries a checksum: a truncated or bit-flipped file is deleted and rebuilt,
never trusted and never a reason for a job to fail (and be retried into failure)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from worker import data as mnist
from worker.data import FULL_TEST, FULL_TRAIN, load_mnist


def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (FULL_TRAIN, 28, 28), dtype=np.uint8), rng.integers(0, 10, FULL_TRAIN),
            rng.integers(0, 256, (FULL_TEST, 28, 28), dtype=np.uint8), rng.integers(0, 10, FULL_TEST))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A whole cache file as the worker writes it (random images: what matters is the file, not the digits)."""
    path = mnist.cache_path(tmp_path_factory.mktemp("cache"))
    mnist._write_cache(path, *_arrays())
    return path.read_bytes()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _bit_flipped(data: bytes) -> bytes:
    middle = len(data) // 2  # inside the image arrays, where a zip's own checks would not look before reading
    return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :]


def test_a_whole_cache_checks_out_and_is_used(tmp_path: Path, pristine: bytes) -> None:
    mnist.cache_path(tmp_path).write_bytes(pristine)
    splits = load_mnist(tmp_path, val_size=1000)
    tx, _, sx, _ = _arrays()
    np.testing.assert_array_equal(splits.train_x.numpy(), tx[: FULL_TRAIN - 1000])
    np.testing.assert_array_equal(splits.test_x.numpy(), sx)
    assert pristine.startswith(mnist.CACHE_MAGIC)


@pytest.mark.parametrize("damage", [_truncated, _bit_flipped, lambda d: d[len(mnist.CACHE_MAGIC) + 65 :]],
                         ids=["truncated", "bit-flipped", "no-checksum"])
def test_a_damaged_cache_is_deleted_and_the_run_goes_on(
    tmp_path: Path, pristine: bytes, damage: object, caplog: pytest.LogCaptureFixture,
) -> None:
    assert callable(damage)
    path = mnist.cache_path(tmp_path)
    path.write_bytes(damage(pristine))
    with caplog.at_level(logging.WARNING, logger="worker.data"):
        splits = load_mnist(tmp_path, val_size=8, limit=16)  # from the real MNIST, as if there were no cache
    assert not path.exists(), "a damaged cache is deleted, so it is rebuilt rather than read again"
    assert "unusable" in caplog.text
    assert splits.train_x.shape == (16, 28, 28)
    assert splits.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the real MNIST, not the damaged random cache


def test_a_full_run_rebuilds_a_damaged_cache(tmp_path: Path, pristine: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Preprocessing 70,000 images takes minutes on 2 cores; what is checked here is the file, so it is skipped.
    monkeypatch.setattr(mnist, "preprocess_images", lambda images, workers=1: images)
    path = mnist.cache_path(tmp_path)
    path.write_bytes(_bit_flipped(pristine))
    first = load_mnist(tmp_path, val_size=1000)
    rebuilt = path.read_bytes()
    assert rebuilt.startswith(mnist.CACHE_MAGIC) and rebuilt != _bit_flipped(pristine)
    second = load_mnist(tmp_path, val_size=1000)  # read back from the rebuilt cache
    assert path.read_bytes() == rebuilt
    np.testing.assert_array_equal(first.train_x.numpy(), second.train_x.numpy())
    assert len(second.train_x) == FULL_TRAIN - 1000
