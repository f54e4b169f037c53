"""Writes the sample photos under examples/: MNIST test digits made to look like phone photos.

    python -m examples.generate

Each is a digit from the untouched MNIST test set, enlarged, printed as dark ink on unevenly lit paper
with sensor noise, and saved as a JPEG (one as a PNG with a transparent background). The file name says
the true digit, so the README's curl examples and the newcomer test can check the answer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from app.mnist import load_raw

HERE = Path(__file__).resolve().parent
# Indices into the MNIST test set: one clear example each of a few digits.
PICKS = {0: 3, 2: 1, 3: 18, 7: 0, 9: 7}


def as_photo(digit28: np.ndarray, seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    side = int(h * 0.7)
    ink = Image.fromarray(digit28).resize((side, side), Image.Resampling.BICUBIC)
    ink = ink.filter(ImageFilter.GaussianBlur(radius=side / 200))
    canvas = np.zeros((h, w), dtype=np.float32)
    top, left = (h - side) // 2 + int(rng.integers(-20, 20)), (w - side) // 2 + int(rng.integers(-60, 60))
    canvas[top : top + side, left : left + side] = np.asarray(ink, dtype=np.float32) / 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paper = 215 + 30 * (xx / w) - 25 * (yy / h)  # light falling from one side
    pen = np.array([35, 40, 70], dtype=np.float32)  # blue-black ink
    rgb = paper[..., None] * (1 - canvas[..., None]) + pen * canvas[..., None]
    rgb += rng.normal(0, 4, rgb.shape).astype(np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def main() -> None:
    _, _, test_x, test_y = load_raw()
    for digit, index in PICKS.items():
        assert int(test_y[index]) == digit, (digit, index, int(test_y[index]))
        photo = as_photo(test_x[index], seed=index)
        if digit == 9:
            # A drawing-app export: dark strokes on a transparent canvas.
            alpha = Image.fromarray(test_x[index]).resize((280, 280), Image.Resampling.BICUBIC)
            rgba = Image.new("RGBA", alpha.size, (20, 20, 20, 0))
            rgba.putalpha(alpha)
            out = HERE / f"digit-{digit}.png"
            rgba.save(out, optimize=True)
        else:
            out = HERE / f"digit-{digit}.jpg"
            buf = io.BytesIO()
            photo.save(buf, format="JPEG", quality=88)
            out.write_bytes(buf.getvalue())
        print(out.relative_to(HERE.parent), out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
