"""Request body caps, per route, counted on the raw ASGI stream before anything parses the body.

Starlette's form parser spools file parts to temporary files with no total cap, and FastAPI reads
the body before it runs any dependency (the API key included), so the cap has to sit under the
parser: `body_limit_route(cap)` is a route class whose requests are refused with 413 `too_large`
at once when Content-Length is over the cap, and at the first byte over it otherwise (chunked).
With `multipart=True` it adds what the upload routes share: a missing part, or a body that is not
multipart/form-data, answers 400 `malformed_multipart`.

    router = APIRouter(route_class=body_limit_route(1024 * 1024))
    router.add_api_route(path, endpoint, methods=["POST"], route_class_override=body_limit_route(cap_of))
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Final

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from app.deps import get_settings_dep
from app.errors import ApiError
from config.settings import Settings

# Every JSON body this API takes (POST /v1/train, Discord interactions) is far smaller than this.
JSON_MAX_BYTES: Final = 64 * 1024

# A cap in bytes, fixed or read from the app's settings (per app, so tests can set their own).
BodyCap = int | Callable[[Settings], int]
Handler = Callable[[Request], Coroutine[object, object, Response]]


class BodyTooLarge(HTTPException):
    """413 `too_large` (app.errors renders it). An HTTPException, so FastAPI's body reading passes it on."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body is over this endpoint's limit of {cap} bytes")


def _counted(receive: Receive, cap: int) -> Receive:
    received = 0

    async def receive_counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise BodyTooLarge(cap)
        return message

    return receive_counted


def _multipart_errors(handler: Handler) -> Handler:
    """A missing part, or a body Starlette's parser refuses (not multipart, no boundary), is 400."""

    async def parsed(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestValidationError as exc:
            missing = [repr(e["loc"][-1]) for e in exc.errors() if e["type"] == "missing" and e["loc"][0] == "body"]
            if not missing:
                raise
            message = f"expected a multipart/form-data body with the part(s) {', '.join(missing)}; missing or empty"
            raise ApiError(400, "malformed_multipart", message) from exc
        except HTTPException as exc:
            if exc.status_code != 400:
                raise
            raise ApiError(400, "malformed_multipart", f"malformed multipart body: {exc.detail}") from exc

    return parsed


def body_limit_route(
    cap: BodyCap, *, multipart: bool = False, before_body: Callable[[Request], None] | None = None
) -> type[APIRoute]:
    """A route class refusing bodies over `cap` bytes before the body is parsed or any dependency runs;
    with `multipart`, unparseable bodies and missing parts answer 400 `malformed_multipart`;
    `before_body` (e.g. the API key check) runs after the Content-Length check, before any byte is read."""

    class BodyLimitRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            if multipart:
                # The stream's cap bounds the whole body; these bound what the parser keeps in memory:
                # plain fields (model_id, activate) are short, and a client sends a handful of parts.
                self.form_limits = {"max_fields": 16, "max_files": 16, "max_part_size": 1024, **self.form_limits}
            handler = super().get_route_handler()
            inner = _multipart_errors(handler) if multipart else handler

            async def limited(request: Request) -> Response:
                limit = cap if isinstance(cap, int) else cap(get_settings_dep(request))
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise BodyTooLarge(limit)
                if before_body is not None:
                    before_body(request)
                return await inner(Request(request.scope, _counted(request.receive, limit)))

            return limited

    return BodyLimitRoute
