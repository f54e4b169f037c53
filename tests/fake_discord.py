"""A fake Discord API and CDN on loopback: a real HTTP server in a thread that records every call.

By default it behaves like Discord for what we use (webhook edits, DM channels, messages, command
registration) and serves attachment bytes. `script()` queues scripted answers for matching calls:
404-then-200, 429 with `retry_after`, 401/403, slow answers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_PREFIX = "/api/v10"


@dataclass
class Call:
    method: str
    path: str  # without the /api/v10 prefix for API calls
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Scripted:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class FileEntry:
    data: bytes
    content_type: str
    delay_s: float = 0.0
    status: int = 200


class FakeDiscord:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.files: dict[str, FileEntry] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}
        self._scripts: list[tuple[str, re.Pattern[str], list[Scripted]]] = []
        self._lock = threading.Lock()
        self._next_id = 1000
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake._dispatch(self, body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeDiscord:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_base(self) -> str:
        return self.url + API_PREFIX

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self._scripts.clear()
            self.files.clear()
            self.commands.clear()

    # -- test controls -----------------------------------------------------------------------------

    def script(self, method: str, path_pattern: str, *answers: Scripted) -> None:
        """The next calls matching `method` + regex `path_pattern` get these answers, in order."""
        with self._lock:
            self._scripts.append((method, re.compile(path_pattern), list(answers)))

    def add_file(self, name: str, data: bytes, content_type: str = "image/png", *, delay_s: float = 0.0,
                 status: int = 200) -> str:
        """Serve `data` at a CDN URL; returns the URL."""
        path = f"/attachments/{name}"
        with self._lock:
            self.files[path] = FileEntry(data, content_type, delay_s, status)
        return self.url + path

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        rx = re.compile(pattern)
        with self._lock:
            return [c for c in self.calls if c.method == method and rx.search(c.path)]

    def wait_for(self, method: str, pattern: str, count: int = 1, timeout: float = 10.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.calls_to(method, pattern)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} x {method} {pattern}, got {len(found)}; all calls: "
                    + ", ".join(f"{c.method} {c.path}" for c in self.calls)
                )
            time.sleep(0.02)

    # -- behaviour ---------------------------------------------------------------------------------

    def _dispatch(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        method = handler.command
        raw_path = handler.path.split("?", 1)[0]
        path = raw_path[len(API_PREFIX):] if raw_path.startswith(API_PREFIX) else raw_path
        call = Call(method, path, {k.lower(): v for k, v in handler.headers.items()}, body, time.monotonic())
        with self._lock:
            self.calls.append(call)
            scripted = None
            for m, rx, answers in self._scripts:
                if m == method and rx.search(path) and answers:
                    scripted = answers.pop(0)
                    break
        if scripted is not None:
            if scripted.delay_s:
                time.sleep(scripted.delay_s)
            self._send(handler, scripted.status, scripted.body, scripted.headers)
            return
        if path.startswith("/attachments/"):
            entry = self.files.get(path)
            if entry is None:
                self._send(handler, 404, {"message": "Not Found"})
                return
            if entry.delay_s:
                time.sleep(entry.delay_s)
            self._send_bytes(handler, entry.status, entry.data, entry.content_type)
            return
        if not raw_path.startswith(API_PREFIX):
            self._send(handler, 404, {"message": "404: Not Found", "code": 0})
            return
        self._send(handler, *self._api(method, path, call))

    def _api(self, method: str, path: str, call: Call) -> tuple[int, Any]:
        if method == "PATCH" and re.fullmatch(r"/webhooks/[^/]+/[^/]+/messages/@original", path):
            return 200, {"id": self._id(), **(call.json() or {})}
        if method == "POST" and path == "/users/@me/channels":
            recipient = (call.json() or {}).get("recipient_id")
            return 200, {"id": f"9{recipient}", "type": 1}
        if method == "POST" and re.fullmatch(r"/channels/[^/]+/messages", path):
            return 200, {"id": self._id(), **(call.json() or {})}
        m = re.fullmatch(r"/applications/([^/]+)(?:/guilds/([^/]+))?/commands", path)
        if m:
            scope = m.group(2) or "global"
            if method == "GET":
                return 200, self.commands.get(scope, [])
            if method == "PUT":
                stored = []
                for command in call.json() or []:
                    stored.append({"id": self._id(), "application_id": m.group(1), "version": self._id(),
                                   "default_member_permissions": None, "nsfw": False, **command})
                    for option in stored[-1].get("options", []):
                        if option.get("required") is False:
                            del option["required"]  # as Discord does
                self.commands[scope] = stored
                return 200, stored
        return 404, {"message": "Unknown route in fake Discord", "code": 0}

    def _id(self) -> str:
        with self._lock:
            self._next_id += 1
            return str(self._next_id)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        FakeDiscord._send_bytes(handler, status, data, "application/json", headers)

    @staticmethod
    def _send_bytes(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str,
                    headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)


def rate_limited(retry_after: float, *, is_global: bool = False) -> Scripted:
    return Scripted(
        429,
        {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global},
        {"Retry-After": str(max(1, round(retry_after))), "X-RateLimit-Scope": "user"},
    )


def not_found(code: int = 10008) -> Scripted:
    return Scripted(404, {"message": "Unknown Message", "code": code})
