"""POST /v1/read: one image in a multipart part named `file` -> the digit it shows.

A read is refused 503 `overloaded` (with Retry-After) before its body is read when as many reads as
the service admits are in (app.admission); the body is capped on the raw stream (413 `too_large`,
see app.body_limit); the image type comes from its bytes, its size from its header (app.decode);
decoding, preprocessing and the forward pass run off the event loop.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Final

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from PIL import Image
from pydantic import BeforeValidator, Field

from app.body_limit import body_limit_route
from app.deps import ModelsDep, RedisDep, SettingsDep, get_models
from app.errors import ApiError, documented_errors, not_ready
from app.observability import READ_LATENCY
from app.prediction import ModelNotReadyError, PredictionTimeoutError, Reading, ReadOverloadedError
from app.preprocess import U8, PreprocessError
from config.settings import Settings

VISUAL_SCALE: Final = 8  # the 28x28 the model saw, enlarged to 224x224
_MULTIPART_OVERHEAD: Final = 16 * 1024  # boundaries and part headers around the image
_AUTO: Final = frozenset({"", "auto", "none", "null"})


def _body_cap(settings: Settings) -> int:
    return settings.api.read_max_bytes + _MULTIPART_OVERHEAD


def overloaded(exc: ReadOverloadedError) -> ApiError:
    return ApiError(503, "overloaded", exc.message, headers={"Retry-After": str(exc.retry_after_s)})


def _refuse_when_full(request: Request) -> None:
    """Before the body is read: a full read queue answers at once, without receiving the image."""
    try:
        get_models(request).admission.check()
    except ReadOverloadedError as exc:
        raise overloaded(exc) from exc


router = APIRouter(
    tags=["read"], route_class=body_limit_route(_body_cap, multipart=True, before_body=_refuse_when_full)
)


def _auto_is_none(value: object) -> object:
    return None if isinstance(value, str) and value.strip().lower() in _AUTO else value


# true (dark ink on light paper), false (light ink on dark), or auto (the default); also 1/0, yes/no, on/off.
Invert = Annotated[bool | None, BeforeValidator(_auto_is_none), Query(description="true, false or auto (default)")]


class ReadResponse(Reading):
    latency_ms: int = Field(description="whole milliseconds the read took on the server")
    visual_png_b64: str | None = None


def visual_png(preview: U8, scale: int = VISUAL_SCALE) -> bytes:
    big = np.kron(preview, np.ones((scale, scale), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(big, mode="L").save(out, format="PNG", optimize=False)
    return out.getvalue()


_ERRORS: Final = documented_errors({
    400: "`invalid_image`, `bad_dimensions` (too small, too elongated, or more pixels to decode than "
         "API__READ_MAX_PIXELS), `preprocessing_failed`, `malformed_multipart`",
    413: "`too_large`: the body is over API__READ_MAX_BYTES (refused from Content-Length, or at the first byte over)",
    415: "`unsupported_media_type`: not PNG or JPEG",
    503: "`overloaded` (with Retry-After: API__READ_QUEUE_MAX reads are in, refused before the body is read), "
         "or `service_not_ready` (no model yet)",
    504: "`timeout`: the read took longer than API__READ_TIMEOUT_S; its work is not carried on",
})


@router.post("/v1/read", response_model=ReadResponse, response_model_exclude_none=True, responses=_ERRORS)
async def read_digit(
    file: Annotated[UploadFile, File(description="the image, PNG or JPEG (the type comes from its bytes)")],
    models: ModelsDep,
    connection: RedisDep,
    app_settings: SettingsDep,
    invert: Invert = None,
    visualize: Annotated[bool, Query(description="include the 28x28 the model saw, as a PNG")] = False,
) -> ReadResponse:
    started = time.perf_counter()
    if not models.is_ready():
        raise await not_ready(connection, app_settings.rq.queue)
    cap = app_settings.api.read_max_bytes
    data = await file.read()
    if len(data) > cap:
        raise ApiError(413, "too_large", f"the image is {len(data)} bytes; images up to {cap} bytes are read")
    if not data:
        raise ApiError(400, "invalid_image", "the file part named 'file' is empty")

    try:
        prediction = await models.read_digit(data, invert=invert)
    except PreprocessError as exc:
        status = 415 if exc.code == "unsupported_media_type" else 400
        raise ApiError(status, exc.code, exc.message) from exc
    except ModelNotReadyError:
        raise await not_ready(connection, app_settings.rq.queue) from None
    except PredictionTimeoutError as exc:
        raise ApiError(504, "timeout", exc.message) from exc
    except ReadOverloadedError as exc:
        raise overloaded(exc) from exc

    visual = base64.b64encode(visual_png(prediction.preview)).decode("ascii") if visualize else None
    elapsed = time.perf_counter() - started
    READ_LATENCY.observe(elapsed)
    return ReadResponse(**prediction.reading.model_dump(), latency_ms=round(elapsed * 1000), visual_png_b64=visual)
