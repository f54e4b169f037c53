"""Helpers for the training tests: a real worker process, an events listener, job polling."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import redis
from rq import Worker

from app.contracts import TrainCompletedV1, TrainFailedV1, TrainProgressV1, TrainStartedV1, parse_event
from tests.support import LiveProcess, spawn

TrainEvent = TrainStartedV1 | TrainProgressV1 | TrainCompletedV1 | TrainFailedV1
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
        self.events: list[TrainEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                self.events.append(parse_event(message["data"]))

    def for_job(self, job_id: str) -> list[TrainEvent]:
        return [e for e in list(self.events) if e.job_id == job_id]

    def wait_for(self, job_id: str, event_type: str, timeout: float = 180.0) -> TrainEvent:
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

