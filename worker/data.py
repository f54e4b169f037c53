"""MNIST for training: the raw digits (app/mnist.py, allow-listed unpickling), preprocessed, cached as uint8.

Every image goes through
`app.preprocess.preprocess_gray(img, invert=False)`, the very function that serves `/v1/read`, and the
result is cached under `DATA_DIR/cache` keyed by `PREPROCESS_HASH`, so a change of preprocessing makes
a new cache and `preprocess_hash` in the manifest stays honest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Final

import numpy as np
import torch

from app.files import write_atomic
from app.mnist import FULL_TEST, FULL_TRAIN, I64, SIDE, U8, MnistUnavailableError, load_raw
from app.preprocess import PREPROCESS_HASH, PreprocessError, preprocess_gray

log = logging.getLogger(__name__)

__all__ = ["FULL_TEST", "FULL_TRAIN", "MnistSplits", "MnistUnavailableError", "load_mnist", "load_raw",
           "preprocess_images"]

_PARALLEL_FROM: Final = 4000  # below this many images a process pool costs more than it saves


def _preprocess_chunk(images: U8) -> U8:
    out = np.empty_like(images)
    for i, img in enumerate(images):
        try:
            out[i] = preprocess_gray(img, invert=False).preview
        except PreprocessError:
            # No digit found: the network sees what /v1/read would refuse, so keep the image as it came.
            out[i] = img
    return out


def preprocess_images(images: U8, workers: int = 1) -> U8:
    """Run `preprocess_gray(img, invert=False)` on each 28x28 image, over `workers` processes."""
    if workers <= 1 or len(images) < _PARALLEL_FROM:
        return _preprocess_chunk(images)
    chunks = np.array_split(images, workers * 4)
    # spawn, not fork: this may run inside an RQ work-horse whose torch thread pool must not be forked.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_preprocess_chunk, chunks)))


def cache_path(cache_dir: Path) -> Path:
    return cache_dir / f"mnist-{PREPROCESS_HASH[:16]}.npz"


# The cache file: this line, the SHA-256 of the rest in hex, a newline, then the npz. A file that does not
# check out (truncated, bit-flipped, an older format) is deleted and rebuilt, never trusted or retried.
CACHE_MAGIC: Final = b"digits-mnist-cache sha256 "
_HEADER_LEN: Final = len(CACHE_MAGIC) + 64 + 1


def _write_cache(path: Path, train_x: U8, train_y: I64, test_x: U8, test_y: I64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    body = buf.getvalue()
    write_atomic(path, CACHE_MAGIC + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body)


def _discard(path: Path, why: str) -> None:
    log.warning("MNIST cache %s is unusable (%s); deleting it, it will be rebuilt", path, why)
    path.unlink(missing_ok=True)


def _read_cache(path: Path) -> tuple[U8, I64, U8, I64] | None:
    """The cached arrays, or None (and the file deleted) when the file is not a whole, intact cache."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("cannot read the MNIST cache %s: %s", path, exc)
        return None
    header, body = data[:_HEADER_LEN], data[_HEADER_LEN:]
    if not header.startswith(CACHE_MAGIC) or not header.endswith(b"\n"):
        _discard(path, "no checksum header")
        return None
    if hashlib.sha256(body).hexdigest().encode("ascii") != header[len(CACHE_MAGIC):-1]:
        _discard(path, "checksum mismatch: truncated or corrupted")
        return None
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            tx, ty, sx, sy = (z["train_x"], z["train_y"], z["test_x"], z["test_y"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        _discard(path, f"{type(exc).__name__}: {exc}")
        return None
    if tx.shape != (FULL_TRAIN, SIDE, SIDE) or sx.shape != (FULL_TEST, SIDE, SIDE) or tx.dtype != np.uint8:
        _discard(path, "unexpected array shapes")
        return None
    return tx, ty.astype(np.int64), sx, sy.astype(np.int64)


def _with_photos(
    cache_dir: Path, train_x: U8, val_x: U8, share: float, limit: int | None, workers: int,
    on_status: Callable[[str], None] | None,
) -> tuple[U8, U8]:
    """train_x and val_x (copies) with their chosen digits replaced by preprocessed photo renders."""
    from worker import photos

    val_start = FULL_TRAIN - len(val_x)
    if limit is None:
        if on_status is not None and not photos.cache_path(cache_dir, share).is_file():
            on_status(f"rendering {share:.0%} of the training digits as photos once (cached beside the MNIST cache)")
        indices, images = photos.full_renders(cache_dir, load_raw()[0], share, workers)
    else:
        every = photos.chosen(FULL_TRAIN, share)
        indices = every[(every < len(train_x)) | (every >= val_start)]
        images = photos.render_many(load_raw()[0][indices], indices, workers)
    train_x, val_x = train_x.copy(), val_x.copy()
    in_train = indices < len(train_x)
    train_x[indices[in_train]] = images[in_train]
    in_val = indices >= val_start
    val_x[indices[in_val] - val_start] = images[in_val]
    return train_x, val_x


@dataclass(frozen=True)
class MnistSplits:
    """Preprocessed uint8 images (N, 28, 28) and int64 labels, as CPU tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _split_bounds(val_size: int, limit: int | None) -> tuple[int, int, int]:
    """(train count, val count, test count). The val split is the tail of the 60k, never trained on."""
    val = min(val_size, FULL_TRAIN - 1)
    train = FULL_TRAIN - val
    test = FULL_TEST
    if limit is not None:
        # A limited run (tests, demos) also evaluates on at most `limit` images of each held-out set.
        train, val, test = min(train, limit), min(val, limit), min(test, limit)
    return train, val, test


def load_mnist(
    cache_dir: Path,
    *,
    val_size: int = 5000,
    limit: int | None = None,
    workers: int = 1,
    on_status: Callable[[str], None] | None = None,
    photo_share: float = 0.0,
) -> MnistSplits:
    """The splits, preprocessed. The full cache is built once (a minute or two); a limited run without
    a cache preprocesses only the images it needs. `photo_share` of the train and validation digits are
    shown as photos instead (worker.photos); the test split stays plain MNIST."""
    n_train, n_val, n_test = _split_bounds(val_size, limit)
    path = cache_path(cache_dir)
    cached = _read_cache(path) if path.is_file() else None  # a bad cache is deleted: the full run rebuilds it
    if cached is not None:
        tx, ty, sx, sy = cached
        train_x, val_x, test_x = tx[:n_train], tx[FULL_TRAIN - n_val :], sx[:n_test]
    else:
        raw_x, ty, raw_sx, sy = load_raw()
        if limit is None:
            if on_status is not None:
                on_status(f"preprocessing 70,000 MNIST images once (cached at {path})")
            tx = preprocess_images(raw_x, workers)
            sx = preprocess_images(raw_sx, workers)
            _write_cache(path, tx, ty, sx, sy)
            train_x, val_x, test_x = tx[:n_train], tx[FULL_TRAIN - n_val :], sx[:n_test]
        else:
            train_x = preprocess_images(raw_x[:n_train], workers)
            val_x = preprocess_images(raw_x[FULL_TRAIN - n_val :], workers)
            test_x = preprocess_images(raw_sx[:n_test], workers)
    if photo_share > 0:
        train_x, val_x = _with_photos(cache_dir, train_x, val_x, photo_share, limit, workers, on_status)
    return MnistSplits(
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(np.ascontiguousarray(ty[:n_train])),
        val_x=torch.from_numpy(np.ascontiguousarray(val_x)),
        val_y=torch.from_numpy(np.ascontiguousarray(ty[FULL_TRAIN - n_val :])),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(np.ascontiguousarray(sy[:n_test])),
    )
