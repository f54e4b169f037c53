"""POST /v1/read latency and throughput against a running server: `python -m bench.read`.

Drives the server with concurrent keep-alive clients over a set of generated photo-like digit
images (JPEG photos of a pen digit on unevenly lit paper, 256-768 px) and prints p50/p95/p99
latency and requests/s at each concurrency (default 1 and 16).

    python -m bench.read --url http://127.0.0.1:8000       # a server you started (with a model)
    python -m bench.read --spawn                           # starts one on a free port with a random
                                                           # ResNet-18 in a temporary DATA_DIR

The client is a small raw-socket HTTP/1.1 client so that, on a machine shared with the server,
the figures measure the server rather than the client library.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.preprocess import photo_of_digit

SIZES = ((256, 256), (384, 320), (512, 512), (640, 480), (768, 576))


def make_images(n: int) -> list[bytes]:
    return [photo_of_digit(*SIZES[i % len(SIZES)], seed=i) for i in range(n)]


def build_request(host: str, path: str, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="digit.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def client(host: str, port: int, requests: list[bytes], latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, body = await read_response(reader)
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                errors.append(f"{status} {body[:200]!r}")
    finally:
        writer.close()


async def run(url: str, images: list[bytes], concurrency: int, total: int) -> tuple[list[float], float, list[str]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [build_request(f"{host}:{port}", "/v1/read", img) for img in images]
    per_client = max(1, total // concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    jobs = [
        [requests[(c * per_client + i) % len(requests)] for i in range(per_client)] for c in range(concurrency)
    ]
    started = time.perf_counter()
    await asyncio.gather(*(client(host, port, job, latencies, errors) for job in jobs))
    return latencies, time.perf_counter() - started, errors


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q / 100 * (len(sorted_ms) - 1)))]


@contextmanager
def spawned_server(threads: int | None) -> Iterator[str]:
    """uvicorn on a free loopback port serving a randomly initialised ResNet-18."""
    import socket

    import torch

    from app.contracts import N_CLASSES, WEIGHTS_FILE, ManifestV1_1
    from app.network import ARCH, build_model
    from app.preprocess import PREPROCESS_HASH
    from app.store import ModelStore

    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        data_dir = Path(tmp)
        store = ModelStore(data_dir / "models")
        store.prepare()
        incoming = store.new_incoming()
        torch.manual_seed(0)
        torch.save(build_model().state_dict(), incoming / WEIGHTS_FILE)
        doc = {
            "schema_version": "v1.1", "model_id": "bench", "arch": ARCH, "n_classes": N_CLASSES, "version": "random",
            "created_at": datetime.now(UTC).isoformat(), "preprocess_hash": PREPROCESS_HASH, "val_acc": 0.0,
        }
        sha = hashlib.sha256((incoming / WEIGHTS_FILE).read_bytes()).hexdigest()
        store.commit(incoming, ManifestV1_1.model_validate_json(json.dumps(doc)), sha)
        store.set_active("bench", "random")

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"}
        if threads is not None:
            env["API__TORCH_THREADS"] = str(threads)
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--no-access-log"],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit("the server exited at start")
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit("the server did not become ready")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def bench(url: str, concurrencies: list[int], total: int, n_images: int) -> None:
    images = make_images(n_images)
    ready = httpx.get(url + "/readyz", timeout=5)
    if ready.status_code != 200:
        raise SystemExit(f"{url} is not ready: {ready.text}")
    print(f"server {url}  model {ready.json()['model_id']} {ready.json()['version']}  images {len(images)} "
          f"({', '.join(f'{w}x{h}' for w, h in SIZES)} JPEG, {statistics.mean(map(len, images)) / 1024:.0f} KiB avg)")
    asyncio.run(run(url, images, 4, 40))  # warm-up: thread pools, allocator, oneDNN kernels per batch size
    print(f"{'concurrency':>11}{'requests':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for concurrency in concurrencies:
        latencies, elapsed, errors = asyncio.run(run(url, images, concurrency, total))
        ms = sorted(latencies)
        print(f"{concurrency:>11}{len(ms):>10}{percentile(ms, 50):>9.1f}{percentile(ms, 95):>9.1f}"
              f"{percentile(ms, 99):>9.1f}{len(ms) / elapsed:>9.1f}{len(errors):>8}")
        for error in errors[:3]:
            print("   ", error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start a server with a random model")
    parser.add_argument("--threads", type=int, default=None, help="API__TORCH_THREADS for --spawn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    if args.spawn:
        with spawned_server(args.threads) as url:
            bench(url, args.concurrency, args.requests, args.images)
    else:
        bench(args.url, args.concurrency, args.requests, args.images)


if __name__ == "__main__":
    main()
