"""Request ids, structured JSON logs that carry them, and the Prometheus metrics."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final

from prometheus_client import Counter, Gauge, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER: Final = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["route", "method", "status"])
READ_LATENCY = Histogram(
    "read_latency_seconds",
    "Time to answer POST /v1/read",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0),
)
MODEL_SWAPS = Counter("model_swaps_total", "Models activated (hot swaps)")
FAILED_ACTIVATIONS = Counter("model_activation_failures_total", "Activations refused or failed")
GATE_DECISIONS = Counter("model_gate_decisions_total", "Promotion gate decisions on activating uploads",
                         ["decision"])  # passed | refused | forced
GATE_READY = Gauge("model_gate_ready", "1 once the promotion gate's set is built and the served model scored: "
                   "the next gate measures only the candidate; 0 while that is being prepared")
ACTIVE_MODEL = Gauge("active_model_info", "The model this replica serves (value 1)", ["model_id", "version"])
REPLICATION_EVENTS = Counter(
    "model_replication_events_total",
    "Model replication through Redis: versions published from here, received (now served), refused "
    "(failed a check), and errors (Redis unreachable)",
    ["event"],
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        for key in ("job_id", "model_id", "version", "route", "status", "duration_ms"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RequestIdMiddleware:
    """Echo a sane X-Request-ID or make one; count every request by route template and status.

    Plain ASGI (not BaseHTTPMiddleware) so it adds no task hop to the read path.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SAFE_ID.match(incoming) else new_request_id()
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answer here, inside the request id's scope, with the same envelope as every other error.
            logging.getLogger("app.errors").exception("unhandled error")
            if started_response:
                raise
            body = json.dumps({"code": "internal_error", "message": "internal error; the request id is in "
                               "the logs", "request_id": request_id}).encode()
            await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(route=path, method=scope["method"], status=str(status)).inc()
            logging.getLogger("app.access").info(
                "%s %s %s", scope["method"], path, status,
                extra={"route": path, "status": status,
                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            _request_id.reset(token)
