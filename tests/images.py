"""Synthetic digit images for tests: drawn strokes, rendered at any size, position, colour, format."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# A '7' and a '4' as polylines in a unit box (x right, y down).
STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "7": [[(0.15, 0.1), (0.85, 0.1), (0.4, 0.95)]],
    "4": [[(0.55, 0.05), (0.1, 0.65), (0.9, 0.65)], [(0.65, 0.3), (0.65, 0.95)]],
}


def draw_digit(
    digit: str = "7",
    size: tuple[int, int] = (200, 200),
    box: tuple[float, float, float, float] = (0.25, 0.2, 0.5, 0.6),
    ink: tuple[int, int, int] = (20, 20, 20),
    paper: tuple[int, int, int] = (245, 245, 240),
    stroke_frac: float = 0.1,
    mode: str = "RGB",
) -> Image.Image:
    """The digit in `box` (x, y, w, h as fractions of the image), stroke width a share of the box height."""
    w, h = size
    img = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(img)
    bx, by, bw, bh = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    width = max(1, round(stroke_frac * bh))
    for line in STROKES[digit]:
        pts = [(bx + x * bw, by + y * bh) for x, y in line]
        draw.line(pts, fill=ink, width=width, joint="curve")
    return img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **params: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def with_alpha_on_transparent(digit: str = "7", size: tuple[int, int] = (200, 200)) -> Image.Image:
    """Dark ink on a fully transparent canvas, as drawing apps export."""
    ink = draw_digit(digit, size=size, ink=(0, 0, 0), paper=(255, 255, 255)).convert("L")
    alpha = Image.fromarray(255 - np.asarray(ink))
    rgba = Image.new("RGBA", size, (0, 0, 0, 0))
    rgba.putalpha(alpha)
    return rgba
