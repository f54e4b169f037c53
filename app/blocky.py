"""Drawings enlarged without smoothing (a pixel-art digit, an 8x8 sketch blown up to 200 px): found by their
run lengths, all near multiples of one block side, and read at the size they were drawn. Part of
`app.preprocess` (its constants are in PREPROCESS_HASH).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.percentile import percentile_f32

F32 = npt.NDArray[np.float32]

BLOCK_MIN: Final = 4  # a drawing enlarged without smoothing, by this factor or more, is read at its own size
BLOCK_MAX: Final = 64
BLOCK_AGREE: Final = 0.9  # share of the ink's run lengths that must be multiples of the block side
BLOCK_CELLS: Final = 5  # ... and the drawing at least this many blocks long
BLOCK_STEP: Final = 0.05  # block sides tried, from the largest down, in these steps
BLOCK_MIN_RUNS: Final = 16  # fewer runs than this say nothing
BLOCK_MAX_RUNS: Final = 256  # more are thinned to this many, evenly


def _run_lengths(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    """Lengths of the interior runs (ink or paper) along every row, and where each starts."""
    change = mask[:, 1:] != mask[:, :-1]
    rows, cols = np.nonzero(change)
    same_row = rows[1:] == rows[:-1]
    return np.asarray((cols[1:] - cols[:-1])[same_row], dtype=np.intp)


def block_side(mask: npt.NDArray[np.bool_]) -> float:
    """f when the ink is a small drawing enlarged f times without smoothing (runs near multiples of f), else 1."""
    runs = np.concatenate([_run_lengths(mask), _run_lengths(mask.T)]).astype(np.float32)
    top = min(BLOCK_MAX, max(mask.shape) / BLOCK_CELLS)
    runs = runs[runs >= BLOCK_MIN - 1]  # one-pixel runs are JPEG's or the reduction's, not the drawing's
    if runs.size < BLOCK_MIN_RUNS or top <= BLOCK_MIN:
        return 1.0
    runs = runs[:: -(-runs.size // BLOCK_MAX_RUNS)]
    # The shortest runs of a blocky drawing are one, two or three blocks: the sides to try lie near them.
    short = percentile_f32(runs, 10.0)
    near = np.arange(short + 1.0, short - 1.0, -BLOCK_STEP, dtype=np.float32)
    sides = np.sort(np.concatenate([near, near / 2, near / 3]))[::-1]
    sides = sides[(sides >= BLOCK_MIN) & (sides <= top)][:, None]  # largest first
    if sides.size == 0:
        return 1.0
    multiples = np.maximum(1.0, np.rint(runs / sides)) * sides
    # An edge may move by a pixel (JPEG, a non-integer enlargement), by half a pixel at small factors.
    slack = np.where(sides < 2 * BLOCK_MIN, 0.5, 1.0)
    agree = np.count_nonzero(np.abs(runs - multiples) <= slack, axis=1) >= BLOCK_AGREE * runs.size
    return float(sides[int(np.argmax(agree)), 0]) if agree.any() else 1.0


def unblock(crop: F32, mask: npt.NDArray[np.bool_], inked: npt.NDArray[np.bool_],
             side: float) -> tuple[F32, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """The crop reduced by the block side (box averaging): the small drawing it was enlarged from.

    The crop starts and ends at the ink's edges, which are block edges, so the blocks line up."""
    h, w = crop.shape
    size = (max(1, round(w / side)), max(1, round(h / side)))

    def shrink(a: F32) -> F32:
        return np.asarray(Image.fromarray(a, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)

    small_mask = shrink(mask.astype(np.float32)) >= 0.5
    if not small_mask.any():
        return crop, mask, inked
    return shrink(crop), small_mask, shrink(inked.astype(np.float32)) > 0
