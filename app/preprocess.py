"""Image bytes -> the 1x1x28x28 tensor the network reads, and the 28x28 uint8 it was made from.

One pipeline for serving and training (the worker runs MNIST through `preprocess_gray`), so
`PREPROCESS_HASH` names exactly what a model was trained on. The steps follow the MNIST recipe:
find the ink, crop it, scale the longer side to 20 px, centre by mass in 28x28.

All work is vectorised numpy/Pillow/scipy on an image first reduced to at most `WORK_SIDE` px, so
a 12-megapixel photo costs about what a small one does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

# Blocky drawings (app.blocky): its constants are part of PREPROCESS_HASH too, read from this module's globals.
from app.blocky import BLOCK_AGREE as BLOCK_AGREE
from app.blocky import BLOCK_CELLS as BLOCK_CELLS
from app.blocky import BLOCK_MAX as BLOCK_MAX
from app.blocky import BLOCK_MAX_RUNS as BLOCK_MAX_RUNS
from app.blocky import BLOCK_MIN as BLOCK_MIN
from app.blocky import BLOCK_MIN_RUNS as BLOCK_MIN_RUNS
from app.blocky import BLOCK_STEP as BLOCK_STEP
from app.blocky import block_side, unblock

# Decoding lives in app.decode. Re-exported: what callers have always imported from here, and the
# decoding constants that are part of PREPROCESS_HASH (read from this module's globals).
from app.decode import DEFAULT_MAX_PIXELS, MIN_INK_CONTRAST, check_dimensions
from app.decode import MAX_ASPECT as MAX_ASPECT
from app.decode import MIN_SIDE as MIN_SIDE
from app.decode import U8 as U8
from app.decode import WORK_SIDE as WORK_SIDE
from app.decode import BadDimensionsError as BadDimensionsError
from app.decode import InvalidImageError as InvalidImageError
from app.decode import PreprocessError as PreprocessError
from app.decode import UnsupportedImageTypeError as UnsupportedImageTypeError
from app.decode import decode_gray as decode_gray
from app.decode import sniff_image_type as sniff_image_type
from app.percentile import percentiles

if TYPE_CHECKING:  # torch is imported where a tensor is made, so code that only checks images stays light
    import torch

F32 = npt.NDArray[np.float32]

# Every constant below is part of PREPROCESS_HASH (and WORK_SIDE, MIN_SIDE, MAX_ASPECT, MIN_INK_CONTRAST
# from app.decode): change one and models trained before are refused.
BORDER_FRAC: Final = 0.05  # outer ring used to tell the paper's colour
# A border median this far from mid-grey decides the polarity alone; nearer (a dim or unevenly lit photo,
# dark corners), the ink is the far tail: whichever of the 0.5th and 99.5th percentiles lies further from
# the median.
POLARITY_CLEAR: Final = 48
POLARITY_TAIL: Final = 0.5
BG_SMALL_SIDE: Final = 64  # at or below this size the background is taken as uniform
BG_PERCENTILE: Final = 5.0  # uniform background of small images
# A border this even (95th less 5th percentile of the ring, in grey levels) is a clean drawing or evenly
# lit paper: the background is uniform, its median. The opening below would take a wide stroke for paper.
BG_FLAT_SPREAD: Final = 12.0
# A quarter of the ring at one paper level (its BG_EXACT_PERCENTILE within BG_EXACT_TOL levels of its 5th) is
# a file made on a computer (a pixel drawing enlarged, an app's export) or a clean scan, never a lit page
# (sensor noise and light spread it): the background is uniform, that level, even where the ink reaches the
# border. The opening below would take a drawing's blocks, wider than its reach, for paper. On our photo set this
# took small upscaled drawings from 81.8% to 90.4% with the photos unchanged (issue 14).
BG_EXACT_PERCENTILE: Final = 25.0
BG_EXACT_TOL: Final = 1.0
BG_MEAN_SIDE: Final = 4  # pixels averaged (sensor noise tamed) before the opening
# The lighting is a grey opening (min then max) of those means over a square this share of the longer side:
# ink up to about that wide (a thick marker stroke) is ink, not paper, and a shadow's edge is followed
# within that reach. (It replaced a min-per-cell grid on 16 cells opened over 7, 44% of the image, which
# could not follow a shadow: on our photo set with the same weights, uneven light 88.6% -> 94.3%, pencil
# 95.7% -> 97.1%, photos 97.8% -> 98.4%, small drawings and plain MNIST unchanged; 0.2 lost markers, 0.4 most
# of the gain; issue 14.)
BG_OPEN_FRAC: Final = 0.3
MIN_THRESHOLD: Final = 24
SPECK_FRAC: Final = 0.05  # components smaller than this share of the largest are dropped
SPECK_MIN_AREA_FRAC: Final = 2e-4  # ... as is anything under this share of the image
RULE_FILL: Final = 0.6  # a row (column) this full of ink ...
RULE_SPAN: Final = 0.9  # ... from end to end ...
RULE_MAX_FRAC: Final = 0.03  # ... in a band at most this share of the image thick is a ruled line, not a stroke
INK_LEVEL_PERCENTILE: Final = 90.0
FRINGE_FRAC: Final = 0.25  # next to the ink, contrast above this share of the threshold is still ink
TARGET_STROKE_PX: Final = 2.0  # stroke width on the 28x28 grid (MNIST is about 2-3)
MAX_STROKE_PX: Final = 3.0  # bolder strokes (markers) are thinned to this
BOX_SIDE: Final = 20
CANVAS: Final = 28
MNIST_MEAN: Final = 0.1307
MNIST_STD: Final = 0.3081

_STEPS: Final = (
    "decode png|jpeg; jpeg draft to >= work_side; reduce to work_side",
    "exif orientation",
    "alpha composited on white (alpha as ink when that leaves no contrast)",
    "grayscale L",
    "polarity from border median when >= polarity_clear from 128, else the percentile (polarity_tail, "
    "100 - polarity_tail) further from the median is the ink (override: invert)",
    "background = border ring's median when its 5-95 percentile spread <= bg_flat_spread, else its "
    "bg_exact_percentile when that is within bg_exact_tol of its 5th, else "
    "grey opening of the bg_mean_side means over bg_open_frac of their longer side (at least 3), bilinear up "
    "(small: percentile)",
    "contrast = img - background",
    "threshold = max(otsu(contrast), min_threshold); blank if max contrast < min_ink_contrast",
    "ruled lines: bands of rows/columns >= rule_fill inked, ink spanning >= rule_span, <= rule_max_frac thick, "
    "replaced by the lesser neighbour",
    "8-connected components; drop specks",
    "crop to kept ink and its fringe (dilated mask with contrast >= fringe_frac * threshold)",
    "blocky (runs >= block_min - 1; block_agree of them within a pixel of multiples of f, f within a pixel "
    "of the 10th-percentile run /1, /2, /3 by block_step, block_min..min(block_max, side/block_cells), "
    "largest first): box reduce by f",
    "ink = contrast / ink_level percentile, clipped, zero outside",
    "stroke width 2*area/perimeter (pixel sides); grey dilation up to target_stroke_px, grey erosion down to "
    "max_stroke_px on the output grid",
    "resize longer side to box_side (box when reducing, bilinear when enlarging), aspect kept",
    "place in canvas by centre of mass (rounded, kept inside)",
    "uint8 = round(255 * ink); tensor = (uint8/255 - mean) / std",
)


_HASHED_CONSTANTS: Final = (
    "WORK_SIDE", "MIN_SIDE", "MAX_ASPECT", "BORDER_FRAC", "POLARITY_CLEAR", "POLARITY_TAIL",
    "BG_SMALL_SIDE", "BG_PERCENTILE", "BG_FLAT_SPREAD", "BG_EXACT_PERCENTILE", "BG_EXACT_TOL", "BG_MEAN_SIDE",
    "BG_OPEN_FRAC", "MIN_INK_CONTRAST", "MIN_THRESHOLD", "SPECK_FRAC", "SPECK_MIN_AREA_FRAC", "RULE_FILL",
    "RULE_SPAN", "RULE_MAX_FRAC", "BLOCK_MIN", "BLOCK_MAX", "BLOCK_AGREE", "BLOCK_CELLS", "BLOCK_STEP",
    "BLOCK_MIN_RUNS", "BLOCK_MAX_RUNS", "INK_LEVEL_PERCENTILE", "FRINGE_FRAC",
    "TARGET_STROKE_PX", "MAX_STROKE_PX", "BOX_SIDE", "CANVAS", "MNIST_MEAN", "MNIST_STD",
)


def _canonical_description() -> str:
    constants = {name: globals()[name] for name in _HASHED_CONSTANTS}
    return json.dumps({"pipeline": "handwriting-ai/preprocess/2", "steps": _STEPS, "constants": constants},
                      sort_keys=True, separators=(",", ":"))


PREPROCESS_DESCRIPTION: Final = _canonical_description()
PREPROCESS_HASH: Final = hashlib.sha256(PREPROCESS_DESCRIPTION.encode("utf-8")).hexdigest()


class NoDigitFoundError(PreprocessError):
    code = "preprocessing_failed"


@dataclass(frozen=True, slots=True)
class Preprocessed:
    preview: U8  # uint8, shape (28, 28): white ink on black, what the model sees

    @property
    def tensor(self) -> torch.Tensor:
        """float32, shape (1, 1, 28, 28), normalised: the network's input (torch is imported only here)."""
        return to_tensor(self.preview)


@dataclass(frozen=True, slots=True)
class _Ring:
    """The outer ring's 5th, BG_EXACT_PERCENTILE-th, 50th, (100 - BG_EXACT_PERCENTILE)-th and 95th
    percentiles: the paper's colour, and how even it is."""

    low: float
    lower: float
    median: float
    upper: float
    high: float

    @classmethod
    def of(cls, gray: U8) -> _Ring:
        h, w = gray.shape
        b = max(1, round(min(h, w) * BORDER_FRAC))
        # Every other pixel of the ring is plenty for its percentiles and halves the cost.
        ring = np.concatenate(
            [gray[:b, ::2].ravel(), gray[-b:, ::2].ravel(), gray[::2, :b].ravel(), gray[::2, -b:].ravel()]
        )
        low, lower, median, upper, high = percentiles(
            ring, (5.0, BG_EXACT_PERCENTILE, 50.0, 100.0 - BG_EXACT_PERCENTILE, 95.0)
        )
        return cls(low, lower, median, upper, high)

    def inverted(self) -> _Ring:
        """The same ring of 255 - the image."""
        return _Ring(255.0 - self.high, 255.0 - self.upper, 255.0 - self.median, 255.0 - self.lower, 255.0 - self.low)


def _dark_ink(gray: U8, ring: _Ring) -> bool:
    """True for dark ink on light paper, from the border; from the ink's tail when the border is mid-grey."""
    if abs(ring.median - 128) >= POLARITY_CLEAR:
        return ring.median >= 128
    lo, mid, hi = percentiles(gray[::2, ::2], (POLARITY_TAIL, 50.0, 100.0 - POLARITY_TAIL))
    return mid - lo >= hi - mid


def _background(img: U8, ring: _Ring) -> F32:
    """Paper level under every pixel, so uneven lighting does not read as ink (ink is bright here).

    `ring` is `img`'s outer ring."""
    h, w = img.shape
    if max(h, w) <= BG_SMALL_SIDE:
        return np.full(img.shape, percentiles(img, (BG_PERCENTILE,))[0], dtype=np.float32)
    if ring.high - ring.low <= BG_FLAT_SPREAD:
        return np.full(img.shape, ring.median, dtype=np.float32)
    if ring.lower - ring.low <= BG_EXACT_TOL:
        return np.full(img.shape, ring.lower, dtype=np.float32)
    # Averaging 4x4 first tames sensor noise, so the darkest average within reach is the paper there.
    means = np.asarray(Image.fromarray(img).reduce(BG_MEAN_SIDE), dtype=np.float32)
    # An opening, not a median: ink narrower than the square is taken away (a thick stroke stays ink), while
    # lighting, smooth or a shadow's edge, passes through.
    k = max(3, round(max(means.shape) * BG_OPEN_FRAC))
    grid = ndimage.grey_opening(means, size=(k, k), mode="nearest")
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32)


def _otsu(values: U8) -> int:
    # Pillow's histogram counts uint8 in C without the int64 copy np.bincount makes.
    hist = np.asarray(Image.fromarray(values).histogram(), dtype=np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return int(np.argmax(between)) + 1


def preprocess_gray(gray: U8, *, invert: bool | None = None) -> Preprocessed:
    """Run the pipeline on a grayscale image (any size, any polarity).

    `invert=None` detects polarity from the border; `True` means dark ink on light paper, `False`
    light ink on dark (as MNIST is).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise PreprocessError("expected a 2-D uint8 grayscale image")
    check_dimensions(gray.shape[1], gray.shape[0], DEFAULT_MAX_PIXELS)
    ring = _Ring.of(gray)
    dark_ink = _dark_ink(gray, ring) if invert is None else invert
    img, ring = (255 - gray, ring.inverted()) if dark_ink else (gray, ring)

    contrast_f = np.clip(img.astype(np.float32) - _background(img, ring), 0, 255)
    contrast = contrast_f.astype(np.uint8)
    if int(contrast.max()) < MIN_INK_CONTRAST:
        raise NoDigitFoundError("no digit found: the image is blank or has too little contrast")
    threshold = max(_otsu(contrast), MIN_THRESHOLD)
    mask = contrast >= threshold
    _remove_rules(contrast_f, mask, threshold)
    if not mask.any():
        raise NoDigitFoundError("no digit found: only ruled lines")

    kept = _without_specks(mask)

    rows = np.flatnonzero(kept.any(axis=1))
    cols = np.flatnonzero(kept.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    r0, c0 = max(0, r0 - 1), max(0, c0 - 1)
    r1, c1 = min(img.shape[0], r1 + 1), min(img.shape[1], c1 + 1)
    sub_mask = kept[r0:r1, c0:c1]
    sub = contrast_f[r0:r1, c0:c1]
    # The ink plus its anti-aliased fringe (one pixel around it, fainter than the threshold).
    inked = _dilate3(sub_mask) & (sub >= threshold * FRINGE_FRAC)
    rows = np.flatnonzero(inked.any(axis=1))
    cols = np.flatnonzero(inked.any(axis=0))
    t0, t1, l0, l1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop_mask = sub_mask[t0:t1, l0:l1]
    crop = sub[t0:t1, l0:l1]
    crop_inked = inked[t0:t1, l0:l1]
    block = block_side(crop_mask)
    if block > 1:
        crop, crop_mask, crop_inked = unblock(crop, crop_mask, crop_inked, block)

    ink_values = crop[crop_mask]
    k = min(ink_values.size - 1, int(ink_values.size * INK_LEVEL_PERCENTILE / 100))
    level = max(float(np.partition(ink_values, k)[k]), 1.0)
    ink = np.clip(crop / level, 0.0, 1.0).astype(np.float32)
    ink *= crop_inked

    h, w = ink.shape
    scale = BOX_SIDE / max(h, w)
    ink = _normalise_stroke(ink, crop_mask, scale)

    out_h = max(1, round(h * scale))
    out_w = max(1, round(w * scale))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(ink, mode="F").resize((out_w, out_h), resample), dtype=np.float32)
    small = np.clip(small, 0.0, 1.0)

    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    total = float(small.sum())
    if total > 0:
        cy = float(small.sum(axis=1) @ np.arange(out_h, dtype=np.float32)) / total
        cx = float(small.sum(axis=0) @ np.arange(out_w, dtype=np.float32)) / total
    else:
        cy, cx = (out_h - 1) / 2, (out_w - 1) / 2
    top = int(np.clip(round(CANVAS / 2 - 0.5 - cy), 0, CANVAS - out_h))
    left = int(np.clip(round(CANVAS / 2 - 0.5 - cx), 0, CANVAS - out_w))
    canvas[top : top + out_h, left : left + out_w] = small

    preview = np.rint(canvas * 255.0).astype(np.uint8)
    return Preprocessed(preview=preview)


def _without_specks(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The ink's 8-connected components less the specks. Labelled within the ink's bounding box only (about a
    fifth of a photo): the same components, numbered in the same order, as over the whole image."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels = np.empty(mask[box].shape, dtype=np.intp)
    n = ndimage.label(mask[box], structure=np.ones((3, 3), dtype=bool), output=labels)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    min_area = max(SPECK_FRAC * float(sizes.max()), SPECK_MIN_AREA_FRAC * mask.size)
    keep = sizes >= min_area
    keep[int(np.argmax(sizes))] = True
    keep[0] = False
    kept = np.zeros(mask.shape, dtype=bool)
    kept[box] = keep[labels]
    return kept


def _dilate3(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Binary dilation by a 3x3 square, as four shifted ORs (scipy's general version costs more)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _normalise_stroke(ink: F32, mask: npt.NDArray[np.bool_], scale: float) -> F32:
    """Grow thin pen strokes to about TARGET_STROKE_PX and thin marker strokes to MAX_STROKE_PX, after scaling."""
    area = float(np.count_nonzero(mask))
    # Perimeter as the count of pixel sides between ink and paper (inside the crop).
    perimeter = float(np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1]))
    perimeter += float(np.count_nonzero(mask[0]) + np.count_nonzero(mask[-1]))
    perimeter += float(np.count_nonzero(mask[:, 0]) + np.count_nonzero(mask[:, -1]))
    if area == 0 or perimeter == 0:
        return ink
    stroke = 2.0 * area / perimeter  # width of a long thin shape: area / (perimeter / 2)
    missing = TARGET_STROKE_PX / scale - stroke
    radius = int(missing // 2)
    if radius >= 1:
        size = 2 * radius + 1
        return np.asarray(ndimage.grey_dilation(ink, size=(size, size)), dtype=np.float32)
    excess = stroke - MAX_STROKE_PX / scale
    radius = int(excess // 2)
    if radius >= 1:
        size = 2 * radius + 1
        return np.asarray(ndimage.grey_erosion(ink, size=(size, size)), dtype=np.float32)
    return ink


def _remove_rules(contrast: F32, mask: npt.NDArray[np.bool_], threshold: int) -> None:
    """Ruled lines (and a margin or grid) out of `contrast` and `mask`, in place.

    A line is a thin band of rows (columns) mostly ink from one side of the image to the other; its rows
    take the lesser of the rows just outside it, so a stroke crossing the line stays joined and the line
    itself goes. (A stroke of a digit rarely runs from edge to edge, and in a small image none is thin enough.)
    """
    for c, m in ((contrast, mask), (contrast.T, mask.T)):
        across = m.shape[1]
        full = np.count_nonzero(m, axis=1) >= RULE_FILL * across
        if not full.any():
            continue
        first = np.argmax(m, axis=1)
        last = across - 1 - np.argmax(m[:, ::-1], axis=1)
        full &= (last - first + 1) >= RULE_SPAN * across
        edges = np.flatnonzero(np.diff(np.concatenate(([0], full.astype(np.int8), [0]))))
        thin = RULE_MAX_FRAC * m.shape[0]
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            if b - a > thin:
                continue
            above = c[a - 1] if a > 0 else np.zeros(across, dtype=np.float32)
            below = c[b] if b < c.shape[0] else np.zeros(across, dtype=np.float32)
            c[a:b] = np.minimum(above, below)
            m[a:b] = c[a:b] >= threshold


def to_tensor(preview: U8) -> torch.Tensor:
    """Normalise a 28x28 uint8 (or N x 28 x 28) into the network's input layout."""
    import torch

    scaled = (preview.astype(np.float32) * np.float32(1.0 / 255.0) - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return torch.from_numpy(scaled.reshape(-1, 1, CANVAS, CANVAS))


def preprocess(data: bytes, *, invert: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Preprocessed:
    """Image bytes (PNG or JPEG) -> Preprocessed. Raises a PreprocessError subclass on bad input."""
    return preprocess_gray(decode_gray(data, max_pixels=max_pixels), invert=invert)
