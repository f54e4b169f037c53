"""MNIST digits rendered as the photos and files users send: `render_photo(digit, condition, rng)`.

One home for "what a photo of a handwritten digit looks like", used by the evaluation set
(`bench/photo_set.py`, MNIST *test* digits) and by training (`worker/data.py`, MNIST *training* digits).
Each condition names a way of writing and photographing (pencil, marker, chalk on a board, ruled paper,
uneven light, ...); within it every choice (sizes, colours, placement, light, blur, noise, JPEG quality)
is drawn from the `numpy.random.Generator` given, so the same rng state gives the same bytes.

How a digit becomes a photo: the 28x28 is enlarged 4x (bicubic), its stroke weight changed by a blur and
a threshold (lower: bolder, higher: thinner), rotated, scaled to the digit's size on the page and used as
ink coverage over the paper (with grain for pencil and chalk), then lit, blurred, noised and encoded.
numpy + Pillow only; a few ms per image at 512 px (`python -m bench.photo_set --speed`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops, ImageFilter

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

RENDERER_VERSION: Final = 1  # bump when any rendering changes: training caches of renders are keyed on it
T = TypeVar("T")
_UP: Final = 4  # the 28x28 is enlarged this much before its stroke weight is changed
_SIDE: Final = 28


@dataclass(frozen=True)
class Look:
    """Everything one render decides. Sizes are in output pixels, colours 0..255 RGB."""

    size: tuple[int, int]  # (width, height) of the file
    digit_height: float  # share of the image's shorter side taken by the digit's 28x28 box
    centre: tuple[float, float]  # (x, y) of the digit's box centre, as shares of width and height
    rotation: float = 0.0  # degrees, counter-clockwise
    weight: float = 0.0  # stroke weight change, in 28x28 pixels: +1 about doubles an MNIST stroke
    ink: tuple[float, float, float] = (25.0, 25.0, 35.0)
    opacity: float = 1.0  # ink coverage where the stroke is solid
    grain: float = 0.0  # 0..1: share of the ink coverage a grain texture may take away (pencil, chalk)
    grain_px: float = 1.0  # size of the grain, in output pixels
    paper: tuple[float, float, float] = (242.0, 240.0, 235.0)
    paper_grain: float = 2.0  # std of the paper's texture, in levels
    light: float = 0.1  # strength of a linear lighting gradient (0: even)
    vignette: float = 0.05
    shadow: float = 0.0  # darkness of a soft-edged shadow over part of the page (0: none)
    ruled: bool = False
    specks: int = 0
    blur: float = 0.0  # Gaussian radius in output pixels
    noise: float = 2.0  # sensor noise std, in levels
    jpeg_quality: int | None = 90  # None: PNG
    mode: str = "RGB"  # "RGB", "L", or "RGBA" (ink on a transparent canvas)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _pick(rng: np.random.Generator, options: tuple[T, ...]) -> T:
    return options[int(rng.integers(len(options)))]


_PENS: Final = ((20.0, 20.0, 30.0), (25.0, 40.0, 150.0), (15.0, 30.0, 90.0), (40.0, 40.0, 40.0))
_MARKERS: Final = ((15.0, 15.0, 15.0), (30.0, 50.0, 170.0), (170.0, 25.0, 30.0), (20.0, 110.0, 50.0))
_PAPERS: Final = ((245.0, 244.0, 238.0), (236.0, 236.0, 236.0), (250.0, 248.0, 240.0), (228.0, 226.0, 215.0))
_TINTS: Final = ((250.0, 236.0, 150.0), (200.0, 225.0, 245.0), (245.0, 205.0, 215.0), (200.0, 170.0, 125.0),
                 (215.0, 240.0, 205.0))
_BOARDS: Final = ((35.0, 62.0, 48.0), (30.0, 32.0, 35.0), (20.0, 45.0, 40.0), (55.0, 58.0, 60.0))
_CHALK: Final = ((238.0, 238.0, 230.0), (240.0, 235.0, 180.0), (215.0, 230.0, 245.0))


def _base(rng: np.random.Generator) -> Look:
    """A phone photo of a pen digit on paper, everything mild; conditions change what they are about."""
    side = int(rng.integers(320, 720))
    aspect = _uniform(rng, 0.75, 1.33)
    return Look(
        size=(side, max(64, round(side * aspect))),
        digit_height=_uniform(rng, 0.45, 0.8),
        centre=(_uniform(rng, 0.42, 0.58), _uniform(rng, 0.42, 0.58)),
        rotation=_uniform(rng, -6, 6),
        weight=_uniform(rng, -0.3, 0.4),
        ink=_pick(rng, _PENS),
        opacity=_uniform(rng, 0.85, 1.0),
        paper=_pick(rng, _PAPERS),
        paper_grain=_uniform(rng, 1.0, 4.0),
        light=_uniform(rng, 0.0, 0.2),
        vignette=_uniform(rng, 0.0, 0.12),
        blur=_uniform(rng, 0.0, 1.0),
        noise=_uniform(rng, 1.0, 4.0),
        jpeg_quality=int(rng.integers(70, 96)),
    )


def _pen(rng: np.random.Generator, look: Look) -> Look:
    return look


def _pencil(rng: np.random.Generator, look: Look) -> Look:
    grey = _uniform(rng, 70, 120)
    return replace(look, ink=(grey, grey, grey + 5), opacity=_uniform(rng, 0.35, 0.7), weight=_uniform(rng, -0.7, -0.2),
                   grain=_uniform(rng, 0.3, 0.6), grain_px=_uniform(rng, 0.8, 1.6))


def _marker(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, ink=_pick(rng, _MARKERS), opacity=1.0, weight=_uniform(rng, 0.6, 1.3))


def _chalk(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, paper=_pick(rng, _BOARDS), paper_grain=_uniform(rng, 3.0, 7.0), ink=_pick(rng, _CHALK),
                   opacity=_uniform(rng, 0.6, 0.95), weight=_uniform(rng, -0.2, 0.6), grain=_uniform(rng, 0.3, 0.55),
                   grain_px=_uniform(rng, 1.0, 2.5))


def _pale_chalk(rng: np.random.Generator, look: Look) -> Look:
    look = _chalk(rng, look)
    return replace(look, opacity=_uniform(rng, 0.3, 0.5), weight=_uniform(rng, -0.6, -0.1),
                   grain=_uniform(rng, 0.4, 0.6))


def _tinted(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, paper=_pick(rng, _TINTS), ink=_pick(rng, _PENS + _MARKERS[2:]))


def _ruled(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, ruled=True, specks=int(rng.integers(8, 40)))


def _uneven_light(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, light=_uniform(rng, 0.25, 0.5), vignette=_uniform(rng, 0.1, 0.25),
                   shadow=_uniform(rng, 0.15, 0.35))


def _blur_noise(rng: np.random.Generator, look: Look) -> Look:
    short = min(look.size)
    return replace(look, blur=_uniform(rng, 0.006, 0.014) * short, noise=_uniform(rng, 6.0, 14.0))


def _low_jpeg(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, jpeg_quality=int(rng.integers(12, 35)))


def _off_centre(rng: np.random.Generator, look: Look) -> Look:
    height = _uniform(rng, 0.18, 0.35)
    margin = height / 2 + 0.03
    centre = (_uniform(rng, margin, 1 - margin), _uniform(rng, margin, 1 - margin))
    return replace(look, digit_height=height, centre=centre)


def _rotated(rng: np.random.Generator, look: Look) -> Look:
    return replace(look, rotation=_uniform(rng, 10, 22) * _pick(rng, (-1.0, 1.0)))


def _phone(rng: np.random.Generator, look: Look) -> Look:
    side = int(rng.integers(900, 1601))
    aspect = _pick(rng, (4 / 3, 3 / 4, 16 / 9, 9 / 16))
    return replace(look, size=(side, round(side * aspect)), blur=_uniform(rng, 0.5, 3.0), noise=_uniform(rng, 2.0, 6.0),
                   light=_uniform(rng, 0.05, 0.3), digit_height=_uniform(rng, 0.3, 0.7))


def _grey(rng: np.random.Generator, look: Look) -> Look:
    look = _pencil(rng, look) if rng.random() < 0.4 else look
    return replace(look, mode="L", jpeg_quality=None if rng.random() < 0.5 else look.jpeg_quality)


def _rgba(rng: np.random.Generator, look: Look) -> Look:
    """A drawing app's export: clean strokes on a transparent canvas, PNG."""
    return replace(look, mode="RGBA", jpeg_quality=None, blur=0.0, noise=0.0, light=0.0, vignette=0.0, paper_grain=0.0,
                   ink=_pick(rng, _PENS + _MARKERS), opacity=1.0, weight=_uniform(rng, -0.2, 1.2))


_CONDITIONS: Final[dict[str, Callable[[np.random.Generator, Look], Look]]] = {
    "pen": _pen,
    "pencil": _pencil,
    "marker": _marker,
    "chalk": _chalk,
    "pale_chalk": _pale_chalk,
    "tinted_paper": _tinted,
    "ruled_paper": _ruled,
    "uneven_light": _uneven_light,
    "blur_noise": _blur_noise,
    "low_jpeg": _low_jpeg,
    "off_centre": _off_centre,
    "rotated": _rotated,
    "phone_photo": _phone,
    "grey_file": _grey,
    "rgba_drawing": _rgba,
}
SMALL_UPSCALED: Final = "small_upscaled"  # an 8x8-ish drawing enlarged without smoothing: blocky, 112-224 px
CONDITIONS: Final[tuple[str, ...]] = (*_CONDITIONS, SMALL_UPSCALED)
PHOTO_CONDITIONS: Final[tuple[str, ...]] = tuple(_CONDITIONS)  # every condition but the small upscaled drawings


def render_photo(digit: U8, condition: str, rng: np.random.Generator, *, max_side: int | None = None) -> bytes:
    """A raw 28x28 MNIST digit (light ink on black, uint8) as an image file (JPEG or PNG) under `condition`.

    `max_side` caps the file's longer side: the photo is drawn as it would be, then smaller (sizes, blur and
    grain scaled alike), which costs a fraction of a phone-sized render."""
    if digit.shape != (_SIDE, _SIDE) or digit.dtype != np.uint8:
        raise ValueError("expected a 28x28 uint8 MNIST digit")
    if condition == SMALL_UPSCALED:
        return _small_upscaled(digit, rng)
    try:
        tweak = _CONDITIONS[condition]
    except KeyError:
        raise ValueError(f"unknown condition {condition!r}; one of {', '.join(CONDITIONS)}") from None
    look = tweak(rng, _base(rng))
    w, h = look.size
    scale = 1.0 if max_side is None else min(1.0, max_side / max(w, h))
    if scale < 1.0:
        look = replace(look, size=(max(64, round(w * scale)), max(64, round(h * scale))), blur=look.blur * scale,
                       grain_px=max(0.5, look.grain_px * scale))
    return render_look(digit, look, rng)


def _coverage(digit: U8, weight: float) -> F32:
    """The digit enlarged _UP times as ink coverage in [0, 1], its strokes made bolder or thinner."""
    big = Image.fromarray(digit).resize((_SIDE * _UP, _SIDE * _UP), Image.Resampling.BICUBIC)
    if weight > 0:
        # Blur then a low threshold grows a stroke by about the blur's reach.
        big = big.filter(ImageFilter.GaussianBlur(weight * _UP * 0.9))
        level = 60.0
    elif weight < 0:
        level = 128.0 - 100.0 * weight  # a higher threshold keeps only the stroke's core
    else:
        level = 128.0
    arr = np.asarray(big, dtype=np.float32)
    peak = float(arr.max())
    level = min(level, 0.8 * peak)  # never threshold the digit away
    soft = 0.08 * 255.0
    coverage: F32 = np.clip((arr - level) / soft + 0.5, 0.0, 1.0).astype(np.float32)
    return coverage


def _grain(shape: tuple[int, int], amount: float, px: float, rng: np.random.Generator) -> F32:
    """1 - amount * texture, the texture blobs about `px` output pixels across."""
    h, w = shape
    gh, gw = max(2, round(h / max(px, 0.5))), max(2, round(w / max(px, 0.5)))
    cells = rng.random((gh, gw), dtype=np.float32)
    tex = np.asarray(Image.fromarray(cells, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return (1.0 - amount * tex).astype(np.float32)


def _lighting(look: Look, rng: np.random.Generator) -> Image.Image:
    """A multiplicative light field as an L image (255: full light): gradient, vignette, maybe a soft shadow."""
    w, h = look.size
    # Computed at low resolution and enlarged: light varies slowly.
    lw, lh = max(2, w // 8), max(2, h // 8)
    ys, xs = np.mgrid[0:lh, 0:lw].astype(np.float32)
    xs, ys = xs / (lw - 1) - 0.5, ys / (lh - 1) - 0.5
    angle = _uniform(rng, 0, 2 * math.pi)
    field = 1.0 - look.light * (0.5 + xs * math.cos(angle) + ys * math.sin(angle))
    field -= look.vignette * (xs**2 + ys**2) * 2.0
    if look.shadow > 0:
        s_angle = _uniform(rng, 0, 2 * math.pi)
        offset = _uniform(rng, -0.35, 0.1)
        dist = xs * math.cos(s_angle) + ys * math.sin(s_angle) - offset
        soft = _uniform(rng, 0.03, 0.12)
        field -= look.shadow / (1.0 + np.exp(-dist / soft))
    small = Image.fromarray((np.clip(field, 0.05, 1.0) * 255.0).astype(np.uint8), mode="L")
    return small.resize((w, h), Image.Resampling.BILINEAR)


def _paper(look: Look, rng: np.random.Generator) -> Image.Image:
    """The page before ink: colour, texture, ruled lines, specks."""
    w, h = look.size
    page_img = Image.new("RGB", (w, h), tuple(round(c) for c in look.paper))
    if look.paper_grain > 0:
        tex = 128.0 + (_grain((h, w), 1.0, _uniform(rng, 1.0, 3.0), rng) - 0.5) * (2 * look.paper_grain)
        tex_img = Image.fromarray(tex.astype(np.uint8), mode="L")
        page_img = ImageChops.add(page_img, Image.merge("RGB", [tex_img] * 3), offset=-128)
    page = np.array(page_img, dtype=np.uint8)
    if look.ruled:
        spacing = _uniform(rng, 0.04, 0.09) * h
        thickness = max(1, round(_uniform(rng, 0.002, 0.006) * h))
        line = _pick(rng, ((150, 180, 215), (120, 150, 200), (160, 160, 160)))
        for y in np.arange(_uniform(rng, 0, spacing), h, spacing):
            page[int(y) : int(y) + thickness] = line
        if rng.random() < 0.5:  # a red margin line
            x = int(_uniform(rng, 0.05, 0.2) * w)
            page[:, x : x + thickness + 1] = (220, 120, 120)
    for _ in range(look.specks):
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        r = max(1, round(_uniform(rng, 0.001, 0.006) * min(w, h)))
        page[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = int(rng.integers(30, 120))
    return Image.fromarray(page, mode="RGB")


def _place(coverage: F32, look: Look) -> Image.Image:
    """The coverage (times the ink's opacity) rotated, scaled to the digit's size, placed on a W x H L mask."""
    w, h = look.size
    img = Image.fromarray((coverage * (255.0 * look.opacity)).astype(np.uint8), mode="L")
    if look.rotation:
        img = img.rotate(look.rotation, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    side = max(8, round(look.digit_height * min(w, h) * img.width / (_SIDE * _UP)))
    img = img.resize((side, side), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(img, (round(look.centre[0] * w - side / 2), round(look.centre[1] * h - side / 2)))
    return canvas


def render_look(digit: U8, look: Look, rng: np.random.Generator) -> bytes:
    """Render one digit exactly as `look` says (the conditions only choose the look)."""
    w, h = look.size
    mask = _place(_coverage(digit, look.weight), look)
    if look.grain > 0:
        grain = _grain((h, w), look.grain, look.grain_px, rng)
        mask = ImageChops.multiply(mask, Image.fromarray((grain * 255.0).astype(np.uint8), mode="L"))
    if look.blur > 0.3:  # defocus, on the ink alone: one channel costs a third of the photo's three
        mask = mask.filter(ImageFilter.GaussianBlur(look.blur))
    ink = tuple(round(c) for c in look.ink)
    if look.mode == "RGBA":
        drawing = Image.new("RGBA", (w, h), (*ink, 0))
        drawing.putalpha(mask)
        return _encode(drawing, None)
    img = Image.composite(Image.new("RGB", (w, h), ink), _paper(look, rng), mask)
    img = ImageChops.multiply(img, Image.merge("RGB", [_lighting(look, rng)] * 3))
    if look.mode == "L":
        img = img.convert("L")
    if look.noise > 0:
        arr = np.asarray(img, dtype=np.int16)
        noise = (rng.standard_normal((h, w), dtype=np.float32) * look.noise).astype(np.int16)
        arr = arr + (noise[..., None] if arr.ndim == 3 else noise)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode=look.mode)
    return _encode(img, look.jpeg_quality)


def _encode(img: Image.Image, jpeg_quality: int | None) -> bytes:
    out = io.BytesIO()
    if jpeg_quality is None:
        img.save(out, format="PNG", compress_level=1)
    else:
        img.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue()


def _small_upscaled(digit: U8, rng: np.random.Generator) -> bytes:
    """The digit shrunk to an 8x8-ish drawing (as drawn in a pixel editor) and enlarged without smoothing."""
    cells = int(rng.integers(7, 11))
    # Crop to the ink first: a pixel drawing fills its small canvas.
    rows, cols = np.flatnonzero(digit.max(axis=1) > 40), np.flatnonzero(digit.max(axis=0) > 40)
    crop = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] if rows.size and cols.size else digit
    pad = int(rng.integers(0, 2))
    small = np.asarray(Image.fromarray(crop).resize((cells - 2 * pad, cells - 2 * pad), Image.Resampling.BOX))
    tile = np.zeros((cells, cells), dtype=np.uint8)
    tile[pad : cells - pad, pad : cells - pad] = small
    if rng.random() < 0.6:  # a one-colour pixel drawing
        tile = np.where(tile > _uniform(rng, 50, 110), 255, 0).astype(np.uint8)
    dark_on_light = rng.random() < 0.7
    ink = 255 - tile if dark_on_light else tile
    side = int(rng.integers(112, 225))
    big = Image.fromarray(ink).resize((side, side), Image.Resampling.NEAREST)
    kind = int(rng.integers(3))
    if kind == 0:
        return _encode(big, None)
    if kind == 1:
        return _encode(big.convert("RGB"), int(rng.integers(80, 96)))
    colour = np.asarray(big.convert("RGB"), dtype=np.uint8).copy()
    colour[..., 2] = np.maximum(colour[..., 2], 40)  # a slightly coloured export
    return _encode(Image.fromarray(colour, mode="RGB"), None)
