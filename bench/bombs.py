"""Image bombs beside normal reads: `python -m bench.bombs --spawn` (or `--url URL` for a server you run).

16 clients send ~200 KB decompression bombs to POST /v1/read while 16 others read a normal digit
photo; prints the normal reads' p50/p95/p99 (the target: every one 200, p99 <= 1 s), what the bombs
were answered, and, for a spawned server, its RSS from /proc: before, at the peak, and how long it
took to come back within 100 MB of where it started.

The bombs (each built once, in memory):
  png_bomb        7000x7000 RGBA PNG of zeros, ~190 KB: 196 MB decoded (the file issue 11 found)
  png_at_budget   3000x3000 RGBA PNG, ~35 KB: just within API__READ_MAX_PIXELS, so decoded whole
  jpeg_bomb       4000x4000 baseline JPEG, ~190 KB: decodes at 1/8 scale
  progressive     4000x4000 progressive JPEG: keeps every coefficient while decoding, refused from its header
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import statistics
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from app.network import DEFAULT_ARCH
from bench.preprocess import photo_of_digit
from bench.read import build_request, percentile, read_response, spawned_server

CLIENTS = 16  # of each kind
RSS_SLACK_MB = 100.0


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _uniform_rgba_png(side: int) -> bytes:
    """An RGBA PNG of `side` x `side` zeros, compressed row by row (never held decoded here)."""
    row = b"\0" * (1 + 4 * side)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@functools.cache
def png_bomb() -> bytes:
    return _uniform_rgba_png(7000)


@functools.cache
def png_at_budget() -> bytes:
    return _uniform_rgba_png(3000)


def _jpeg(side: int, *, progressive: bool) -> bytes:
    img = Image.new("L", (side, side), 200)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=50, progressive=progressive)
    return out.getvalue()


@functools.cache
def jpeg_bomb() -> bytes:
    return _jpeg(4000, progressive=False)


@functools.cache
def progressive_bomb() -> bytes:
    return _jpeg(4000, progressive=True)


def bombs() -> list[bytes]:
    return [png_bomb(), png_at_budget(), jpeg_bomb(), progressive_bomb()]


@dataclass
class Storm:
    normal_ms: list[float] = field(default_factory=list)
    normal_status: list[int] = field(default_factory=list)
    normal_digits: list[int] = field(default_factory=list)
    bomb_status: list[int] = field(default_factory=list)


async def _client(host: str, port: int, request: bytes, rounds: int, record: list[tuple[int, bytes, float]]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, body = await read_response(reader)
            record.append((status, body, time.perf_counter() - started))
    finally:
        writer.close()


async def _storm(url: str, normal: bytes, bomb_images: list[bytes], clients: int, rounds: int) -> Storm:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    normal_request = build_request(host, "/v1/read", normal)
    normals: list[tuple[int, bytes, float]] = []
    bombed: list[tuple[int, bytes, float]] = []
    tasks = [_client(host, port, normal_request, rounds, normals) for _ in range(clients)]
    tasks += [
        _client(host, port, build_request(host, "/v1/read", bomb_images[i % len(bomb_images)]), rounds, bombed)
        for i in range(clients)
    ]
    await asyncio.gather(*tasks)
    storm = Storm()
    for status, body, seconds in normals:
        storm.normal_status.append(status)
        storm.normal_ms.append(seconds * 1000)
        if status == 200:
            storm.normal_digits.append(int(json.loads(body)["digit"]))
    storm.bomb_status = [status for status, _, _ in bombed]
    return storm


def storm(url: str, normal: bytes, *, clients: int = CLIENTS, rounds: int = 3) -> Storm:
    """`clients` normal readers and `clients` bomb senders at once, `rounds` requests each."""
    return asyncio.run(_storm(url, normal, bombs(), clients, rounds))


def _status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, from /proc (Linux)."""
    return _status_mb(pid, "VmRSS")


def peak_mb(pid: int) -> float:
    """Its peak resident memory since it started, or since `reset_peak`."""
    return _status_mb(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def settle_s(pid: int, baseline_mb: float, timeout_s: float = 60.0) -> float | None:
    """Seconds until the RSS is within RSS_SLACK_MB of `baseline_mb`; None if it never was within `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if rss_mb(pid) <= baseline_mb + RSS_SLACK_MB:
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def run(url: str, pid: int | None, rounds: int) -> None:
    normal = photo_of_digit(512, 512, seed=1)
    sizes = ", ".join(f"{len(b) / 1024:.0f} KiB" for b in bombs())
    print(f"server {url}  normal image {len(normal) / 1024:.0f} KiB  bombs {sizes}")
    storm(url, normal, clients=2, rounds=2)  # warm-up
    baseline = rss_mb(pid) if pid is not None else None
    if pid is not None:
        reset_peak(pid)
    result = storm(url, normal, rounds=rounds)
    ms = sorted(result.normal_ms)
    ok = sum(s == 200 for s in result.normal_status)
    print(f"normal reads {len(ms)}: {ok} x 200, p50 {percentile(ms, 50):.0f} ms, p95 {percentile(ms, 95):.0f} ms, "
          f"p99 {percentile(ms, 99):.0f} ms, mean {statistics.mean(ms):.0f} ms")
    answered = {s: result.bomb_status.count(s) for s in sorted(set(result.bomb_status))}
    print(f"bombs {len(result.bomb_status)}: " + ", ".join(f"{n} x {s}" for s, n in answered.items()))
    if pid is not None and baseline is not None:
        peak = peak_mb(pid)
        back = settle_s(pid, baseline)
        print(f"API RSS: baseline {baseline:.0f} MB, peak {peak:.0f} MB (+{peak - baseline:.0f}), "
              + (f"within {RSS_SLACK_MB:.0f} MB of baseline after {back:.1f} s" if back is not None
                 else f"still {rss_mb(pid) - baseline:.0f} MB over baseline after 60 s"))


def _server_child() -> int:
    """The pid of the uvicorn `bench.read.spawned_server` started as a child of this process."""
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    raise RuntimeError("no uvicorn child process found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start a server with a random model (RSS measured)")
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    args = parser.parse_args()
    if args.spawn:
        with spawned_server(DEFAULT_ARCH, None) as url:
            run(url, _server_child(), args.rounds)
    else:
        run(args.url, None, args.rounds)


if __name__ == "__main__":
    main()
