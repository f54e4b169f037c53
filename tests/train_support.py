"""Helpers for the training tests: a real worker process, an events listener, job polling."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import redis
from rq import Worker

from app.contracts import MANIFEST_FILE, WEIGHTS_FILE, TrainEventModel, parse_event
from tests.support import LiveProcess, spawn
from worker.artifacts import Artifacts, mark_uploaded

API_KEY = "train-test-key"

# Tiny runs: 16 training images in batches of 8, 8 for validation and 16 for the test accuracy.
TINY_TRAINING = {
    "TRAIN__LIMIT": "16",
    "TRAIN__VAL_SIZE": "8",
    "TRAIN__PROGRESS_EVERY": "1",
    "TRAIN__THREADS": "1",
}


class EventListener:
    """Subscribes to the events channel at once and keeps every parsed event, in arrival order."""

    def __init__(self, url: str, channel: str = "digits:events") -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = redis.client.PubSub(self._client.connection_pool, ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        self.events: list[TrainEventModel] = []
        self.raw: list[bytes] = []  # each message exactly as it came, in the same order as `events`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                event = parse_event(message["data"])
                self.raw.append(message["data"])
                self.events.append(event)

    def for_job(self, job_id: str) -> list[TrainEventModel]:
        return [e for e in list(self.events) if e.job_id == job_id]

    def raw_for_job(self, job_id: str) -> list[dict[str, object]]:
        """The job's messages as plain JSON objects, to check JSON types the models would coerce away."""
        decoded = [json.loads(raw) for raw in list(self.raw)]
        return [d for d in decoded if isinstance(d, dict) and d.get("job_id") == job_id]

    def wait_for(self, job_id: str, event_type: str, timeout: float = 180.0) -> TrainEventModel:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.for_job(job_id):
                if event.type == event_type:
                    return event
            time.sleep(0.1)
        raise AssertionError(f"no {event_type} for job {job_id}; got {[e.type for e in self.for_job(job_id)]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


def start_worker(env: dict[str, str], log_dir: Path, redis_url: str, timeout: float = 60.0) -> LiveProcess:
    """`digits worker` as its own process; returns once RQ lists it."""
    live = spawn([sys.executable, "-m", "worker.cli", "worker"], env, log_dir / f"worker-{time.monotonic_ns()}.log")
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if live.proc.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{live.log()}")
            if Worker.all(connection=client):
                return live
            time.sleep(0.1)
    finally:
        client.close()
    live.stop()
    raise RuntimeError(f"worker did not register:\n{live.log()}")


def fake_run_dir(root: Path, model_id: str, version: str, *, uploaded: bool) -> Path:
    """A run's directory under an artifacts root, as a worker leaves it (files stand in for real weights)."""
    directory = root / model_id / version
    directory.mkdir(parents=True)
    (directory / WEIGHTS_FILE).write_bytes(b"w")
    (directory / MANIFEST_FILE).write_text("{}")
    if uploaded:
        mark_uploaded(Artifacts(directory, directory / WEIGHTS_FILE, directory / MANIFEST_FILE, {}), 200)
    return directory
