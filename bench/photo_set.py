"""Our own evaluation set, rendered from MNIST *test* digits only: `python -m bench.photo_set OUT_DIR`.

Three parts, from disjoint test digits picked by a fixed permutation:
- `photo`: every condition of `app.photo.PHOTO_CONDITIONS` (pencil, marker, chalk, ruled paper, light, ...);
- `small`: 8x8-ish drawings enlarged without smoothing to 112-224 px (`app.photo.SMALL_UPSCALED`);
- `plain`: the 28x28 MNIST test PNGs as they ship.
Everything is drawn from seeded generators, so the same command writes the same bytes. `labels.csv`
lists file, part, condition, label and the MNIST test index. `--speed` prints ms per image by condition.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from app.photo import CONDITIONS, PHOTO_CONDITIONS, RENDERER_VERSION, SMALL_UPSCALED, render_photo

SEED: Final = 20261129
PER_CONDITION: Final = 70  # 15 photo conditions -> 1,050 photos
SMALL: Final = 500
PLAIN: Final = 1000
LABELS_FILE: Final = "labels.csv"


@dataclass(frozen=True)
class Item:
    file: str
    part: str  # photo | small | plain
    condition: str
    label: int
    index: int  # in the MNIST test set


def _suffix(data: bytes) -> str:
    return ".jpg" if data[:3] == b"\xff\xd8\xff" else ".png"


def _plain_png(digit: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(digit).save(out, format="PNG")
    return out.getvalue()


def build(out_dir: Path, per_condition: int = PER_CONDITION, small: int = SMALL, plain: int = PLAIN) -> list[Item]:
    """Render the set into `out_dir` (created) and write its labels.csv. Returns the items."""
    from worker.data import load_raw

    _, _, test_x, test_y = load_raw()
    order = np.random.default_rng(SEED).permutation(len(test_x))
    n_photo = per_condition * len(PHOTO_CONDITIONS)
    if n_photo + small + plain > len(order):
        raise SystemExit("the parts would need more than the 10,000 MNIST test digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []

    def write(part: str, condition: str, k: int, index: int, data: bytes) -> None:
        name = f"{part}/{k:04d}-{condition}-{int(test_y[index])}{_suffix(data)}"
        (out_dir / part).mkdir(exist_ok=True)
        (out_dir / name).write_bytes(data)
        items.append(Item(name, part, condition, int(test_y[index]), int(index)))

    for k, index in enumerate(order[:n_photo]):
        condition = PHOTO_CONDITIONS[k % len(PHOTO_CONDITIONS)]
        rng = np.random.default_rng([SEED, RENDERER_VERSION, int(index)])
        write("photo", condition, k, int(index), render_photo(test_x[index], condition, rng))
    for k, index in enumerate(order[n_photo : n_photo + small]):
        rng = np.random.default_rng([SEED, RENDERER_VERSION, int(index)])
        write("small", SMALL_UPSCALED, k, int(index), render_photo(test_x[index], SMALL_UPSCALED, rng))
    for k, index in enumerate(order[n_photo + small : n_photo + small + plain]):
        write("plain", "mnist_28x28", k, int(index), _plain_png(test_x[index]))

    with (out_dir / LABELS_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "part", "condition", "label", "mnist_test_index"])
        writer.writerows([i.file, i.part, i.condition, i.label, i.index] for i in items)
    return items


def load(set_dir: Path) -> list[Item]:
    with (set_dir / LABELS_FILE).open(newline="") as f:
        return [Item(r["file"], r["part"], r["condition"], int(r["label"]), int(r["mnist_test_index"]))
                for r in csv.DictReader(f)]


def speed(repeats: int) -> None:
    """Milliseconds per render, by condition (one thread, this machine)."""
    from worker.data import load_raw

    _, _, test_x, _ = load_raw()
    print(f"{'condition':<16}{'ms/image':>10}")
    for condition in CONDITIONS:
        started = time.perf_counter()
        for i in range(repeats):
            render_photo(test_x[i], condition, np.random.default_rng(i))
        print(f"{condition:<16}{(time.perf_counter() - started) * 1000 / repeats:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/photo-set"))
    parser.add_argument("--per-condition", type=int, default=PER_CONDITION)
    parser.add_argument("--small", type=int, default=SMALL)
    parser.add_argument("--plain", type=int, default=PLAIN)
    parser.add_argument("--speed", action="store_true", help="only time the renderer")
    args = parser.parse_args()
    if args.speed:
        speed(20)
        return
    started = time.perf_counter()
    items = build(args.out_dir, args.per_condition, args.small, args.plain)
    print(f"{len(items)} images in {args.out_dir} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
