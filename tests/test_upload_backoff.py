"""The worker's upload backs off when the API cannot take the model: after a 507 (disk full) it waits
at least 30 s, doubling, capped, honouring Retry-After; it never sends more than the configured attempts."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from app.contracts import MANIFEST_FILE, WEIGHTS_FILE
from worker.artifacts import Artifacts
from worker.upload import INSUFFICIENT_STORAGE_BACKOFF_S, UploadError, upload_artifacts

WEIGHTS_BYTES = 2 * 1024 * 1024


class _Api(http.server.BaseHTTPRequestHandler):
    """Answers each upload with the next scripted (status, headers); counts the bytes each attempt sent."""

    script: ClassVar[list[tuple[int, dict[str, str]]]] = []
    received: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).received.append(len(self.rfile.read(length)))
        status, headers = type(self).script.pop(0) if type(self).script else (200, {})
        body = json.dumps({"code": "insufficient_storage" if status == 507 else "ok", "message": f"status {status}",
                           "activated": True}).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    _Api.script, _Api.received = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Artifacts:
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x01" * WEIGHTS_BYTES)
    (tmp_path / MANIFEST_FILE).write_text('{"model_id": "m"}')
    return Artifacts(tmp_path, tmp_path / WEIGHTS_FILE, tmp_path / MANIFEST_FILE, {"model_id": "m"})


FULL: tuple[int, dict[str, str]] = (507, {})


def test_a_full_disk_is_waited_out_not_hammered(api: str, artifacts: Artifacts) -> None:
    _Api.script = [FULL, FULL, FULL, FULL]
    sleeps: list[float] = []
    result = upload_artifacts(artifacts, api, "k", attempts=6, backoff_s=2.0, max_backoff_s=100.0,
                              sleep=sleeps.append)
    assert result.status == 200
    # 30 s after the first 507 (not 2 s), doubling, capped at 100 s.
    assert sleeps == [INSUFFICIENT_STORAGE_BACKOFF_S, 60.0, 100.0, 100.0]
    assert len(_Api.received) == 5 and all(n > WEIGHTS_BYTES for n in _Api.received)


def test_retry_after_is_honoured_within_the_cap(api: str, artifacts: Artifacts) -> None:
    _Api.script = [(503, {"Retry-After": "45"}), (503, {"Retry-After": "9999"}), (502, {})]
    sleeps: list[float] = []
    upload_artifacts(artifacts, api, "k", attempts=4, backoff_s=1.0, max_backoff_s=120.0, sleep=sleeps.append)
    assert sleeps == [45.0, 120.0, 4.0]


def test_never_more_than_the_configured_attempts(api: str, artifacts: Artifacts) -> None:
    _Api.script = [FULL] * 10
    sleeps: list[float] = []
    with pytest.raises(UploadError, match=r"after 3 attempts: HTTP 507 insufficient_storage"):
        upload_artifacts(artifacts, api, "k", attempts=3, backoff_s=2.0, max_backoff_s=300.0, sleep=sleeps.append)
    assert len(_Api.received) == 3 and sleeps == [30.0, 60.0]
