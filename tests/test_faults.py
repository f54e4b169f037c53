"""Faults a running system meets, on the real parts: an embedded Redis restarted under a real `digits worker`
mid-job, a corrupt MNIST cache, a job that runs past its time limit.

`-m fault` runs only these. The outage here is FAULT_OUTAGE_S seconds (default 12: longer than the worker's
10 s job heartbeat, so a heartbeat fails during it); `FAULT_OUTAGE_S=60 pytest -m fault` checks the 60 s the
issue names.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job

from app.contracts import (
    JOB_FAILURE_TTL_S,
    TRAIN_JOB_FUNC,
    DigitsTrainJobV1,
    TrainEventModel,
    TrainFailedV1,
    parse_event,
)
from app.estimate import latest_throughput
from app.queue import enqueue_train, read_job
from config.settings import Settings, TrainSettings
from tests.support import TEST_GATE_SIZE, LiveProcess, ServedApp, serve, wait_until
from tests.train_support import API_KEY, TINY_TRAINING, start_worker
from worker import data as mnist
from worker.cli.redis_embedded import EmbeddedRedis

pytestmark = pytest.mark.fault

OUTAGE_S = float(os.environ.get("FAULT_OUTAGE_S", "12"))
MODEL_ID = "fault_model"


class ResubscribingListener:
    """Every event on the channel, across Redis restarts (it resubscribes at once, as the relay does)."""

    def __init__(self, url: str, channel: str = "digits:events") -> None:
        self.url, self.channel = url, channel
        self.events: list[TrainEventModel] = []
        self.subscriptions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.subscriptions == 1, what="the listener to subscribe")

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            try:
                pubsub = redis.client.PubSub(client.connection_pool, ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.subscriptions += 1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.1)
                    if message is not None and message["type"] == "message":
                        self.events.append(parse_event(message["data"]))
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()

    def types(self, job_id: str) -> list[str]:
        return [e.type for e in list(self.events) if e.job_id == job_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persistent=True) as embedded:
        yield embedded


@pytest.fixture(scope="module")
def system(server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[ServedApp, LiveProcess, Path]]:
    """The API and one worker (64 images in batches of 8) on the persistent Redis, for the whole module;
    the API's DATA_DIR is root/api, the worker's root/worker."""
    root = tmp_path_factory.mktemp("faults")
    api = serve(Settings.model_validate({"log_level": "WARNING", "redis_url": server.url,
                                         "data_dir": root / "api", "handwriting_api_key": API_KEY,
                                         "api": {"gate_size": TEST_GATE_SIZE}}))
    worker_data = root / "worker"
    worker = start_worker({"REDIS_URL": server.url, **TINY_TRAINING, "TRAIN__LIMIT": "64",
                           "DATA_DIR": str(worker_data), "HANDWRITING_API_URL": api.url,
                           "HANDWRITING_API_KEY": API_KEY}, root, server.url)
    yield api, worker, worker_data
    worker.stop(signal.SIGINT, timeout=3)
    worker.stop(signal.SIGINT, timeout=10)
    api.stop()


@pytest.fixture
def conn(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def _job(request_id: str, epochs: int = 1) -> DigitsTrainJobV1:
    return DigitsTrainJobV1(request_id=request_id, user_id=3, batch_size=8, model_id=MODEL_ID, epochs=epochs)


def _ended(conn: redis.Redis, job_id: str, timeout: float = 180) -> str:
    def done() -> bool:
        view = read_job(conn, "digits", job_id)
        return view is not None and view.status in ("finished", "failed")

    wait_until(done, timeout=timeout, what=f"job {job_id} to end")
    view = read_job(conn, "digits", job_id)
    assert view is not None
    return view.status


def test_the_worker_rides_out_a_redis_restart_mid_job(
    system: tuple[ServedApp, LiveProcess, Path], server: EmbeddedRedis, conn: redis.Redis,
) -> None:
    _, worker, worker_data = system
    api_data = worker_data.parent / "api"
    # A cache cut short by a crash: the job must rebuild around it, not fail on it three times.
    cache = mnist.cache_path(worker_data / "cache")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(mnist.CACHE_MAGIC + b"0" * 64 + b"\nPK\x03\x04 truncated")
    listener = ResubscribingListener(server.url)
    try:
        job_id = enqueue_train(conn, "digits", _job("req-outage"), train=TrainSettings())
        wait_until(lambda: "digits.train.batch.v1" in listener.types(job_id), timeout=120,
                   what="training to be under way")
        horse = Job.fetch(job_id, connection=conn).get_meta()["pid"]
        assert isinstance(horse, int)

        server.halt()  # Redis goes away mid-job: the rest of the run happens without it
        time.sleep(OUTAGE_S)
        # Hold the worker still while Redis comes back and the listener resubscribes, so the listener hears
        # everything the worker kept; then let it go on.
        _signal((worker.proc.pid, horse), signal.SIGSTOP)
        try:
            seen = listener.subscriptions
            server.start()
            wait_until(lambda: listener.subscriptions > seen, what="the listener to resubscribe")
        finally:
            _signal((worker.proc.pid, horse), signal.SIGCONT)

        assert _ended(conn, job_id) == "finished"
        wait_until(lambda: "digits.train.completed.v1" in listener.types(job_id), what="the completed event")
        view = read_job(conn, "digits", job_id)
        assert view is not None and view.result is not None and view.result["uploaded"] is True
        assert view.stage == "completed" and view.progress is not None and view.progress["pct"] == 100.0

        # Every event, once, in order: nothing published during the outage was lost.
        assert listener.types(job_id) == [
            "digits.train.started.v1",
            *["digits.train.progress.v1", "digits.train.batch.v1"] * 8,
            "digits.train.epoch.v1", "digits.train.best.v1", "digits.train.artifact.v1", "digits.train.upload.v1",
            "digits.train.completed.v1",
        ]
        # The model was uploaded exactly once: one stored version, no upload retry, no second run.
        stored = [d for d in (api_data / "models" / MODEL_ID).iterdir() if not d.name.startswith(".")]
        assert len(stored) == 1 and stored[0].name == view.result["version"]
        log = worker.log()
        assert "Redis unreachable" in log and "Redis is back" in log
        assert "skipped, Redis unreachable" in log, "the parent's heartbeat met the outage and survived it"
        assert "upload attempt" not in log and "unhandled exception" not in log
        assert worker.proc.poll() is None, "the worker lives on"
        assert conn.zcard("rq:scheduled:digits") == 0 and conn.llen("rq:queue:digits") == 0

        # The corrupt cache was thrown away (a limited run does not write a full one), not retried into failure.
        assert not cache.exists() and "unusable" in log
        # And the worker recorded its speed for the estimate made at enqueue.
        measured = latest_throughput(conn, "digits")
        assert measured is not None and measured.epoch_images == 64 and measured.device.startswith("cpu")
    finally:
        listener.close()


def test_a_job_past_its_time_limit_fails_once_and_says_so(
    system: tuple[ServedApp, LiveProcess, Path], server: EmbeddedRedis, conn: redis.Redis,
) -> None:
    listener = ResubscribingListener(server.url)
    try:
        # The contract's retry policy, and a time limit 100 epochs cannot meet (long enough for the work-horse's
        # imports: the timeout strikes in training, as it would at 7 h).
        rq_job = Queue("digits", connection=conn).enqueue_call(
            TRAIN_JOB_FUNC, args=(_job("req-timeout", epochs=100).model_dump(mode="json"),), timeout=20,
            failure_ttl=JOB_FAILURE_TTL_S, retry=Retry(max=2, interval=[1, 1]))
        assert _ended(conn, rq_job.id) == "failed"
        wait_until(lambda: "digits.train.failed.v1" in listener.types(rq_job.id), what="the failed event")
        failed = [e for e in listener.events if isinstance(e, TrainFailedV1) and e.job_id == rq_job.id]
        assert len(failed) == 1 and failed[0].error_kind == "system"
        assert "time limit" in failed[0].message and "not retried" in failed[0].message
        time.sleep(2.5)  # past both retry intervals: nothing comes back
        assert conn.zcard("rq:scheduled:digits") == 0 and conn.llen("rq:queue:digits") == 0
        assert Job.fetch(rq_job.id, connection=conn).get_status().value == "failed"
    finally:
        listener.close()


def _signal(pids: tuple[int, ...], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)

