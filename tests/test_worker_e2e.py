"""The real thing: embedded Redis, `digits worker` as its own process, the API on loopback.

Every run is tiny (TRAIN__LIMIT=16) so each job takes seconds; what is checked is the plumbing:
events in order with matching ids, job status through its stages, upload + activation, failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue, Retry, Worker
from rq.job import Job

from app.contracts import (
    LEGACY_JOB_FUNC,
    DigitsTrainJobV1,
    TrainCompletedV1,
    TrainFailedV1,
    TrainProgressV1,
    parse_event,
)
from app.queue import enqueue_train, read_job
from config.settings import TrainSettings
from tests.serving_support import digit_png
from tests.support import LiveProcess, ServedApp, wait_until
from tests.train_support import API_KEY, TINY_TRAINING, EventListener, fake_run_dir, start_worker
from worker.cli.redis_embedded import free_port


@pytest.fixture
def events(redis_url: str) -> Iterator[EventListener]:
    listener = EventListener(redis_url)
    yield listener
    listener.close()


@pytest.fixture
def workers(tmp_path: Path, redis_url: str) -> Iterator[Callable[[dict[str, str]], LiveProcess]]:
    started: list[LiveProcess] = []

    def start(env: dict[str, str]) -> LiveProcess:
        live = start_worker({"REDIS_URL": redis_url, **TINY_TRAINING, **env}, tmp_path, redis_url)
        started.append(live)
        return live

    yield start
    for live in started:
        # Twice: RQ's first SIGINT waits for the job, the second ends it.
        live.stop(signal.SIGINT, timeout=3)
        live.stop(signal.SIGINT, timeout=10)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def _scheduled(conn: redis.Redis) -> int:
    """Jobs waiting for a retry (RQ's ScheduledJobRegistry is a sorted set under this key)."""
    n = conn.zcard("rq:scheduled:digits")
    assert isinstance(n, int)
    return n


# The gateway bot's decoder (issue 15): per event, each required field and its JSON type.
# "number" is a JSON int or float; "int" must be a JSON integer; "str?" is a string or null.
BOT_COMMON = {"type": "str", "request_id": "str", "user_id": "int", "model_id": "str", "run_id": "str?", "ts": "str"}
BOT_REQUIRED: dict[str, dict[str, str]] = {
    "digits.train.started.v1": {"total_epochs": "int"},
    "digits.train.batch.v1": {
        "epoch": "int", "total_epochs": "int", "batch": "int", "total_batches": "int", "batch_loss": "number",
        "batch_acc": "number", "avg_loss": "number", "samples_per_sec": "number", "main_rss_mb": "int",
        "workers_rss_mb": "int", "worker_count": "int", "cgroup_usage_mb": "int", "cgroup_limit_mb": "int",
        "cgroup_pct": "number", "anon_mb": "int", "file_mb": "int",
    },
    "digits.train.epoch.v1": {"epoch": "int", "total_epochs": "int", "train_loss": "number", "val_acc": "number",
                              "time_s": "number"},
    "digits.train.best.v1": {"epoch": "int", "val_acc": "number"},
    "digits.train.artifact.v1": {"path": "str"},
    "digits.train.upload.v1": {"status": "int", "model_bytes": "int", "manifest_bytes": "int"},
    "digits.train.prune.v1": {"deleted_count": "int"},
    "digits.train.completed.v1": {"val_acc": "number"},
    "digits.train.failed.v1": {"error_kind": "str", "message": "str"},
    "digits.train.progress.v1": {},  # ours; the bot ignores it
}
BOT_OPTIONAL = {  # started.v1's optional fields: when present, of these types
    "device": "str", "batch_size": "int", "augment": "bool", "aug_rotate": "number", "aug_translate": "number",
    "noise_prob": "number", "dots_prob": "number", "cpu_cores": "int", "optimal_threads": "int",
    "memory_mb": "int", "optimal_workers": "int", "max_batch_size": "int",
}


def _json_type_ok(value: object, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str?":
        return value is None or isinstance(value, str)
    return isinstance(value, str)


def assert_bot_json_types(message: dict[str, object]) -> None:
    kind = message.get("type")
    assert isinstance(kind, str) and kind in BOT_REQUIRED, f"not an event the family has: {kind}"
    for name, want in {**BOT_COMMON, **BOT_REQUIRED[kind]}.items():
        assert name in message, f"{kind} lacks {name}"
        assert _json_type_ok(message[name], want), f"{kind}.{name} = {message[name]!r} is not a JSON {want}"
    if kind == "digits.train.started.v1":
        for name, want in BOT_OPTIONAL.items():
            if message.get(name) is not None:
                assert _json_type_ok(message[name], want), f"{kind}.{name} = {message[name]!r} is not {want}"
    assert parse_event(json.dumps(message)).type == kind  # and our own model accepts it


def _payload(model_id: str = "mnist_resnet18_v1") -> dict[str, object]:
    return DigitsTrainJobV1(request_id="req-1", user_id=5, batch_size=8, model_id=model_id).model_dump(mode="json")


def test_train_upload_activate_read(
    served_app: Callable[..., ServedApp], workers: Callable[[dict[str, str]], LiveProcess], events: EventListener,
    redis_url: str, data_dir: Path,
) -> None:
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY)
    client = httpx.Client(base_url=api.url, timeout=30)
    r = client.post("/v1/train", headers={"X-Api-Key": API_KEY, "X-Request-ID": "req-e2e"},
                    json={"batch_size": 8, "seed": 3, "user_id": 77, "model_id": "digits_e2e"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    # No worker yet: the job waits in the queue.
    seen = [client.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": API_KEY}).json()]
    assert seen[0]["status"] == "queued"

    # An older uploaded run and one whose upload failed: with one uploaded run kept, the older one goes.
    older = fake_run_dir(data_dir / "worker" / "artifacts", "digits_e2e", "20200101T000000Z-00000000", uploaded=True)
    unsent = fake_run_dir(data_dir / "worker" / "artifacts", "digits_e2e", "20200101T000000Z-11111111", uploaded=False)
    workers({"DATA_DIR": str(data_dir / "worker"), "HANDWRITING_API_URL": api.url, "HANDWRITING_API_KEY": API_KEY,
             "TRAIN__KEEP_ARTIFACTS": "1"})

    def finished() -> bool:
        seen.append(client.get(f"/v1/jobs/{job_id}", headers={"X-Api-Key": API_KEY}).json())
        return seen[-1]["status"] in ("finished", "failed")

    wait_until(finished, timeout=180, what="the job to end")
    final = seen[-1]
    assert final["status"] == "finished", final
    statuses = [s["status"] for s in seen]
    assert statuses.index("queued") < statuses.index("started") < statuses.index("finished")
    training = [s for s in seen if s["status"] == "started" and s["progress"]]
    assert training and training[-1]["progress"]["total_batches"] == 2
    result = final["result"]
    assert result["activated"] is True and result["uploaded"] is True and result["model_id"] == "digits_e2e"
    assert final["progress"]["pct"] == 100.0 and final["stage"] == "completed"

    completed = events.wait_for(job_id, "digits.train.completed.v1")
    assert isinstance(completed, TrainCompletedV1)
    mine = events.for_job(job_id)
    types = [e.type for e in mine]
    # The bot's family in order (2 batches at PROGRESS_EVERY=1), our own progress.v1 beside each batch.
    assert [t for t in types if t != "digits.train.progress.v1"] == [
        "digits.train.started.v1", "digits.train.batch.v1", "digits.train.batch.v1", "digits.train.epoch.v1",
        "digits.train.best.v1", "digits.train.artifact.v1", "digits.train.upload.v1", "digits.train.prune.v1",
        "digits.train.completed.v1",
    ]
    assert types.count("digits.train.progress.v1") == 2
    assert {(e.request_id, e.user_id, e.model_id) for e in mine} == {("req-e2e", 77, "digits_e2e")}
    assert len({e.run_id for e in mine}) == 1 and mine[0].run_id  # one run, one id, on every event
    raw = events.raw_for_job(job_id)
    assert [m["type"] for m in raw] == types
    for message in raw:
        assert_bot_json_types(message)
    started, batch, epoch, artifact, upload, prune = (
        next(m for m in raw if m["type"] == f"digits.train.{name}.v1")
        for name in ("started", "batch", "epoch", "artifact", "upload", "prune"))
    assert (started["batch_size"], started["augment"], started["total_epochs"]) == (8, True, 1)
    assert isinstance(started["device"], str) and started["device"].startswith("cpu")
    assert isinstance(batch["main_rss_mb"], int) and batch["main_rss_mb"] > 50  # a process with torch loaded
    acc = batch["batch_acc"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and (batch["batch"], batch["total_batches"]) == (1, 2)
    assert epoch["val_acc"] == completed.val_acc
    assert artifact["path"] == result["artifacts_dir"]
    assert upload["status"] == 200
    assert prune["deleted_count"] == 1 and not older.exists() and (unsent / "model.pt").is_file()
    assert upload["model_bytes"] == Path(result["artifacts_dir"], "model.pt").stat().st_size
    assert upload["manifest_bytes"] == Path(result["artifacts_dir"], "manifest.json").stat().st_size
    progress = [e for e in mine if isinstance(e, TrainProgressV1)]
    assert [p.pct for p in progress] == [50.0, 100.0]
    assert [e.ts for e in mine] == sorted(e.ts for e in mine)
    assert completed.version == result["version"] and completed.activated
    assert completed.val_acc == result["val_acc"] and completed.test_acc == result["test_acc"]

    active = client.get("/v1/models/active").json()
    assert active["model_loaded"] is True and active["version"] == result["version"]
    assert active["model_id"] == "digits_e2e" and active["train_samples"] == 16
    read = client.post("/v1/read", files={"file": ("d.png", digit_png(), "image/png")})
    assert read.status_code == 200, read.text
    assert read.json()["version"] == result["version"] and read.json()["model_id"] == "digits_e2e"
    assert Path(result["artifacts_dir"], "model.pt").is_file()
    client.close()


def test_legacy_target_runs_and_rq_sees_the_worker(
    workers: Callable[[dict[str, str]], LiveProcess], events: EventListener, conn: redis.Redis, redis_url: str,
    data_dir: Path,
) -> None:
    workers({"DATA_DIR": str(data_dir)})
    info = subprocess.run([str(Path(sys.executable).parent / "rq"), "info", "--url", redis_url],
                          capture_output=True, text=True, timeout=60)
    assert "1 workers" in info.stdout or "1 worker" in info.stdout, info.stdout + info.stderr

    # Exactly as the existing bot enqueues it: its own function string, its own RQ options.
    job = Queue("digits", connection=conn).enqueue(LEGACY_JOB_FUNC, _payload(model_id="legacy_m"),
                                                    job_timeout=600, retry=Retry(max=2, interval=[60, 300]))
    completed = events.wait_for(job.id, "digits.train.completed.v1")
    assert isinstance(completed, TrainCompletedV1)
    assert (completed.request_id, completed.user_id, completed.model_id) == ("req-1", 5, "legacy_m")
    assert completed.activated is False  # no HANDWRITING_API_KEY for this worker: nothing uploaded
    view = read_job(conn, "digits", job.id)
    assert view is not None and view.status == "finished"
    assert view.result is not None and "HANDWRITING_API_KEY" in str(view.result["upload_note"])
    assert events.for_job(job.id)[0].type == "digits.train.started.v1"


def _failed_runs(conn: redis.Redis) -> int:
    """Runs of any job that ended in failure, as the (one) worker counts them: RQ adds one per failed run."""
    workers = Worker.all(connection=conn)
    assert len(workers) == 1
    return workers[0].failed_job_count


def test_invalid_payload_fails_at_once_as_a_user_error_without_retry(
    workers: Callable[[dict[str, str]], LiveProcess], events: EventListener, conn: redis.Redis, data_dir: Path,
) -> None:
    workers({"DATA_DIR": str(data_dir)})
    bad = {**_payload(), "epochs": 0, "augment": "yes"}
    # A retry an hour later: were the user error retried, the job would sit scheduled, not failed.
    job = Queue("digits", connection=conn).enqueue(LEGACY_JOB_FUNC, bad, retry=Retry(max=2, interval=[3600]))

    def settled() -> bool:
        return Job.fetch(job.id, connection=conn).get_status().value not in ("queued", "started")

    wait_until(settled, timeout=60, what="the job's first run to end")
    assert Job.fetch(job.id, connection=conn).get_status().value == "failed"
    assert _scheduled(conn) == 0, "a user error was scheduled for a retry"
    failed = events.wait_for(job.id, "digits.train.failed.v1", timeout=60)
    # RQ counts the failed run in the worker's statistics just after it marks the job failed.
    wait_until(lambda: _failed_runs(conn) >= 1, timeout=10, what="the worker to count the failed run")
    assert _failed_runs(conn) == 1, "the job ran more than once"
    assert isinstance(failed, TrainFailedV1)
    assert failed.error_kind == "user" and "epochs" in failed.message and "augment" in failed.message
    assert (failed.request_id, failed.user_id) == ("req-1", 5)
    assert [e.type for e in events.for_job(job.id)] == ["digits.train.failed.v1"]  # no training started
    [raw] = events.raw_for_job(job.id)
    assert_bot_json_types(raw)
    assert raw["run_id"] is None  # no run began
    view = read_job(conn, "digits", job.id)
    assert view is not None and view.status == "failed"
    assert view.error == {"kind": "user", "message": failed.message}
    assert conn.llen("rq:queue:digits") == 0


def test_upload_target_down_retries_then_fails_keeping_the_artifacts(
    workers: Callable[[dict[str, str]], LiveProcess], events: EventListener, conn: redis.Redis, data_dir: Path,
) -> None:
    worker = workers({"DATA_DIR": str(data_dir), "HANDWRITING_API_URL": f"http://127.0.0.1:{free_port()}",
                      "HANDWRITING_API_KEY": API_KEY, "TRAIN__UPLOAD_ATTEMPTS": "3",
                      "TRAIN__UPLOAD_BACKOFF_S": "0.05"})
    job_id = enqueue_train(conn, "digits", DigitsTrainJobV1(request_id="req-up", user_id=1, batch_size=8),
                           train=TrainSettings())
    failed = events.wait_for(job_id, "digits.train.failed.v1")
    assert isinstance(failed, TrainFailedV1)
    assert failed.error_kind == "system" and "after 3 attempts" in failed.message
    kept = Path(failed.message.rsplit("kept at ", 1)[1])
    assert kept.is_relative_to(data_dir / "artifacts") and (kept / "model.pt").is_file()
    assert (kept / "manifest.json").is_file()
    log = worker.log()
    assert "upload attempt 1/3" in log and "upload attempt 2/3" in log
    view = read_job(conn, "digits", job_id)
    assert view is not None and view.status == "failed" and view.error is not None
    assert view.error["message"] == failed.message
    assert _scheduled(conn) == 0, "a failed upload is not re-trained"


def test_work_horse_killed_mid_training_ends_failed_with_an_event(
    workers: Callable[[dict[str, str]], LiveProcess], events: EventListener, conn: redis.Redis, data_dir: Path,
) -> None:
    worker = workers({"DATA_DIR": str(data_dir), "TRAIN__LIMIT": "400"})
    job_id = enqueue_train(conn, "digits", DigitsTrainJobV1(request_id="req-kill", user_id=9, batch_size=4),
                           train=TrainSettings())
    events.wait_for(job_id, "digits.train.progress.v1")
    pid = Job.fetch(job_id, connection=conn).get_meta()["pid"]
    assert isinstance(pid, int) and pid != worker.proc.pid
    os.kill(pid, signal.SIGKILL)

    failed = events.wait_for(job_id, "digits.train.failed.v1", timeout=60)
    assert isinstance(failed, TrainFailedV1)
    assert failed.error_kind == "system" and "SIGKILL" in failed.message
    assert (failed.request_id, failed.user_id) == ("req-kill", 9)
    assert failed.run_id is not None and failed.run_id == events.for_job(job_id)[0].run_id
    for raw in events.raw_for_job(job_id):
        assert_bot_json_types(raw)
    view = read_job(conn, "digits", job_id)
    assert view is not None and view.status == "failed" and view.stage == "failed"
    assert view.progress is not None and view.progress["epoch"] == 1  # what it got to is kept
    assert _scheduled(conn) == 0
    assert worker.proc.poll() is None, "the worker itself lives on"
