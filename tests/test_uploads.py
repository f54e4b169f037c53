"""The two multipart routes (POST /v1/read, POST /v1/admin/models/upload) through FastAPI's own machinery.

Their bodies are capped on the raw ASGI stream, before the form parser (which spools file parts
with no total cap) and before the API key is checked; OpenAPI describes both bodies by itself.
The cap tests drive the real app at the ASGI level, so they see exactly how much of the body was read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.types import Message

from app.main import create_app
from tests.serving_support import (
    API_KEY,
    install_model,
    make_settings,
    manifest,
    running_app,
    store_snapshot,
    upload_files,
    weights_bytes,
)

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
READ_CAP = 8 * 1024  # API__READ_MAX_BYTES in these tests
MODEL_CAP = 1024 * 1024  # API__MODEL_MAX_BYTES in these tests


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def file_part_head(name: str) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()


class Sent:
    """A file part without end (well, 32 MiB) fed to the app chunk by chunk, counting what the app pulled."""

    def __init__(self, part: str) -> None:
        self.chunks: Iterator[bytes] = itertools.chain([file_part_head(part)], itertools.repeat(b"\x07" * CHUNK))
        self.bytes = 0

    async def receive(self) -> Message:
        if self.bytes >= 32 * 1024 * 1024:  # a body limit that fails lets the test end, failing
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = next(self.chunks)
        self.bytes += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}


async def post(app: FastAPI, path: str, receive: Sent, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"content-type": CONTENT_TYPE, **headers}.items()],
        "client": ("127.0.0.1", 50000), "server": ("api", 80), "state": {},
    }
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive.receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body)


ROUTES = {"read": ("/v1/read", "file", READ_CAP), "upload": ("/v1/admin/models/upload", "model", MODEL_CAP)}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The real app (no model needed: every request here is refused before one would be used)."""
    data_dir = tmp_path_factory.mktemp("uploads")
    return create_app(make_settings(data_dir, read_max_bytes=READ_CAP, model_max_bytes=MODEL_CAP))


@pytest.mark.parametrize("route", list(ROUTES))
async def test_a_declared_oversize_body_is_refused_before_any_byte_is_read(app: FastAPI, route: str) -> None:
    path, part, _ = ROUTES[route]
    sent = Sent(part)
    # No X-Api-Key: the admin upload answers 413 before it would answer 401.
    status, body = await post(app, path, sent, {"content-length": str(1 << 30)})
    assert status == 413 and body["code"] == "too_large", body
    assert body["request_id"] and "limit" in str(body["message"])
    assert sent.bytes == 0


@pytest.mark.parametrize("route", list(ROUTES))
async def test_an_endless_chunked_body_is_refused_at_the_first_chunk_over_the_cap(app: FastAPI, route: str) -> None:
    path, part, cap = ROUTES[route]
    sent = Sent(part)
    status, body = await post(app, path, sent, {"x-api-key": API_KEY})  # no Content-Length: counted as it streams
    assert status == 413 and body["code"] == "too_large", body
    # The cap covers the part plus the multipart framing around it; reading stopped one chunk past it.
    assert cap < sent.bytes <= cap + 64 * 1024 + CHUNK + len(file_part_head(part))


@pytest.mark.parametrize("key", [None, "wrong"])
async def test_an_upload_without_the_key_is_refused_before_any_byte_is_read(app: FastAPI, key: str | None) -> None:
    sent = Sent("model")
    status, body = await post(app, "/v1/admin/models/upload", sent, {"x-api-key": key} if key else {})
    assert status == 401 and body["code"] == "unauthorized", body
    assert sent.bytes == 0


def test_openapi_documents_both_multipart_bodies(app: FastAPI) -> None:
    spec = app.openapi()

    def form_of(path: str) -> dict[str, Any]:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == ["multipart/form-data"]
        ref = content["multipart/form-data"]["schema"]["$ref"]
        schema: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        return schema

    read = form_of("/v1/read")
    assert read["required"] == ["file"] and list(read["properties"]) == ["file"]
    query = {p["name"] for p in spec["paths"]["/v1/read"]["post"]["parameters"]}
    assert query == {"invert", "visualize"}

    upload = form_of("/v1/admin/models/upload")
    properties = upload["properties"]
    assert set(properties) == {"model_id", "activate", "force", "manifest", "model"}
    assert set(upload["required"]) == {"manifest", "model"}
    assert properties["activate"]["type"] == "boolean" and properties["activate"]["default"] is True
    assert properties["force"]["type"] == "boolean" and properties["force"]["default"] is False  # the gate is on
    for file_part in ("manifest", "model"):
        assert properties[file_part]["type"] == "string"  # sent as a file, not as JSON


def open_temp_files() -> set[str]:
    """What this process (the app runs in a thread of it) holds open under the temporary directory."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {link for link in links if link.startswith(tempfile.gettempdir())}


async def test_a_refused_oversize_upload_leaves_the_store_untouched_and_no_temp_files(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir, model_max_bytes=2 * MODEL_CAP)) as client:
        before, temp_files = store_snapshot(data_dir), open_temp_files()
        data, files = upload_files(manifest(version="big"), weights_bytes(2))  # ~45 MB, over the 2 MiB cap
        request = client.build_request("POST", "/v1/admin/models/upload", data=data, files=files,
                                       headers={"X-Api-Key": API_KEY})
        body = request.read()

        async def no_length() -> AsyncIterator[bytes]:
            for i in range(0, len(body), CHUNK):
                yield body[i : i + CHUNK]

        response = await client.post("/v1/admin/models/upload", content=no_length(),
                                      headers={"X-Api-Key": API_KEY, "content-type": request.headers["content-type"]})
        assert response.status_code == 413 and response.json()["code"] == "too_large", response.text
        assert store_snapshot(data_dir) == before
        assert not any((data_dir / "models" / "incoming").glob("*"))
        # Starlette spooled the first 2 MiB of the model part to a temporary file (on disk past 1 MiB,
        # unlinked): it is closed, so nothing of it is left.
        assert open_temp_files() <= temp_files
        listing = (await client.get("/v1/admin/models", headers={"X-Api-Key": API_KEY})).json()
        assert [v["version"] for v in listing["versions"]] == ["v1"]
