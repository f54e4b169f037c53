"""POST /v1/read latency and throughput against a running server: `python -m bench.read`.

Drives the server with concurrent keep-alive clients over a set of generated photo-like digit
images (JPEG photos of a pen digit on unevenly lit paper, 256-768 px) and prints p50/p95/p99
latency, requests/s and failed reads at each concurrency (default 1 and 16), then a lone 512x512
JPEG at concurrency 1, with the CPU's model and flags beside every figure.

    python -m bench.read --url http://127.0.0.1:8000       # a server you started (with a model)
    python -m bench.read --spawn                           # `make bench-read`: today's arch and the new
                                                           # one side by side, one server at a time, each
                                                           # with a random model in a temporary DATA_DIR

With --spawn it ends with where a lone 512x512 JPEG read spends its time: decoding, the preprocessing
after it, the forward pass (each timed alone in this process, after the servers stopped) and the
rest (HTTP, multipart parsing, queueing: the end-to-end p50 less the three).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
def spawned_server(arch: str, threads: int | None, *, settled: bool = True) -> Iterator[str]:
    """uvicorn on a free loopback port serving a randomly initialised network of `arch`, stored through the
    real store: the server serves it only after its safe load and smoke test, so /readyz 200 says it passed.
    `settled`: also wait for the work a fresh server does in the background (the promotion gate's set and
    score, `model_gate_ready 1` in /metrics), so that figures are not taken beside it."""
    import socket

    import torch

    from app.contracts import N_CLASSES, WEIGHTS_FILE, ManifestV1_1
    from app.network import build_model
    from app.preprocess import PREPROCESS_HASH
    from app.store import ModelStore

    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        data_dir = Path(tmp)
        store = ModelStore(data_dir / "models")
        store.prepare()
        incoming = store.new_incoming()
        torch.manual_seed(0)
        torch.save(build_model(arch).state_dict(), incoming / WEIGHTS_FILE)
        doc = {
            "schema_version": "v1.1", "model_id": "bench", "arch": arch, "n_classes": N_CLASSES, "version": arch,
            "created_at": datetime.now(UTC).isoformat(), "preprocess_hash": PREPROCESS_HASH, "val_acc": 0.0,
        }
        sha = hashlib.sha256((incoming / WEIGHTS_FILE).read_bytes()).hexdigest()
        store.commit(incoming, ManifestV1_1.model_validate_json(json.dumps(doc)), sha)
        store.set_active("bench", arch)

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
                raise SystemExit("the server did not become ready (did the smoke test refuse the model?)")
            while settled and "model_gate_ready 1.0" not in httpx.get(url + "/metrics", timeout=5).text:
                if time.monotonic() > deadline + 300:
                    raise SystemExit("the promotion gate did not get ready within 5 minutes")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@dataclass
class Figures:
    """One concurrency level against one server."""

    label: str
    concurrency: int
    latencies: list[float]
    elapsed: float
    errors: list[str]

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed

    def row(self, tag: str) -> str:
        ms = sorted(self.latencies)
        return (f"{self.label:<16}{self.concurrency:>4}{len(ms):>7}{percentile(ms, 50):>8.1f}{percentile(ms, 95):>8.1f}"
                f"{percentile(ms, 99):>8.1f}{self.rps:>8.1f}{len(self.errors):>7}  {tag}")


HEADER = f"{'server':<16}{'c':>4}{'reads':>7}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'req/s':>8}{'failed':>7}  cpu"


def bench(url: str, label: str, concurrencies: list[int], total: int, n_images: int) -> list[Figures]:
    """Warm up, then each concurrency over the photo set, then concurrency 1 over one 512x512 JPEG alone."""
    images = make_images(n_images)
    ready = httpx.get(url + "/readyz", timeout=5)
    if ready.status_code != 200:
        raise SystemExit(f"{url} is not ready: {ready.text}")
    asyncio.run(run(url, images, 4, 40))  # warm-up: thread pools, allocator, oneDNN kernels per batch size
    figures = [Figures(label, c, *asyncio.run(run(url, images, c, total))) for c in concurrencies]
    lone = asyncio.run(run(url, [photo_of_digit(512, 512, seed=7)], 1, max(50, total // 4)))
    figures.append(Figures(f"{label} 512px", 1, *lone))
    return figures


def profile_lone_read(arch: str, threads: int, repeats: int) -> dict[str, float]:
    """Median ms of each part of a lone 512x512 JPEG read, in this process: decode, the preprocessing after
    decoding (1 thread, as in the server's pool), and the served forward pass at batch 1 (ONNX Runtime in fp32)."""
    import torch

    from app.contracts import WEIGHTS_FILE, ManifestV1_1
    from app.inference import forward_probs, pick_dtype, threads_for
    from app.loading import load_candidate
    from app.network import build_model
    from app.preprocess import PREPROCESS_HASH, decode_gray, preprocess_gray
    from config.settings import get_settings

    data = photo_of_digit(512, 512, seed=7)

    def median_ms(fn: Callable[[], object]) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    torch.set_num_threads(1)
    api = get_settings().api  # as the spawned servers read it
    max_pixels = api.read_max_pixels
    gray = decode_gray(data, max_pixels=max_pixels)
    decode_ms = median_ms(lambda: decode_gray(data, max_pixels=max_pixels))
    pre_ms = median_ms(lambda: preprocess_gray(gray))
    tensor = preprocess_gray(gray).tensor
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        torch.save(build_model(arch).state_dict(), Path(tmp) / WEIGHTS_FILE)
        doc = {"schema_version": "v1.1", "model_id": "bench", "arch": arch, "n_classes": 10, "version": "p",
               "created_at": datetime.now(UTC).isoformat(), "preprocess_hash": PREPROCESS_HASH, "val_acc": 0.0}
        dtype = pick_dtype(api.precision)
        model = load_candidate(Path(tmp) / WEIGHTS_FILE, ManifestV1_1.model_validate_json(json.dumps(doc)),
                               dtype=dtype, threads=threads)
    torch.set_num_threads(threads_for(1, threads))  # as the server runs a lone read (bf16 runs on torch's threads)
    forward_ms = median_ms(lambda: forward_probs(model.net, tensor, 1.0, tta=False, dtype=dtype))
    return {"decode": decode_ms, "preprocess": pre_ms, "forward": forward_ms}


def main() -> None:
    from app.network import ARCHS, DEFAULT_ARCH, LEGACY_ARCH, available_cores
    from bench.cpu import cpu_line, cpu_tag

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a server you started (instead of --spawn)")
    parser.add_argument("--spawn", action="store_true", help="start one server per arch, each with a random model")
    parser.add_argument("--arch", nargs="+", default=[LEGACY_ARCH, DEFAULT_ARCH], choices=sorted(ARCHS),
                        help="archs for --spawn")
    parser.add_argument("--threads", type=int, default=None, help="API__TORCH_THREADS for --spawn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    tag = cpu_tag()
    print(cpu_line())
    print(f"photo-like JPEGs: {args.images} images ({', '.join(f'{w}x{h}' for w, h in SIZES)}); "
          "then one 512x512 JPEG alone at concurrency 1")
    results: list[Figures] = []
    if args.url is not None:
        results = bench(args.url, "given server", args.concurrency, args.requests, args.images)
    elif not args.spawn:
        raise SystemExit("give --url URL or --spawn")
    for arch in args.arch if args.spawn else []:
        print(f"{arch}: random weights, stored and served through the real store (safe load + smoke test passed)",
              flush=True)
        with spawned_server(arch, args.threads) as url:
            results += bench(url, arch, args.concurrency, args.requests, args.images)
    print()
    print(HEADER)
    for figures in results:
        print(figures.row(tag))
        for error in figures.errors[:3]:
            print("   ", error)
    if not args.spawn:
        return
    by = {(f.label, f.concurrency): f for f in results}
    first, last = args.arch[0], args.arch[-1]
    if len(args.arch) > 1 and max(args.concurrency) > 1:
        c = max(args.concurrency)
        print(f"\n{last} vs {first}: c={c} {by[(last, c)].rps / by[(first, c)].rps:.2f}x req/s; "
              f"512px c=1 p50 {percentile(sorted(by[(last + ' 512px', 1)].latencies), 50):.1f} ms vs "
              f"{percentile(sorted(by[(first + ' 512px', 1)].latencies), 50):.1f} ms  {tag}")
    threads = args.threads or available_cores()
    print(f"\nwhere a lone 512x512 JPEG read spends its time (median ms; {threads} threads, forward as served)"
          f"  {tag}")
    print(f"{'arch':<16}{'decode':>8}{'prep':>8}{'forward':>9}{'http+rest':>10}{'p50 e2e':>9}")
    for arch in args.arch:
        parts = profile_lone_read(arch, threads, repeats=100)
        e2e = percentile(sorted(by[(arch + " 512px", 1)].latencies), 50)
        rest = e2e - sum(parts.values())
        print(f"{arch:<16}{parts['decode']:>8.2f}{parts['preprocess']:>8.2f}{parts['forward']:>9.2f}{rest:>10.2f}"
              f"{e2e:>9.1f}")


if __name__ == "__main__":
    main()
