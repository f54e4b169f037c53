"""Image bytes -> a small grayscale array, upright, alpha on white, at most `WORK_SIDE` px a side.

A stranger chooses the bytes, so the cost is decided from the header before anything is decoded:

- the size comes from the header (PNG IHDR, JPEG SOF) and is checked first;
- a baseline JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (`Image.draft`), so a 12 MP
  photo costs what a 0.2 MP one does, and the budget applies to what it decodes to;
- a PNG (and a progressive JPEG, which keeps every DCT coefficient of the whole image while it
  decodes) cannot decode reduced, so its header size must be within the budget itself;
- the decoded image is reduced (`Image.reduce`) before any other copy: the EXIF orientation is
  applied to the reduced image, and grey conversion and alpha compositing happen on it.

The budget, `max_pixels`, is what one decode may hold at full size. `DEFAULT_MAX_PIXELS` comes
from what preprocessing needs: it works at `WORK_SIDE` px, so twelve times that a side is more
detail than it ever uses (an A4 page scanned at 300 dpi, any phone screenshot), and at 4 bytes a
pixel a decode holds at most 36 MiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import warnings
from collections.abc import Iterator
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image

U8 = npt.NDArray[np.uint8]

# Part of PREPROCESS_HASH (app.preprocess hashes them): change one and models trained before are refused.
WORK_SIDE: Final = 256  # longer side the image is reduced to before any analysis
MIN_SIDE: Final = 8  # smaller images carry no readable digit
MAX_ASPECT: Final = 20.0
MIN_INK_CONTRAST: Final = 32  # of 255: weaker than this everywhere means there is no digit

# Not hashed: limits, not steps.
DEFAULT_MAX_PIXELS: Final = (12 * WORK_SIDE) ** 2  # 9,437,184 px; API__READ_MAX_PIXELS's default
JPEG_MAX_DRAFT_SCALE: Final = 8  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8
# A decode holding more than this (a photo's JPEG at 1/8 holds ~0.2 MP) is heavy: it may take
# hundreds of milliseconds, and only some of the decode threads take such work at once (app.admission).
HEAVY_DECODE_PIXELS: Final = (4 * WORK_SIDE) ** 2

PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC: Final = b"\xff\xd8\xff"

# Modes Image.reduce averages correctly; any other is converted (to L, or LA with alpha) first.
_REDUCIBLE: Final = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does).
_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class PreprocessError(Exception):
    """Base of every error decoding and preprocessing raise; `code` is the API's stable error code."""

    code: str = "preprocessing_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedImageTypeError(PreprocessError):
    code = "unsupported_media_type"


class InvalidImageError(PreprocessError):
    code = "invalid_image"


class BadDimensionsError(PreprocessError):
    code = "bad_dimensions"


def sniff_image_type(data: bytes) -> str | None:
    """'png' or 'jpeg' from the leading bytes, else None."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def check_dimensions(width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse shapes that cannot hold a digit (a side under MIN_SIDE, longer than MAX_ASPECT times wide),
    and more than `max_pixels` when given."""
    if max_pixels is not None and width * height > max_pixels:
        raise BadDimensionsError(f"image is {width}x{height}: over the limit of {max_pixels} pixels")
    if min(width, height) < MIN_SIDE:
        raise BadDimensionsError(f"image is {width}x{height}: each side must be at least {MIN_SIDE} px")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadDimensionsError(f"image is {width}x{height}: too elongated to hold a digit")


def decoded_pixels(data: bytes, *, max_pixels: int) -> int:
    """How many pixels `decode_gray` will hold for these bytes, from the header alone (nothing decoded).
    Raises what `decode_gray` raises for a type, shape or size it refuses."""
    kind = _kind(data)
    with _as_preprocess_errors(kind):
        opened = _open_planned(data, kind, max_pixels)
        return opened.size[0] * opened.size[1]


def decode_gray(data: bytes, *, max_pixels: int) -> U8:
    """Decode PNG/JPEG bytes to a grayscale uint8 array, upright, alpha on white, <= WORK_SIDE px.

    Raises UnsupportedImageTypeError (not PNG/JPEG), BadDimensionsError (shape, or over `max_pixels`
    as decoded; see the module's docstring), InvalidImageError (does not decode).
    """
    kind = _kind(data)
    with _as_preprocess_errors(kind):
        gray, decoded = _decode(_open_planned(data, kind, max_pixels))
    if decoded > HEAVY_DECODE_PIXELS:  # its tens of MB are free now: back to the system, not kept by malloc
        return_freed_heap()
    return gray


def _decode(opened: Image.Image) -> tuple[U8, int]:
    """The planned image decoded, upright, grey and small; and how many pixels its decode held."""
    opened.load()
    decoded = opened.size[0] * opened.size[1]
    orientation = opened.getexif().get(ExifTags.Base.Orientation)  # a PNG's eXIf may follow its pixels
    img = _reduced(opened)
    if isinstance(orientation, int) and orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[orientation])
    gray = to_gray(img)
    if max(gray.width, gray.height) > WORK_SIDE:
        gray.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.uint8), decoded


def return_freed_heap() -> None:
    """Hand freed heap back to the system after work that freed tens of MB at once (a heavy decode, a model's
    export): glibc keeps it for reuse otherwise, and the process stays that much bigger."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _kind(data: bytes) -> str:
    kind = sniff_image_type(data)
    if kind is None:
        raise UnsupportedImageTypeError("only PNG and JPEG images are accepted")
    return kind


@contextlib.contextmanager
def _as_preprocess_errors(kind: str) -> Iterator[None]:
    """What Pillow raises for bad bytes, as this module's errors."""
    try:
        yield
    except PreprocessError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadDimensionsError(f"image has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(f"the {kind.upper()} data could not be decoded: {exc}") from exc


def _open_planned(data: bytes, kind: str, max_pixels: int) -> Image.Image:
    """The image opened from its header (nothing decoded), its shape checked and its decode scale set."""
    with warnings.catch_warnings():
        # Pillow's own guard (89 MP) as an error: far past any budget, refused from the header.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    check_dimensions(*opened.size)
    _plan_decode(opened, kind, max_pixels)
    return opened


def _plan_decode(opened: Image.Image, kind: str, max_pixels: int) -> None:
    """Choose the decode scale (JPEG draft) and refuse, before decoding, what would hold over `max_pixels`."""
    width, height = opened.size
    longer = max(width, height)
    progressive = kind == "jpeg" and bool(opened.info.get("progressive"))
    if kind == "jpeg" and not progressive and longer > WORK_SIDE:
        # DCT-domain downscaling: the smallest of 1/2, 1/4, 1/8 that still gives at least WORK_SIDE.
        opened.draft("L", (width * WORK_SIDE // longer, height * WORK_SIDE // longer))
    decoded = opened.size[0] * opened.size[1]
    if decoded <= max_pixels:
        return
    mp = f"{width * height / 1e6:.1f} MP"
    if kind == "png" or progressive:
        what = "a PNG" if kind == "png" else "a progressive JPEG"
        raise BadDimensionsError(
            f"image is {width}x{height} ({mp}): {what} is decoded whole, and this service decodes at most "
            f"{max_pixels} pixels; send it smaller, or as a baseline JPEG"
        )
    raise BadDimensionsError(
        f"image is {width}x{height} ({mp}): even at 1/{JPEG_MAX_DRAFT_SCALE} scale it is over the "
        f"{max_pixels} pixels this service decodes; send it smaller"
    )


def _reduced(img: Image.Image) -> Image.Image:
    """The decoded image box-reduced to at most 2 x WORK_SIDE a side, in a mode that reduces correctly."""
    if img.mode not in _REDUCIBLE:
        img = img.convert("LA" if _has_alpha(img) else "L")
    longer = max(img.width, img.height)
    if longer > 2 * WORK_SIDE:
        img = img.reduce(longer // WORK_SIDE)
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def to_gray(img: Image.Image) -> Image.Image:
    """Grayscale L; alpha composited on white, or the alpha itself when that is where the drawing is."""
    if not _has_alpha(img):
        return img.convert("L")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, rgba).convert("L")
    alpha = rgba.getchannel("A")
    flat_range = np.ptp(np.asarray(flat, dtype=np.uint8))
    alpha_range = np.ptp(np.asarray(alpha, dtype=np.uint8))
    if int(flat_range) < MIN_INK_CONTRAST and int(alpha_range) >= MIN_INK_CONTRAST:
        # Light ink drawn on a transparent canvas vanishes on white: the alpha channel is the drawing.
        return alpha
    return flat
