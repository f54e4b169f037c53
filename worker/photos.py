"""Training sees what serving sees: photo-like renders of MNIST *training* digits, preprocessed as /v1/read does.

A fixed share of the training digits (and, from its own digits, of the validation split) is replaced by
the same digit rendered as a photo (`app.photo.render_photo`, every condition in turn) and run through
`app.preprocess.preprocess`, the very function that reads an upload: decoding, lighting, crop, stroke
width, centring. Which digits, which condition and every random choice follow from the digit's index, so
the result is the same on every run. Test digits are never rendered here (the test split stays plain MNIST;
our photo set is made from test digits by `bench/photo_set.py`).

The renders of the full 60k are cached beside the MNIST cache, keyed on the preprocess hash, the renderer
version and the share; a limited run (TRAIN__LIMIT) renders only what it needs.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from app.files import write_atomic
from app.photo import CONDITIONS, RENDERER_VERSION, render_photo
from app.preprocess import PREPROCESS_HASH, PreprocessError, preprocess

log = logging.getLogger(__name__)

SEED: Final = 60_000  # not the photo set's seed: other digits, other draws
_PARALLEL_FROM: Final = 400

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


def chosen(total: int, share: float) -> I64:
    """The sorted indices (of `total` training digits) that are shown as photos: a fixed random share."""
    count = round(total * share)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(SEED).permutation(total)[:count]).astype(np.int64)


def render_one(digit: U8, index: int) -> U8:
    """Digit `index` of the training set as a photo, preprocessed: the 28x28 the network will see."""
    condition = CONDITIONS[index % len(CONDITIONS)]
    data = render_photo(digit, condition, np.random.default_rng([SEED, RENDERER_VERSION, index]))
    try:
        return preprocess(data).preview
    except PreprocessError:
        # /v1/read would refuse this photo; the network sees the plain digit instead.
        return np.asarray(preprocess(_png(digit), invert=False).preview, dtype=np.uint8)


def _png(digit: U8) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(digit).save(out, format="PNG")
    return out.getvalue()


def _render_chunk(job: tuple[U8, I64]) -> U8:
    digits, indices = job
    out = np.empty((len(indices), 28, 28), dtype=np.uint8)
    for i, (digit, index) in enumerate(zip(digits, indices, strict=True)):
        out[i] = render_one(digit, int(index))
    return out


def render_many(digits: U8, indices: I64, workers: int = 1) -> U8:
    """`render_one` for each (digit, index), over `workers` processes."""
    if workers <= 1 or len(indices) < _PARALLEL_FROM:
        return _render_chunk((digits, indices))
    parts = [(d, i) for d, i in zip(np.array_split(digits, workers * 4), np.array_split(indices, workers * 4),
                                    strict=True)]
    # spawn, not fork: this may run inside an RQ work-horse whose torch thread pool must not be forked.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_render_chunk, parts)))


def cache_path(cache_dir: Path, share: float) -> Path:
    return cache_dir / f"photos-{PREPROCESS_HASH[:16]}-r{RENDERER_VERSION}-s{round(share * 10_000)}.npz"


def full_renders(cache_dir: Path, raw_train: U8, share: float, workers: int) -> tuple[I64, U8]:
    """(indices, preprocessed renders) for the chosen share of the 60k, from the cache or made once."""
    path = cache_path(cache_dir, share)
    indices = chosen(len(raw_train), share)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                cached_idx, images = z["indices"], z["images"]
            if np.array_equal(cached_idx, indices) and images.shape == (len(indices), 28, 28):
                return indices, images
        except (OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable photo cache %s: %s", path, exc)
    images = render_many(raw_train[indices], indices, workers)
    buf = io.BytesIO()
    np.savez(buf, indices=indices, images=images)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return indices, images
