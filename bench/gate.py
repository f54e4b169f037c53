"""The promotion gate's cost, and what it does to reads: `python -m bench.gate`.

A server that serves a model gets its next gate ready in the background (builds the set once per DATA_DIR,
scores the served model). Starts servers with a random model (`bench.read.spawned_server`), then:

1. cold, worst case: a fresh server (empty DATA_DIR) gets a candidate the moment it is ready, so the gate
   waits for that preparation, then measures the candidate;
2. a fresh server whose preparation is done (`model_gate_ready 1`; how long that took is printed) gets a
   candidate: the first gate of a DATA_DIR as a user meets it (a training job takes minutes), and more
   candidates: each gate measures only the candidate (the active model's score is cached);
3. reads with `--concurrency` clients, first alone (baseline), then while candidates are uploaded back to
   back, and compares the latency of the reads that started while a gate was measuring (the last
   `gate.seconds` of each upload's answer) with the baseline.

Prints the gate's seconds (cold, warm), read p50/p99 at baseline and during gates, and the ratio (the
target: p99 during a gate <= 2x baseline). Figures depend on the machine and what else runs on it:
the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import threading
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from app.network import ARCHS, DEFAULT_ARCH
from bench.cpu import cpu_line
from bench.read import build_request, make_images, percentile, read_response, spawned_server

KEY = "bench-gate-key"


def candidate(seed: int, arch: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    import torch

    from app.contracts import N_CLASSES
    from app.network import build_model
    from app.preprocess import PREPROCESS_HASH

    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(build_model(arch).state_dict(), buf)
    doc = {"schema_version": "v1.1", "model_id": "bench", "arch": arch, "n_classes": N_CLASSES,
           "version": f"candidate-{seed}", "created_at": datetime.now(UTC).isoformat(),
           "preprocess_hash": PREPROCESS_HASH, "val_acc": 0.0}
    return ({"model_id": "bench", "activate": "true"},
            {"manifest": ("manifest.json", json.dumps(doc).encode(), "application/json"),
             "model": ("model.pt", buf.getvalue(), "application/octet-stream")})


def upload(url: str, seed: int, arch: str) -> tuple[float, dict[str, object]]:
    """(the time the answer came, the gate's report)."""
    data, files = candidate(seed, arch)
    response = httpx.post(url + "/v1/admin/models/upload", data=data, files=files, headers={"X-Api-Key": KEY},
                          timeout=600)
    response.raise_for_status()
    gate = response.json()["gate"]
    assert isinstance(gate, dict)
    return time.monotonic(), gate


async def reads(url: str, images: list[bytes], concurrency: int, stop: threading.Event,
                seconds: float) -> list[tuple[float, float]]:
    """(start, latency ms) of each read, from `concurrency` keep-alive clients, until `stop` or `seconds`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [build_request(f"{host}:{port}", "/v1/read", img) for img in images]
    out: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds

    async def client(offset: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                writer.write(requests[i % len(requests)])
                await writer.drain()
                status, _ = await read_response(reader)
                if status == 200:
                    out.append((started, (time.monotonic() - started) * 1000))
                i += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(c * 7) for c in range(concurrency)))
    return out


def summary(ms: list[float]) -> str:
    s = sorted(ms)
    return f"n={len(s):4d}  p50 {percentile(s, 50):7.1f} ms  p99 {percentile(s, 99):7.1f} ms" if s else "n=0"


def cold(arch: str, images: list[bytes], concurrency: int) -> list[float]:
    """A fresh server (empty DATA_DIR) gets a candidate the moment it is ready, with `concurrency` clients
    reading meanwhile (0: none); prints the gate's time, returns the reads' latencies (ms)."""
    with spawned_server(arch, None, settled=False) as url:
        started = time.monotonic()
        report: dict[str, object] = {}
        done = threading.Event()

        def first_upload() -> None:
            try:
                report.update(upload(url, 1, arch)[1])
            finally:
                done.set()

        thread = threading.Thread(target=first_upload)
        thread.start()
        latencies = [ms for _, ms in asyncio.run(reads(url, images, concurrency, done, 3600.0))]
        thread.join()
        print(f"cold gate, a candidate the moment a fresh server is ready, {concurrency} client(s) reading: gate "
              f"{float(str(report['seconds'])):.1f} s, upload answered in {time.monotonic() - started:.1f} s "
              f"({report['decision']}, {report['images']} images)")
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=4, help="warm gates measured under reads")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--baseline-s", type=float, default=20.0)
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS), help="the served and candidate network")
    args = parser.parse_args()
    os.environ["HANDWRITING_API_KEY"] = KEY  # the spawned server inherits the environment
    images = make_images(20)
    print(cpu_line())
    print(f"arch {args.arch}  CPU cores {len(os.sched_getaffinity(0))}  load average {os.getloadavg()[0]:.1f}  "
          f"gate size {os.environ.get('API__GATE_SIZE', '1000 (default)')}")
    cold(args.arch, images, 0)
    cold_reads = cold(args.arch, images, args.concurrency)
    started = time.monotonic()
    with spawned_server(args.arch, None) as url:
        print(f"a fresh server: ready and its gate prepared {time.monotonic() - started:.1f} s after launch")
        asyncio.run(reads(url, images, 2, threading.Event(), 3.0))  # warm-up
        started = time.monotonic()
        _, first = upload(url, 1, args.arch)
        print(f"first gate of this DATA_DIR, once prepared: gate {first['seconds']:.1f} s, upload answered in "
              f"{time.monotonic() - started:.1f} s ({first['decision']}, {first['images']} images)")
        base = asyncio.run(reads(url, images, args.concurrency, threading.Event(), args.baseline_s))
        windows: list[tuple[float, float]] = []
        warm: list[float] = []
        stop = threading.Event()

        def uploader() -> None:
            try:
                for seed in range(2, 2 + args.candidates):
                    answered, gate = upload(url, seed, args.arch)
                    seconds = float(str(gate["seconds"]))
                    warm.append(seconds)
                    windows.append((answered - seconds, answered))
            finally:
                stop.set()

        thread = threading.Thread(target=uploader)
        thread.start()
        during_all = asyncio.run(reads(url, images, args.concurrency, stop, 3600.0))
        thread.join()
        during = [ms for t, ms in during_all if any(a <= t <= b for a, b in windows)]
        print(f"warm gates (candidate only): {', '.join(f'{s:.1f}' for s in warm)} s")
        print(f"reads, baseline      {summary([ms for _, ms in base])}")
        print(f"reads, during a gate {summary(during)}")
        print(f"reads, during the cold gate (building its set) {summary(cold_reads)}")
        if base and during:
            ratio = percentile(sorted(during), 99) / percentile(sorted(ms for _, ms in base), 99)
            print(f"p99 during / baseline = {ratio:.2f} (target <= 2)  load average {os.getloadavg()[0]:.1f}")
        if base and cold_reads:
            ratio = percentile(sorted(cold_reads), 99) / percentile(sorted(ms for _, ms in base), 99)
            print(f"p99 during the cold gate / baseline = {ratio:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
