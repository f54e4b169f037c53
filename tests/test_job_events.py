"""`GET /v1/jobs/{id}/events` (Server-Sent Events) and the keyless job view, against the API under uvicorn,
the embedded Redis and a real `digits worker` process running tiny trainings."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support import LiveProcess, ServedApp, wait_until
from tests.train_support import API_KEY, TINY_TRAINING, start_worker

ServeApp = Callable[..., ServedApp]
PUBLIC_FIELDS = {"job_id", "status", "stage", "model_id", "progress", "val_acc", "test_acc", "version", "activated",
                 "gate_decision", "gate_candidate_acc", "gate_active_acc", "activation_reason",
                 "error_kind", "enqueued_at", "started_at", "ended_at"}
PROGRESS_FIELDS = {"epoch", "total_epochs", "batch", "total_batches", "loss", "samples_per_sec", "pct"}


class EventStream:
    """Reads one SSE response event by event: (event name, parsed data) pairs; comments are skipped."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> tuple[str, dict[str, object]] | None:
        name, data = "message", ""
        for line in self._lines:
            if line == "":
                if data:
                    return name, json.loads(data)
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data += value
        return None  # the server closed the stream

    def rest(self) -> list[dict[str, object]]:
        states = []
        while (event := self.next()) is not None:
            assert event[0] == "state"
            states.append(event[1])
        return states


@pytest.fixture
def stack(served_app: ServeApp, redis_url: str, data_dir: Path) -> ServedApp:
    return served_app(data_dir=data_dir, handwriting_api_key=API_KEY, redis_url=redis_url)


@pytest.fixture
def worker(tmp_path: Path, redis_url: str, data_dir: Path, stack: ServedApp) -> Iterator[Callable[[], LiveProcess]]:
    started: list[LiveProcess] = []

    def start() -> LiveProcess:
        env = {"REDIS_URL": redis_url, **TINY_TRAINING, "DATA_DIR": str(data_dir / "worker"),
               "HANDWRITING_API_URL": stack.url, "HANDWRITING_API_KEY": API_KEY}
        started.append(start_worker(env, tmp_path, redis_url))
        return started[-1]

    yield start
    for live in started:
        live.stop(signal.SIGINT, timeout=3)
        live.stop(signal.SIGINT, timeout=10)


def _enqueue(api: ServedApp) -> str:
    r = httpx.post(api.url + "/v1/train", headers={"X-Api-Key": API_KEY},
                   json={"batch_size": 8, "user_id": 4242, "model_id": "digits_sse"})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def test_events_start_with_the_state_now_and_end_after_the_final_one(
    stack: ServedApp, worker: Callable[[], LiveProcess]
) -> None:
    job_id = _enqueue(stack)
    with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = EventStream(response)
        first = stream.next()
        assert first is not None and first[0] == "state"
        assert first[1]["status"] == "queued" and first[1]["job_id"] == job_id and first[1]["progress"] is None
        worker()
        states = [first[1], *stream.rest()]  # returns only because the server ends the stream

    final = states[-1]
    assert final["status"] == "finished" and final["stage"] == "completed"
    assert final["activated"] is True and isinstance(final["version"], str)
    # The first model goes live through the promotion gate with nothing to beat, and the job says so.
    assert final["gate_decision"] == "passed" and "nothing to beat" in str(final["activation_reason"])
    assert isinstance(final["val_acc"], float) and isinstance(final["test_acc"], float)
    assert all(set(s) == PUBLIC_FIELDS for s in states)  # no user id, request id, paths or notes
    # The user id never appears as a value (a timestamp or version may hold the digits 4242 by chance).
    assert not any(value in (4242, "4242") for s in states for value in s.values())
    assert "artifacts" not in json.dumps(states)
    progress = [s["progress"] for s in states if isinstance(s["progress"], dict)]
    assert progress and all(set(p) == PROGRESS_FIELDS for p in progress)
    pcts = [p["pct"] for p in progress]
    assert pcts == sorted(pcts) and pcts[-1] == 100.0
    assert [s["status"] for s in states].count("finished") == 1
    # Each stage once, in the order the work goes (the run's start is not announced as training before its data).
    stages = [s["stage"] for i, s in enumerate(states) if i == 0 or s["stage"] != states[i - 1]["stage"]]
    assert stages == [s for s in ("queued", "preparing", "training", "saving", "uploading", "completed") if s in stages]
    assert len({json.dumps(s, sort_keys=True) for s in states}) == len(states)  # each event is a change

    # A job that has ended: its final state, and the stream closes at once.
    with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", timeout=30) as response:
        assert EventStream(response).rest() == [final]

    # GET /v1/jobs/{id} shows the same public fields without the key (or with a wrong one), everything with it.
    url = f"{stack.url}/v1/jobs/{job_id}"
    assert httpx.get(url).json() == final == httpx.get(url, headers={"X-Api-Key": "wrong"}).json()
    full = httpx.get(url, headers={"X-Api-Key": API_KEY}).json()
    assert full["user_id"] == 4242 and full["request_id"] and Path(str(full["result"]["artifacts_dir"])).is_dir()
    assert full["result"]["version"] == final["version"]


def test_the_stream_survives_losing_its_redis_connections(
    stack: ServedApp, worker: Callable[[], LiveProcess], redis_url: str
) -> None:
    job_id = _enqueue(stack)
    admin = redis.Redis.from_url(redis_url)

    def subscribers() -> int:
        counts = admin.pubsub_numsub("digits:events")
        return int(counts[0][1]) if counts else 0

    try:
        with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", timeout=120) as response:
            stream = EventStream(response)
            first = stream.next()
            assert first is not None and first[1]["status"] == "queued"
            wait_until(lambda: subscribers() == 1, timeout=30, what="the stream to subscribe")
            # Every connection to Redis but this one dropped, as a Redis restart or a network cut would.
            killed = admin.client_kill_filter(_type="pubsub")
            admin.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            wait_until(lambda: subscribers() == 1, timeout=30, what="the stream to subscribe again")
            time.sleep(0.5)
            worker()
            states = stream.rest()
        assert states and states[-1]["status"] == "finished" and states[-1]["activated"] is True
        assert any(isinstance(s["progress"], dict) for s in states)
    finally:
        admin.close()


def test_unknown_jobs_and_no_redis_answer_as_get_job_does(
    stack: ServedApp, served_app: ServeApp, data_dir: Path
) -> None:
    missing = httpx.get(f"{stack.url}/v1/jobs/no-such-job/events")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert httpx.get(f"{stack.url}/v1/jobs/no-such-job").json()["code"] == "not_found"
    without = served_app(data_dir=data_dir)
    r = httpx.get(f"{without.url}/v1/jobs/abc/events")
    assert r.status_code == 503 and r.json()["code"] == "training_unavailable"
