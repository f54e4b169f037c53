"""POST /v1/read: one image in a multipart part named `file` -> the digit it shows.

The body is counted as it streams (413 `too_large` at the cap, and at once when Content-Length
already says so), the image type comes from its bytes, and preprocessing and the forward pass
run off the event loop.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Final

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, Field

from app.deps import ModelsDep, RedisDep, SettingsDep
from app.errors import ApiError, not_ready
from app.multipart import (
    BodyTooLargeError,
    FileSpec,
    MalformedMultipartError,
    openapi_multipart,
    parse_flag,
    read_multipart,
)
from app.observability import READ_LATENCY
from app.preprocess import U8, PreprocessError
from app.serving import ModelNotReadyError, PredictionTimeoutError

router = APIRouter(tags=["read"])

VISUAL_SCALE: Final = 8  # the 28x28 the model saw, enlarged to 224x224
_MULTIPART_OVERHEAD: Final = 16 * 1024  # boundaries and part headers around the image
_AUTO: Final = frozenset({"", "auto", "none", "null"})

_OPENAPI_BODY: Final = openapi_multipart(
    ["file"], {"file": {"type": "string", "format": "binary", "description": "PNG or JPEG"}}
)


class ReadResponse(BaseModel):
    digit: int
    confidence: float
    probs: list[float]
    model_id: str
    version: str
    uncertain: bool
    latency_ms: int = Field(description="whole milliseconds the read took on the server")
    visual_png_b64: str | None = None


def parse_invert(value: str | None) -> bool | None:
    """`invert`: true (dark ink on light paper), false (light ink on dark), or auto (the default)."""
    if (value or "").strip().lower() in _AUTO:
        return None
    flag = parse_flag(value or "")
    if flag is not None:
        return flag
    raise ApiError(422, "invalid_request", f"invert must be true, false or auto, not {value!r}")


def visual_png(preview: U8, scale: int = VISUAL_SCALE) -> bytes:
    big = np.kron(preview, np.ones((scale, scale), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(big, mode="L").save(out, format="PNG", optimize=False)
    return out.getvalue()


def check_content_length(request: Request, cap: int) -> None:
    """Refuse a body whose declared length is already over `cap`, before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "too_large", f"request body of {declared} bytes is over the limit of {cap} bytes")


@router.post("/v1/read", response_model=ReadResponse, response_model_exclude_none=True, openapi_extra=_OPENAPI_BODY)
async def read_digit(
    request: Request,
    models: ModelsDep,
    connection: RedisDep,
    app_settings: SettingsDep,
    invert: Annotated[str | None, Query(description="true, false or auto (default)")] = None,
    visualize: Annotated[bool, Query(description="include the 28x28 the model saw, as a PNG")] = False,
) -> ReadResponse:
    started = time.perf_counter()
    settings = app_settings.api
    invert_flag = parse_invert(invert)
    if not models.is_ready():
        raise await not_ready(connection, app_settings.rq.queue)
    cap = settings.read_max_bytes
    check_content_length(request, cap + _MULTIPART_OVERHEAD)
    try:
        form = await read_multipart(
            request.headers.get("content-type"),
            request.stream(),
            files={"file": FileSpec(max_bytes=cap)},
            max_total=cap + _MULTIPART_OVERHEAD,
        )
    except BodyTooLargeError as exc:
        raise ApiError(413, "too_large", f"{exc.message} (images up to {cap} bytes are read)") from exc
    except MalformedMultipartError as exc:
        raise ApiError(400, "malformed_multipart", exc.message) from exc
    upload = form.files.get("file")
    if upload is None:
        raise ApiError(400, "malformed_multipart", "expected one file part named 'file' holding a PNG or JPEG image")
    if upload.size == 0:
        raise ApiError(400, "invalid_image", "the file part named 'file' is empty")

    try:
        prediction = await models.read_digit(upload.data, invert=invert_flag)
    except PreprocessError as exc:
        status = 415 if exc.code == "unsupported_media_type" else 400
        raise ApiError(status, exc.code, exc.message) from exc
    except ModelNotReadyError:
        raise await not_ready(connection, app_settings.rq.queue) from None
    except PredictionTimeoutError as exc:
        raise ApiError(504, "timeout", exc.message) from exc

    visual = base64.b64encode(visual_png(prediction.preview)).decode("ascii") if visualize else None
    elapsed = time.perf_counter() - started
    READ_LATENCY.observe(elapsed)
    return ReadResponse(
        digit=prediction.digit,
        confidence=prediction.confidence,
        probs=prediction.probs,
        model_id=prediction.model_id,
        version=prediction.version,
        uncertain=prediction.uncertain,
        latency_ms=round(elapsed * 1000),
        visual_png_b64=visual,
    )
