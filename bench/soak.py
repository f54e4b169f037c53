"""Soak: the whole system under mixed load for a while: `python -m bench.soak` (`make bench-soak`).

Starts an embedded Redis, the API and a worker (each its own process, a temporary DATA_DIR), trains a first
model through POST /v1/train, then for --seconds (default 300) runs at once:
  - readers: --readers clients doing POST /v1/read back to back (photo-like JPEG digits);
  - uploads: every --upload-every s, the newest trained model uploaded again as a new version (activated);
  - training: one small job (TRAIN__LIMIT=--train-limit images) after another.
Every --sample-s it prints a row: reads and failed reads in the interval, p99, uploads, jobs, and the API's and
the worker's resident memory and open file descriptors (the worker's work-horse included while one runs).
Failed reads must be 0; memory and open files should be flat after the first rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.read import make_images, percentile, run
from worker.cli.redis_embedded import EmbeddedRedis, free_port


def cpu_line() -> str:
    """The CPU the figures were measured on, as the other benches' readers expect to see it."""
    model, flags = platform.processor() or "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "unknown CPU", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    simd = "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else (
        "avx2" if "avx2" in flags else "no avx2")
    return f"CPU: {model}, {len(os.sched_getaffinity(0))} cores available ({simd})"


def rss_mb_and_fds(pid: int) -> tuple[float, int]:
    """Resident memory (MiB) and open file descriptors of `pid` and its children (a work-horse, a pool)."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    rss_kb, fds = 0, 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return rss_kb / 1024, fds


@dataclass
class Tally:
    reads: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    uploads: int = 0
    failed_uploads: int = 0
    jobs: int = 0
    failed_jobs: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> Tally:
        with self.lock:
            taken = Tally(self.reads, self.failed, self.latencies, self.uploads, self.failed_uploads, self.jobs,
                          self.failed_jobs, self.errors)
            self.reads = self.failed = self.uploads = self.failed_uploads = self.jobs = self.failed_jobs = 0
            self.latencies, self.errors = [], []
        return taken


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_job(client: httpx.Client, job_id: str, timeout_s: float, stop: threading.Event | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        status = str(client.get(f"/v1/jobs/{job_id}").json().get("status"))
        if status in ("finished", "failed"):
            return status
        time.sleep(1.0)
    return "timeout"


def reader_loop(url: str, images: list[bytes], stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        latencies, _, errors = asyncio.run(run(url, images, 1, 20))
        with tally.lock:
            tally.reads += len(latencies)
            tally.failed += len(errors)
            tally.latencies += latencies
            tally.errors += errors[:3]


def train_loop(client: httpx.Client, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        r = client.post("/v1/train", json={"batch_size": 32, "user_id": 1})
        status = wait_job(client, r.json()["job_id"], 600, stop) if r.status_code == 202 else f"HTTP {r.status_code}"
        if stop.is_set():
            return  # the soak ended with this job under way: neither a success nor a failure
        with tally.lock:
            tally.jobs += status == "finished"
            tally.failed_jobs += status != "finished"
            if status != "finished":
                tally.errors.append(f"training job: {status} {r.text[:200]}")


def upload_loop(client: httpx.Client, artifacts: Path, every_s: float, stop: threading.Event, tally: Tally) -> None:
    while not stop.wait(every_s):
        runs = sorted(artifacts.glob("*/*/manifest.json"))
        if not runs:
            continue
        manifest = json.loads(runs[-1].read_text())
        manifest["version"] = f"soak-{int(time.time())}-{secrets.token_hex(3)}"
        weights = (runs[-1].parent / "model.pt").read_bytes()
        r = client.post("/v1/admin/models/upload", data={"model_id": manifest["model_id"], "activate": "true"},
                        files={"manifest": ("manifest.json", json.dumps(manifest).encode(), "application/json"),
                               "model": ("model.pt", weights, "application/octet-stream")})
        with tally.lock:
            tally.uploads += r.status_code == 200
            tally.failed_uploads += r.status_code != 200
            if r.status_code != 200:
                tally.errors.append(f"upload: HTTP {r.status_code} {r.text[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--upload-every", type=float, default=20.0)
    parser.add_argument("--train-limit", type=int, default=512, help="TRAIN__LIMIT of the worker's jobs")
    args = parser.parse_args()

    key = secrets.token_urlsafe(16)
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        root, port = Path(tmp), free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "REDIS_URL": redis_server.url, "HANDWRITING_API_KEY": key, "HANDWRITING_API_URL": url,
               "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        api = spawn(["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                     "warning", "--no-access-log"], {**env, "DATA_DIR": str(root / "api")}, root / "api.log")
        worker = spawn(["-m", "worker.cli", "worker"], {**env, "DATA_DIR": str(root / "worker"), "TRAIN__THREADS": "1",
                                                        "TRAIN__LIMIT": str(args.train_limit)}, root / "worker.log")
        client = httpx.Client(base_url=url, headers={"X-Api-Key": key}, timeout=120)
        stop = threading.Event()
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            first = client.post("/v1/train", json={"batch_size": 32})
            print(f"{cpu_line()}\nfirst model: job {first.json()['job_id']} ...", flush=True)
            if wait_job(client, first.json()["job_id"], 900) != "finished":
                raise SystemExit(f"the first model did not train; see {root / 'worker.log'}")
            images = make_images(12)
            tally = Tally()
            threads = [threading.Thread(target=reader_loop, args=(url, images, stop, tally), daemon=True)
                       for _ in range(args.readers)]
            threads.append(threading.Thread(target=train_loop, args=(client, stop, tally), daemon=True))
            threads.append(threading.Thread(target=upload_loop, daemon=True,
                                            args=(client, root / "worker" / "artifacts", args.upload_every, stop,
                                                  tally)))
            for thread in threads:
                thread.start()
            print(f"soak: {args.seconds:.0f} s, {args.readers} readers, an upload every {args.upload_every:.0f} s, "
                  f"training jobs of {args.train_limit} images back to back")
            print(f"{'t s':>6}{'reads':>8}{'failed':>8}{'p99 ms':>9}{'uploads':>9}{'jobs':>6}"
                  f"{'api MiB':>9}{'api fds':>9}{'wrk MiB':>9}{'wrk fds':>9}")
            started, total_failed, rows = time.monotonic(), 0, []
            while (elapsed := time.monotonic() - started) < args.seconds:
                time.sleep(min(args.sample_s, args.seconds - elapsed))
                t = tally.take()
                total_failed += t.failed
                api_mb, api_fds = rss_mb_and_fds(api.pid)
                wrk_mb, wrk_fds = rss_mb_and_fds(worker.pid)
                rows.append((api_mb, api_fds, wrk_mb, wrk_fds))
                p99 = percentile(sorted(t.latencies), 99) if t.latencies else float("nan")
                print(f"{time.monotonic() - started:>6.0f}{t.reads:>8}{t.failed:>8}{p99:>9.0f}"
                      f"{t.uploads:>5}/{t.failed_uploads:<3}{t.jobs:>3}/{t.failed_jobs:<2}"
                      f"{api_mb:>9.0f}{api_fds:>9}{wrk_mb:>9.0f}{wrk_fds:>9}", flush=True)
                for error in t.errors[:3]:
                    print("      ", error)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            first_row, last_row = rows[min(1, len(rows) - 1)], rows[-1]
            print(f"failed reads: {total_failed} (must be 0)")
            print(f"drift from the second sample to the last: API {last_row[0] - first_row[0]:+.0f} MiB, "
                  f"{last_row[1] - first_row[1]:+d} fds; worker (without a horse at both ends, compare "
                  f"like with like) {last_row[2] - first_row[2]:+.0f} MiB, {last_row[3] - first_row[3]:+d} fds")
            if total_failed:
                sys.exit(1)
        finally:
            stop.set()
            client.close()
            for proc in (worker, api):
                proc.send_signal(signal.SIGINT)
            for proc in (worker, api):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
