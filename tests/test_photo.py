"""The photo renderer: every condition gives a file /v1/read accepts, the same rng gives the same bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.photo import CONDITIONS, PHOTO_CONDITIONS, SMALL_UPSCALED, render_photo
from app.preprocess import preprocess


def ring_digit() -> np.ndarray:
    """A 28x28 '0' in MNIST form: light ink on black, about 20 px tall, strokes 2-3 px."""
    ys, xs = np.mgrid[0:28, 0:28].astype(np.float32)
    r = np.hypot((ys - 13.5) / 9.5, (xs - 13.5) / 7.0)
    ring: np.ndarray = (np.clip(1.0 - np.abs(r - 0.85) / 0.15, 0, 1) * 255).astype(np.uint8)
    return ring


DIGIT = ring_digit()


@pytest.mark.parametrize("condition", CONDITIONS)
def test_every_condition_renders_a_file_the_service_reads(condition: str) -> None:
    data = render_photo(DIGIT, condition, np.random.default_rng(7))
    assert data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert min(img.size) >= 64
    # The digit is there to find: preprocessing finds ink and centres it.
    preview = preprocess(data).preview
    assert preview.max() > 200 and preview[:2].max() == 0


@pytest.mark.parametrize("condition", CONDITIONS)
def test_the_same_rng_state_gives_the_same_bytes(condition: str) -> None:
    first = render_photo(DIGIT, condition, np.random.default_rng(123))
    again = render_photo(DIGIT, condition, np.random.default_rng(123))
    other = render_photo(DIGIT, condition, np.random.default_rng(124))
    assert first == again
    assert first != other


def test_conditions_cover_grey_rgba_jpeg_png_and_phone_sizes() -> None:
    modes, formats, sides = set(), set(), []
    for i in range(12):
        for condition in ("grey_file", "rgba_drawing", "phone_photo", "pen"):
            with Image.open(io.BytesIO(render_photo(DIGIT, condition, np.random.default_rng(i)))) as img:
                modes.add(img.mode)
                formats.add(img.format)
                sides.append(max(img.size))
    assert {"L", "RGB", "RGBA"} <= modes
    assert formats == {"JPEG", "PNG"}
    assert max(sides) >= 900


def test_small_upscaled_digits_are_blocky_and_112_to_224_px() -> None:
    for i in range(8):
        with Image.open(io.BytesIO(render_photo(DIGIT, SMALL_UPSCALED, np.random.default_rng(i)))) as img:
            gray = np.asarray(img.convert("L"), dtype=np.int16)
        assert 112 <= gray.shape[0] <= 224
        # The rows change in few places: the image is a small drawing enlarged without smoothing
        # (JPEG's ringing aside, so a change is a clear one).
        changes = int((np.abs(np.diff(gray, axis=0)).mean(axis=1) > 10).sum())
        assert changes <= 12
    assert SMALL_UPSCALED not in PHOTO_CONDITIONS


def test_refuses_what_is_not_an_mnist_digit_or_a_condition() -> None:
    with pytest.raises(ValueError, match="condition"):
        render_photo(DIGIT, "watercolour", np.random.default_rng(0))
    with pytest.raises(ValueError, match="28x28"):
        render_photo(np.zeros((32, 32), dtype=np.uint8), "pen", np.random.default_rng(0))
