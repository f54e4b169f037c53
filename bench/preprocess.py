"""Preprocessing speed on photo-like JPEGs, one thread: `python -m bench.preprocess`.

Prints the median and p95 per image for a 512x512 and a 4000x3000 photo of a handwritten digit.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from app.preprocess import preprocess


def photo_of_digit(width: int, height: int, seed: int = 0) -> bytes:
    """A dark pen '4' on unevenly lit grey paper with sensor noise, saved as a JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paper = 170 + 60 * (xx / width) + 20 * (yy / height)
    img = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(img)
    s = min(width, height)
    cx, cy, r = width / 2, height / 2, s * 0.3
    pen = max(2, int(s * 0.02))
    ink = (30, 30, 60)
    draw.line([(cx - r * 0.5, cy - r), (cx - r * 0.7, cy + r * 0.1), (cx + r * 0.5, cy + r * 0.1)], fill=ink, width=pen)
    draw.line([(cx + r * 0.2, cy - r * 0.6), (cx + r * 0.2, cy + r)], fill=ink, width=pen)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, s // 400)))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def measure(data: bytes, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        preprocess(data)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        preprocess(data)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'image':<14}{'bytes':>10}{'median ms':>12}{'p95 ms':>10}")
    for w, h in ((512, 512), (4000, 3000)):
        data = photo_of_digit(w, h)
        med, p95 = measure(data, args.repeats)
        print(f"{f'{w}x{h} JPEG':<14}{len(data):>10}{med:>12.2f}{p95:>10.2f}")


if __name__ == "__main__":
    main()
