"""The one error envelope of the API: `{"code", "message", "request_id"}` with a stable `code`."""

from __future__ import annotations

import asyncio
from typing import Final

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.contracts import describe_errors
from app.observability import current_request_id
from app.prediction import NOT_READY_MESSAGE
from app.queue import TrainingUnavailableError, describe_training, training_in_progress

_CODE_BY_STATUS: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


class ErrorBody(BaseModel):
    """Every error's body."""

    code: str
    message: str
    request_id: str | None


def documented_errors(described: dict[int, str]) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses=` for a route: each status with the error envelope and the codes it may carry."""
    return {status: {"model": ErrorBody, "description": text} for status, text in described.items()}


class ApiError(Exception):
    """Raise from any route to answer with the envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"code": code, "message": message, "request_id": current_request_id()}
    return JSONResponse(status_code=status, content=body, headers=headers)


async def not_ready(connection: redis.Redis | None, queue_name: str) -> ApiError:
    """503 `service_not_ready`, saying how far a training in progress is, or how to get a model."""
    job = await asyncio.to_thread(training_in_progress, connection, queue_name)
    if job is None:
        return ApiError(503, "service_not_ready", NOT_READY_MESSAGE)
    return ApiError(503, "service_not_ready", f"no model is loaded yet: {describe_training(job)}")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _training_unavailable(_: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "training_unavailable", str(exc))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", "invalid request: " + describe_errors(exc.errors()))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_STATUS.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(TrainingUnavailableError, _training_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
