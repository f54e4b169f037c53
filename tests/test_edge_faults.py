"""What a stranger can send costs the API little: huge bodies, and image bombs beside normal reads.

Each test drives a real API process (`digits serve`) over loopback and reads its memory from /proc:
VmHWM (the peak, reset through clear_refs before each attack) and VmRSS. Latency figures are for
`python -m bench.bombs`; these tests assert what must hold on any machine.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.bombs import RSS_SLACK_MB, bombs, peak_mb, reset_peak, rss_mb, settle_s, storm
from tests.serving_support import API_KEY, digit_png, install_model
from tests.support import LiveProcess, spawn, wait_until
from worker.cli.redis_embedded import free_port

pytestmark = pytest.mark.fault

MB = 1024 * 1024
HUGE = 300 * MB


@dataclass
class Api:
    url: str
    port: int
    process: LiveProcess

    @property
    def pid(self) -> int:
        return self.process.proc.pid


@contextlib.contextmanager
def api_process(root: Path, **env: str) -> Iterator[Api]:
    """`digits serve` in its own process, with a model that always reads 7 (and generous read timeouts:
    the test machine is shared, and what is asserted here is correctness, not speed)."""
    data_dir = root / "data"
    install_model(data_dir, forced_digit=7)
    port = free_port()
    env = {"DATA_DIR": str(data_dir), "HANDWRITING_API_KEY": API_KEY, "LOG_LEVEL": "WARNING",
           "API__MODEL_POLL_S": "0", "API__READ_TIMEOUT_S": "60", **env}
    process = spawn([sys.executable, "-m", "worker.cli", "serve", "--port", str(port)], env, root / "api.log")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.proc.poll() is None, process.log()
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code != 200:
                return False
            # Once a model is served the promotion gate readies its next decision in the background (its set,
            # the served model's score): the memory the tests below measure must not include that work.
            return "\nmodel_gate_ready 1.0" in httpx.get(url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=120, what="the API process to serve its model and ready its gate")
        yield Api(url, port, process)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with api_process(tmp_path_factory.mktemp("edge")) as served:
        yield served


# --- huge bodies ------------------------------------------------------------------------------------


@dataclass
class Sent:
    status: int | None
    body: dict[str, object]
    bytes_sent: int
    seconds: float


def send_huge(port: int, path: str, headers: dict[str, str], *, chunked: bool, total: int = HUGE) -> Sent:
    """POST `total` bytes of body, declared (Content-Length) or chunked, stopping the moment the server
    answers, as a client that keeps sending until told otherwise does. A multipart body is one endless
    file part, so that the parser has nothing to object to before the cap."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = f"POST {path} HTTP/1.1\r\nHost: api\r\n{framing}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    piece = b"7" * (256 * 1024)
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        if headers.get("Content-Type", "").startswith("multipart/"):
            part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            sent += len(part)
        while sent < total and time.monotonic() - started < 60:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break  # the server has answered (or closed): stop sending
            if writable:
                try:
                    sock.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(piece)
        status, body = _response(sock)
    return Sent(status, body, sent, time.monotonic() - started)


def _response(sock: socket.socket) -> tuple[int | None, dict[str, object]]:
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, {}
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest[: _length(data)] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}
JSON = {"Content-Type": "application/json"}
DISCORD = {**JSON, "X-Signature-Ed25519": "00" * 64, "X-Signature-Timestamp": str(int(time.time()))}

# (route, headers, chunked, the answer): a declared size over the cap is refused from the header, 413 before
# the key; a chunked body without the key is refused 401 before a byte is read; otherwise 413 at the cap.
HUGE_BODIES = {
    "train, declared, no key": ("/v1/train", JSON, False, 413),
    "train, chunked, no key": ("/v1/train", JSON, True, 401),
    "train, chunked, with the key": ("/v1/train", {**JSON, "X-Api-Key": API_KEY}, True, 413),
    "read, declared": ("/v1/read", MULTIPART, False, 413),
    "read, chunked": ("/v1/read", MULTIPART, True, 413),
    "discord, declared": ("/discord/interactions", DISCORD, False, 413),
    "discord, chunked": ("/discord/interactions", DISCORD, True, 413),
    "upload, chunked, no key": ("/v1/admin/models/upload", MULTIPART, True, 401),
}


@pytest.mark.parametrize("case", list(HUGE_BODIES))
def test_a_300_mb_body_is_refused_fast_and_costs_the_api_under_20_mb(api: Api, case: str) -> None:
    path, headers, chunked, expected = HUGE_BODIES[case]
    reset_peak(api.pid)
    before = peak_mb(api.pid)
    sent = send_huge(api.port, path, headers, chunked=chunked)
    grew = peak_mb(api.pid) - before
    assert sent.status == expected, sent
    assert sent.body["code"] == ("too_large" if expected == 413 else "unauthorized") and sent.body["request_id"]
    # Stopped long before 300 MB: what was sent is what the socket buffers took before the answer came.
    assert sent.bytes_sent < 32 * MB, sent
    assert grew < 20, f"the API's peak RSS grew {grew:.1f} MB"
    health = httpx.get(api.url + "/healthz", timeout=5)
    assert health.status_code == 200


def test_healthz_answers_while_a_body_is_still_streaming(api: Api) -> None:
    """A client holding a body open (a slow upload) does not hold the event loop: /healthz answers meanwhile."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/read HTTP/1.1\r\nHost: api\r\nContent-Type: {MULTIPART['Content-Type']}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        sock.sendall(b"1000\r\n" + b"7" * 0x1000 + b"\r\n")  # 4 KiB in, and the body still open
        started = time.monotonic()
        health = httpx.get(api.url + "/healthz", timeout=5)
        assert health.status_code == 200 and time.monotonic() - started < 5


# --- image bombs beside normal reads ------------------------------------------------------------------


def test_bombs_beside_normal_reads_all_normal_reads_answer_and_memory_comes_back(api: Api) -> None:
    normal = digit_png(160)
    storm(api.url, normal, clients=2, rounds=1)  # warm the pools and the allocator
    baseline = rss_mb(api.pid)
    reset_peak(api.pid)

    result = storm(api.url, normal, clients=16, rounds=2)

    assert result.normal_status == [200] * 32, result.normal_status
    assert result.normal_digits == [7] * 32
    # Every bomb is refused as bad input (too many pixels, or blank once decoded), none brings a 5xx.
    assert len(result.bomb_status) == 32 and set(result.bomb_status) == {400}, result.bomb_status
    peak = peak_mb(api.pid)
    back = settle_s(api.pid, baseline, timeout_s=60)
    assert back is not None, (
        f"RSS {rss_mb(api.pid):.0f} MB, still over {baseline:.0f} + {RSS_SLACK_MB:.0f} MB 60 s later "
        f"(peak {peak:.0f} MB)"
    )


def test_each_bomb_is_answered_with_its_reason(api: Api) -> None:
    answers = []
    for image in bombs():
        response = httpx.post(api.url + "/v1/read", files={"file": ("b.png", image)}, timeout=60)
        answers.append((response.status_code, response.json()["code"], response.json()["message"]))
    png, at_budget, jpeg, progressive = answers
    assert png[:2] == (400, "bad_dimensions") and "7000x7000" in png[2] and "PNG" in png[2]
    assert at_budget[:2] == (400, "preprocessing_failed")  # decoded whole (within budget): blank
    assert jpeg[:2] == (400, "preprocessing_failed")  # decoded at 1/8: blank
    assert progressive[:2] == (400, "bad_dimensions") and "progressive" in progressive[2]


def test_a_full_read_queue_answers_503_overloaded_at_once(tmp_path: Path) -> None:
    """With room for one read, reads arriving while another decodes are refused at once, with Retry-After."""
    slow = bombs()[1]  # decoded whole: the slowest honest work there is
    with api_process(tmp_path, API__READ_QUEUE_MAX="1") as served:
        answers: list[httpx.Response] = []
        go = threading.Barrier(4)

        def client() -> None:
            with httpx.Client(base_url=served.url, timeout=60) as http:
                go.wait()
                answers.append(http.post("/v1/read", files={"file": ("a.png", slow)}))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        statuses = sorted(r.status_code for r in answers)
        assert 400 in statuses and 503 in statuses and set(statuses) <= {400, 503}, statuses
        for refused in (r for r in answers if r.status_code == 503):
            assert refused.json()["code"] == "overloaded" and refused.headers["Retry-After"] == "1"
            assert refused.json()["request_id"]
        # The place is free again once the read holding it has answered.
        again = httpx.post(served.url + "/v1/read", files={"file": ("c.png", digit_png(96))}, timeout=60)
        assert again.status_code == 200


def test_openapi_documents_the_new_refusals(api: Api) -> None:
    paths = httpx.get(api.url + "/openapi.json", timeout=10).json()["paths"]
    read, train = paths["/v1/read"]["post"]["responses"], paths["/v1/train"]["post"]["responses"]
    assert "overloaded" in read["503"]["description"] and "too_large" in read["413"]["description"]
    assert "unauthorized" in train["401"]["description"] and "too_large" in train["413"]["description"]
    assert read["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
