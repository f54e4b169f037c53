"""Preprocessing: any reasonable picture of a digit maps to the same 28x28; bad input gives typed errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from app import preprocess as preprocess_module
from app.percentile import percentile_f32, percentiles
from app.preprocess import (
    BOX_SIDE,
    PREPROCESS_DESCRIPTION,
    PREPROCESS_HASH,
    BadDimensionsError,
    InvalidImageError,
    NoDigitFoundError,
    PreprocessError,
    UnsupportedImageTypeError,
    preprocess,
    preprocess_gray,
)
from tests.images import draw_digit, encode, with_alpha_on_transparent

REFERENCE = draw_digit("7", size=(200, 200))


def preview(data: bytes, invert: bool | None = None) -> np.ndarray:
    return preprocess(data, invert=invert).preview.astype(np.float32) / 255.0


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 28x28 previews (1.0 = identical)."""
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return preview(encode(REFERENCE))


def test_output_shape_dtype_and_normalisation(reference: np.ndarray) -> None:
    result = preprocess(encode(REFERENCE))
    assert result.tensor.shape == (1, 1, 28, 28)
    assert result.tensor.dtype == torch.float32
    assert result.preview.shape == (28, 28) and result.preview.dtype == np.uint8
    # MNIST layout: white ink on black, background exactly zero.
    assert result.preview[0].max() == 0 and result.preview.max() > 200
    assert result.tensor.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)


def test_ink_fits_20px_box_centred_by_mass(reference: np.ndarray) -> None:
    rows = np.flatnonzero(reference.any(axis=1))
    cols = np.flatnonzero(reference.any(axis=0))
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == BOX_SIDE
    ys, xs = np.mgrid[0:28, 0:28]
    cy = (ys * reference).sum() / reference.sum()
    cx = (xs * reference).sum() / reference.sum()
    assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0


@pytest.mark.parametrize(
    ("name", "img"),
    [
        ("small", draw_digit("7", size=(60, 60), box=(0.2, 0.15, 0.55, 0.7))),
        ("large", draw_digit("7", size=(1600, 1200), box=(0.4, 0.3, 0.2, 0.4))),
        ("corner", draw_digit("7", size=(300, 300), box=(0.02, 0.55, 0.25, 0.4))),
        ("light_on_dark", draw_digit("7", ink=(250, 250, 250), paper=(10, 10, 30))),
        ("blue_ink", draw_digit("7", ink=(20, 40, 200), paper=(255, 255, 255))),
        ("red_on_yellow", draw_digit("7", ink=(200, 10, 10), paper=(250, 240, 120))),
        ("grayscale", draw_digit("7", mode="L")),
        ("palette", draw_digit("7").convert("P")),
        ("transparent_canvas", with_alpha_on_transparent("7")),
    ],
)
def test_same_digit_same_28x28(name: str, img: Image.Image, reference: np.ndarray) -> None:
    assert similarity(preview(encode(img)), reference) > 0.85, name


def test_jpeg_with_noise_and_uneven_lighting(reference: np.ndarray) -> None:
    img = draw_digit("7", size=(640, 480), box=(0.35, 0.2, 0.3, 0.6))
    arr = np.asarray(img).astype(np.float32)
    gradient = np.linspace(-90, 10, 640, dtype=np.float32)[None, :, None]  # a shadow across the page
    noise = np.random.default_rng(0).normal(0, 8, arr.shape).astype(np.float32)
    photo = Image.fromarray(np.clip(arr + gradient + noise, 0, 255).astype(np.uint8))
    photo = photo.filter(ImageFilter.GaussianBlur(1))
    assert similarity(preview(encode(photo, "JPEG", quality=70)), reference) > 0.85


def test_specks_are_dropped(reference: np.ndarray) -> None:
    arr = np.asarray(draw_digit("7")).copy()
    rng = np.random.default_rng(1)
    for y, x in rng.integers(0, 200, size=(30, 2)):
        arr[y : y + 2, x : x + 2] = 0  # pepper specks all over the page
    assert similarity(preview(encode(Image.fromarray(arr))), reference) > 0.85


def test_exif_orientation_is_applied(reference: np.ndarray) -> None:
    rotated = REFERENCE.rotate(90, expand=True)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag saying "rotate 90 clockwise to view"
    assert similarity(preview(_jpeg_with_exif(rotated, exif)), reference) > 0.85
    # Without the tag the same pixels read sideways: the tag is what made the difference.
    assert similarity(preview(encode(rotated, "JPEG", quality=95)), reference) < 0.7


def _jpeg_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_invert_override(reference: np.ndarray) -> None:
    dark_on_light = encode(draw_digit("7"))
    light_on_dark = encode(draw_digit("7", ink=(255, 255, 255), paper=(0, 0, 0)))
    assert similarity(preview(dark_on_light, invert=True), reference) > 0.95
    assert similarity(preview(light_on_dark, invert=False), reference) > 0.95
    # Forcing the wrong polarity reads the paper as ink: whatever comes out is not the digit.
    with contextlib.suppress(PreprocessError):
        assert similarity(preview(dark_on_light, invert=False), reference) < 0.7


def test_distinct_digits_stay_distinct(reference: np.ndarray) -> None:
    four = preview(encode(draw_digit("4")))
    assert similarity(four, reference) < 0.7


def test_mnist_like_input_is_nearly_unchanged() -> None:
    """A 28x28 image already in MNIST form (what the worker feeds) comes out almost the same."""
    src = preview(encode(REFERENCE))
    again = preprocess_gray((src * 255).astype(np.uint8), invert=False).preview.astype(np.float32) / 255
    assert np.abs(again - src).mean() < 0.03


CONSTANTS = sorted(json.loads(PREPROCESS_DESCRIPTION)["constants"])


def test_hash_is_the_sha256_of_the_canonical_description_with_the_constants_in_use() -> None:
    assert hashlib.sha256(PREPROCESS_DESCRIPTION.encode("utf-8")).hexdigest() == PREPROCESS_HASH
    described = json.loads(PREPROCESS_DESCRIPTION)
    assert described["constants"] == {name: getattr(preprocess_module, name) for name in CONSTANTS}
    assert {"BOX_SIDE", "CANVAS", "MNIST_MEAN", "MNIST_STD", "TARGET_STROKE_PX"} <= set(CONSTANTS)


@pytest.mark.parametrize("name", CONSTANTS)
def test_changing_any_preprocessing_constant_changes_the_hash(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess_module, name, getattr(preprocess_module, name) * 2)
    changed = preprocess_module._canonical_description()
    assert hashlib.sha256(changed.encode("utf-8")).hexdigest() != PREPROCESS_HASH


# --- bad input: each a specific, catchable error --------------------------------------------------


def test_blank_image() -> None:
    with pytest.raises(NoDigitFoundError, match="no digit"):
        preprocess(encode(Image.new("L", (100, 100), 255)))
    with pytest.raises(NoDigitFoundError):
        preprocess(encode(Image.new("RGB", (100, 100), (30, 30, 30)), "JPEG"))


@pytest.mark.parametrize("size", [(1, 1), (20000, 1), (1, 5000), (7, 100)])
def test_bad_dimensions(size: tuple[int, int]) -> None:
    with pytest.raises(BadDimensionsError):
        preprocess(encode(Image.new("L", size, 255)))


def test_too_elongated() -> None:
    with pytest.raises(BadDimensionsError, match="elongated"):
        preprocess(encode(Image.new("L", (2000, 20), 255)))


def test_corrupt_bytes() -> None:
    with pytest.raises(UnsupportedImageTypeError):
        preprocess(b"definitely not an image" * 10)
    with pytest.raises(UnsupportedImageTypeError):
        preprocess(b"")
    with pytest.raises(UnsupportedImageTypeError):
        preprocess(encode(REFERENCE, "GIF"))


def test_png_magic_with_garbage_after() -> None:
    with pytest.raises(InvalidImageError):
        preprocess(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)


def test_truncated_png_and_jpeg() -> None:
    png = encode(REFERENCE)
    with pytest.raises(InvalidImageError):
        preprocess(png[: len(png) // 2])
    jpeg = encode(REFERENCE, "JPEG")
    with pytest.raises(InvalidImageError):
        preprocess(jpeg[: len(jpeg) // 3])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    """A 100000x100000 PNG header over a tiny payload: refused from the header, nothing allocated."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    bomb += _png_chunk(b"IEND", b"")
    with pytest.raises(BadDimensionsError, match="pixels"):
        preprocess(bomb)


def test_pixel_cap_is_configurable() -> None:
    with pytest.raises(BadDimensionsError):
        preprocess(encode(REFERENCE), max_pixels=100 * 100)


def test_every_error_carries_an_api_code() -> None:
    codes = {cls.code for cls in (UnsupportedImageTypeError, InvalidImageError, BadDimensionsError, NoDigitFoundError)}
    assert codes == {"unsupported_media_type", "invalid_image", "bad_dimensions", "preprocessing_failed"}


@pytest.mark.parametrize("seed", range(4))
def test_our_percentiles_are_numpys_to_the_last_bit(seed: int) -> None:
    """Preprocessing takes its percentiles from app.percentile (numpy's own costs ~110 us in Python on a small
    array); a model's PREPROCESS_HASH promises the same 28x28 as before, so every value must be numpy's exactly."""
    rng = np.random.default_rng(seed)
    for _ in range(500):
        n = int(rng.integers(1, 2000))
        low, high = sorted(int(v) for v in rng.integers(0, 256, 2))
        grey = rng.integers(low, high + 1, n).astype(np.uint8).reshape(1, n)  # any shape: the ring, a 2-D image
        for qs in ((5.0, 25.0, 50.0, 75.0, 95.0), (0.5, 50.0, 99.5), (0.0, 100.0)):
            assert percentiles(grey, qs) == tuple(float(v) for v in np.percentile(grey, qs))
        assert percentiles(grey, (5.0,)) == (float(np.percentile(grey, 5.0)),)  # one quantile: numpy's scalar path
        runs = rng.integers(3, 300, n).astype(np.float32) * np.float32(rng.uniform(0.2, 3.0))
        for q in (10.0, 0.0, 37.5, 100.0):
            assert percentile_f32(runs, q) == float(np.percentile(runs, q))
